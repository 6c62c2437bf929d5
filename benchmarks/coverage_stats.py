"""Statistics over seeds shared by both tasks of the coverage experiment (benchmarks/coverage.py)."""

from __future__ import annotations

import math

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, SE and the 95% t-interval of per-seed values (paired differences)."""
    mean, se = mean_se(values)
    t = T975.get(len(values) - 1, 1.96)
    return mean, se, mean - t * se, mean + t * se
