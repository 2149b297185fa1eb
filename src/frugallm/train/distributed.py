"""Scale-out on torch.distributed, applied to the model from outside (the model files hold no distributed code).

Launch. ``torchrun --nproc-per-node N -m frugallm train ...`` (or ``frugallm train --nproc N``, which re-runs
itself through torch's elastic launcher) starts N processes; ``Dist.from_env`` reads RANK, WORLD_SIZE and
LOCAL_RANK and initialises the process group: NCCL on GPUs, gloo on CPUs. With one process every collective
here is the identity and the model is left as built.

Layout. A device mesh with named dimensions

    world = dp x ep          mesh dims ("dp", "ep"), rank = dp_index * ep + ep_index

Expert parallelism borrows its ranks from data parallelism, as DeepSeek-V3 and torchtitan do: every rank
reads its own share of the global batch (``TokenLoader(rank=, world_size=)``), so the batch is cut world ways
whatever dp and ep are. What dp and ep decide is where the weights live:

    non-expert parameters    FSDP2 over all ranks (the flattened "dp_ep" mesh): Shard(0), world ways
    routed experts           split over "ep" (rank e of the group keeps experts [e*E/ep, (e+1)*E/ep), a DTensor
                             Shard(0) on the ep mesh), then FSDP2 over "dp"
    buffers                  replicated; the balancing bias gets the same update on every rank because the
                             loop sums the expert loads over all ranks before updating it

``parallelize(model)`` applies, in this fixed order: expert parallelism (each ``MoE.experts`` becomes an
``ExpertParallelExperts``), FSDP2 on each expert group (dp mesh), on each decoder and MTP block, and at the
root. Activation checkpointing, when asked, wraps the blocks before (``apply_activation_checkpointing``), so
FSDP shards the wrapped blocks as torchtitan does.

Gradients. FSDP2 averages the non-expert gradients over the world. An expert's gradient reaches its owner
through the backward all-to-all already summed over the ep ranks whose tokens it served; FSDP2 then sums it
over dp and divides by the world size (``set_gradient_divide_factor``). Both are the gradient of the mean loss
over the global batch, the quantity one process computes, which is what the equivalence tests check.

Control flow. Every decision that depends on a clock or a signal (time budget, evaluation, checkpoint, Ctrl-C)
is agreed across ranks with ``any`` before it is acted on: ranks that disagreed would issue different
collectives and hang.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.errors import ConfigError

TIMEOUT_ENV = "FRUGALLM_DIST_TIMEOUT_S"
# long enough for rank 0 to tokenise a corpus while the others wait at a barrier; a rank that dies does not
# wait for it, as the launcher stops the whole job when any process exits with an error
DEFAULT_TIMEOUT_S = 1800.0


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's and MTP module's activations in the backward pass instead of keeping
    them (the memory model, ``frugallm.cost.memory``, counts both as recomputed)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for blocks in (model.model.layers, model.model.mtp):  # type: ignore[attr-defined]
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)


def mesh_shape(world_size: int, *, dp: int | None = None, ep: int = 1) -> tuple[int, int]:
    """(dp, ep) for ``world_size`` processes; dp defaults to world_size // ep. Errors name the fields."""
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"ep must be a positive integer, got {ep!r}")
    if dp is not None and (not isinstance(dp, int) or dp < 1):
        raise ConfigError(f"dp must be a positive integer or unset, got {dp!r}")
    if world_size % ep:
        raise ConfigError(f"the world size {world_size} is not divisible by ep={ep}: start a multiple of {ep} "
                          f"processes (--nproc / torchrun --nproc-per-node) or change --ep")
    dp = world_size // ep if dp is None else dp
    if dp * ep != world_size:
        raise ConfigError(f"dp={dp} x ep={ep} = {dp * ep} processes, but the world size is {world_size}; "
                          f"leave --dp unset to use world_size / ep")
    return dp, ep


def check_expert_parallel(cfg: ModelConfig, ep: int) -> None:
    """ep must split the routed experts evenly: each rank holds E / ep whole experts."""
    if ep == 1:
        return
    if cfg.ffn != "moe":
        raise ConfigError(f"ep={ep} splits routed experts, but this model has a dense FFN (ffn={cfg.ffn!r}); "
                          f"use ep=1")
    E = cfg.n_routed_experts
    if ep > E:
        raise ConfigError(f"ep={ep} asks for more expert-parallel ranks than the model has routed experts "
                          f"(n_routed_experts={E}); use ep <= {E}")
    if E % ep:
        raise ConfigError(f"n_routed_experts={E} is not divisible by ep={ep}: every rank must hold the same "
                          f"number of experts")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp: int = 1
    ep: int = 1
    backend: str | None = None
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh with dims ("dp", "ep"); None on one process
    reshard_after_forward: bool = True  # FSDP2: free gathered block weights after forward (memory) or keep them

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, *, dp: int | None = None, ep: int = 1, timeout_s: float | None = None) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dp, ep = mesh_shape(world, dp=dp, ep=ep)  # validate before any process group exists
        if world <= 1:
            return cls()
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            timeout = timeout_s or float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
            # a finite timeout: a collective that can never complete fails instead of hanging forever
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
        return cls(rank=rank, world_size=world, local_rank=local, device=device, dp=dp, ep=ep,
                   backend=backend, mesh=mesh)

    def check(self, model_cfg: ModelConfig, batch_size: int, grad_accum: int = 1) -> None:
        """Validate the run against this layout before any data or weights are touched."""
        check_expert_parallel(model_cfg, self.ep)
        if batch_size % (self.world_size * grad_accum):
            raise ConfigError(f"batch_size={batch_size} must be divisible by the world size {self.world_size} "
                              f"x grad_accum={grad_accum}: every rank runs the same number of equal micro-batches")

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size={batch_size} must be divisible by the world size {self.world_size}")

    def describe(self) -> str:
        if self.world_size == 1:
            return "1 process"
        return f"{self.world_size} processes ({self.backend}), mesh dp={self.dp} x ep={self.ep}"

    # ----- model wrapping ------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Expert parallelism, then FSDP2 per expert group, per block and at the root (module docstring)."""
        if self.world_size == 1:
            return model
        from torch.distributed.fsdp import fully_shard

        from frugallm.precision import update_recipes
        from frugallm.train.expert_parallel import ExpertParallelExperts, apply_expert_parallel

        # FP8 linears would keep whole e4m3 copies of weights that are sharded here: they quantize again instead
        update_recipes(model, cache_weights=False)
        if self.ep > 1:
            check_expert_parallel(model.config, self.ep)  # type: ignore[attr-defined]
            apply_expert_parallel(model, self.mesh["ep"])
        # one FSDP group over every rank for the non-expert weights: ep ranks read different data too
        world_mesh = self.mesh["dp", "ep"]._flatten("dp_ep")
        blocks = list(model.model.layers) + list(model.model.mtp)  # type: ignore[attr-defined]
        for block in blocks:
            for module in block.modules():
                if isinstance(module, ExpertParallelExperts):
                    experts = fully_shard(module, mesh=self.mesh["dp"],
                                          reshard_after_forward=self.reshard_after_forward)
                    experts.set_gradient_divide_factor(float(self.world_size))
                    # gloo has no PREMUL_SUM: sum, then divide. Not with dp = 1, where torch 2.13 divides
                    # twice when summing is forced (measured: expert gradients came out halved)
                    if self.backend == "gloo" and self.dp > 1:
                        experts.set_force_sum_reduction_for_comms(True)
            head = getattr(block, "shared_head", None)
            if head is not None:
                # an MTP block's head norm runs from the root's forward after the block has returned and
                # resharded: as its own unit it gathers its weight when called
                fully_shard(head.norm, mesh=world_mesh, reshard_after_forward=self.reshard_after_forward)
            fully_shard(block, mesh=world_mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=world_mesh)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model  # FSDP2 keeps the module's class and names

    def gather_model(self, model: nn.Module) -> nn.Module | None:
        """A plain, unsharded copy of the model on rank 0's CPU (None on the other ranks), for the final
        export; with one process, the model itself. Collective: every rank must call it."""
        if self.world_size == 1:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from frugallm.model import build_model

        # experts sharded over dp and ep are gathered in two steps, which torch warns about on every rank
        quiet = logging.getLogger("torch.distributed.tensor._redistribute")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        finally:
            quiet.setLevel(level)
        if not self.is_main:
            return None
        plain = build_model(model.config, device="cpu", init=False)  # type: ignore[attr-defined]
        plain.load_state_dict(full)
        return plain

    # ----- collectives --------------------------------------------------------------------------------
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm`` (no clipping when <= 0) and return the norm.

        Sharded gradients live on different meshes (experts on dp x ep, the rest on the flattened world),
        which torch's clip_grad_norm_ cannot stack; each rank sums the squares of its own shards instead,
        counting a replicated shard once, and one all-reduce gives the total."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.world_size == 1:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            return float(norm)
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        locals_ = []
        for p in params:
            g = p.grad
            if isinstance(g, DTensor):
                copies = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if p.is_replicate())
                local = g.to_local()
            else:  # an unsharded parameter: the same gradient on every rank
                copies, local = self.world_size, g
            sq += local.float().pow(2).sum() / copies
            locals_.append(local)
        dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch's clip_grad_norm_
            for local in locals_:
                local.mul_(coef.to(local.dtype))
        return float(norm)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(t) / self.world_size if self.world_size > 1 else t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return self.any_each(flag)[0]

    def any_each(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks, in one collective."""
        if self.world_size == 1:
            return tuple(bool(f) for f in flags)
        import torch.distributed as dist

        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def rank_errors() -> Iterator[None]:
    """Under torchrun, log any error with the rank that raised it and record it for the elastic agent,
    whose failure summary then names that rank as the root cause; then re-raise."""
    try:
        yield
    except BaseException as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            rank = os.environ.get("RANK", "?")
            print(f"frugallm [rank {rank}/{world}]: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if os.environ.get("TORCHELASTIC_ERROR_FILE"):
                from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

                ErrorHandler().record_exception(e)
        raise
