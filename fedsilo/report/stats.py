"""Statistics over seeds, pure: the 95% t-interval of a mean, and a test set's binomial standard error.

Two sources of noise are kept apart. The t-interval is over seeds, which draw the head, the client
shards and the batch order. The binomial standard error, sqrt(p (1 - p) / n), is what a finite
test set of n rows adds to any one accuracy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Two-sided 95% Student t quantiles, t(0.975; df) for df = 1..30 (any statistics table).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """t(0.975; df): from the table up to 30 degrees of freedom, beyond it the Cornish-Fisher
    expansion around the normal quantile (within 1e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and the half-width of its 95% t-interval (None from one seed)."""

    mean: float
    half_width: float | None
    n: int

    def text(self, digits: int = 4) -> str:
        spread = "" if self.half_width is None else f" ± {self.half_width:.{digits}f}"
        return f"{self.mean:.{digits}f}{spread}"


def t_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` and its 95% t-interval: mean ± t(0.975; n - 1) s / sqrt(n)."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, None, 1)
    return Interval(mean, t975(n - 1) * statistics.stdev(values) / math.sqrt(n), n)


def binomial_se(accuracy: float, examples: int) -> float:
    """The standard error that scoring on ``examples`` test rows alone puts on an ``accuracy``."""
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def cumulative_steps(local_steps: Mapping[int, float]) -> dict[int, int]:
    """Sequential local SGD steps done by the end of each round, from each round's steps (the
    slowest client's: clients train side by side). Rounds count from 1; a gap ends the count,
    since what came after it cannot be placed."""
    total, out = 0, {}
    for round_ in range(1, len(local_steps) + 1):
        if round_ not in local_steps:
            break
        total += int(local_steps[round_])
        out[round_] = total
    return out
