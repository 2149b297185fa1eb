"""The API price sheet (``prices.toml``: USD per million tokens, each entry dated and sourced) and user
overrides, merged field by field like the hardware catalogue: ``--prices-file FILE`` or
``$FRUGALLM_PRICES_FILE``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from frugallm.cost.catalog import merged_entries
from frugallm.errors import ConfigError

PRICES_ENV = "FRUGALLM_PRICES_FILE"


@dataclass(frozen=True, kw_only=True)
class ApiPrice:
    key: str
    provider: str
    model: str
    input: float  # USD per million input tokens that miss the provider's cache
    output: float  # USD per million output tokens
    cached_input: float | None = None  # USD per million cache-hit input tokens; None: billed as input
    valid_from: str = ""
    valid_until: str = ""
    source: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            v = getattr(self, name)
            if v is None and name == "cached_input":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"price entry [{self.key}]: {name} must be a number >= 0, got {v!r}")

    def cost_usd(self, input_tokens: float, output_tokens: float, cache_hit_share: float = 0.0) -> float:
        """What ``input_tokens`` (a ``cache_hit_share`` of them served from the provider's cache) and
        ``output_tokens`` cost."""
        cached = self.input if self.cached_input is None else self.cached_input
        hit = input_tokens * cache_hit_share
        return ((input_tokens - hit) * self.input + hit * cached + output_tokens * self.output) / 1e6


def load_prices(prices_file: str | Path | None = None) -> dict[str, ApiPrice]:
    """The built-in price sheet merged with ``prices_file`` (or ``$FRUGALLM_PRICES_FILE``)."""
    table = merged_entries("prices.toml", prices_file, PRICES_ENV, what="price", record=ApiPrice,
                           required=("provider", "model", "input", "output"),
                           normalise=lambda k: k.strip().lower())
    prices = {key: ApiPrice(key=key, **entry) for key, entry in table.items()}
    return prices


__all__ = ["PRICES_ENV", "ApiPrice", "load_prices"]
