"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), for runs on more than one process.

A sharded ``checkpoints/step_NNNNNN/`` holds DCP's files, ``*.distcp`` (each rank's chunks) and ``.metadata``
(every tensor's global shape and which chunk lies where), for ``{"model": ..., "optim": ...}`` keyed by
parameter name, and ``state.json`` as a single-process checkpoint has it (step, tokens, loader position, RNG)
plus ``"format": "dcp"`` and the layout it was written at. Every rank writes its chunks into
``.step_NNNNNN.tmp``; when all are done rank 0 writes ``state.json`` last and renames the directory into place,
so a crash leaves the earlier checkpoints and never a half-written one under a real name. The run directory
must be on a filesystem every rank sees.

Resharding. DCP stores global tensors cut into chunks and a load reads the chunks the reading layout needs, so
a checkpoint written at one world size or (dp, ep) layout loads at another, including one process, which
reads full tensors into the plain model (``checkpoint.load_checkpoint`` hands such directories here). The
other way round, a single-process checkpoint (``model.safetensors`` + ``optimizer.pt``) loads into a sharded
model: every rank reads the full tensors and keeps its own shard.

Reading is pickle-free where the user's files could run code: DCP unpickles ``.metadata`` with plain
``pickle``, so ``check_metadata`` first reads it with an unpickler that admits only the classes DCP's
metadata is made of; the ``*.distcp`` chunks DCP itself reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frugallm import fsio
from frugallm.errors import CheckpointError
from frugallm.train.checkpoint_state import (
    SHARDED_FORMAT,
    STATE,
    is_sharded,
    load_model_tensors,
    load_tensor_file,
    prune_checkpoints,
    read_state,
    rng_state,
    set_rng_state,
)

METADATA = ".metadata"
# (module, names) DCP's metadata pickles refer to; None: any class defined in that module
_METADATA_GLOBALS: dict[str, frozenset[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":  # torch.Size and the dtype, layout and memory-format constants
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif module in _METADATA_GLOBALS:  # checked before importing: an import can run code
            allowed = _METADATA_GLOBALS[module]
            obj = getattr(importlib.import_module(module), name, None)
            if (name in allowed) if allowed is not None else (isinstance(obj, type) and obj.__module__ == module):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def check_metadata(path: Path) -> None:
    """Read ``.metadata`` admitting only DCP's metadata classes, so that the ``pickle.load`` DCP then runs on
    it cannot call anything else."""
    file = Path(path) / METADATA
    try:
        with open(file, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused: {e} (a pickle that could run code when loaded)") from None
    except Exception as e:  # missing, truncated
        raise CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], dist: Any, keep: int = 3) -> Path:
    """Collective: every rank calls it with its shard of the model and optimizer. ``dist`` is the ``Dist``."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"  # one name every rank knows without a broadcast
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash
        tmp.mkdir()
    dist.barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.is_main:
        full = {**state, "step": step, "rng": rng_state(), "complete": True, "format": SHARDED_FORMAT,
                "world_size": dist.world_size, "dp": dist.dp, "ep": dist.ep}
        fsio.write_json(tmp / STATE, full, indent=None)
        fsio.replace_dir(tmp, final)
        prune_checkpoints(run_dir, keep)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
                            ) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) at whatever layout they have now, one
    process included. Collective when a process group is up."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    state = read_state(path)
    check_metadata(path)
    import torch.distributed as dist

    sds = _state_dicts(model, optimizer)
    try:
        with warnings.catch_warnings():
            # one process without a process group reads every chunk itself, as intended: no warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sds, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as e:  # DCP wraps missing keys and shape mismatches in its own exceptions
        raise CheckpointError(f"{path}: cannot load this sharded checkpoint into the model "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); was it written "
                              f"with another model configuration?") from None
    if optimizer is None:
        set_model_state_dict(model, sds["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=sds["model"], optim_state_dict=sds["optim"])
    set_rng_state(state["rng"], path)
    return state


def _clean_fqn(name: str) -> str:
    # activation checkpointing wraps blocks; state-dict names leave the wrapper out
    return name.replace("_checkpoint_wrapped_module.", "")


def load_single_into_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
                             ) -> dict[str, Any]:
    """A single-process checkpoint into a sharded model: each rank reads the full tensors and keeps its
    shard. ``optimizer.pt`` numbers parameters in the order the optimizer was built; this run's optimizer
    was built the same way over the same names, so position i of each group names parameter i."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    state = read_state(path)
    tensors = load_model_tensors(path)
    full = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, tensors, options=full)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load into the model ({str(e).splitlines()[0]}); was it "
                              f"written with another model configuration?") from None
    if optimizer is not None:
        saved = load_tensor_file(path / "optimizer.pt")
        names = {id(p): _clean_fqn(n) for n, p in model.named_parameters()}
        if len(saved["param_groups"]) != len(optimizer.param_groups):
            raise CheckpointError(f"{path}: the optimizer has {len(saved['param_groups'])} parameter groups, "
                                  f"this run's has {len(optimizer.param_groups)}")
        by_name: dict[str, Any] = {"state": {}, "param_groups": []}
        for g_saved, g_live in zip(saved["param_groups"], optimizer.param_groups, strict=True):
            if len(g_saved["params"]) != len(g_live["params"]):
                raise CheckpointError(f"{path}: optimizer groups differ in size from this run's")
            fqns = [names[id(p)] for p in g_live["params"]]
            for idx, fqn in zip(g_saved["params"], fqns, strict=True):
                if idx in saved["state"]:
                    by_name["state"][fqn] = saved["state"][idx]
            by_name["param_groups"].append({**g_saved, "params": fqns})
        set_optimizer_state_dict(model, optimizer, by_name, options=full)
    set_rng_state(state["rng"], path)
    return state


def load_any_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
                        ) -> dict[str, Any]:
    """Into a sharded (multi-process) model, whichever format the checkpoint has."""
    if is_sharded(path):
        return load_sharded_checkpoint(path, model, optimizer)
    return load_single_into_sharded(path, model, optimizer)
