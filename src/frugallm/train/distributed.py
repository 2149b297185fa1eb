"""Scale-out on torch.distributed, applied to the model from outside (the model file has no distributed code).

``Dist.from_env()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); with one process every
collective is the identity. With several it initialises the process group (NCCL on GPUs, gloo on CPUs)
and ``parallelize(model)`` applies, in this order: activation checkpointing (when asked), then FSDP2
(``torch.distributed.fsdp.fully_shard``) per decoder block and at the root, so parameters, gradients and
optimizer states are sharded over the data-parallel ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from frugallm.errors import ConfigError


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in the backward pass instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers  # type: ignore[attr-defined]
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float = 300.0) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            # a finite timeout: a rank that dies makes the others fail instead of hanging forever
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(rank=rank, world_size=world, local_rank=local, device=device)

    # ----- model wrapping ------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.distributed.fsdp import fully_shard

        for layer in list(model.model.layers) + list(model.model.mtp):  # type: ignore[attr-defined]
            fully_shard(layer)
        fully_shard(model)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model  # FSDP2 keeps the module's class and names

    # ----- collectives --------------------------------------------------------------------------------
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                              max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
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

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size={batch_size} must be divisible by the world size {self.world_size}")
