"""What the single-process and the sharded checkpoint formats share: ``state.json`` and its RNG states, the
list of a run's checkpoints, and reading ``optimizer.pt``.

A checkpoint directory comes from the user (``--resume RUN``), so nothing in it may run code when read.
``state.json`` is JSON, RNG states included (the raw generator bytes in base64); ``optimizer.pt`` is read with
``torch.load(weights_only=True)``, which unpickles only tensors and plain containers and refuses anything
else, such as an object whose ``__reduce__`` would call a function.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from frugallm.errors import CheckpointError

STATE = "state.json"
SHARDED_FORMAT = "dcp"  # state.json's "format" in a torch.distributed.checkpoint directory


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ``state.json`` is the last file a checkpoint gets."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE).is_file())


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    file = Path(path) / STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint state ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a checkpoint state (a JSON object)")
    return state


def is_sharded(path: Path) -> bool:
    try:
        return read_state(path).get("format") == SHARDED_FORMAT
    except CheckpointError:
        return False


def load_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = Path(path) / "model.safetensors"
    try:
        return safetensors.torch.load_file(str(file))
    except Exception as e:  # safetensors raises its own types
        raise CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None


def load_tensor_file(file: Path) -> Any:
    """A ``torch.save`` file of tensors and plain values; a file holding anything else is refused unread."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: refused: it holds objects other than tensors and plain values "
                              f"(a pickle that could run code when loaded), or is damaged") from None
    except Exception as e:  # a missing or truncated file: OSError, RuntimeError from the zip reader, EOFError
        raise CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, file: Path) -> None:
    saved = load_tensor_file(file)
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: does not fit this run's optimizer ({str(e).splitlines()[0]})") from None


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """The torch generators (CPU, and every CUDA device) as JSON. Nothing in frugallm draws from Python's
    ``random`` or numpy's global generator (the loader's order is a seeded permutation), so they are not kept."""
    state: dict[str, Any] = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], where: Path) -> None:
    """``where`` names the checkpoint in errors."""
    try:
        if "torch" in state:  # written before the JSON form: base64 of a torch.save of {"cpu", "cuda"}
            old = torch.load(io.BytesIO(base64.b64decode(state["torch"])), weights_only=True)
            cpu, cuda = old["cpu"], old.get("cuda")
        else:
            cpu = _unb64(state["torch_cpu"])
            cuda = [_unb64(s) for s in state["torch_cuda"]] if "torch_cuda" in state else None
        torch.set_rng_state(cpu)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{where / STATE}: refused: its RNG state holds objects other than tensors "
                              f"(a pickle that could run code when loaded)") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where / STATE}: unreadable RNG state ({type(e).__name__}: {e})") from None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
