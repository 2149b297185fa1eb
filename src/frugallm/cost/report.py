"""The measured cost of a run: what the training loop writes to ``RUN_DIR/cost.json`` and what
``frugallm cost --from-run`` reads back to extrapolate.

cost.json fields (stable; extra fields may be added, none removed):
    wall_seconds            training wall-clock seconds counted
    device_kind             catalogue key ('h800', 'h100-sxm' ...) or 'cpu'
    device_count            devices the run used
    device_hours            wall_seconds * device_count / 3600
    tokens                  trained tokens (positions that got a next-token loss)
    seq_len                 sequence length the FLOP model used
    flops_per_token         frugallm.cost.flops.train_flops_per_token(cfg, seq_len) (causal attention, MTP)
    flops                   flops_per_token * tokens
    achieved_tflops         flops / wall_seconds / device_count / 1e12, per device
    peak_tflops_per_device  the peak the MFU is measured against (null when unknown)
    mfu                     achieved / peak (null when the peak is unknown)
    price_per_device_hour   USD (null when unknown)
    cost_usd                device_hours * price_per_device_hour (null when the price is unknown)
    tokens_per_second       tokens / wall_seconds, all devices together
Written by ``frugallm train`` beside these (not needed by ``--from-run``):
    memory_estimate         frugallm.cost.memory.training_memory per device, in bytes by part and total,
                            as checked before the run started
    memory_peak_bytes       measured: the GPU allocator's peak, or on a CPU the process's peak resident set
    memory_peak_source      which of the two
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.cost.flops import train_flops_per_token
from frugallm.errors import ConfigError

COST_FILE = "cost.json"
REQUIRED_FIELDS = ("wall_seconds", "device_kind", "device_count", "tokens", "flops", "achieved_tflops",
                   "tokens_per_second")


def _positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def run_cost(*, cfg: ModelConfig, seq_len: int, tokens: int, wall_seconds: float, device_kind: str,
             device_count: int, price_per_device_hour: float | None,
             peak_flops_per_device: float | None) -> dict[str, Any]:
    """The cost.json record of a run that trained ``tokens`` tokens in ``wall_seconds`` on
    ``device_count`` devices. FLOPs come from the FLOP model, not from a counter, so runs compare. ``tokens``
    may be 0 (an RL run whose every group carried no signal trains nothing, yet its time still cost)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ConfigError(f"tokens must be an integer >= 0, got {tokens!r}")
    _positive("wall_seconds", wall_seconds)
    _positive("device_count", device_count)
    _positive("price_per_device_hour", price_per_device_hour, allow_none=True)
    _positive("peak_flops_per_device", peak_flops_per_device, allow_none=True)
    per_token = train_flops_per_token(cfg, seq_len)
    flops = per_token * tokens
    achieved = flops / wall_seconds / device_count  # FLOP/s per device
    device_hours = wall_seconds * device_count / 3600
    return {
        "wall_seconds": float(wall_seconds),
        "device_kind": device_kind,
        "device_count": int(device_count),
        "device_hours": device_hours,
        "tokens": int(tokens),
        "seq_len": int(seq_len),
        "flops_per_token": per_token,
        "flops": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops_per_device": None if peak_flops_per_device is None else peak_flops_per_device / 1e12,
        "mfu": None if peak_flops_per_device is None else achieved / peak_flops_per_device,
        "price_per_device_hour": price_per_device_hour,
        "cost_usd": None if price_per_device_hour is None else device_hours * price_per_device_hour,
        "tokens_per_second": tokens / wall_seconds,
    }


def write_cost_json(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``run_dir/cost.json`` atomically: a temporary file in the same directory, then
    ``os.replace``, so a reader never sees half a file and an interrupted run keeps the previous one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / COST_FILE
    return fsio.write_json(path, record)


def read_cost_json(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / COST_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: --from-run needs a run directory with a cost.json "
                          f"(written by the training loop)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")
    for name in ("wall_seconds", "device_count", "tokens", "achieved_tflops", "tokens_per_second"):
        _positive(f"{path.name} {name}", record[name])
    return record


def run_model_config(run_dir: str | Path) -> ModelConfig:
    """The model of a run: ``config.toml``'s ``[model]`` table, or ``model/config.json`` (HF format).
    TOML has no null: the training loop lists fields that are None (``q_lora_rank`` ...) in ``unset``."""
    from frugallm.config import load_model_config, model_config_from_table, read_toml

    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if path.is_file():
        table = dict(read_toml(path).get("model", {}))
        for name in table.pop("unset", []):
            table[name] = None
        return model_config_from_table(table, where=str(path))
    if (run_dir / "model" / "config.json").is_file():
        return load_model_config(run_dir / "model" / "config.json")
    raise ConfigError(f"{run_dir}: no config.toml or model/config.json to read the model from; "
                      f"pass --preset or --config")


__all__ = ["COST_FILE", "read_cost_json", "run_cost", "run_model_config", "write_cost_json"]
