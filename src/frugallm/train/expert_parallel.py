"""Expert parallelism: the routed experts of each MoE layer split across an expert-parallel (ep) group, tokens
sent to the ranks that hold their experts and their outputs brought back, with ``all_to_all_single``.

Symbols: R ranks in the ep group, E routed experts, E_l = E / R experts per rank (ep rank r holds experts
[r*E_l, (r+1)*E_l)), N tokens on this rank, k experts per token, H hidden, P = N*k (token, expert) pairs this
rank sends, M pairs it receives.

``ExpertParallelExperts.forward(x [N, H], indices [N, k], gates [N, k])``, on every rank of the group at once:
    sort the pairs by expert (stable), as GroupedExperts does        xs [P, H], counts [E]
    exchange counts: all_to_all_single of counts viewed [R, E_l]     recv [R, E_l]: pairs rank s sends me
                                                                     for my local expert j
    dispatch: all_to_all_single(xs), send splits = counts summed per destination rank,
              receive splits = recv summed per source rank          xr [M, H], by source, then by expert
    stable sort by local expert (source order kept inside an expert) xe [M, H], recv.sum(0) [E_l] per expert
    run the local experts (the replaced module's run_sorted)         ye [M, H]
    undo the sort; combine: all_to_all_single back, splits swapped   ys [P, H] in this rank's sorted order
    weight by the gates and sum per token (index_add_), as GroupedExperts does  -> [N, H]
Nothing is dropped or padded: the splits are exactly what the router chose (dropless, variable sizes), and
the counts travel first so every rank can size its buffers. The backward of an all-to-all is the
all-to-all of the gradients with the splits swapped (``_AllToAll``).

Inside one expert the received rows are ordered by source rank, then by position on that rank. Rank s holds
rows [s*B/R, (s+1)*B/R) of the global batch, so this is the order one process sees the same batch in: every
expert multiplies the same rows in the same order, which keeps the run equal to a single-process one.

Under autocast the pairs are cast to the compute dtype before they travel (bf16: half of fp32's bytes); the
experts would cast them on arrival anyway, so the numbers are unchanged.

Group-limited routing and the layout. The router keeps topk_group of n_group groups of E/n_group consecutive
experts, and ranks hold consecutive blocks of E_l experts, so the two line up by construction. When the
groups nest inside ranks (n_group a multiple of R) a token's pairs go to at most min(topk_group, k) ranks:
DeepSeek-V3's node-limited routing (8 groups of 32 experts, one per node, 4 kept) is this with one group per
node. ``max_ranks_per_token`` gives the bound for any layout and ``ranks_reached`` measures it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from frugallm.config import ModelConfig
from frugallm.model.moe import GroupedExperts, MoE


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows [sum(in_splits), ...] -> [sum(out_splits), ...]; backward swaps the splits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:j]) : ...]`` to rank j of ``group``; receive ``out_splits[j]`` rows from
    rank j. Differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """This rank's E_l experts of one MoE layer, holding ``gate_up_proj [E, 2*I_m, H]`` and
    ``down_proj [E, H, I_m]`` as DTensors sharded on dim 0 over the ep mesh (global shapes and names as
    ``GroupedExperts``, so state dicts and sharded checkpoints see the whole layer)."""

    def __init__(self, experts: GroupedExperts, ep_mesh: Any):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        self.ep_size, self.ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
        self.n_experts, self.intermediate = experts.n_experts, experts.intermediate
        if self.n_experts % self.ep_size:
            raise ValueError(f"{self.n_experts} experts do not split over {self.ep_size} ranks")
        self.n_local = self.n_experts // self.ep_size
        self.group = ep_mesh.get_group()
        lo = self.ep_rank * self.n_local
        # every rank built the same full layer from the same seed: keep our slice, no communication needed
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = full.detach()[lo:lo + self.n_local].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False),
                                             requires_grad=full.requires_grad))
            delattr(experts, name)
        # The replaced module still computes: its run_sorted (one matmul per expert, grouped_mm on CUDA, or
        # FP8 GEMMs for Fp8GroupedExperts) runs on this rank's weights, lent to it for each call. It is kept
        # unregistered and without parameters of its own, so names and state dicts see ours only.
        object.__setattr__(self, "_kernel", experts)

    def _local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self.gate_up_proj, self.down_proj
        return (gate_up.to_local() if hasattr(gate_up, "to_local") else gate_up,  # [E_l, 2*I_m, H]
                down.to_local() if hasattr(down, "to_local") else down)  # [E_l, H, I_m]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/gates [N, k] -> sum_j gates[:, j] * expert_{indices[:, j]}(x)  [N, H]."""
        R, El, k = self.ep_size, self.n_local, indices.shape[1]
        flat = indices.reshape(-1)  # [P]
        order = flat.argsort(stable=True)  # pairs sorted by expert, hence by destination rank
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        token = order // k  # [P] source token of each sorted pair
        xs = x[token]  # [P, H]
        if torch.is_autocast_enabled(x.device.type):
            xs = xs.to(torch.get_autocast_dtype(x.device.type))
        recv = torch.empty_like(counts)  # [R*E_l]: row s = what rank s sends to each of my experts
        dist.all_to_all_single(recv, counts, group=self.group)
        send_splits = counts.view(R, El).sum(1).tolist()  # [R] pairs to each rank
        recv_splits = recv.view(R, El).sum(1).tolist()  # [R] pairs from each rank
        xr = all_to_all(xs, recv_splits, send_splits, self.group)  # [M, H]
        local_expert = torch.arange(El, device=x.device).repeat(R).repeat_interleave(recv)  # [M]
        perm = local_expert.argsort(stable=True)  # by expert, source order kept
        gate_up, down = self._local_weights()
        xe = xr[perm]  # [M, H]
        kernel = self._kernel
        # plain attributes, past nn.Module's parameter checks (to_local of a parameter may be one)
        kernel.__dict__.update(gate_up_proj=gate_up, down_proj=down)
        try:
            ye = kernel.run_sorted(xe, recv.view(R, El).sum(0))  # [M, H]
        finally:  # lent, not given: FSDP frees the gathered weights after the layer
            kernel.__dict__.update(gate_up_proj=None, down_proj=None)
        if ye.shape[0] == 0:
            # nothing arrived: keep both all-to-alls and the weights in the graph anyway, or this rank would
            # skip the dispatch's backward all-to-all that the other ranks run, and leave the weights gradless
            ye = xe + 0.0 * (gate_up.sum() + down.sum()).to(xe.dtype)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        ys = all_to_all(ye[inverse], send_splits, recv_splits, self.group)  # [P, H]
        ys = ys * gates.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)


def apply_expert_parallel(model: nn.Module, ep_mesh: Any) -> int:
    """Replace every MoE layer's experts (main blocks and MTP blocks) by this rank's share; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, GroupedExperts):
            module.experts = ExpertParallelExperts(module.experts, ep_mesh)  # type: ignore[assignment]
            n += 1
    return n


def max_ranks_per_token(cfg: ModelConfig, ep: int) -> int:
    """The most ep ranks one token's pairs can reach under the model's group-limited routing."""
    E, G, g, k = cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
    per_rank, per_group = E // ep, E // G
    if G > 1 and per_rank % per_group == 0:  # whole groups on each rank
        return min(g, k, ep)
    if G > 1 and per_group % per_rank == 0:  # each group spread over per_group / per_rank ranks
        return min(g * (per_group // per_rank), k, ep)
    return min(k, ep)


def ranks_reached(indices: torch.Tensor, experts_per_rank: int) -> torch.Tensor:
    """indices [N, k] -> [N] the number of distinct ranks each token's experts live on."""
    ranks = indices // experts_per_rank  # [N, k]
    n_ranks = int(ranks.max()) + 1 if ranks.numel() else 1
    hit = torch.zeros(indices.shape[0], n_ranks, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, ranks, True)
    return hit.sum(1)
