"""Checkpoints of a run: ``checkpoints/step_NNNNNN/`` holding ``model.safetensors`` (our parameter and buffer
names), ``optimizer.pt`` (read back with ``weights_only=True``: tensors and plain values only), and
``state.json`` (step, tokens, elapsed time, loader position, RNG states; see ``checkpoint_state``).

Each checkpoint is written to a temporary directory and renamed into place, so a crash mid-write leaves
the previous checkpoints intact and never a half-written one under a real name; ``state.json`` is the
last file written. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from frugallm import fsio
from frugallm.errors import CheckpointError
from frugallm.train.checkpoint_state import (
    STATE,
    is_sharded,
    list_checkpoints,
    load_model_tensors,
    load_optimizer_state,
    prune_checkpoints,
    read_state,
    rng_state,
    set_rng_state,
)
from frugallm.train.dist_checkpoint import load_sharded_checkpoint


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 3, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """``tensors``: what to keep of the model (a LoRA run keeps its adapters and the frozen base is read
    again from where it came from); None keeps its whole state dict."""
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    own = model.state_dict() if tensors is None else tensors
    with fsio.atomic_dir(final) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in own.items()}
        # tied weights share storage; safetensors wants each storage once
        seen: dict[int, str] = {}
        for k in list(tensors):
            ptr = tensors[k].data_ptr()
            if ptr in seen:
                tensors[k] = tensors[k].clone()
            seen[ptr] = k
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        full = {**state, "step": step, "rng": rng_state(), "complete": True}
        (tmp / STATE).write_text(json.dumps(full))
    prune_checkpoints(run_dir, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Into ``model`` (or only into ``tensors``, the model's tensors ``save_checkpoint`` was given), the
    optimizer and the RNGs; returns the checkpoint's state."""
    if is_sharded(path):  # written by a multi-process run: DCP reads it into this (plain) model
        return load_sharded_checkpoint(path, model, optimizer)
    state = read_state(path)
    own = model.state_dict() if tensors is None else tensors
    tensors = load_model_tensors(path)
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
        load_optimizer_state(optimizer, path / "optimizer.pt")
    set_rng_state(state["rng"], path)
    return state
