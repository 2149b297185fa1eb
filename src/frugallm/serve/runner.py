"""Running the model over the paged cache: the main layers and the MTP block for a batch of sequences that
each bring a few new tokens, with attention reading every earlier token from ``BlockPool``.

Symbols (DeepSeek-V3 sizes in brackets): B sequences, S new tokens per sequence (padded), T keys (the longest
sequence's length), n_h heads [128], d_n qk_nope [128], d_r qk_rope [64], d_v v_head [128], r kv_lora_rank [512],
W = r + d_r [576] the cached row.

Each layer runs the block's own halves, ``layer.attention`` then ``layer.ffn`` (``model.block``), the MTP module
first its own ``combine``; only the attention step differs from the model's forward: it gets a
``CachedAttention``, which attends with the cache and applies o_proj. A block's cache layer is its
``layer_idx`` (main layers 0 .. L-1, the first MTP module L, as checkpoints number them). Attention with the
cache is one of three classes behind one call, ``method(attn, x, rope, rows, batch)``:

``MLAExpanded`` (prefill; also a reference decode path)
    c_kv, k_rope = compress_kv(x)            written to the cache, then all T rows read back
    K = [W_UK c_kv, k_rope], V = W_UV c_kv   rebuilt per head for all T keys: T*r*n_h*(d_n+d_v) MACs
    out = softmax(q K^T * scale) V           through ``MLA.attend_expanded``
``MLAAbsorbed`` (decode)
    q_lat = q_nope W_UK                      [B, n_h, S, r]     W_UK moves onto the query side
    scores = [q_lat | q_rope] . row          [B, n_h, S, T]     one matmul over the cached rows as stored
    o_lat = softmax(scores * scale) c_kv     [B, n_h, S, r]
    out = o_lat W_UV^T                       [B, S, n_h*d_v]    W_UV after attention
    per token: T*n_h*(W + r) MACs, against the expanded path's T*r*n_h*(d_n+d_v) re-expansion
``KVHeads`` (the MHA/GQA baselines): rows are [k | v] per KV head, a plain paged KV cache.

Positions: query s of sequence b sits at ``start_b + s``; it sees keys 0 .. start_b + s. The MTP block's row
for position p lives at slot(p + 1) (see ``cache``), so its batch is built with ``shift=1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.model.attention import MLA, RopeTable
from frugallm.model.block import DecoderLayer
from frugallm.model.transformer import DeepseekV3LM
from frugallm.serve.adapters import MultiLoraLinear
from frugallm.serve.cache import BlockPool
from frugallm.serve.ffn import ffn_half


@dataclass
class Row:
    """One sequence's part of a forward: ``n`` new tokens at positions ``start ..``; positions below
    ``write_from`` are already cached (recomputed only for their hidden state) and are not written again."""

    table: list[int]
    start: int
    n: int
    write_from: int
    adapter: int = 0  # the LoRA adapter this row runs with (serve.adapters; 0: the base model)


@dataclass
class PagedBatch:
    positions: torch.Tensor  # [B, S] absolute position of each query
    key_slots: torch.Tensor  # [B, T] cache slot of each key position (padding points at slot 0, masked)
    mask: torch.Tensor | None  # [B, 1, S, T] True where the query may attend; None: every key, every query
    write_rows: torch.Tensor  # [N_w] flat query index (b*S + s) whose row is written
    write_slots: torch.Tensor  # [N_w] and where
    contiguous: bool  # one sequence, no padding: the model's own causal attention applies
    key_start: int | None = None  # one sequence whose T key slots are consecutive: the first (read as a view)

    @property
    def start(self) -> int:
        return int(self.positions[0, 0])


def paged_batch(rows: list[Row], block_size: int, shift: int = 0, device: torch.device | None = None
                ) -> PagedBatch:
    """Index tensors for one forward. Built from Python lists with few tensor ops: on a CPU this runs once
    per step and its op count is part of every token's latency."""
    bs = block_size
    B, S = len(rows), max(r.n for r in rows)
    T = max(r.start + r.n for r in rows)
    n_blk = max(len(r.table) for r in rows)
    write_rows, write_slots = [], []
    for b, r in enumerate(rows):
        assert len(r.table) * bs >= r.start + r.n + shift, "blocks are allocated before a forward"
        for s in range(max(r.write_from - r.start, 0), r.n):
            q = r.start + s + shift
            write_rows.append(b * S + s)
            write_slots.append(r.table[q // bs] * bs + q % bs)
    tables = torch.tensor([r.table + [0] * (n_blk - len(r.table)) for r in rows])  # [B, n_blk]
    all_slots = (tables[:, :, None] * bs + torch.arange(bs)).flatten(1)  # [B, n_blk*bs]
    key_slots = all_slots[:, shift : shift + T]  # [B, T]
    positions = torch.tensor([[r.start + s for s in range(S)] for r in rows])  # [B, S]
    mask = None
    if not (B == 1 and S == 1):
        mask = (torch.arange(T)[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, S, T]
    contiguous = B == 1 and rows[0].n == S
    key_start = None
    if B == 1:  # one sequence: its blocks are often consecutive (the free list hands out low ids first)
        first, last = shift // bs, (shift + T - 1) // bs
        table = rows[0].table
        if table[last] - table[first] == last - first and all(
                table[i + 1] == table[i] + 1 for i in range(first, last)):
            key_start = table[first] * bs + shift % bs
    to = dict(device=device)
    return PagedBatch(positions.to(**to), key_slots.to(**to), None if mask is None else mask.to(**to),
                      torch.tensor(write_rows, dtype=torch.long, **to),
                      torch.tensor(write_slots, dtype=torch.long, **to), contiguous, key_start)


def store_and_gather(cache: torch.Tensor, entries: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """Write the new rows (entries [B, S, W]) into ``cache`` [slots, W] and read back every key row
    [B, T, W]: attention sees exactly what later steps will read."""
    B, S, W = entries.shape
    new = entries.reshape(B * S, W).index_select(0, batch.write_rows)  # [N_w, W]
    cache.index_copy_(0, batch.write_slots, new.to(cache.dtype))
    T = batch.key_slots.shape[1]
    if batch.key_start is not None:  # consecutive slots: a view of the cache, no copy of the context
        keys = cache.narrow(0, batch.key_start, T).unsqueeze(0)  # [1, T, W]
    else:
        keys = cache.index_select(0, batch.key_slots.flatten()).view(B, T, W)  # [B, T, W]
    return keys.to(entries.dtype)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """q [B, h, S, d], k [B, h, T, d], v [B, h, T, d_v], mask [B, 1, S, T] or None -> [B, S, h*d_v]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, h, S, d_v]
    return out.transpose(1, 2).flatten(2)


def _query_and_cached_rows(attn: MLA, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                           cache: torch.Tensor, batch: PagedBatch
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query ([B, n_h, S, d_n], rotated [B, n_h, S, d_r]) and, after storing the new tokens' latent and
    rope key, every cached [c_kv | k_rope] row the batch attends to [B, T, r + d_r]."""
    q_nope, q_rope = attn.project_q(x, rope)
    kv_latent, k_rope = attn.compress_kv(x, rope)  # [B, S, r], [B, S, d_r]
    return q_nope, q_rope, store_and_gather(cache, torch.cat([kv_latent, k_rope], dim=-1), batch)


class MLAExpanded:
    """Rebuild per-head K and V from the cached latent (the training path, used for prefill)."""

    name = "expanded"

    def __call__(self, attn: MLA, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 cache: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        q_nope, q_rope, rows = _query_and_cached_rows(attn, x, rope, cache, batch)
        kv_latent, k_rope = rows.split([attn.kv_rank, attn.d_rope], dim=-1)
        if batch.contiguous:
            return attn.attend_expanded(q_nope, q_rope, kv_latent, k_rope, q_offset=batch.start)
        k, v = attn.expand_kv(kv_latent, k_rope)  # [B, n_h, T, d_qk], [B, n_h, T, d_v]
        return masked_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, batch.mask, attn.scale)


class MLAAbsorbed:
    """Attend over the cached [c_kv | k_rope] rows directly: W_UK absorbed into the query, W_UV applied after
    attention (DeepSeek-V2 section 2.1.2; vLLM's MLA decode)."""

    name = "absorbed"

    def __init__(self) -> None:
        self._frozen: dict[int, torch.Tensor] = {}  # id of a frozen e4m3 kv_b_proj -> its dequantized weight

    def _kv_b_weights(self, attn: MLA, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK, W_UV as ``MLA.kv_b_weights``; a frozen e4m3 kv_b_proj (LoRA over published FP8 weights) is
        dequantized once and kept, since a frozen weight never changes."""
        kv_b = attn.kv_b_proj
        if not hasattr(kv_b, "dequantize_weight"):
            return attn.kv_b_weights()
        if id(kv_b) not in self._frozen:
            self._frozen[id(kv_b)] = kv_b.dequantize_weight(dtype).unflatten(0, (attn.n_heads, -1))  # [n_h, d_n+d_v, r]
        w = self._frozen[id(kv_b)]
        return w[:, : attn.d_nope], w[:, attn.d_nope :]

    def __call__(self, attn: MLA, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 cache: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        q_nope, q_rope, rows = _query_and_cached_rows(attn, x, rope, cache, batch)
        kv_b = attn.kv_b_proj
        if isinstance(kv_b, MultiLoraLinear) and kv_b.active():  # rows on different adapters: one W per row
            w = kv_b.row_weights(x.shape[0]).unflatten(1, (attn.n_heads, attn.d_nope + attn.d_v))
            w_uk, w_uv = w[:, :, : attn.d_nope], w[:, :, attn.d_nope :]  # [B, n_h, d_n, r], [B, n_h, d_v, r]
            q_lat = torch.einsum("bhsd,bhdr->bhsr", q_nope, w_uk)  # [B, n_h, S, r]
        else:
            w_uk, w_uv = self._kv_b_weights(attn, x.dtype)  # [n_h, d_n, r], [n_h, d_v, r]
            q_lat = _per_head(q_nope, w_uk)  # [B, n_h, S, r]
        q = torch.cat([q_lat, q_rope], dim=-1)  # [B, n_h, S, W]
        B, h, S, W = q.shape
        scores = torch.matmul(q.reshape(B, h * S, W), rows.transpose(1, 2)).view(B, h, S, -1)  # [B, n_h, S, T]
        scores = scores.float().mul_(attn.scale)
        if batch.mask is not None:
            scores.masked_fill_(~batch.mask, float("-inf"))
        probs = scores.softmax(-1).to(rows.dtype)  # [B, n_h, S, T]
        o_lat = torch.matmul(probs.view(B, h * S, -1), rows[..., : attn.kv_rank]).view(B, h, S, -1)  # [B, n_h, S, r]
        if w_uv.dim() == 4:  # one W_UV per row
            out = torch.matmul(o_lat, w_uv.transpose(-1, -2))  # [B, n_h, S, d_v]
        else:
            out = _per_head(o_lat, w_uv.transpose(-1, -2))  # [B, n_h, S, d_v]
        return out.transpose(1, 2).flatten(2)  # [B, S, n_h*d_v]


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, n_h, S, a] times each head's w [n_h, a, c] -> [B, n_h, S, c] as one GEMM per head over all B*S
    rows (a broadcasting matmul would copy w once per row of the batch)."""
    B, h, S, a = x.shape
    y = torch.bmm(x.transpose(0, 1).reshape(h, B * S, a), w)  # [n_h, B*S, c]
    return y.view(h, B, S, -1).transpose(0, 1)


class KVHeads:
    """A plain paged K/V cache for the MHA/GQA baselines: rows are [k (n_kv*d_qk) | v (n_kv*d_v)]."""

    name = "kv-heads"

    def __call__(self, attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 cache: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        q, k, v = attn.qkv(x, rope)  # [B, n_h, S, d_qk], [B, n_kv, S, d_qk], [B, n_kv, S, d_v]
        new = torch.cat([k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], dim=-1)  # [B, S, W]
        rows = store_and_gather(cache, new, batch)  # [B, T, W]
        k, v = rows.split([attn.n_kv * attn.d_qk, attn.n_kv * attn.d_v], dim=-1)
        k = k.unflatten(-1, (attn.n_kv, -1)).transpose(1, 2)  # [B, n_kv, T, d_qk]
        v = v.unflatten(-1, (attn.n_kv, -1)).transpose(1, 2)  # [B, n_kv, T, d_v]
        if batch.contiguous:
            return attn.attend(q, k, v, q_offset=batch.start)
        rep = attn.n_heads // attn.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, n_h, T, *]
        return masked_attention(q, k, v, batch.mask, attn.scale)


DECODE_ATTENTION = {"absorbed": MLAAbsorbed, "expanded": MLAExpanded}


@dataclass
class CachedAttention:
    """The ``attend`` of ``DecoderLayer.attention`` for one forward over the paged cache: ``method`` on the
    block's cache layer, then the block's o_proj."""

    method: MLAExpanded | MLAAbsorbed | KVHeads
    caches: Sequence[torch.Tensor]  # [slots, W] per cache layer
    batch: PagedBatch

    def __call__(self, block: DecoderLayer, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        attn = block.self_attn
        return attn.o_proj(self.method(attn, x, rope, self.caches[block.layer_idx], self.batch))  # [B, S, H]


class ModelRunner:
    """The model's forward passes over the paged cache. Cache layer l < L belongs to main layer l; layer L
    (present when ``with_mtp``) to the first MTP module."""

    def __init__(self, model: DeepseekV3LM, pool: BlockPool, decode_attention: str = "absorbed",
                 with_mtp: bool = False) -> None:
        self.model, self.pool = model, pool
        self.caches = pool.data.unbind(0)  # views, taken once: the pool's tensor is never reallocated
        self.with_mtp = with_mtp
        if model.config.attention == "mla":
            self.prefill_attn = MLAExpanded()
            self.decode_attn = DECODE_ATTENTION[decode_attention]()
        else:
            self.prefill_attn = self.decode_attn = KVHeads()

    def _attend(self, batch: PagedBatch, prefill: bool) -> CachedAttention:
        return CachedAttention(self.prefill_attn if prefill else self.decode_attn, self.caches, batch)

    def _rope(self, batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary(batch.positions)  # [B, S, d_r/2] each

    def main(self, tokens: torch.Tensor, rows: list[Row], prefill: bool) -> torch.Tensor:
        """tokens [B, S] -> last hidden state before the final norm [B, S, H]."""
        batch = paged_batch(rows, self.pool.block_size, device=self.pool.data.device)
        rope, attend = self._rope(batch), self._attend(batch, prefill)
        adapters = getattr(self.model, "row_adapters", None)
        if adapters is not None:
            adapters.use([r.adapter for r in rows])
        try:
            x = self.model.model.embed_tokens(tokens)  # [B, S, H]
            for layer in self.model.model.layers:
                x = ffn_half(layer, layer.attention(x, rope, attend))
        finally:
            if adapters is not None:
                adapters.use(None)
        return x

    def mtp(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, rows: list[Row], prefill: bool
            ) -> torch.Tensor:
        """The first MTP module at the rows' positions: h_prev [B, S, H] is the main model's hidden state
        there, next_tokens [B, S] the token one further on. Returns its hidden state [B, S, H]."""
        module = self.model.model.mtp[0]
        batch = paged_batch(rows, self.pool.block_size, shift=1, device=self.pool.data.device)
        x = module.combine(h_prev, self.model.model.embed_tokens(next_tokens))  # [B, S, H]
        return ffn_half(module, module.attention(x, self._rope(batch), self._attend(batch, prefill)))

    def logits(self, h: torch.Tensor, mtp: bool = False) -> torch.Tensor:
        norm = self.model.model.mtp[0].shared_head.norm if mtp else None
        return self.model.logits(h, norm).float().cpu()  # [..., V]; sampling runs on the CPU's generators
