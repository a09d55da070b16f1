"""Confidence intervals for pass rates: the percentile bootstrap, seeded (the same figures on every machine).

Our own few lines rather than scipy's ``bootstrap`` (not a dependency): resampling a list of 0/1
outcomes with replacement and taking the 2.5th and 97.5th percentiles of the resampled means.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def percentile_interval(samples: Sequence[float], *, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of ``samples`` (resampled statistics): the (1 - level)/2 and (1 + level)/2 percentiles."""
    s = sorted(samples)
    tail = (1 - level) / 2
    return s[int(tail * (len(s) - 1))], s[round((1 - tail) * (len(s) - 1))]


def bootstrap_interval(outcomes: Sequence[bool | float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap ``level`` interval of the mean of ``outcomes`` ((nan, nan) when there are none)."""
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan")
    values = [float(x) for x in outcomes]
    rng = random.Random(seed)
    return percentile_interval([sum(rng.choices(values, k=n)) / n for _ in range(resamples)], level=level)
