"""Loaders: training windows in a seeded order that any rank can resume, and sequential evaluation windows,
read from a preparation made by ``frugallm.data.pack``.

Symbols used in shape comments:  N tokens in a split, W window (= seq_len + 1 + MTP depth), G global batch
(windows per optimizer step over all ranks), B = G / world_size rows on this rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from frugallm.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    from frugallm.data.pack import PreparedCorpus


def _mix64(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 finaliser of ``x ^ key`` (uint64 arithmetic wraps, as intended)."""
    x = x ^ np.uint64(key)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """``perm[positions]`` for a seeded pseudo-random permutation of ``range(n)``, without materialising it:
    a 4-round Feistel network on the smallest even-bit domain >= n, walked until the value lands below n
    (cycle walking keeps it a bijection of range(n)). Memory is O(len(positions)) whatever n is, so an epoch
    over billions of windows costs nothing up front and any rank can jump to any position."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5EED]).integers(0, 2 ** 63, 4)
    x = np.asarray(positions, dtype=np.uint64)
    todo = np.ones(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            left, right = x[todo] >> np.uint64(half), x[todo] & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right, int(k)) & mask)
            x[todo] = (left << np.uint64(half)) | right
            todo &= x >= np.uint64(n)
    return x.astype(np.int64)


class TokenLoader:
    """Training windows of ``window`` tokens from one split, deterministic from the seed.

    The split [N] is cut into n = N // W non-overlapping windows. Epoch e visits them in the order of a
    seeded permutation; the stream of window ids is epoch 0, epoch 1, ... and a batch takes the next G ids of
    that stream (crossing into the next epoch when one runs out). The global batch is therefore the same for
    any world_size, and rank r keeps rows [r*B, (r+1)*B). The position (epoch, index) is the whole state."""

    def __init__(self, corpus: PreparedCorpus, split: str, *, global_batch: int, window: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if global_batch < 1 or window < 2:
            raise ConfigError(f"need global_batch >= 1 and window >= 2, got {global_batch} and {window}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
        if global_batch % world_size:
            raise ConfigError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        self.split, self.global_batch, self.window, self.seed = split, global_batch, window, seed
        self.rank, self.world_size = rank, world_size
        self.tokens = corpus.tokens(split)
        self.n_windows = len(self.tokens) // window
        if self.n_windows == 0:
            raise DataError(f"the {split} split has {len(self.tokens)} tokens, fewer than one window of "
                            f"{window}: use a larger corpus or a shorter sequence length")
        self.epoch = 0
        self.index = 0  # next position in the current epoch's permutation

    def _next_ids(self, count: int) -> np.ndarray:
        ids = []  # global window ids, [count]
        while count:
            take = min(count, self.n_windows - self.index)
            positions = np.arange(self.index, self.index + take, dtype=np.uint64)
            ids.append(permute(positions, self.n_windows, self.seed, self.epoch))
            self.index += take
            count -= take
            if self.index == self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(ids)

    def next_batch(self) -> torch.Tensor:
        """int64 [B, W] token windows for this rank."""
        ids = self._next_ids(self.global_batch)  # [G]: every rank draws the same, then keeps its rows
        rows_per_rank = self.global_batch // self.world_size
        mine = ids[self.rank * rows_per_rank:(self.rank + 1) * rows_per_rank]  # [B]
        w = self.window
        batch = np.stack([np.asarray(self.tokens[i * w:(i + 1) * w]) for i in mine]).astype(np.int64)  # [B, W]
        return torch.from_numpy(batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / self.n_windows

    def state_dict(self) -> dict:
        return {"version": 1, "split": self.split, "seed": self.seed, "window": self.window,
                "n_windows": self.n_windows, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. world_size and global_batch may differ from the saving run (the position is
        counted in windows); the corpus, split, window and seed must match or the order would be another."""
        for k in ("split", "seed", "window", "n_windows"):
            if state.get(k) != getattr(self, k):
                raise CheckpointError(f"loader state has {k}={state.get(k)!r} but this run has "
                                      f"{getattr(self, k)!r}: it was saved for another corpus or setting")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.n_windows:
            raise CheckpointError(f"loader state position epoch={epoch} index={index} is out of range")
        self.epoch, self.index = epoch, index


def iter_eval_batches(corpus: PreparedCorpus, split: str, *, batch: int, window: int,
                      max_windows: int | None = None) -> Iterator[torch.Tensor]:
    """Sequential non-overlapping windows in order, int64 [<=batch, W]; the last batch may be smaller. A split
    shorter than one window (a tiny corpus) is yielded whole as a single row [1, N] rather than not at all."""
    if batch < 1 or window < 2:
        raise ConfigError(f"need batch >= 1 and window >= 2, got {batch} and {window}")
    tokens = corpus.tokens(split)
    n_windows = len(tokens) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0 and len(tokens) >= 2 and (max_windows is None or max_windows > 0):
        yield torch.from_numpy(np.asarray(tokens[:]).astype(np.int64)[None])  # [1, N]
        return
    for start in range(0, n_windows, batch):
        stop = min(start + batch, n_windows)
        flat = np.asarray(tokens[start * window:stop * window]).astype(np.int64)  # [rows * W]
        yield torch.from_numpy(flat.reshape(stop - start, window))  # [rows, W]
