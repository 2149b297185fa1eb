"""Checkpoints of a run: ``checkpoints/step_NNNNNN/`` holding ``model.safetensors`` (our parameter and buffer
names), ``optimizer.pt``, and ``state.json`` (step, tokens, elapsed time, loader position, RNG states).

Each checkpoint is written to a temporary directory and renamed into place, so a crash mid-write leaves
the previous checkpoints intact and never a half-written one under a real name; ``state.json`` is the
last file written. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from frugallm.errors import CheckpointError

STATE = "state.json"


def _rng_state() -> dict[str, str]:
    buf = io.BytesIO()
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(states, buf)
    return {"torch": base64.b64encode(buf.getvalue()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    states = torch.load(io.BytesIO(base64.b64decode(state["torch"])), weights_only=False)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 3) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # tied weights share storage; safetensors wants each storage once
        seen: dict[int, str] = {}
        for k in list(tensors):
            ptr = tensors[k].data_ptr()
            if ptr in seen:
                tensors[k] = tensors[k].clone()
            seen[ptr] = k
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        full = {**state, "step": step, "rng": _rng_state(), "complete": True}
        (tmp / STATE).write_text(json.dumps(full))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> dict[str, Any]:
    from frugallm.train.dist_checkpoint import is_sharded, load_sharded_checkpoint

    if is_sharded(path):  # written by a multi-process run: DCP reads it into this (plain) model
        return load_sharded_checkpoint(path, model, optimizer)
    try:
        state = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / "model.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as e:  # safetensors raises its own types
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                              f"was it written with another model configuration?")
    for k, v in own.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model expects "
                                  f"{tuple(v.shape)}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    _set_rng_state(state["rng"])
    return state


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A run's model: its final Hugging Face export when present, else its newest checkpoint (``frugallm.rundir``)."""
    from frugallm.rundir import load_model

    return load_model(run_dir, device=device)[0]
