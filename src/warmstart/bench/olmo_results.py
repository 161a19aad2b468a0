"""Tables and plots of the real-benchmark bench (issue #18), from the committed unit JSONs only.

Per target, start and budget: held-out accuracy (mean over the seeds that finished), Δ
against scratch (the ``base`` start) with a paired-bootstrap 95 % interval over questions
(a question's score is its hit rate over seeds), and on the mean over targets the same
with each target's questions resampled independently. Parity: the first step (linear
between evaluated budgets, from step 0 = the start's zero-shot) at which a start reaches
scratch's accuracy at the last budget, in % of that budget; its wall clock adds the
start's selection and merge to the training time up to that step, in % of scratch's
training time at the last budget (evaluation excluded on both sides).

``gated`` is derived, not trained: warmstart's default with a do-no-harm gate on accuracy. Where
the merged start's zero-shot accuracy on the validation slice (a slice of train, used for the
learning rates; never the held-out split) is not above the base's, the run trains from the base;
else from the merge. Both runs exist already (``main`` and ``base``, same seed, same recipe, and
training from a given start is deterministic), so its rows are theirs, chosen by that rule, with
the gate's cost (two zero-shot evaluations of the validation slice, estimated from the measured
zero-shot evaluation of the held-out questions) added to its selection overhead.
"""

from __future__ import annotations

import statistics
from itertools import pairwise
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text, read_json
from .olmo_protocol import OlmoBenchConfig, unpack
from .stats import paired_bootstrap, paired_bootstrap_mean

METRICS = ("hits", "hits_norm")  # summed log-likelihood (lm-eval acc) or per byte (acc_norm)


def load_runs(results: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """{(target, start): {seed: unit JSON}} of every finished train unit."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for p in sorted((results / "runs").glob("*/*.json")):
        r = read_json(p)
        out.setdefault((r["target"], r["start"]), {})[int(r["seed"])] = r
    return out


def _zero_shot_validation(r: dict) -> float | None:
    """Accuracy at step 0 of the validation curve (the start before any training; every rate has it)."""
    for x in r.get("runs", []):
        for step, acc in x.get("validation", []):
            if int(step) == 0:
                return acc
    return None


def gated_runs(runs: dict[tuple[str, str], dict[int, dict]], n_ratio: float) -> dict:
    """``(target, "gated")``: per seed, main's run where its merged start beats the base zero-shot on the
    validation slice, else the base's run. ``n_ratio``: validation questions / held-out questions, to
    estimate the gate's two evaluations from the measured zero-shot evaluation of the held-out split."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for (target, start), by_seed in runs.items():
        if start != "main":
            continue
        for seed, m in by_seed.items():
            b = runs.get((target, "base"), {}).get(seed)
            vm, vb = _zero_shot_validation(m), (_zero_shot_validation(b) if b else None)
            if vm is None or vb is None:
                continue
            info = dict(m.get("start_info") or {})
            cost = n_ratio * sum(r["test"].get("0", {}).get("eval_s", 0.0) for r in (m, b))
            info["gate_s"] = cost
            info["gate_validation"] = {"merged": vm, "base": vb}
            passed = vm > vb and not info.get("gate")
            if not passed:
                info["gate"] = info.get("gate") or (f"merged {100 * vm:.0f} % ≤ base {100 * vb:.0f} % zero-shot on "
                                                    "validation: trains from the base")
                info["donors"] = []
            out.setdefault((target, "gated"), {})[seed] = {**(m if passed else b), "start": "gated",
                                                           "start_info": info}
    return out


def _scores(runs: dict[int, dict], budget: int, metric: str) -> list[float] | None:
    """Per question, the hit rate over the seeds that have this budget (budget 0: the zero-shot)."""
    vecs = [unpack(r["test"][str(budget)][metric]) for r in runs.values() if str(budget) in r["test"]]
    if not vecs:
        return None
    return [sum(x) / len(vecs) for x in zip(*vecs)]


def _acc(v: list[float] | None) -> float | None:
    return sum(v) / len(v) if v else None


def _cross(points: list[tuple[float, float]], target: float) -> float | None:
    """First x (linear between points) where y reaches ``target``."""
    for (x0, y0), (x1, y1) in pairwise(points):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return points[-1][0] if points and points[-1][1] >= target else None


def _train_time(runs: dict[int, dict], budget: int, step: float) -> float | None:
    """Training seconds up to ``step`` of the rate chosen at ``budget`` (mean over seeds)."""
    ts = []
    for r in runs.values():
        lr = r["chosen_lr"].get(str(budget))
        run = next((x for x in r["runs"] if x["lr"] == lr), None)
        if run and run["time_s"]:
            pts = [(0.0, 0.0)] + [(float(s), float(t)) for s, t in run["time_s"]]
            for (x0, t0), (x1, t1) in pairwise(pts):
                if x0 <= step <= x1:
                    ts.append(t0 + (t1 - t0) * (step - x0) / max(x1 - x0, 1e-9))
                    break
    return statistics.fmean(ts) if ts else None


def summarize(cfg: OlmoBenchConfig, results: Path, metric: str = "hits") -> dict:
    runs = load_runs(results)
    runs.update(gated_runs(runs, cfg.n_validation / cfg.n_test))
    rows, means = [], []
    budgets = list(cfg.budgets)
    last = budgets[-1]
    starts = [s for s in cfg.starts if s != "base"]
    if "main" in starts:
        starts.insert(starts.index("main") + 1, "gated")
    for target in cfg.targets:
        scratch = runs.get((target, "base"))
        if not scratch:
            continue
        for start in ["base"] + starts:
            rs = runs.get((target, start))
            if not rs:
                continue
            info = next(iter(rs.values())).get("start_info") or {}
            row = {"target": target, "start": start, "seeds": sorted(rs), "zero_shot": _acc(_scores(rs, 0, metric)),
                   "donors": [x.get("task") for x in info.get("donors", [])], "gate": bool(info.get("gate")),
                   "select_s": info.get("select_s", 0.0) + info.get("gate_s", 0.0),
                   "merge_s": info.get("merge_s", 0.0)}
            for b in budgets:
                w, s = _scores(rs, b, metric), _scores(scratch, b, metric)
                row[f"acc_{b}"] = _acc(w)
                if start != "base" and w and s and len(w) == len(s):
                    row[f"delta_{b}"] = paired_bootstrap(w, s)
            row.update(_parity(rs, scratch, budgets, metric, row["select_s"] + row["merge_s"]) if start != "base"
                       else {"plateau": _plateau(rs, budgets)})
            rows.append(row)
    for start in starts:
        for b in budgets:
            pairs = []
            for target in cfg.targets:
                w, s = _scores(runs.get((target, start), {}), b, metric), _scores(runs.get((target, "base"), {}), b,
                                                                                 metric)
                if w and s and len(w) == len(s):
                    pairs.append((w, s))
            if pairs:
                means.append({"start": start, "budget": b, "targets": len(pairs),
                              "delta": paired_bootstrap_mean(pairs)})
    gate = [r for r in rows if r["start"] == "main" and r["gate"]]
    acc_gate = [r for r in rows if r["start"] == "gated" and r["gate"]]
    return {"metric": metric, "rows": rows, "means": means, "versus": versus(cfg, runs, metric),
            "gate": {"triggered": len(gate), "of": sum(r["start"] == "main" for r in rows),
                     "targets": [r["target"] for r in gate]},
            "accuracy_gate": {"triggered": len(acc_gate), "of": sum(r["start"] == "gated" for r in rows),
                              "targets": [r["target"] for r in acc_gate]},
            "last_budget": last}


def versus(cfg: OlmoBenchConfig, runs: dict, metric: str = "hits", ref: str = "main") -> list[dict]:
    """``ref`` (warmstart's default) against every other start but scratch, per budget: Δ = ref − start
    per target, on the seeds both have finished (a question's score: its hit rate over those seeds),
    and the mean over targets with the paired bootstrap. What the issue's "beats the all-donor
    average, random donors and random-LoRA merges by ≥ 1 point" is read from."""
    out = []
    others = [s for s in cfg.starts if s not in ("base", ref)] + (["gated"] if ref != "gated" else [])
    for start in others:
        for b in cfg.budgets:
            pairs, per = [], {}
            for t in cfg.targets:
                mine, other = runs.get((t, ref), {}), runs.get((t, start), {})
                seeds = sorted(set(mine) & set(other))
                w = _scores({k: mine[k] for k in seeds}, b, metric) if seeds else None
                x = _scores({k: other[k] for k in seeds}, b, metric) if seeds else None
                if w and x and len(w) == len(x):
                    pairs.append((w, x))
                    per[t] = _acc(w) - _acc(x)
            if pairs:
                out.append({"start": start, "budget": b, "targets": len(pairs), "per_target": per,
                            "delta": paired_bootstrap_mean(pairs)})
    return out


def _plateau(rs: dict[int, dict], budgets: list[int]) -> float | None:
    """Scratch's validation gain over the last budget interval (best rate at each, first seed):
    near zero where the last budget is where training from the base has converged."""
    if len(budgets) < 2:
        return None
    r = rs[min(rs)]
    best = [max(_at(x["validation"], b) for x in r["runs"]) for b in budgets[-2:]]
    return best[1] - best[0]


def _at(series, step: int) -> float:
    return next((v for s, v in series if int(s) == step), float("nan"))


def _parity(rs, scratch, budgets, metric, overhead_s) -> dict:
    last = budgets[-1]
    goal = _acc(_scores(scratch, last, metric))
    pts = [(0.0, _acc(_scores(rs, 0, metric)))] + [(float(b), _acc(_scores(rs, b, metric))) for b in budgets]
    pts = [(x, y) for x, y in pts if y is not None]
    if goal is None or not pts:
        return {}
    step = _cross(pts, goal)
    out = {"parity_step": step, "parity_steps_pct": None if step is None else 100 * step / last}
    base_t = _train_time(scratch, last, last)
    if step is not None and base_t:
        t = (_train_time(rs, last, step) or 0.0) + overhead_s
        out["parity_wall_pct"] = 100 * t / base_t
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _delta(d) -> str:
    return "–" if not d else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def render(cfg: OlmoBenchConfig, s: dict) -> str:
    b = cfg.budgets
    lines = [(f"Metric: {'summed' if s['metric'] == 'hits' else 'per-byte'} log-likelihood rank classification; "
              f"held-out questions per target: {cfg.n_test}; accuracies in %; Δ vs scratch with paired-bootstrap "
              "95 % interval over questions."), ""]
    lines += ["| target | start | seeds | zero-shot | " + " | ".join(f"acc@{x}" for x in b) + " | " +
              " | ".join(f"Δ@{x}" for x in b) + " | parity steps % | parity wall % | select s | merge s | donors |",
              "|" + "---|" * (9 + 2 * len(b))]
    for r in s["rows"]:
        lines.append(f"| {r['target']} | {r['start']}{' (gate)' if r['gate'] else ''} | {len(r['seeds'])} | "
                     f"{_pct(r['zero_shot'])} | " + " | ".join(_pct(r.get(f'acc_{x}')) for x in b) + " | " +
                     " | ".join(_delta(r.get(f'delta_{x}')) for x in b) + " | " +
                     ("–" if r.get("parity_steps_pct") is None else f"{r['parity_steps_pct']:.0f}") + " | " +
                     ("–" if r.get("parity_wall_pct") is None else f"{r['parity_wall_pct']:.0f}") + " | " +
                     f"{r['select_s'] or 0:.0f} | {r['merge_s'] or 0:.1f} | " +
                     ", ".join(x or "?" for x in r["donors"]) + " |")
    lines += ["", ("Parity: steps (and wall clock: selection + merge + training up to that step) to reach scratch's "
                  f"accuracy at {b[-1]} steps, in % of scratch's {b[-1]} steps (its training time)."), "",
              "Mean over targets (Δ vs scratch, paired bootstrap resampling each target's questions):", "",
              "| start | budget | targets | mean Δ [95 %] |", "|---|---|---|---|"]
    lines += [f"| {m['start']} | {m['budget']} | {m['targets']} | {_delta(m['delta'])} |" for m in s["means"]]
    if s.get("versus"):
        lines += ["", "warmstart's default (`main`) against the other starts: Δ = main − start, on the seeds both "
                  "finished, paired bootstrap; per target at each budget:", "",
                  "| start | budget | targets | mean Δ [95 %] | per target |", "|---|---|---|---|---|"]
        lines += [f"| {v['start']} | {v['budget']} | {v['targets']} | {_delta(v['delta'])} | " +
                  ", ".join(f"{t} {100 * d:+.1f}" for t, d in v["per_target"].items()) + " |" for v in s["versus"]]
    g = s["gate"]
    plateau = [f"{r['target']} {100 * r['plateau']:+.0f}" for r in s["rows"] if r.get("plateau") is not None]
    if plateau:
        lines += ["", f"Scratch's validation gain from {b[-2]} to {b[-1]} steps (points; ≈ 0 = plateau): "
                  + ", ".join(plateau) + "."]
    which = f" ({', '.join(g['targets'])})" if g["targets"] else ""
    lines += ["", f"Do-no-harm gate (margin {cfg.margin}): triggered on {g['triggered']} of {g['of']} targets{which}."]
    a = s.get("accuracy_gate")
    if a and a["of"]:
        which = f" ({', '.join(a['targets'])})" if a["targets"] else ""
        lines += ["", f"`gated` (derived: main, or scratch where the merged start is not above the base zero-shot on "
                  f"validation; its select s includes the gate's two evaluations): the gate triggered on "
                  f"{a['triggered']} of {a['of']} targets{which}."]
    return "\n".join(lines) + "\n"


def sources_table(cfg: OlmoBenchConfig, results: Path) -> str:
    """Each finished source: validation accuracy (zero-shot → end) at each rate, the chosen one."""
    rows = []
    for t in cfg.tasks:
        p = results / "sources" / t / "sweep.json"
        if not p.is_file():
            continue
        sw = read_json(p)
        cells = [f"{100 * x['validation'][0][1]:.0f} → {100 * x['validation'][-1][1]:.0f} ({x['train_time_s']:.0f} s)"
                 for x in sw["sweep"]]
        rows.append(f"| {t} | {sw['steps']} | " + " | ".join(cells) + f" | {sw['chosen_lr']:g} |")
    if not rows:
        return ""
    head = " | ".join(f"lr {lr:g}: val acc % (training s)" for lr in cfg.source_lrs)
    return "\n".join([f"Sources ({len(rows)} of {len(cfg.tasks)}):", "", f"| task | steps | {head} | chosen |",
                      "|" + "---|" * (3 + len(cfg.source_lrs)), *rows]) + "\n\n"


def write_plots(cfg: OlmoBenchConfig, results: Path, metric: str = "hits") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(results)
    targets = [t for t in cfg.targets if (t, "base") in runs]
    if not targets:
        return []
    cols = 3
    fig, axes = plt.subplots((len(targets) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(targets) + 2) // 3)),
                             squeeze=False)
    for ax, t in zip(axes.flat, targets):
        for start in cfg.starts:
            rs = runs.get((t, start))
            if not rs:
                continue
            xs = [0] + list(cfg.budgets)
            pts = [(x, _acc(_scores(rs, x, metric))) for x in xs]
            pts = [(x, 100 * y) for x, y in pts if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=start,
                    lw=2 if start in ("base", "main") else 1)
        ax.set_title(t)
        ax.set_xlabel("steps")
        ax.set_ylabel("held-out acc %")
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = results / f"curves-{metric}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return [out]


def write_results(results: str | Path, metric: str = "hits") -> dict:
    results = Path(results)
    cfg = OlmoBenchConfig(**read_json(results / "bench.json", "bench file")["config"]).resolved()
    s = summarize(cfg, results, metric)
    atomic_write_json(results / "results.json", s)
    plots = write_plots(cfg, results, metric)
    md = sources_table(cfg, results) + render(cfg, s) + "".join(f"\n![curves]({p.name})\n" for p in plots)
    atomic_write_text(results / "results.md", md)
    return s


__all__ = ["gated_runs", "load_runs", "render", "summarize", "versus", "write_plots", "write_results"]
