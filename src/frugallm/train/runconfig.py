"""``config.toml`` of a run: a ``[model]`` table (ModelConfig fields) and a ``[train]`` table (TrainConfig
fields), and for a fine-tuning run a ``[finetune]`` table (``frugallm.tune.finetune.FinetuneConfig``, which
this module passes through as a plain table: train knows nothing of tune). TOML has no null, so fields set
to None are listed in each table's ``unset`` array."""

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


TABLES = ("model", "train", "finetune", "rl")


def write_run_config(path: Path, model: ModelConfig, train: TrainConfig,
                     finetune: dict[str, Any] | None = None, rl: dict[str, Any] | None = None) -> None:
    tables = {"model": _table(model.to_dict()), "train": _table(train.to_dict())}
    if finetune is not None:
        tables["finetune"] = _table(finetune)
    if rl is not None:
        tables["rl"] = _table(rl)
    fsio.write_text(path, tomli_w.dumps(tables))


def read_finetune_table(path: str | Path) -> dict[str, Any] | None:
    """The ``[finetune]`` table of a run's config.toml (None fields restored), or None for other runs."""
    table = read_toml(path).get("finetune")
    return None if table is None else _untable(table)


def read_rl_table(path: str | Path) -> dict[str, Any] | None:
    """The ``[rl]`` table of an RL run's config.toml (``frugallm.rl.trainer.RLConfig``), or None."""
    table = read_toml(path).get("rl")
    return None if table is None else _untable(table)


def read_run_config(path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """A run's config.toml, or any TOML with ``[model]`` (optionally ``preset = NAME``) and ``[train]``."""
    data = read_toml(path)
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; allowed: {', '.join(TABLES)}")
    model = model_config_from_table(data.get("model", {"preset": "tiny"}), where=str(path))
    try:
        train = TrainConfig.from_dict(_untable(data.get("train", {})))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return model, train
