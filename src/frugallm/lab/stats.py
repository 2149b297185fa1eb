"""Honest statistics over seeds: each figure as a mean with its spread, and a verdict that refuses to call a
difference smaller than the seed-to-seed noise a win.

Spread is the sample standard deviation over seeds (ddof = 1). Two arms differ at this scale only when the
difference of their means exceeds the larger of their two spreads; with one seed there is no spread and no
verdict can be drawn, which is said rather than guessed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

HELD, NOT_HELD, NO_DIFFERENCE, NOT_MEASURABLE = ("held", "did not hold", "no difference at this scale",
                                                  "not measurable here")


@dataclass(frozen=True, kw_only=True)
class Estimate:
    mean: float
    spread: float  # sample standard deviation over seeds; nan with one seed
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"an estimate needs at least one value, got n={self.n}")

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "spread": None if math.isnan(self.spread) else self.spread, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.4f}" + ("" if math.isnan(self.spread) else f" ± {self.spread:.4f}")


def estimate(values: list[float]) -> Estimate:
    """Mean and spread of one figure over seeds."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to estimate from")
    if any(math.isnan(v) for v in vals):  # a figure some seed could not give (a curve short of the point)
        return Estimate(mean=float("nan"), spread=float("nan"), n=len(vals))
    spread = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return Estimate(mean=statistics.fmean(vals), spread=spread, n=len(vals))


def verdict(claimed: Estimate, baseline: Estimate, *, lower_is_better: bool = True) -> tuple[str, str]:
    """(verdict, why) for the claim that ``claimed`` beats ``baseline`` on this figure."""
    if claimed.n < 2 or baseline.n < 2:
        return NOT_MEASURABLE, "one seed per arm gives no spread to judge a difference against"
    diff = claimed.mean - baseline.mean
    noise = max(claimed.spread, baseline.spread)
    if abs(diff) <= noise:
        return NO_DIFFERENCE, f"difference {diff:+.4f} is within the seed spread {noise:.4f}"
    better = diff < 0 if lower_is_better else diff > 0
    return (HELD if better else NOT_HELD), f"difference {diff:+.4f} exceeds the seed spread {noise:.4f}"
