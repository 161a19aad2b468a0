"""Weighting schemes: how much each donor counts in a merge — the one registry of their names.

Each scheme is registered once (:data:`SCHEMES`) with the inputs it needs, whether it takes an
argument after a colon (``softmax:T``), and where it can run; ``warmstart select``, ``warmstart
merge``, plans, run configs and help texts all read it. :func:`parse` turns a spec into the
scheme and its arguments; :func:`compute_weights` returns one float per donor. Every scheme
except ``given`` is normalised to sum to 1.

MWA (Metrics-Weighted Averaging, Choi & Yu 2025, https://arxiv.org/abs/2504.18580)
weights checkpoints by a training metric shaped by one penalty exponent p:

    mwa:loss   wᵢ = (1/Lᵢ)^p / Σⱼ (1/Lⱼ)^p      (lower loss counts more)
    mwa:steps  wᵢ = sᵢ^p / Σⱼ sⱼ^p              (later steps count more)

p = 0 gives the uniform average and, as p grows, the weight concentrates on the
best checkpoint (p → ∞ selects it). The ratio of two weights is (Lⱼ/Lᵢ)^p, so
only relative metric values matter and one p works for any number of
checkpoints. Computed in log space so large p never overflows.

The training metric of a donor is its trainer_state.json's, else the one its caller looked up
(the library catalog; merging itself never opens it). When some donor still has no training
loss, :func:`mwa_losses` applies the one fallback (docs/merge.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .params import as_number, is_plain

Metrics = tuple  # (final training loss or None, global step or None) of one checkpoint


@dataclass(frozen=True)
class Scheme:
    name: str
    fn: Callable | None  # (n, inputs...) → weights; None: searched on target data (select/optimize)
    needs: tuple[str, ...]  # the inputs it reads: given, scores, losses, steps, target
    doc: str
    arg: str | None = None  # the one argument written after a colon (softmax:T → temperature)
    in_merge: bool = True  # a merge plan can use it (False: searched by select/optimize)
    in_select: bool = True  # `warmstart select --weights` accepts it (False: needs numbers per donor)

    def spec(self) -> str:
        return f"{self.name}:{self.arg[0].upper()}" if self.arg else self.name


SCHEMES: dict[str, Scheme] = {}


def _register(name: str, needs: tuple[str, ...], doc: str, **kw):
    def deco(fn):
        SCHEMES[name] = Scheme(name, fn, needs, doc, **kw)
        return fn

    return deco


def parse(spec: str, *, where: str = "merge", what: str = "weighting scheme") -> tuple[Scheme, dict]:
    """'softmax:0.5' → (softmax, {'temperature': 0.5}); refuses names unknown or not usable ``where``
    (``merge``, ``select``; ``any``: every registered scheme), listing those that are."""
    s = SCHEMES.get(spec)
    args: dict = {}
    if s is None:
        name, _, arg = str(spec).partition(":")
        s = SCHEMES.get(name)
        if s is None or s.arg is None or not arg:
            raise ConfigError(f"unknown {what} {spec!r}", hint="choose one of " + names(where))
        try:
            args[s.arg] = float(arg)
        except ValueError:
            raise ConfigError(f"bad {s.arg} in {spec!r}", hint=f"e.g. {s.name}:0.5") from None
    if where != "any" and not (s.in_merge if where == "merge" else s.in_select):
        why = "is searched on target data by select/optimize" if where == "merge" else "needs numbers per donor"
        raise ConfigError(f"weighting {s.name!r} {why}", hint="choose one of " + names(where))
    return s, args


def names(where: str = "merge") -> str:
    """The specs usable ``where`` (for help texts and messages), e.g. 'uniform, given, ..., softmax:T'."""
    return ", ".join(s.spec() for s in SCHEMES.values() if (s.in_merge if where == "merge" else s.in_select))


def compute_weights(scheme: str, *, n: int, scores: Sequence[float] | None = None, higher_is_better: bool = False,
                    losses: Sequence[float] | None = None, steps: Sequence[float] | None = None,
                    penalty: float = 1.0, temperature: float = 1.0,
                    given: Sequence[float] | None = None) -> list[float]:
    """One weight per model for ``scheme`` (a spec: ``softmax:0.5`` sets the temperature); raises ConfigError."""
    if n <= 0:
        raise ConfigError("no models to weight")
    s, args = parse(scheme, where="any")
    if s.fn is None:
        raise ConfigError(f"weighting {s.name!r} is searched on target data, not computed",
                          hint="use warmstart select/optimize")
    kw = {"scores": scores, "higher_is_better": higher_is_better, "losses": losses, "steps": steps,
          "penalty": penalty, "temperature": temperature, "given": given, **args}
    return s.fn(n, **kw)


@_register("uniform", (), "every donor 1/n")
def _uniform(n, **_):
    return [1.0 / n] * n


@_register("given", ("given",), "the numbers given, as written (negative or zero-sum for task negation)",
           in_select=False)
def _given(n, *, given, **_):
    w = [float(x) for x in _need(given, n, "given weights")]
    if abs(sum(w)) < 1e-12:
        raise ConfigError(f"weights {w} sum to zero", hint="give at least one non-zero weight")
    return w


@_register("score", ("scores",), "∝ the target score (accuracy), or 1/score for a loss")
def _score(n, *, scores, higher_is_better, losses, **_):
    if losses is not None:  # a loss is a score where lower is better
        scores, higher_is_better = losses, False
    vals = _positive(_need(scores, n, "scores"), "score")
    return _normalise_logs([math.log(v) if higher_is_better else -math.log(v) for v in vals])


@_register("softmax", ("scores",), "softmax of the target scores at temperature T (default 1)", arg="temperature")
def _softmax(n, *, scores, higher_is_better, losses, temperature, **_):
    if losses is not None:
        scores, higher_is_better = losses, False
    if temperature <= 0:
        raise ConfigError(f"softmax temperature must be positive, got {temperature}")
    vals = _need(scores, n, "scores")
    sign = 1.0 if higher_is_better else -1.0
    return _normalise_logs([sign * float(v) / temperature for v in vals])


@_register("mwa:loss", ("losses",), "MWA: ∝ (1/final training loss)^p")
def _mwa_loss(n, *, losses, penalty, **_):
    _check_penalty(penalty)
    vals = _positive(_need(losses, n, "training losses"), "loss")
    return _normalise_logs([-penalty * math.log(v) for v in vals])


@_register("mwa:steps", ("steps",), "MWA: ∝ training step^p")
def _mwa_steps(n, *, steps, penalty, **_):
    _check_penalty(penalty)
    vals = _positive(_need(steps, n, "training steps"), "step")
    return _normalise_logs([penalty * math.log(v) for v in vals])


SCHEMES["optimized"] = Scheme("optimized", None, ("target",), "searched by CMA-ES on the target sample",
                              in_merge=False)


def mwa_losses(losses: Sequence[float | None], scores: Sequence[float | None] | None,
               higher_is_better: bool) -> tuple[list, str | None]:
    """The one MWA fallback, for select and merge alike: when some donor has no training loss and
    every donor has a target-sample score that is a loss (lower is better), all donors are weighted
    by that score instead (one source for all, never a mix). Returns the losses and where they came
    from (None: the training losses, as recorded); otherwise the gap is left for the scheme to refuse."""
    losses = list(losses)
    if None not in losses:
        return losses, None
    if not higher_is_better and scores is not None and len(scores) == len(losses) and None not in scores:
        return [float(s) for s in scores], "target sample"
    return losses, None


def _check_penalty(penalty: float) -> None:
    if penalty < 0:
        raise ConfigError(f"MWA penalty must be >= 0, got {penalty}")


def _need(vals, n: int, what: str) -> list[float]:
    if vals is None:
        raise ConfigError(f"this weighting scheme needs {what}")
    vals = list(vals)
    if len(vals) != n:
        raise ConfigError(f"got {len(vals)} {what} for {n} models")
    if any(v is None for v in vals):
        raise ConfigError(f"{what} missing for model(s) {[i for i, v in enumerate(vals) if v is None]}",
                          hint="MWA reads trainer_state.json of each checkpoint (or the library catalog with "
                          "--library); pass weights explicitly otherwise")
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


# ----------------------------------------------------------------------------
# A plan's weights


def resolve_weights(plan, cks: list, base_ck, metrics: Mapping[str, Metrics] | None = None,
                    notes: list[str] | None = None) -> list[float]:
    """One weight per donor of ``plan`` (the base first when ``include_base``), from its weighting scheme.

    ``cks``/``base_ck``: the opened checkpoints; ``metrics``: resolved path → (final loss, step) for
    checkpoints without trainer_state.json, looked up by the caller. A fallback used is told in ``notes``."""
    specs = list(plan.models)
    ws = [m.weight for m in specs]
    if plan.include_base:
        cks, ws, specs = [base_ck] + cks, [plan.base_weight] + ws, [None] + specs
    spec = plan.weighting or ("given" if any(w is not None for w in ws) else "uniform")
    scheme, args = parse(spec)
    if not all(is_plain(w) for w in ws) or plan.slices:
        return [None] * len(ws)  # gradients / filters / slices: resolved per tensor (engine._resolve_items)
    if scheme.name == "given" and all(w is not None for w in ws):
        return [float(as_number(w)) for w in ws]  # as written: negative or zero-sum weights (task negation) run
    if scheme.name == "given":
        who = ["base" if s is None else s.ref for s, w in zip(specs, ws) if w is None]
        raise ConfigError(f"no weight given for {who}", path=plan.source,
                          hint="give every model a weight (and base_weight with include_base), "
                          "or use --weights uniform")
    losses, steps = _training_metrics(cks, metrics or {})
    scores = [s.score if s is not None else None for s in specs]
    if "losses" in scheme.needs:
        losses, source = mwa_losses(losses, scores, plan.higher_is_better)
        if source and notes is not None:
            notes.append(f"{scheme.name}: a donor has no training loss, so every donor is weighted by its "
                         f"{source} loss (the selection's scores)")
    try:
        return compute_weights(scheme.name, n=len(cks), given=ws if scheme.name == "given" else None,
                               losses=losses if "losses" in scheme.needs else None, steps=steps, scores=scores,
                               higher_is_better=plan.higher_is_better, penalty=plan.penalty,
                               temperature=args.get("temperature", plan.temperature))
    except ConfigError as e:
        raise ConfigError(e.message, path=plan.source or e.path, hint=e.hint) from None


def _training_metrics(cks: list, metrics: Mapping[str, Metrics]) -> tuple[list, list]:
    """Per checkpoint: its own trainer_state.json metrics, gaps filled from the caller's ``metrics``."""
    losses, steps = [], []
    for c in cks:
        m = c.metrics if c is not None else None
        loss, step = (m.final_loss, m.global_step) if m else (None, None)
        extra = metrics.get(str(c.path)) if c is not None else None
        if extra is not None and (loss is None or step is None):
            loss = loss if loss is not None else extra[0]
            step = step if step is not None else extra[1]
        losses.append(loss)
        steps.append(step)
    return losses, steps


__all__ = ["SCHEMES", "Metrics", "Scheme", "compute_weights", "mwa_losses", "names", "parse", "resolve_weights"]
