"""95 % intervals for the demo's claims, so a table states what its sample size can support.

Why these: an accuracy is a binomial proportion (Wilson score interval: sensible near 0 % and at
n = 100, unlike the normal interval); an accuracy difference between two cells uses Newcombe's
hybrid score interval built from the two Wilson intervals, which treats the cells as independent
samples — conservative here, since both cells decode the same problems. TPF is a mean of per-problem
ratios (normal interval from their standard deviation, when the per-problem values are known).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``k1/n1 - k2/n2`` (independent samples)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the normal interval of a mean (per-problem TPF values)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"mean_interval needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def ratio_interval(m1: float, lo1: float, hi1: float, m2: float, lo2: float, hi2: float,
                   z: float = Z95) -> tuple[float, float]:
    """Interval of ``m1 / m2`` from the two means' normal intervals (delta method on the log)."""
    se1, se2 = (hi1 - lo1) / (2 * z), (hi2 - lo2) / (2 * z)
    se_log = math.sqrt((se1 / m1) ** 2 + (se2 / m2) ** 2)
    r = m1 / m2
    return r * math.exp(-z * se_log), r * math.exp(z * se_log)


def points(low_high: tuple[float, float]) -> str:
    """A proportion interval as "[a, b]" in percentage points."""
    return f"[{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]"


def with_intervals(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A grid cell's record with ``correct`` (problems solved) and ``accuracy_ci`` (Wilson) added;
    works on the records of older results.json files, which hold only accuracy and samples."""
    out = dict(rec)
    out["correct"] = round(rec["accuracy"] * rec["samples"])
    out["accuracy_ci"] = list(wilson_interval(out["correct"], rec["samples"]))
    return out
