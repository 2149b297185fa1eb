"""The shape shared by the cost catalogues (``hardware.toml``, ``prices.toml``): a built-in TOML table of
entries, a user file (argument or environment variable) merged over it field by field, and validation that
names the entry and the field."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from frugallm.config import read_toml
from frugallm.errors import ConfigError


def merged_entries(builtin: str, user_file: str | Path | None, env: str, *, what: str, record: type,
                   required: Sequence[str], normalise: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """Entries of ``frugallm/cost/<builtin>`` with ``user_file`` (or ``$<env>``) merged over them, keyed by
    ``normalise(key)``; each entry's fields checked against the dataclass ``record`` (its ``key`` aside)
    and ``required``. ``what`` names an entry in messages ('hardware', 'price')."""
    with resources.as_file(resources.files("frugallm.cost") / builtin) as path:
        table = {normalise(k): dict(v) for k, v in read_toml(path).items()}
    user = user_file or os.environ.get(env)
    if user:
        for key, entry in read_toml(user).items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{user}: [{key}] must be a table of {what} fields")
            table.setdefault(normalise(key), {}).update(entry)
    allowed = {f.name for f in fields(record)} - {"key"}
    for key, entry in table.items():
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ConfigError(f"{what} entry [{key}]: unknown field(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(allowed))}")
        missing = [f for f in required if f not in entry]
        if missing:
            raise ConfigError(f"{what} entry [{key}]: missing {', '.join(missing)}")
    return table
