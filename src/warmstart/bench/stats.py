"""Paired statistics of the real-benchmark bench (issue #18).

Every run of a target is scored on the same held-out questions, so a
difference between two runs is a *paired* difference: resampling questions
(not runs) gives its sampling noise. The mean over targets resamples each
target's questions independently (the targets are different question sets)
and averages the per-target differences, the way the table averages them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

N_BOOT = 2000
LEVEL = 0.95


def _as_array(x):
    import numpy as np

    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("expected a non-empty 1-d sequence of per-question scores")
    return a


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean(a − b), lower, upper): percentile bootstrap over questions of the paired difference.

    ``a`` and ``b`` are per-question scores on the same questions (0/1 hits, or a hit rate
    averaged over seeds)."""
    return paired_bootstrap_mean([(a, b)], n_boot=n_boot, level=level, seed=seed)


def paired_bootstrap_mean(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int = N_BOOT,
                          level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Mean over targets of mean(a − b), with the percentile interval of that mean when each
    target's questions are resampled independently."""
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs = []
    for a, b in pairs:
        a, b = _as_array(a), _as_array(b)
        if a.shape != b.shape:
            raise ValueError(f"paired scores differ in length ({a.size} vs {b.size})")
        diffs.append(a - b)
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.zeros(n_boot)
    for d in diffs:
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        boot += d[idx].mean(axis=1)
    boot /= len(diffs)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def questions_for(delta: float, discordance: float, *, z: float = 1.959964) -> int:
    """Questions a target needs so that a paired difference ``delta`` has a 95% normal interval
    excluding zero, when a fraction ``discordance`` of questions is answered differently by the
    two runs (then var(a − b) ≤ discordance for 0/1 scores)."""
    if not (0 < delta and 0 < discordance <= 1):
        raise ValueError("delta and discordance must be positive (discordance ≤ 1)")
    return math.ceil(discordance * (z / delta) ** 2)


__all__ = ["paired_bootstrap", "paired_bootstrap_mean", "questions_for"]
