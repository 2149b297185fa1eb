"""``config.toml`` of a run: a ``[model]`` table (ModelConfig fields) and a ``[train]`` table (TrainConfig
fields). TOML has no null, so fields set to None are listed in each table's ``unset`` array."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from frugallm import fsio
from frugallm.config import ModelConfig, model_config_from_table, read_toml
from frugallm.errors import ConfigError
from frugallm.train.config import TrainConfig


def _table(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if v is not None}
    unset = sorted(k for k, v in d.items() if v is None)
    if unset:
        out["unset"] = unset
    return out


def _untable(t: dict[str, Any]) -> dict[str, Any]:
    t = dict(t)
    for k in t.pop("unset", []):
        t[k] = None
    return t


def write_run_config(path: Path, model: ModelConfig, train: TrainConfig) -> None:
    text = tomli_w.dumps({"model": _table(model.to_dict()), "train": _table(train.to_dict())})
    fsio.write_text(path, text)


def read_run_config(path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """A run's config.toml, or any TOML with ``[model]`` (optionally ``preset = NAME``) and ``[train]``."""
    data = read_toml(path)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; allowed: model, train")
    model = model_config_from_table(data.get("model", {"preset": "tiny"}), where=str(path))
    try:
        train = TrainConfig.from_dict(_untable(data.get("train", {})))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return model, train
