"""mergekit parameter settings: a number, a gradient across layers, or tensor-name filters.

A setting (mergekit's ``ParameterSetting``) is one of::

    0.5                                   # a scalar (bool, int, float, or a numeric string: "1e-3")
    [0, 0.5, 1]                           # a gradient: interpolated over the layers (t = i / (L − 1))
    [{filter: self_attn, value: 0.2},     # filters: the first whose text occurs in the tensor name wins;
     {filter: mlp, value: [0.9, 0.3]},    #   a value may itself be a gradient; no filter (or "*")
     {value: 1.0}]                        #   matches every tensor

:func:`evaluate` follows mergekit 0.1.5's ``evaluate_setting`` (config.py): t = 0 for the
tensors outside the layer stack (embeddings, final norm, lm_head), the gradient's points evenly
spaced over [0, 1] and linearly interpolated. :func:`check` types a setting before any work, so a
bad value is reported in one line naming the key instead of failing mid-merge.
"""

from __future__ import annotations

from typing import Any

# Tensor dtypes a plan may name (output, input rounding); mergekit_yaml and plan both read them.
DTYPES = ("float32", "float16", "bfloat16", "float64")

# Parameters set per input model (mergekit's INPUT/NON_BASE scope); every other one is shared.
PER_MODEL = ("weight", "density", "gamma", "epsilon", "scale")


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def as_number(v: Any) -> float | bool:
    """mergekit validates float parameters with pydantic: numeric strings ("1e-3", which YAML
    leaves a string) are numbers; anything else is an error."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v
    return float(v)


def check(v: Any, where: str) -> str | None:
    """None when ``v`` is a valid numeric setting, else a one-line problem naming ``where``."""
    bad = (f"{where} must be a number, a list of numbers (a gradient across layers) or a list of "
           f"{{filter: ..., value: ...}} entries, got {v!r}")
    if _scalar(v):
        try:
            as_number(v)
        except ValueError:
            return bad
        return None
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not v:
        return bad
    if all(_scalar(e) for e in v):
        return next((bad for e in v if check(e, where)), None)
    for e in v:
        if not isinstance(e, dict) or "value" not in e or set(e) - {"filter", "value"}:
            return bad
        if e.get("filter") is not None and not isinstance(e["filter"], str):
            return f"{where}: filter must be a string, got {e['filter']!r}"
        if isinstance(e["value"], dict) or (p := check(e["value"], where)):
            return p or bad
    return None


def is_plain(v: Any) -> bool:
    """A scalar: the same value for every tensor."""
    return v is None or _scalar(v)


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for one tensor at layer position ``t`` ∈ [0, 1]; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if _scalar(setting):
        try:
            return as_number(setting)
        except ValueError:  # a string parameter (e.g. tie_break): as given
            return setting
    if not setting:
        return None
    if all(_scalar(e) for e in setting):
        values = [as_number(e) for e in setting]
        if any(isinstance(e, bool) for e in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t)
    return None


def resolve(name: str, scopes: list[dict | None], tensor_name: str, t: float, default: Any = None) -> Any:
    """The first scope (highest precedence first) whose setting for ``name`` gives a value."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate(scope[name], tensor_name, t)
            if v is not None:
                return v
    return default


__all__ = ["PER_MODEL", "as_number", "check", "evaluate", "is_plain", "resolve"]
