"""The serving KV cache: one block-structured pool shared by every running sequence, with prefix
(context) caching and an optional spill of evicted blocks to disk.

Layout
    data [n_layers, n_blocks * block_size, width]     one tensor, allocated once from the memory budget
    a token's entry for layer l is the row ``data[l, slot]``, slot = block_id * block_size + offset

For MLA ``width = kv_lora_rank + qk_rope_head_dim`` and a row is ``[c_kv | k_rope]`` (the normalised latent
and the rotated shared rope key, exactly what ``MLA.compress_kv`` returns), so the absorbed decode attends
over rows as they lie: scores = [q_lat | q_rope] . row. At DeepSeek-V3 size that is 512 + 64 = 576 values per
token per layer, 70,272 bytes per token over 61 layers in bf16 (DeepSeek-V2 paper, section 2.1.3). The
MHA/GQA baselines store ``[k (n_kv*d_qk) | v (n_kv*d_v)]`` per token, which is what MLA saves against.

Layers ``0 .. L-1`` are the main model's; when speculative decoding runs the MTP module, it gets layer ``L``.
The MTP block's entry for position i depends on token i+1 (it reads the embedding of the next token), so it
is stored one slot later, at slot(i + 1): then everything in a block is a function of the block's own tokens
and those before it, and a full block can be shared by content alone.

Blocks
    free list        blocks holding nothing
    ref counts       how many sequences' block tables hold a block
    prefix index     hash -> block for full blocks; the hash of block k chains over all tokens up to its end:
                     h_k = sha256(h_{k-1} | tokens of block k), h_{-1} = sha256(namespace); the namespace names
                     the model and cache layout so that spilled blocks are never read by another model
    LRU              registered blocks no sequence holds; reusable by a later prompt, evicted oldest first
                     when the free list runs dry (and, with a spill directory, written to disk first)

A block is only registered once it is full and every layer's entry in it is final, and blocks are never
written after that, so sharing needs no copy-on-write.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.cost.memory import kv_cache_bytes, kv_cache_elements_per_layer
from frugallm.errors import ResourceError


class CacheFullError(ResourceError):
    """No free or evictable block is left (the scheduler's reservations should prevent this)."""


@dataclass(frozen=True, kw_only=True)
class CacheLayout:
    n_layers: int  # main layers (+1 for the MTP block when it drafts)
    width: int  # values per token per layer
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """One slot across the layers, as allocated (``cache_bytes_per_token`` gives it from a config)."""
        return self.n_layers * self.width * torch.empty((), dtype=self.dtype).element_size()


def entry_width(cfg: ModelConfig) -> int:
    """Values cached per token per layer: ``r_kv + d_r`` for MLA, ``n_kv * (d_qk + d_v)`` for MHA/GQA (the
    cost model's ``kv_cache_elements_per_layer``)."""
    return kv_cache_elements_per_layer(cfg)


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, with_mtp: bool = False) -> int:
    """Bytes the cache holds per token of context, by the cost model's formula (``cost.memory.kv_cache_bytes``),
    with the MTP block's layer when it drafts."""
    return kv_cache_bytes(cfg, dtype, layers=cfg.num_hidden_layers + int(with_mtp))


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.sha256(parent)
    h.update(b"".join(int(t).to_bytes(4, "little") for t in tokens))
    return h.digest()


def root_hash(namespace: str) -> bytes:
    return hashlib.sha256(namespace.encode()).digest()


class BlockPool:
    """Fixed-size blocks of cache rows in one preallocated tensor (see the module docstring)."""

    def __init__(self, layout: CacheLayout, *, block_size: int, max_bytes: int | None = None,
                 n_blocks: int | None = None, device: str | torch.device = "cpu",
                 spill_dir: str | Path | None = None, spill_max_bytes: int | None = None,
                 namespace: str = "") -> None:
        if block_size < 1:
            raise ResourceError(f"block_size must be >= 1, got {block_size}")
        self.layout, self.block_size = layout, block_size
        self.block_bytes = layout.bytes_per_token * block_size
        if n_blocks is None:
            if max_bytes is None:
                raise ResourceError("BlockPool needs max_bytes (a memory budget) or n_blocks")
            n_blocks = max_bytes // self.block_bytes
        if n_blocks < 1:
            raise ResourceError(f"cache budget of {max_bytes} bytes holds no block of {block_size} tokens "
                                f"({self.block_bytes} bytes each); raise the cache memory")
        self.n_blocks = n_blocks
        try:
            self.data = torch.zeros(layout.n_layers, n_blocks * block_size, layout.width, dtype=layout.dtype,
                                    device=device)  # [L, slots, W]
        except (RuntimeError, MemoryError) as e:  # torch's out-of-memory errors are RuntimeErrors
            raise ResourceError(f"cannot allocate the KV cache pool ({n_blocks * self.block_bytes / 2**20:.1f} MiB "
                                f"on {device}): {e}; lower the cache memory") from None
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # a stack: low ids first
        self.refs = [0] * n_blocks
        self.hash_of: list[bytes | None] = [None] * n_blocks
        self.index: dict[bytes, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; oldest first
        self.reserved = 0  # blocks promised to admitted sequences but not yet allocated
        self.root = root_hash(namespace)
        self.spill = DiskSpill(Path(spill_dir), spill_max_bytes, self.block_bytes) if spill_dir else None
        self.evictions = 0

    # ----- accounting ---------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def available(self) -> int:
        """Blocks that can still be promised: free + evictable - already promised."""
        return len(self.free) + len(self.lru) - self.reserved

    def used_blocks(self) -> int:
        return self.n_blocks - len(self.free) - len(self.lru)

    def reserve(self, n: int) -> None:
        if n > self.available():
            raise CacheFullError(f"cannot reserve {n} blocks, {self.available()} available")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved -= n
        assert self.reserved >= 0, "reservation accounting went negative"

    # ----- allocation ---------------------------------------------------------------------------------
    def allocate(self, reserved: bool = True) -> int:
        """One block, taken from a reservation made with ``reserve`` unless ``reserved`` is False."""
        if reserved:
            self.unreserve(1)
        elif self.available() < 1:
            raise CacheFullError("no free KV cache block")
        if self.free:
            block = self.free.pop()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            self._evict(block)
        else:  # pragma: no cover - reservations make this unreachable
            raise CacheFullError("no free KV cache block")
        self.refs[block] = 1
        return block

    def _evict(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            if self.spill is not None:
                self.spill.put(h, self.read_block(block))
            del self.index[h]
            self.hash_of[block] = None
        self.evictions += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released more often than held"
        if self.refs[block] == 0:
            if self.hash_of[block] is not None:
                self.lru[block] = None  # keep its content for a later prompt with the same prefix
            else:
                self.free.append(block)

    def release_all(self, blocks: Sequence[int]) -> None:
        # last blocks first, so that a prefix's head outlives its tail in the LRU order
        for b in reversed(blocks):
            self.release(b)

    # ----- prefix cache -------------------------------------------------------------------------------
    def register(self, block: int, h: bytes) -> None:
        """Publish a full, final block under its chained hash. If the same content is already published
        (two sequences computed it concurrently), the first copy stays the one the index points to."""
        if h in self.index or self.hash_of[block] is not None:
            return
        self.index[h] = block
        self.hash_of[block] = h

    def lookup(self, h: bytes, reserved: bool = True) -> int | None:
        """The block published under ``h``, now referenced by the caller; reloaded from the spill directory
        when it was evicted there (taking a block, from a reservation unless ``reserved`` is False)."""
        block = self.index.get(h)
        if block is not None:
            # a hit is one block the caller will not allocate: its reservation shrinks by one whether the
            # block came off the LRU (available drops by one) or is shared with a running sequence
            if reserved:
                self.unreserve(1)
            if self.refs[block] == 0:
                del self.lru[block]
            self.refs[block] += 1
            return block
        if self.spill is None:
            return None
        rows = self.spill.get(h, self.layout, self.block_size)
        if rows is None:
            return None
        block = self.allocate(reserved)
        self.write_block(block, rows)
        self.register(block, h)
        return block

    def forget_prefixes(self, namespace: str) -> None:
        """Drop every published block (the model that computed them changed) and start a new hash chain."""
        for block in list(self.lru):
            self.hash_of[block] = None
            self.free.append(block)
        self.lru.clear()
        for block in self.index.values():
            self.hash_of[block] = None
        self.index.clear()
        self.root = root_hash(namespace)

    def contains(self, h: bytes) -> bool:
        return h in self.index or (self.spill is not None and self.spill.has(h))

    # ----- reading and writing rows -------------------------------------------------------------------
    def slots(self, table: Sequence[int], positions: range | Sequence[int]) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def read_block(self, block: int) -> torch.Tensor:
        s = block * self.block_size
        return self.data[:, s : s + self.block_size].clone()  # [L, bs, W]

    def write_block(self, block: int, rows: torch.Tensor) -> None:
        s = block * self.block_size
        self.data[:, s : s + self.block_size].copy_(rows)


class DiskSpill:
    """Evicted prefix blocks as one safetensors file each, named by hash; bounded by ``max_bytes`` (oldest
    files deleted first). Files left by an earlier server with the same namespace are found again."""

    def __init__(self, directory: Path, max_bytes: int | None, block_bytes: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.files: OrderedDict[bytes, int] = OrderedDict()  # hash -> size, oldest first
        for f in sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                self.files[bytes.fromhex(f.stem)] = f.stat().st_size
            except ValueError:
                continue  # not one of ours
        self.writes = self.reads = 0

    def _path(self, h: bytes) -> Path:
        return self.dir / f"{h.hex()}.safetensors"

    def has(self, h: bytes) -> bool:
        return h in self.files

    def put(self, h: bytes, rows: torch.Tensor) -> None:
        if h in self.files:
            return
        path = self._path(h)
        with fsio.atomic_path(path) as tmp:  # a reader never sees half a block
            save_file({"rows": rows.contiguous()}, str(tmp))
        self.files[h] = path.stat().st_size
        self.writes += 1
        if self.max_bytes is not None:
            while sum(self.files.values()) > self.max_bytes and len(self.files) > 1:
                old, _ = self.files.popitem(last=False)
                self._path(old).unlink(missing_ok=True)

    def get(self, h: bytes, layout: CacheLayout, block_size: int) -> torch.Tensor | None:
        if h not in self.files:
            return None
        try:
            with safe_open(str(self._path(h)), "pt") as f:
                rows = f.get_tensor("rows")
        except Exception:  # a truncated or foreign file is a miss, never a crash
            self.files.pop(h, None)
            return None
        if tuple(rows.shape) != (layout.n_layers, block_size, layout.width) or rows.dtype != layout.dtype:
            self.files.pop(h, None)
            return None
        self.files.move_to_end(h)
        self.reads += 1
        return rows
