"""DeepSeekMoE (V3 report, section 2.1.2): shared experts always on, fine-grained routed experts chosen by a
sigmoid router with group-limited selection, auxiliary-loss-free balancing through a per-expert bias,
and a small sequence-wise balance loss. No token is ever dropped.

Symbols: N tokens (B*S), E routed experts, k experts per token, G groups (n_group), g groups kept
(topk_group), I_m expert width.

Routing, for each token:
    s = sigmoid(x W_r^T)                         [N, E] affinities, in float32 (the router stays high precision)
    choice = s + b                               b: the balancing bias, a buffer, used for selection only
    group score = sum of the top 2 `choice` in each group; keep the best g groups, mask the rest
    idx = top-k of `choice` among kept experts   [N, k]
    gate = s[idx] (/ sum when norm_topk_prob) * routed_scaling_factor
The bias never enters gate values, so balancing changes who is chosen but not how outputs mix. That is V3's
``topk_method = noaux_tc``. DeepSeek-V2 scores with a softmax (``scoring_func``) and picks either the top-k
of all experts (``greedy``, V2-Lite) or the top-k inside the g groups whose best single score is highest
(``group_limited_greedy``, V2); its checkpoints carry no bias, which stays zero.

Experts run grouped: the N*k (token, expert) pairs are sorted by expert so that every expert sees one
contiguous slice, computed with one ``torch._grouped_mm`` or one matmul per expert, as the kernel policy
chooses (``frugallm.kernels.experts``, which on the CPU also pads each expert's rows to a bucket size so
that oneDNN reuses its bf16 kernels). Results go back to token order through the inverse permutation and
are mixed by the gates with one batched matmul. Dispatch and combine are gathers in both directions
(their backward gathers through the inverse permutation), never a scatter-add. Weights are stored
stacked, ``gate_up_proj [E, 2*I_m, H]`` and ``down_proj [E, H, I_m]``, which is what expert parallelism
shards on dim 0.

Sequence-wise balance loss (eq. 17-20), per sequence of length S:
    f_i = E / (k*S) * #{t : i in idx_t},   P_i = mean_t s_{t,i} / sum_j s_{t,j},   L = sum_i f_i P_i
returned unweighted (mean over the sequences); the training loop multiplies it by alpha.

Batch-wise auxiliary balance loss, the classic alternative that ``frugallm lab balancing`` measures V3's
bias against: DeepSeek-V2's expert-level balance loss (arXiv 2405.04434, eq. 12-14) over all N counted
tokens of the batch at once,
    f_i = E / (k*N) * #{t : i in idx_t},   P_i = mean_t s_{t,i} / sum_j s_{t,j},   L_aux = sum_i f_i P_i
which is 1 when the load is uniform and for k = 1 is exactly Switch Transformer's E * sum_i f_i P_i
(arXiv 2101.03961, eq. 4, f_i there the fraction of tokens). Returned unweighted; the loop multiplies it by
``TrainConfig.aux_loss_alpha`` (default 0: V3 trains without it). The gradient reaches the router through
P only; f counts selections and carries none, as in both papers.

Packed rows (``frugallm.tune.sft``) pass ``TokenGroups``: each example is a sequence of its own (S its
length), padding (and, in an MTP block, the positions with nothing to predict) is in none, so that neither
the balance loss nor ``MoEStats.load`` counts it and a packed example adds what it would alone. Routing and
the expert computation are unchanged for every token, padding included: its outputs are simply never
trained, and skipping it would cost a gather where it saves only the padding's share of expert FLOPs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.config import ModelConfig
from frugallm.kernels import KernelPolicy
from frugallm.kernels.experts import from_buckets, grouped_mm_applies, to_buckets
from frugallm.model.layers import MLP, swiglu


class RouterOutput(NamedTuple):
    indices: torch.Tensor  # [N, k] int64
    gates: torch.Tensor  # [N, k] float32
    scores: torch.Tensor  # [N, E] float32 affinities (unbiased)


class MoEStats(NamedTuple):
    balance_loss: torch.Tensor  # scalar, unweighted sequence-wise balance loss
    load: torch.Tensor  # [E] tokens routed to each expert (detached)
    aux_loss: torch.Tensor | None = None  # scalar, unweighted batch-wise auxiliary balance loss


class TokenGroups(NamedTuple):
    """The sequences the balance statistics run over when they are not the batch rows, and which tokens they
    count: ``index`` [N] the group 0 .. count-1 of each token, -1 for a token counted nowhere."""

    index: torch.Tensor  # [N] int64
    count: int

    @staticmethod
    def of_segments(segment_ids: torch.Tensor) -> TokenGroups:
        """One group per (row, segment) of segment_ids [B, S] (segments contiguous, 0 is padding)."""
        starts = torch.ones_like(segment_ids, dtype=torch.bool)  # [B, S] where a segment begins
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        starts &= segment_ids != 0
        index = starts.reshape(-1).cumsum(0) - 1  # [N]
        return TokenGroups(torch.where(segment_ids.reshape(-1) != 0, index, -1), int(starts.sum()))

    def only(self, keep: torch.Tensor) -> TokenGroups:
        """The same groups counting only the tokens where ``keep`` [B, S] (or [N]) is True."""
        return TokenGroups(torch.where(keep.reshape(-1), self.index, -1), self.count)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # the bias accumulates steps of gamma = 1e-3: keep it float32 when the model is cast
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: [N, H]."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # [N, E]
        if self.n_group > 1 and self.method != "greedy":
            grouped = choice.unflatten(-1, (self.n_group, -1))  # [N, G, E/G]
            if self.method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            else:
                group_score = grouped.amax(dim=-1)  # [N, G] (V2's group-limited greedy)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)  # [N, G]
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
        indices = choice.topk(self.top_k, dim=-1).indices  # [N, k]
        gates = scores.gather(1, indices)  # [N, k]
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(indices, gates * self.scaling, scores)


class ExpertGroups(NamedTuple):
    """How the sorted rows split among the experts, as one ``GroupedExperts.group`` call laid them out."""

    sizes: list[int]  # rows of each expert's contiguous slice (bucket-padded where the policy pads)
    offs: torch.Tensor | None  # [E] int32 end offsets for ``torch._grouped_mm``; None: one GEMM per expert
    dest: torch.Tensor | None  # [M] each real row's padded row (``from_buckets``), None when unpadded


def grouped_linear(xs: torch.Tensor, weight: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """Each expert's rows times its matrix: xs [rows, K] laid out by ``groups``, weight [E, N, K] -> [rows, N]:
    one grouped GEMM where ``groups.offs`` is set, else one GEMM per expert. LoRA's adapters and the
    experts' own weights both go through here."""
    if groups.offs is not None:
        return torch._grouped_mm(xs, weight.transpose(-2, -1), offs=groups.offs)
    outs = []
    # unbind, not weight[e]: the backward of one unbind is one stack, where E selects would each allocate
    # and add a zero gradient of the whole stacked weight
    for chunk, w in zip(xs.split(groups.sizes), weight.unbind(0), strict=True):
        if chunk.shape[0]:
            outs.append(F.linear(chunk, w))  # [m_e, N]
    return torch.cat(outs) if outs else xs.new_zeros(0, weight.shape[1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run on tokens sorted by expert.

    ``run_sorted`` is ``group`` (the layout of the rows), then ``project`` twice with the SwiGLU between:
    subclasses change how one projection runs (FP8 GEMMs, a LoRA adapter beside the frozen weight, frozen
    e4m3 weights) by overriding ``project`` and, if their GEMMs want other rows, ``group``."""

    kernels = KernelPolicy()  # grouped GEMM or row buckets (``frugallm.kernels``); build_model sets the model's
    PROJECTIONS = ("gate_up_proj", "down_proj")

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.n_experts, self.intermediate = n_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))

    @property
    def hidden(self) -> int:
        return self.down_proj.shape[1]

    def compute_dtype(self, xs: torch.Tensor) -> torch.dtype:
        dev = xs.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs.dtype

    def group(self, xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ExpertGroups]:
        """xs [M, H] sorted by expert, counts [E] -> the rows the GEMMs run on and their layout: as they are
        for one grouped GEMM (bf16 on CUDA), else padded to bucket sizes where the policy pads."""
        if grouped_mm_applies(xs, self.kernels):
            return xs, ExpertGroups(counts.tolist(), counts.cumsum(0).to(torch.int32), None)
        rows, sizes, dest = to_buckets(xs, counts, self.kernels)  # [rows, H], rows >= M where padded
        return rows, ExpertGroups(sizes, None, dest)

    def project(self, xs: torch.Tensor, which: str, groups: ExpertGroups) -> torch.Tensor:
        """One projection (``which`` in PROJECTIONS) of every expert's rows: [rows, K] -> [rows, N]."""
        return grouped_linear(xs, getattr(self, which).to(xs.dtype), groups)

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, H] sorted by expert, counts [E]: apply each expert to its contiguous slice -> [M, H]."""
        xs = xs.to(self.compute_dtype(xs))
        rows, groups = self.group(xs, counts)
        if groups.offs is None and type(self).project is GroupedExperts.project:
            ys = self._expert_by_expert(rows, groups)
        else:
            h = self.project(rows, "gate_up_proj", groups)  # [rows, 2*I_m]
            ys = self.project(swiglu(h), "down_proj", groups)  # [rows, H]
        return from_buckets(ys, groups.dest)  # [M, H]

    def _expert_by_expert(self, rows: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """Both projections one expert at a time: the same GEMMs as two ``project`` calls, but each expert's
        [m_e, 2I] intermediate is small and freed before the next, where one [rows, 2I] buffer for all
        experts is large enough for the allocator to map it fresh (page faults) on every step."""
        gate_up, down = self.gate_up_proj.to(rows.dtype), self.down_proj.to(rows.dtype)
        outs = []
        for chunk, w_gu, w_d in zip(rows.split(groups.sizes), gate_up.unbind(0), down.unbind(0), strict=True):
            if chunk.shape[0]:
                outs.append(F.linear(swiglu(F.linear(chunk, w_gu)), w_d))  # [m_e, 2I] -> [m_e, H]
        return torch.cat(outs) if outs else rows.new_zeros(0, self.hidden)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/gates [N, k] -> sum_j gates[:, j] * expert_{indices[:, j]}(x)  [N, H]."""
        N, k = indices.shape
        flat = indices.reshape(-1)  # [N*k] pair p = t*k + j
        order = flat.argsort(stable=True)  # sorted slot -> pair
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # pair -> sorted slot
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        ys = self.run_sorted(_Dispatch.apply(x, order, inverse, k), counts)  # [N*k, H], sorted by expert
        ys = _Permute.apply(ys, inverse, order).view(N, k, -1)  # back to pair order [N, k, H]
        return torch.bmm(gates.unsqueeze(1).to(ys.dtype), ys).squeeze(1).to(x.dtype)  # [N, H]


class _Dispatch(torch.autograd.Function):
    """xs[i] = x[order[i] // k]: each token copied to its k sorted slots. The backward gathers each token's
    k slot gradients through the inverse permutation and sums them: gathers only, no scatter-add."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse).view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """Rows permuted by ``perm``; the gradient goes back through the inverse permutation (a gather)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, groups: TokenGroups | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x: [B, S, H] -> ([B, S, H], stats); ``groups``: the statistics' sequences, else the batch rows."""
        B, S, H = x.shape
        flat = x.reshape(B * S, H)  # [N, H]
        route = self.gate(flat)
        out = self.experts(flat, route.indices, route.gates).view(B, S, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if groups is None:
            load = self.load(route.indices)
            return out, MoEStats(self.balance_loss(route, B, S), load, self.batch_balance_loss(route, load))
        counted = groups.index >= 0  # [N]
        load = self.load(route.indices, counted)
        return out, MoEStats(self.grouped_balance_loss(route, groups), load,
                             self.batch_balance_loss(route, load, counted))

    def load(self, indices: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens routed to each expert [E], of the tokens ``counted`` [N] only where given."""
        if counted is not None:  # the others go to one more bin, dropped: no sync, as boolean indexing would
            indices = torch.where(counted[:, None], indices, self.n_experts)  # [N, k]
            return torch.bincount(indices.reshape(-1), minlength=self.n_experts + 1)[: self.n_experts].detach()
        return torch.bincount(indices.reshape(-1), minlength=self.n_experts).detach()  # [E]

    def balance_loss(self, route: RouterOutput, B: int, S: int) -> torch.Tensor:
        probs = route.scores / route.scores.sum(-1, keepdim=True)  # [N, E]
        P = probs.view(B, S, -1).mean(1)  # [B, E]
        E = self.n_experts
        seq = torch.arange(B, device=probs.device).repeat_interleave(S * self.top_k)  # [B*S*k]
        hits = torch.bincount(seq * E + route.indices.reshape(-1), minlength=B * E).view(B, E)
        f = hits.to(probs.dtype) * (E / (self.top_k * S))  # [B, E]
        return (f * P).sum(-1).mean()

    def grouped_balance_loss(self, route: RouterOutput, groups: TokenGroups) -> torch.Tensor:
        """``balance_loss`` with ``groups`` as the sequences (S_g the tokens each counts), averaged over the
        groups that count any token; the batch rows as groups give ``balance_loss`` itself."""
        probs = route.scores / route.scores.sum(-1, keepdim=True)  # [N, E]
        E, G = self.n_experts, groups.count
        slot = torch.where(groups.index >= 0, groups.index, G)  # [N]; bin G gathers the uncounted, dropped
        n = torch.bincount(slot, minlength=G + 1)[:G]  # [G] tokens each group counts
        per = n.clamp(min=1).to(probs.dtype)[:, None]  # [G, 1]
        P = probs.new_zeros(G + 1, E).index_add(0, slot, probs)[:G] / per  # [G, E]
        pairs = (slot[:, None] * E + route.indices).reshape(-1)  # [N*k]
        hits = torch.bincount(pairs, minlength=(G + 1) * E).view(G + 1, E)[:G]  # [G, E]
        f = hits.to(probs.dtype) * (E / self.top_k) / per  # [G, E]
        return (f * P).sum() / (n > 0).sum().clamp(min=1)

    def batch_balance_loss(self, route: RouterOutput, load: torch.Tensor,
                           counted: torch.Tensor | None = None) -> torch.Tensor:
        """The batch-wise auxiliary loss (module doc) over the tokens ``counted`` [N] (all when None), from
        ``load`` [E], those tokens' selections per expert."""
        probs = route.scores / route.scores.sum(-1, keepdim=True)  # [N, E]
        if counted is None:
            n = probs.new_tensor(float(probs.shape[0]))
            P = probs.mean(0)  # [E]
        else:
            w = counted.to(probs.dtype)  # [N]
            n = w.sum().clamp(min=1)
            P = (w[:, None] * probs).sum(0) / n  # [E]
        f = load.to(probs.dtype) * (self.n_experts / self.top_k) / n  # [E]
        return (f * P).sum()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded
        ones, by a fixed step gamma (V3 report, eq. 16 and section 4.2)."""
        load = load.to(self.gate.e_score_correction_bias.device, torch.float32)
        self.gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
