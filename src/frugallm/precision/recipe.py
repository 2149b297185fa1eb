"""``Fp8Recipe``: the knobs of the FP8 fine-grained recipe (``fp8.py`` teaches it), in a module of its own
because both the conversion (``fp8.py``) and the modules it installs (``fp8_linear.py``) read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from frugallm.config import reject_unknown_fields
from frugallm.errors import ConfigError
from frugallm.precision.backends import BACKENDS


@dataclass(kw_only=True, frozen=True)
class Fp8Recipe:
    tile: int = 128  # activation / gradient tile length along K (1 x tile)
    block: int = 128  # weight block side (block x block)
    pow2_scales: bool = False  # round scales up to powers of two: scaling becomes exact in binary
    backend: str = "auto"  # 'auto' | 'emulated' | 'hopper'
    fp8_saved_activations: bool = False  # keep linear inputs for backward in e4m3 (1 + 4/tile bytes/element)
    # keep each weight's e4m3 blocks from the forward for the input gradient (1 byte per weight, the whole
    # model's until the backward) rather than quantizing the weight again there, which gives the same blocks;
    # sharded runs turn it off (frugallm.train.distributed), where the copies would be whole, not sharded
    cache_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("tile", "block"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 16 == 0):
                raise ConfigError(f"fp8 {name} must be a positive multiple of 16 (128 in the V3 recipe), "
                                  f"got {v!r}")
        for name in ("pow2_scales", "fp8_saved_activations", "cache_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"fp8 {name} must be true or false, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"fp8 backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "hopper" and (self.tile, self.block) != (128, 128):
            raise ConfigError(f"fp8 backend 'hopper' needs tile = block = 128 (cuBLAS blockwise FP8), "
                              f"got tile={self.tile}, block={self.block}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fp8Recipe:
        reject_unknown_fields(cls, d, "fp8")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        saved = "e4m3" if self.fp8_saved_activations else "as-is"
        return (f"backend={self.backend} tiles=1x{self.tile} blocks={self.block}x{self.block} "
                f"pow2={self.pow2_scales} saved-inputs={saved} weight-copies={self.cache_weights}")
