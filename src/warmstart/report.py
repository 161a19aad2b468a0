"""The report: what the warm start gained over training from the plain base.

Inputs are the two training curves (``curve.json`` written by
:mod:`warmstart.train`) plus the selection and merge overhead; outputs are
``report.md``, ``report.json`` and PNG plots. Everything here is plain Python
over logged numbers, so a report can be re-rendered at any time
(``warmstart report RUN_DIR``) without touching a model.

Parity, the headline number: the first step at which the warm start's eval
metric reaches the baseline's *final* value, linearly interpolated between the
two evaluations around the crossing, as a percentage of the baseline's steps.
The wall-clock version adds the time spent selecting and merging, so the warm
start pays for its own overhead.

No speed-up is claimed when nothing was learned (the baseline never improved on
its step-0 value) or when the two curves are within the evaluation's noise at
every evaluation (:func:`assess_effect`); the headline then says which. Δ carries
a 95% interval: Newcombe's hybrid score interval for two proportions for per-row
metrics (the curves store aggregate values only, so no paired bootstrap).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as _metrics
from ._io import atomic_write_json, atomic_write_text, read_json
from .errors import ConfigError, DataError, WarmstartError
from .rundir import STAGES, Curve, RunDir
from .rundir import finite as _finite

# Preferred headline metrics, best first; the first one a curve logs is used.
METRIC_PREFERENCE = ("eval_mc_accuracy", "eval_accuracy", "eval_exact_match", "eval_token_accuracy")


def pick_metric(*curves: Curve, prefer: str | None = None) -> str:
    """The headline metric: ``prefer`` if given, else the first of METRIC_PREFERENCE all curves log."""
    logged = [set(c.columns()) for c in curves]
    if prefer:
        key = prefer if prefer.startswith("eval_") else f"eval_{prefer}"
        if not all(key in cols for cols in logged):
            raise ConfigError(f"metric {prefer!r} is not in every curve", hint=f"logged: {sorted(logged[0])}")
        return key
    for key in METRIC_PREFERENCE:
        if all(key in cols for cols in logged):
            return key
    return "eval_loss"


# ----------------------------------------------------------------------------
# Parity


@dataclass
class Parity:
    """When the warm start first matched the baseline's final metric.

    ``status`` is ``"at_start"`` (already there at the step-0 evaluation, before any
    training), ``"reached"`` or ``"never"``. Percentages are of the baseline's steps
    and of the baseline's training time; ``wall_s`` includes the itemised overhead.
    :func:`build_report` turns a crossing that is no speed-up into ``"no_effect"``
    (with ``reason``; see :func:`assess_effect`).
    """

    metric: str
    target: float
    status: str
    baseline_steps: int
    baseline_time_s: float
    step: float | None = None
    percent_steps: float | None = None
    train_time_s: float | None = None
    overhead_s: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    percent_wall: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def crossing(series: list[tuple[float, float, float]], target: float, *,
             higher_is_better: bool = True) -> tuple[float, float] | None:
    """First (step, time) at which ``value`` reaches ``target``, from (step, time, value) points.

    Linear interpolation between the last evaluation below the target and the first
    at or above it; ``None`` if it is never reached. The first point reaching it
    returns that point itself (no extrapolation before the first evaluation).
    """
    sign = 1.0 if higher_is_better else -1.0
    prev = None
    for step, t, v in series:
        if sign * v >= sign * target:
            if prev is None:
                return step, t
            s0, t0, v0 = prev
            frac = (target - v0) / (v - v0)  # v0 < target <= v (for higher_is_better), so 0 < frac <= 1
            return s0 + frac * (step - s0), t0 + frac * (t - t0)
        prev = (step, t, v)
    return None


def compute_parity(warm: Curve, baseline: Curve, metric: str | None = None,
                   overhead_s: dict[str, float] | None = None) -> Parity:
    """Steps and wall clock for ``warm`` to reach ``baseline``'s final ``metric``."""
    metric = metric or pick_metric(warm, baseline)
    target = baseline.final(metric)
    if target is None:
        raise DataError(f"baseline curve has no {metric} values")
    higher = _metrics.higher_is_better(metric)
    pts = [(p["step"], p.get("time_s") or 0.0, p[metric]) for p in sorted(warm.points, key=lambda p: p["step"])
           if _finite(p.get(metric))]
    overhead = {k: float(v) for k, v in (overhead_s or {}).items()}
    par = Parity(metric=metric, target=target, status="never", baseline_steps=baseline.steps,
                 baseline_time_s=baseline.train_time_s, overhead_s=overhead)
    hit = crossing(pts, target, higher_is_better=higher)
    if hit is None:
        return par
    step, t = hit
    par.status = "at_start" if step == 0 else "reached"
    par.step, par.train_time_s = step, t
    par.percent_steps = 100.0 * step / par.baseline_steps if par.baseline_steps else None
    par.wall_s = t + sum(overhead.values())
    par.percent_wall = 100.0 * par.wall_s / par.baseline_time_s if par.baseline_time_s else None
    return par


# ----------------------------------------------------------------------------
# Noise: is there an effect to report at all?

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Metrics that are a mean of one 0/1 outcome per eval row (mc_accuracy_sum / _norm included);
# token_accuracy is per token and the loss is continuous, so neither gets a binomial interval.
ROW_PROPORTIONS = ("accuracy", "exact_match", "mc_accuracy")


def is_row_proportion(metric: str) -> bool:
    name = metric.removeprefix("eval_")
    return name in ROW_PROPORTIONS or name.startswith("mc_accuracy")


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p`` observed on ``n`` rows."""
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(p1: float, n1: int, p2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval for p1 − p2 (Newcombe 1998, method 10: hybrid score from two Wilson intervals).

    Written out rather than imported: statsmodels has it but is not otherwise needed. It treats the
    two runs as independent samples; both are scored on the same rows, which usually correlates
    them, so the interval is on the wide (conservative) side of a paired one.
    """
    l1, u1 = wilson_interval(p1, n1, z)
    l2, u2 = wilson_interval(p2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def eval_rows(c: Curve) -> int | None:
    n = c.meta.get("eval_examples")
    return int(n) if _finite(n) and n > 0 else None


def assess_effect(warm: Curve, baseline: Curve, metric: str) -> dict:
    """``verdict`` None (an effect to report), ``"baseline_flat"`` (the baseline's final value is
    no better than its step-0 value: nothing was learned to speed up) or ``"within_noise"`` (at
    every step both curves evaluated, the 95% interval of their difference includes 0 — for
    metrics without an interval, the curves coincide). Also ``eval_rows`` and ``delta_ci95``."""
    sign = 1.0 if _metrics.higher_is_better(metric) else -1.0
    n_w, n_b = eval_rows(warm), eval_rows(baseline)
    prop = is_row_proportion(metric) and n_w is not None and n_b is not None
    wf, bf = warm.final(metric), baseline.final(metric)
    out: dict[str, Any] = {"eval_rows": n_b or n_w, "delta_ci95": None, "ci_method": None, "verdict": None,
                           "evaluations_compared": 0, "baseline_start": None}
    if prop and wf is not None and bf is not None:
        out["delta_ci95"] = list(newcombe_interval(wf, n_w, bf, n_b))
        out["ci_method"] = "Newcombe hybrid score interval, two proportions"
    b_series = dict(baseline.series(metric))
    out["baseline_start"] = b_series.get(0.0)
    if out["baseline_start"] is not None and bf is not None and sign * (bf - out["baseline_start"]) <= 0:
        out["verdict"] = "baseline_flat"
        return out
    common = [(w, b_series[s]) for s, w in warm.series(metric) if s in b_series]
    out["evaluations_compared"] = len(common)

    def same(w: float, b: float) -> bool:
        if prop:
            lo, hi = newcombe_interval(w, n_w, b, n_b)
            return lo <= 0 <= hi
        return abs(w - b) <= 1e-9 * max(1.0, abs(b))

    if common and all(same(w, b) for w, b in common):
        out["verdict"] = "within_noise"
    return out


# ----------------------------------------------------------------------------
# The report: numbers (report.json), prose (report.md), plots (PNG)


def build_report(warm: Curve, baseline: Curve | None = None, *, metric: str | None = None,
                 overhead_s: dict[str, float] | None = None, **context: Any) -> dict:
    """All the report's numbers as one JSON-able dict. ``context`` (target, base, donors,
    merge, stages, ...) is copied in as is."""
    curves = [warm] + ([baseline] if baseline else [])
    metric = metric or pick_metric(*curves)
    rep: dict[str, Any] = {"metric": metric, **context}
    rep["warm"] = _run_summary(warm, metric)
    if baseline is not None:
        rep["baseline"] = _run_summary(baseline, metric)
        w, b = rep["warm"]["final"], rep["baseline"]["final"]
        rep["delta"] = None if w is None or b is None else w - b
        rep["effect"] = eff = assess_effect(warm, baseline, metric)
        par = compute_parity(warm, baseline, metric, overhead_s).to_dict()
        if eff["verdict"] == "within_noise" or eff["verdict"] and par["status"] != "never":
            # a crossing inside the noise (or of a flat baseline) is no speed-up: not reported as one
            par.update(status="no_effect", reason=eff["verdict"], step=None, percent_steps=None,
                       train_time_s=None, wall_s=None, percent_wall=None)
        par.update(eval_rows=eff["eval_rows"], baseline_start=eff["baseline_start"],
                   evaluations_compared=eff["evaluations_compared"])
        rep["parity"] = par
    rep["overhead_s"] = dict(overhead_s or {})
    return rep


def _run_summary(c: Curve, metric: str) -> dict:
    first = min(c.points, key=lambda p: p["step"]) if c.points else {}
    return {"final": c.final(metric), "final_eval_loss": c.final("eval_loss"),
            "zero_shot": first.get(metric) if first.get("step") == 0 else None,
            "zero_shot_eval_loss": first.get("eval_loss") if first.get("step") == 0 else None,
            "steps": c.steps, "train_time_s": c.train_time_s, "init": c.meta.get("init"),
            "evaluation": eval_cost(c)}


def eval_cost(c: Curve) -> dict:
    """What the eval curve cost the run: its points, their seconds and that cost's share of the run's time
    (training + evaluation, or + the wait at the end when evaluation ran on a second thread)."""
    secs = sum(p.get("evaluation_s") or 0.0 for p in c.points)
    train, asyn = c.train_time_s or 0.0, bool(c.meta.get("eval_async"))
    out = {"points": len(c.points), "seconds": secs, "async": asyn}
    if asyn:
        out["waited_s"] = c.meta.get("eval_wait_s") or 0.0
    cost = out["waited_s"] if asyn else secs
    return {**out, "share": cost / (train + cost) if train + cost > 0 else None}


def _eval_cell(e: dict | None) -> str:
    if not e or not e.get("points"):
        return "–"
    share = "" if e.get("share") is None else f", {100 * e['share']:.0f}% of the run"
    if e.get("async"):
        return f"{e['seconds']:.1f} s on a second thread, {e['waited_s']:.1f} s waited{share}"
    return f"{e['seconds']:.1f} s at {e['points']} points{share}"


def _f(v, fmt=".4f") -> str:
    return "–" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0f}%"


def parity_sentence(par: dict) -> list[str]:
    name = par["metric"].removeprefix("eval_")
    rows = f"{par['eval_rows']} eval rows" if par.get("eval_rows") else "eval rows unknown"
    if par["status"] == "no_effect" and par.get("reason") == "baseline_flat":
        start = "–" if par.get("baseline_start") is None else f"{par['baseline_start']:.4f}"
        return [f"**Steps to parity: not measured** — the baseline never improved on its step-0 {name} "
                f"({start} at step 0, {par['target']:.4f} at the end; {rows}): nothing was learned that a warm "
                f"start could reach sooner. Train longer, with a higher learning rate, or on more data."]
    if par["status"] == "no_effect":
        return [f"**Steps to parity: no measurable difference** — warm start and baseline are within the "
                f"evaluation's noise at all {par.get('evaluations_compared')} evaluations (the 95% interval of "
                f"their difference includes 0; {rows}), so no speed-up is claimed."]
    if par["status"] == "never":
        return [f"**Steps to parity: never** — the warm start did not reach the baseline's final "
                f"{name} ({par['target']:.4f}) within its {par['baseline_steps']} steps."]
    when = ("already at step 0, before any training" if par["status"] == "at_start"
            else f"at step {par['step']:.1f}")
    items = " + ".join(f"{k} {v:.1f} s" for k, v in par["overhead_s"].items())
    items = f"{items} + training {par['train_time_s']:.1f} s" if items else f"training {par['train_time_s']:.1f} s"
    return [f"**Steps to parity: {par['step']:.1f} of {par['baseline_steps']} ({_pct(par['percent_steps'])})** — "
            f"the warm start reached the baseline's final {name} ({par['target']:.4f}) {when}.",
            f"**Wall clock to parity: {par['wall_s']:.1f} s ({_pct(par['percent_wall'])} of the baseline's "
            f"{par['baseline_time_s']:.1f} s of training)** = {items}."]


def delta_sentence(rep: dict) -> str:
    """The headline difference with its 95% interval and the number of eval rows behind it."""
    m, eff = rep["metric"].removeprefix("eval_"), rep.get("effect") or {}
    rows = f"{eff['eval_rows']} eval rows" if eff.get("eval_rows") else "eval rows unknown"
    ci = eff.get("delta_ci95")
    if ci:
        spread = f"95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, {rows}; Newcombe interval for two proportions"
    else:
        spread = f"{rows}; no interval: {m} is not one 0/1 outcome per row"
    return f"**Δ final {m}: {rep['delta']:+.4f}** ({spread})."


def render_markdown(rep: dict, plots: list[str] = ()) -> str:
    m = rep["metric"].removeprefix("eval_")
    lines = [f"# warmstart report: {rep.get('name') or rep.get('target') or 'run'}", ""]
    for k in ("target", "eval", "base"):
        if rep.get(k):
            lines.append(f"- {k}: `{rep[k]}`")
    if rep.get("eval_rows"):
        lines.append(f"- eval rows: {eval_rows_text(rep['eval_rows'])}")
    eff = rep.get("effect") or {}
    lines += [f"- headline metric: {m} (held-out eval split"
              + (f", {eff['eval_rows']} rows)" if eff.get("eval_rows") else ")"), ""]
    w, b = rep["warm"], rep.get("baseline")
    lines += ["| | baseline (plain base) | warm start | Δ |", "|---|---|---|---|"]
    lines.append(f"| final {m} | {_f(b and b['final'])} | {_f(w['final'])} | {_f(rep.get('delta'), '+.4f')} |")
    dl = None if not b or w["final_eval_loss"] is None or b["final_eval_loss"] is None \
        else w["final_eval_loss"] - b["final_eval_loss"]
    lines.append(f"| final eval loss | {_f(b and b['final_eval_loss'])} | {_f(w['final_eval_loss'])} "
                 f"| {_f(dl, '+.4f')} |")
    lines.append(f"| {m} at step 0 (zero-shot init) | {_f(b and b['zero_shot'])} | {_f(w['zero_shot'])} | |")
    lines.append(f"| steps | {b['steps'] if b else '–'} | {w['steps']} | |")
    lines.append(f"| training time (s, eval excluded) | {_f(b and b['train_time_s'], '.1f')} | "
                 f"{_f(w['train_time_s'], '.1f')} | |")
    lines.append(f"| evaluation | {_eval_cell(b and b.get('evaluation'))} | {_eval_cell(w.get('evaluation'))} | |")
    lines.append("")
    if rep.get("delta") is not None:
        lines += [delta_sentence(rep), ""]
    if rep.get("parity"):
        for sentence in parity_sentence(rep["parity"]):
            lines += [sentence, ""]
    if rep.get("selection"):
        lines += [selection_sentence(rep["selection"], rep), ""]
    if rep.get("transfer"):
        lines += [transfer_sentence(rep["transfer"]), ""]
    lines += _donor_lines(rep) + _transfer_lines(rep) + _stage_lines(rep)
    if plots:
        lines += ["## Curves", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def eval_rows_text(r: dict) -> str:
    """'150 used of 300 given (eval_limit 150)', or '71 (all given)'."""
    what = "given" if r.get("source") == "file" else "held out"
    if r.get("used") == r.get("given"):
        return f"{r.get('used')} (all {what})"
    return f"{r.get('used')} used of {r.get('given')} {what} (eval_limit {r.get('limit')})"


def selection_sentence(s: dict, rep: dict) -> str:
    """What selection cost and what it was made of, beside the training cost (the wall-clock line's parts)."""
    if s.get("sample_rows") is None:  # a run selected before the marker recorded its sample
        return f"**Selection cost: {s['wall_s']:.1f} s**."
    cached = f", {s['cached']} from the cache" if s.get("cached") else ""
    b, w = rep.get("baseline"), rep["warm"]
    train = f"baseline training {b['train_time_s']:.1f} s, " if b else ""
    if b and b.get("train_time_s") and b.get("steps"):  # the unit the wall-clock line is read in
        train = (f"baseline training {b['train_time_s']:.1f} s (selection = "
                 f"{s['wall_s'] / (b['train_time_s'] / b['steps']):.1f} of its steps), ")
    merge = (rep.get("overhead_s") or {}).get("merge")
    return (f"**Selection cost: {s['wall_s']:.1f} s** — {s.get('candidates')} candidates scored by "
            f"`{s.get('scorer')}` on {s.get('sample_rows')} target rows ({s.get('sample')}{cached}); "
            + (f"merge {merge:.1f} s; " if merge is not None else "")
            + f"{train}warm-start training {w['train_time_s']:.1f} s (evaluation excluded).")


def transfer_sentence(t: dict) -> str:
    """'The warm start is a transfer of X (α 1) from OLD onto BASE, ...': what the warm start was."""
    what = ("an adapter (the fine-tune's A, its B scaled by α), trained further" if t.get("output") == "adapter"
            else "a full model, trained with a fresh LoRA or fully as the baseline")
    return (f"**Warm start: transfer of `{t.get('finetuned')}` (α {t.get('alpha'):g}) from `{t.get('base_old')}` "
            f"onto `{t.get('base_new')}`** — base_new + α·(fine-tune − base_old), as {what}; "
            f"transfer {t.get('wall_s', 0):.1f} s.")


def _transfer_lines(rep: dict) -> list[str]:
    t = rep.get("transfer")
    if not t:
        return []
    counts = ", ".join(f"{k} {v}" for k, v in (t.get("counts") or {}).items())
    out = ["## Transfer", "", "| | |", "|---|---|",
           f"| fine-tune ({t.get('kind')}) | `{t.get('finetuned')}` |",
           f"| old base ({t.get('base_old_from')}) | `{t.get('base_old')}` |",
           f"| new base | `{t.get('base_new')}` |", f"| α | {t.get('alpha'):g} |",
           f"| written as | {t.get('output')} |",
           f"| cosine of the two bases | {_f(t.get('cos_bases'), '.6f')} |",
           f"| relative base drift ‖new − old‖/‖old‖ | {_f(t.get('rel_drift'), '.6f')} |",
           f"| relative diff ‖fine-tune − old‖/‖old‖ | {_f(t.get('rel_diff'), '.6f')} |",
           f"| cosine(base drift, diff) | {_f(t.get('cos_drift_diff'), '.6f')} |",
           f"| tensors | {counts} |", f"| transfer time | {t.get('wall_s', 0):.1f} s |", ""]
    out += [f"- warning: {w}" for w in t.get("warnings") or []]
    return out + ([""] if t.get("warnings") else [])


def _donor_lines(rep: dict) -> list[str]:
    out = []
    if rep.get("donors"):
        out += ["## Donors", "", "| id | task | kind | score | weight | ref |", "|---|---|---|---|---|---|"]
        for d in rep["donors"]:
            out.append(f"| {d.get('id', '')} | {d.get('task') or ''} | {d.get('kind', '')} | {_f(d.get('score'))} | "
                       f"{_f(d.get('weight'), '.3f')} | `{d.get('ref', '')}` |")
        out.append("")
    if rep.get("merge"):
        out += ["## Merge recipe", "", "```json", json.dumps(rep["merge"], indent=2, default=str), "```", ""]
    return out


def _stage_lines(rep: dict) -> list[str]:
    if not rep.get("stages"):
        return []
    out = ["## Stages", "", "| stage | wall time (s) |", "|---|---|"]
    out += [f"| {k} | {_f(v, '.1f')} |" for k, v in rep["stages"].items()]
    return out + [""]


def plot_title(rep: dict) -> str:
    """'warm start vs baseline: capitals.jsonl (run runs/capitals)' from the report's context."""
    target = Path(rep["target"]).name if rep.get("target") else rep.get("name") or "target"
    run = f" (run {rep['run_dir']})" if rep.get("run_dir") else ""
    return f"warm start vs baseline: {target}{run}"


def _metric_label(key: str) -> str:
    return key.removeprefix("eval_").replace("_", " ") if key != "eval_loss" else "eval loss"


def _is_fraction(key: str) -> bool:
    return is_row_proportion(key) or "accuracy" in key


def make_figures(warm: Curve, baseline: Curve | None, metric: str, overhead_s: float = 0.0,
                 title: str = "warm start vs baseline", overhead_label: str = "selection + merge"
                 ) -> list[tuple[str, Any]]:
    """The two figures (vs step, vs wall clock) as (file name, matplotlib Figure), unsaved.

    The baseline is dashed with hollow square markers and drawn above the warm start, so it
    stays visible where the curves coincide. On the wall-clock axis the warm start begins after
    its selection + merge time, shaded and labelled, so its overhead is seen at a glance."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figs = []
    for x, fname, xlabel in (("step", "curves_step.png", "training step"),
                             ("time_s", "curves_wall.png", "training wall clock (s; eval excluded)")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
        fig.suptitle(title + (" — by step" if x == "step" else " — by wall clock"), fontsize=10)
        for ax, key in zip(axes, (metric, "eval_loss")):
            _draw_runs(ax, warm, baseline, key, x, overhead_s if x == "time_s" else 0.0, overhead_label)
            if x == "step":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(_metric_label(key))
            if _is_fraction(key):
                top = max([v for c in (warm, baseline) if c for _, v in c.series(key)] or [0.0])
                ax.set_ylim(0.0, min(1.0, max(0.05, 1.1 * top)))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        figs.append((fname, fig))
    return figs


def _draw_runs(ax, warm: Curve, baseline: Curve | None, key: str, x: str, shift: float,
               label: str = "selection + merge") -> None:
    if shift > 0:
        ax.axvspan(0.0, shift, color="tab:orange", alpha=0.15, lw=0, label=label)
    s = warm.series(key, x)
    if s:
        ax.plot([a + shift for a, _ in s], [v for _, v in s], "-", marker="o", ms=4, color="tab:orange",
                label="warm start", zorder=2)
    s = baseline.series(key, x) if baseline else []
    if s:
        ax.plot([a for a, _ in s], [v for _, v in s], "--", marker="s", ms=7, mfc="none", mew=1.3,
                color="tab:blue", label="baseline", zorder=3)
    if baseline and key != "eval_loss" and baseline.final(key) is not None:
        ax.axhline(baseline.final(key), ls=":", lw=0.8, color="gray", label="baseline final", zorder=1)


def plot_curves(warm: Curve, baseline: Curve | None, metric: str, out_dir: str | Path,
                overhead_s: float = 0.0, title: str = "warm start vs baseline",
                overhead_label: str = "selection + merge") -> list[str]:
    """Two PNGs (vs step, vs wall clock), each with the metric and the eval loss for both runs
    (:func:`make_figures`); returns their file names."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    files = []
    for fname, fig in make_figures(warm, baseline, metric, overhead_s, title, overhead_label):
        tmp = out_dir / f".{fname}.tmp"
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        tmp.replace(out_dir / fname)
        files.append(fname)
    return files


def write_report(rep: dict, warm: Curve, baseline: Curve | None, out_dir: str | Path) -> list[Path]:
    """report.json, report.md and the plots into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(warm, baseline, rep["metric"], out_dir, sum(rep.get("overhead_s", {}).values()),
                        title=plot_title(rep),
                        overhead_label="transfer" if rep.get("transfer") else "selection + merge")
    rep = {**rep, "plots": plots}
    atomic_write_json(out_dir / "report.json", rep)
    atomic_write_text(out_dir / "report.md", render_markdown(rep, plots))
    return [out_dir / "report.json", out_dir / "report.md"] + [out_dir / p for p in plots]


def report_run(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Build and write the report of a pipeline run directory (into ``out``, default RUN/report)."""
    rd = RunDir(run_dir)
    if not rd.done("warm"):
        raise DataError("the warm-start training has not finished in this run directory", path=rd.root,
                        hint="run `warmstart run` (same arguments) to finish it")
    warm = rd.curve("warm")
    baseline = rd.curve("baseline") if rd.done("baseline") else None
    info = rd.info() if rd.is_run() else {}
    sel, mrg, spl = rd.read_marker("select"), rd.read_marker("merge"), rd.read_marker("split")
    tr = mrg.outputs.transfer if mrg else None
    if tr:  # a transfer run: the transfer is the overhead (its select stage scored nothing)
        overhead = {"transfer": mrg.wall_s}
    else:
        overhead = {k: m.wall_s for k, m in (("select", sel), ("merge", mrg)) if m}
    sp = spl.outputs if spl else None
    rep = build_report(warm, baseline, metric=((info.get("config") or {}).get("report") or {}).get("metric"),
                       overhead_s=overhead, name=Path(info.get("target", "run")).stem, target=info.get("target"),
                       eval=info.get("eval") or f"carved from target ({sp and sp.eval_rows} rows)",
                       base=info.get("base"), donors=sel.outputs.donors if sel and not tr else None,
                       merge=mrg.outputs.recipe if mrg else None, merge_result=mrg.outputs.result if mrg else None,
                       stages=rd.stage_times(), split=sp.to_dict() if sp else {}, run_dir=str(rd.root),
                       selection=None if tr else _selection_cost(sel),
                       eval_rows=info.get("eval_rows") or _eval_rows(sp, info), **({"transfer": tr} if tr else {}))
    write_report(rep, warm, baseline, out or rd.stage("report"))
    return rep


def _selection_cost(sel) -> dict | None:
    """The select stage's time and what it was made of (the report's selection sentence)."""
    if sel is None:
        return None
    so = sel.outputs
    return {"wall_s": sel.wall_s, "scorer": so.scorer, "metric": so.metric, "sample": so.sample,
            "sample_rows": so.sample_rows, "cached": so.cached,
            "candidates": so.candidates if so.candidates is not None else len(so.ranking or [])}


def _eval_rows(sp, info: dict) -> dict | None:
    """The eval rows of a run whose run.json predates its ``eval_rows`` record: from the split marker."""
    if sp is None or sp.eval_rows is None:
        return None
    return {"used": sp.eval_rows, "given": sp.eval_rows if sp.eval_rows_given is None else sp.eval_rows_given,
            "source": "file" if info.get("eval") else "carved"}


# ----------------------------------------------------------------------------
# Several runs side by side (`warmstart compare`)

COMPARE_COLUMNS = ("target", "metric", "baseline", "warm", "delta", "zero_shot", "parity_steps_pct",
                   "parity_wall_pct")


def collect_reports(run_dirs: list[str | Path]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The reports of the finished runs, and (run dir, why it was skipped + what to do) for the others."""
    reports, skipped = [], []
    for d in run_dirs:
        rd = RunDir(d)
        f = rd.stage("report") / "report.json"
        if f.is_file():
            try:
                reports.append(read_json(f, "report"))
                continue
            except WarmstartError as e:
                skipped.append((str(d), f"{e.message}; re-render it with `warmstart report {d}`"))
                continue
        if not rd.is_run():
            skipped.append((str(d), "not a warmstart run directory (no run.json)"))
            continue
        todo = [s for s in STAGES if not rd.done(s)]
        if todo == ["report"]:
            why = f"no report yet; write it with `warmstart report {d}`"
        else:
            why = (f"unfinished run (stage {todo[0]} not done); re-run the same `warmstart run` command "
                   f"(--out {d}) to resume it")
        skipped.append((str(d), why))
    return reports, skipped


def compare_rows(reports: list[dict]) -> list[dict]:
    """One row per report, then a mean row. Parity means are over runs that reached it
    ("never" counts in the n/N, not in the mean)."""
    rows = []
    for r in reports:
        par = r.get("parity") or {}
        rows.append({"target": r.get("name") or r.get("target"), "metric": r["metric"].removeprefix("eval_"),
                     "baseline": (r.get("baseline") or {}).get("final"), "warm": r["warm"]["final"],
                     "delta": r.get("delta"), "zero_shot": r["warm"].get("zero_shot"),
                     "parity_steps_pct": par.get("percent_steps"), "parity_wall_pct": par.get("percent_wall"),
                     "parity_status": par.get("status")})
    mean: dict[str, Any] = {"target": "mean", "metric": ""}
    for k in COMPARE_COLUMNS[2:]:
        vals = [r[k] for r in rows if _finite(r[k])]
        mean[k] = sum(vals) / len(vals) if vals else None
    reached = sum(1 for r in rows if r["parity_status"] in ("reached", "at_start"))
    mean["parity_status"] = f"{reached}/{len(rows)} reached"
    return rows + [mean]


def compare_markdown(rows: list[dict]) -> str:
    head = ["target", "metric", "baseline", "warm", "Δ", "zero-shot", "steps to parity", "wall to parity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        word = {"never": "never", "no_effect": "no effect"}.get(r.get("parity_status"))
        steps = word or _pct(r["parity_steps_pct"])
        wall = word or _pct(r["parity_wall_pct"])
        if r["target"] == "mean":
            steps, wall = f"{steps} ({r['parity_status']})", wall
        lines.append(f"| {r['target']} | {r['metric']} | {_f(r['baseline'])} | {_f(r['warm'])} | "
                     f"{_f(r['delta'], '+.4f')} | {_f(r['zero_shot'])} | {steps} | {wall} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Curve",
    "Parity",
    "assess_effect",
    "build_report",
    "collect_reports",
    "compare_markdown",
    "compare_rows",
    "compute_parity",
    "eval_cost",
    "eval_rows_text",
    "crossing",
    "make_figures",
    "newcombe_interval",
    "pick_metric",
    "plot_curves",
    "render_markdown",
    "report_run",
    "selection_sentence",
    "transfer_sentence",
    "wilson_interval",
    "write_report",
]
