"""Weighting schemes: how much each donor counts in a merge.

``compute_weights(scheme, n=...)`` returns one float per donor. Every scheme
except ``given`` is normalised to sum to 1.

MWA (Metrics-Weighted Averaging, Choi & Yu 2025, https://arxiv.org/abs/2504.18580)
weights checkpoints by a training metric shaped by one penalty exponent p:

    mwa:loss   wᵢ = (1/Lᵢ)^p / Σⱼ (1/Lⱼ)^p      (lower loss counts more)
    mwa:steps  wᵢ = sᵢ^p / Σⱼ sⱼ^p              (later steps count more)

p = 0 gives the uniform average and, as p grows, the weight concentrates on the
best checkpoint (p → ∞ selects it). The ratio of two weights is (Lⱼ/Lᵢ)^p, so
only relative metric values matter and one p works for any number of
checkpoints. Computed in log space so large p never overflows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

SCHEMES = ("uniform", "given", "score", "softmax", "mwa:loss", "mwa:steps")


def compute_weights(scheme: str, *, n: int, scores: Sequence[float] | None = None, higher_is_better: bool = False,
                    losses: Sequence[float] | None = None, steps: Sequence[float] | None = None,
                    penalty: float = 1.0, temperature: float = 1.0,
                    given: Sequence[float] | None = None) -> list[float]:
    """One weight per model for ``scheme`` (see module docstring); raises ConfigError on bad input."""
    if n <= 0:
        raise ConfigError("no models to weight")
    if scheme == "uniform":
        return [1.0 / n] * n
    if scheme == "given":
        w = [float(x) for x in _need(given, n, "given weights")]
        if abs(sum(w)) < 1e-12:
            raise ConfigError(f"weights {w} sum to zero", hint="give at least one non-zero weight")
        return w
    if scheme == "score":
        if losses is not None:  # a loss is a score where lower is better
            scores, higher_is_better = losses, False
        vals = _positive(_need(scores, n, "scores"), "score")
        return _normalise_logs([math.log(v) if higher_is_better else -math.log(v) for v in vals])
    if scheme == "softmax":
        if losses is not None:
            scores, higher_is_better = losses, False
        if temperature <= 0:
            raise ConfigError(f"softmax temperature must be positive, got {temperature}")
        vals = _need(scores, n, "scores")
        sign = 1.0 if higher_is_better else -1.0
        return _normalise_logs([sign * float(v) / temperature for v in vals])
    if scheme in ("mwa:loss", "mwa:steps"):
        if penalty < 0:
            raise ConfigError(f"MWA penalty must be >= 0, got {penalty}")
        if scheme == "mwa:loss":
            vals = _positive(_need(losses, n, "training losses"), "loss")
            return _normalise_logs([-penalty * math.log(v) for v in vals])
        vals = _positive(_need(steps, n, "training steps"), "step")
        return _normalise_logs([penalty * math.log(v) for v in vals])
    raise ConfigError(f"unknown weighting scheme {scheme!r}", hint="choose one of " + ", ".join(SCHEMES))


def _need(vals, n: int, what: str) -> list[float]:
    if vals is None:
        raise ConfigError(f"this weighting scheme needs {what}")
    vals = list(vals)
    if len(vals) != n:
        raise ConfigError(f"got {len(vals)} {what} for {n} models")
    if any(v is None for v in vals):
        raise ConfigError(f"{what} missing for model(s) {[i for i, v in enumerate(vals) if v is None]}",
                          hint="MWA reads trainer_state.json of each checkpoint; pass weights explicitly otherwise")
    out = [float(v) for v in vals]
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{what} must be finite, got {out}")
    return out


def _positive(vals: list[float], what: str) -> list[float]:
    if any(v <= 0 for v in vals):
        raise ConfigError(f"every {what} must be positive for this scheme, got {vals}")
    return vals


def _normalise_logs(logs: list[float]) -> list[float]:
    m = max(logs)
    ex = [math.exp(x - m) for x in logs]  # log-sum-exp: no overflow for large penalty
    s = sum(ex)
    return [e / s for e in ex]


__all__ = ["SCHEMES", "compute_weights"]
