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
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_json, atomic_write_text, read_json
from .errors import ConfigError, DataError

# Preferred headline metrics, best first; the first one a curve logs is used.
METRIC_PREFERENCE = ("eval_mc_accuracy", "eval_accuracy", "eval_exact_match", "eval_token_accuracy")
LOWER_IS_BETTER = ("eval_loss",)


# ----------------------------------------------------------------------------
# Curves: one row per evaluation (step, time, train loss, eval metrics)


@dataclass
class Curve:
    """An evaluation curve. Each point has ``step``, ``time_s`` (training time so far,
    evaluation excluded), ``wall_s`` (since start, evaluation included), ``train_loss``
    and ``eval_*`` metrics."""

    points: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> Curve:
        path = Path(path)
        if path.is_dir():
            path = path / "curve.json"
        d = read_json(path, "curve file")
        if not isinstance(d, dict) or not isinstance(d.get("points"), list):
            raise DataError("curve file has no 'points' list", path=path)
        if not isinstance(d.get("meta", {}), dict):
            raise DataError("curve file's 'meta' is not a mapping", path=path)
        for i, p in enumerate(d["points"]):  # the report does arithmetic on every value
            num = (int, float, type(None))
            if not isinstance(p, dict) or not isinstance(p.get("step"), (int, float)) or \
                    not all(isinstance(v, num) for v in p.values()):
                raise DataError(f"curve point {i} is not a mapping of numbers with a 'step'", path=path)
        return cls(points=d["points"], meta=d.get("meta", {}))

    def to_dict(self) -> dict:
        return {"meta": self.meta, "points": self.points}

    def columns(self) -> list[str]:
        cols: list[str] = []
        for p in self.points:
            cols += [k for k in p if k not in cols]
        return cols

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        w.writeheader()
        for p in self.points:
            w.writerow({k: ("" if v is None else v) for k, v in p.items()})
        return buf.getvalue()

    def write(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "curve.json", self.to_dict())
        atomic_write_text(out_dir / "curve.csv", self.to_csv())

    def series(self, key: str, x: str = "step") -> list[tuple[float, float]]:
        """(x, value) pairs where ``key`` was logged, in step order."""
        pts = [p for p in self.points if _finite(p.get(key)) and _finite(p.get(x))]
        pts.sort(key=lambda p: p["step"])
        return [(float(p[x]), float(p[key])) for p in pts]

    def final(self, key: str) -> float | None:
        s = self.series(key)
        return s[-1][1] if s else None

    @property
    def steps(self) -> int:
        return int(self.meta.get("max_steps") or max((p["step"] for p in self.points), default=0))

    @property
    def train_time_s(self) -> float:
        return float(self.meta.get("train_time_s") or max((p.get("time_s") or 0 for p in self.points), default=0))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    higher = metric not in LOWER_IS_BETTER
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
        rep["parity"] = compute_parity(warm, baseline, metric, overhead_s).to_dict()
    rep["overhead_s"] = dict(overhead_s or {})
    return rep


def _run_summary(c: Curve, metric: str) -> dict:
    first = min(c.points, key=lambda p: p["step"]) if c.points else {}
    return {"final": c.final(metric), "final_eval_loss": c.final("eval_loss"),
            "zero_shot": first.get(metric) if first.get("step") == 0 else None,
            "zero_shot_eval_loss": first.get("eval_loss") if first.get("step") == 0 else None,
            "steps": c.steps, "train_time_s": c.train_time_s, "init": c.meta.get("init")}


def _f(v, fmt=".4f") -> str:
    return "–" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0f}%"


def parity_sentence(par: dict) -> list[str]:
    name = par["metric"].removeprefix("eval_")
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


def render_markdown(rep: dict, plots: list[str] = ()) -> str:
    m = rep["metric"].removeprefix("eval_")
    lines = [f"# warmstart report: {rep.get('name') or rep.get('target') or 'run'}", ""]
    for k in ("target", "eval", "base"):
        if rep.get(k):
            lines.append(f"- {k}: `{rep[k]}`")
    lines += [f"- headline metric: {m} (held-out eval split)", ""]
    w, b = rep["warm"], rep.get("baseline")
    lines += ["| | baseline (plain base) | warm start | Δ |", "|---|---|---|---|"]
    lines.append(f"| final {m} | {_f(b and b['final'])} | {_f(w['final'])} | {_f(rep.get('delta'), '+.4f')} |")
    dl = None if not b or w["final_eval_loss"] is None or b["final_eval_loss"] is None \
        else w["final_eval_loss"] - b["final_eval_loss"]
    lines.append(f"| final eval loss | {_f(b and b['final_eval_loss'])} | {_f(w['final_eval_loss'])} | {_f(dl, '+.4f')} |")
    lines.append(f"| {m} at step 0 (zero-shot init) | {_f(b and b['zero_shot'])} | {_f(w['zero_shot'])} | |")
    lines.append(f"| steps | {b['steps'] if b else '–'} | {w['steps']} | |")
    lines.append(f"| training time (s, eval excluded) | {_f(b and b['train_time_s'], '.1f')} | "
                 f"{_f(w['train_time_s'], '.1f')} | |")
    lines.append("")
    if rep.get("parity"):
        for sentence in parity_sentence(rep["parity"]):
            lines += [sentence, ""]
    lines += _donor_lines(rep) + _stage_lines(rep)
    if plots:
        lines += ["## Curves", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _donor_lines(rep: dict) -> list[str]:
    out = []
    if rep.get("donors"):
        out += ["## Donors", "", "| id | kind | score | weight | ref |", "|---|---|---|---|---|"]
        for d in rep["donors"]:
            out.append(f"| {d.get('id', '')} | {d.get('kind', '')} | {_f(d.get('score'))} | "
                       f"{_f(d.get('weight'), '.3f')} | `{d.get('ref', '')}` |")
        out.append("")
    if rep.get("merge"):
        import json

        out += ["## Merge recipe", "", "```json", json.dumps(rep["merge"], indent=2, default=str), "```", ""]
    return out


def _stage_lines(rep: dict) -> list[str]:
    if not rep.get("stages"):
        return []
    out = ["## Stages", "", "| stage | wall time (s) |", "|---|---|"]
    out += [f"| {k} | {_f(v, '.1f')} |" for k, v in rep["stages"].items()]
    return out + [""]


def plot_curves(warm: Curve, baseline: Curve | None, metric: str, out_dir: str | Path,
                overhead_s: float = 0.0) -> list[str]:
    """Two PNGs (vs step, vs wall clock), each with the metric and the eval loss for both runs.

    On the wall-clock axis the warm start begins at its selection + merge overhead."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    files = []
    for x, fname, xlabel in (("step", "curves_step.png", "step"),
                             ("time_s", "curves_wall.png", "wall clock (s, incl. select + merge for warm)")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, (metric, "eval_loss")):
            for c, label, shift in ((baseline, "baseline", 0.0), (warm, "warm start", overhead_s)):
                s = c.series(key, x) if c else []
                if s:
                    off = shift if x == "time_s" else 0.0
                    ax.plot([a + off for a, _ in s], [v for _, v in s], marker="o", ms=3, label=label)
            if baseline and key == metric and baseline.final(key) is not None:
                ax.axhline(baseline.final(key), ls="--", lw=0.8, color="gray", label="baseline final")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(key.removeprefix("eval_"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
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
    plots = plot_curves(warm, baseline, rep["metric"], out_dir, sum(rep.get("overhead_s", {}).values()))
    rep = {**rep, "plots": plots}
    atomic_write_json(out_dir / "report.json", rep)
    atomic_write_text(out_dir / "report.md", render_markdown(rep, plots))
    return [out_dir / "report.json", out_dir / "report.md"] + [out_dir / p for p in plots]


def report_run(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Build and write the report of a pipeline run directory (into ``out``, default RUN/report)."""
    from .pipeline import RunDir

    rd = RunDir(run_dir)
    if not rd.done("warm"):
        raise DataError("the warm-start training has not finished in this run directory", path=rd.root,
                        hint="run `warmstart run` (same arguments) to finish it")
    warm = Curve.from_file(rd.stage("warm"))
    baseline = Curve.from_file(rd.stage("baseline")) if rd.done("baseline") else None
    info = rd.info() if (rd.root / "run.json").is_file() else {}
    sel, mrg = rd.marker("select") or {}, rd.marker("merge") or {}
    overhead = {k: m["wall_s"] for k, m in (("select", sel), ("merge", mrg)) if m}
    split = (rd.marker("split") or {}).get("outputs", {})
    metric = ((info.get("config") or {}).get("report") or {}).get("metric")
    rep = build_report(warm, baseline, metric=metric, overhead_s=overhead, name=Path(info.get("target", "run")).stem,
                       target=info.get("target"), eval=info.get("eval") or f"carved from target ({split.get('eval_rows')} rows)",
                       base=info.get("base"), donors=sel.get("outputs", {}).get("donors"),
                       merge=mrg.get("outputs", {}).get("recipe"), merge_result=mrg.get("outputs", {}).get("result"),
                       stages=rd.stage_times(), split=split, run_dir=str(rd.root))
    write_report(rep, warm, baseline, out or rd.stage("report"))
    return rep


# ----------------------------------------------------------------------------
# Several runs side by side (`warmstart compare`)

COMPARE_COLUMNS = ("target", "metric", "baseline", "warm", "delta", "zero_shot", "parity_steps_pct",
                   "parity_wall_pct")


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
        never = r.get("parity_status") == "never"
        steps = "never" if never else _pct(r["parity_steps_pct"])
        wall = "never" if never else _pct(r["parity_wall_pct"])
        if r["target"] == "mean":
            steps, wall = f"{steps} ({r['parity_status']})", wall
        lines.append(f"| {r['target']} | {r['metric']} | {_f(r['baseline'])} | {_f(r['warm'])} | "
                     f"{_f(r['delta'], '+.4f')} | {_f(r['zero_shot'])} | {steps} | {wall} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Curve",
    "Parity",
    "build_report",
    "compare_markdown",
    "compare_rows",
    "compute_parity",
    "crossing",
    "pick_metric",
    "plot_curves",
    "render_markdown",
    "report_run",
    "write_report",
]
