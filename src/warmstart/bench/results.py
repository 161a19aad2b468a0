"""Tables and plots of the recycle-bench results (``results.md``, ``curves.png``)."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..rundir import Curve, RunDir

# Issue #7's targets, to beat Mashup Learning (LoRA: +0.7 to +1.8 points, 41-46% fewer steps, ≥63% wall).
TARGET_GAIN, TARGET_STEPS_PCT, TARGET_WALL_PCT = 2.0, 50.0, 60.0


def _pct(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _pm(s: dict, k: str, signed: bool = False) -> str:
    std = s.get(k + "_std")
    return _pct(s[k], signed) + (f" ± {100 * std:.1f}" if std is not None else "")


def _mean_row(rows: list[dict]) -> dict:
    out = {"target": "**mean**", "n_seeds": min((r["n_seeds"] for r in rows), default=0), "donors": []}
    for k in ("base_zero_shot", "scratch", "merged_zero_shot", "warm", "delta", "parity_steps_pct", "parity_wall_pct"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = statistics.fmean(vals) if vals else None
    # Spread of the mean over seeds is not the spread over targets; report the targets' spread of Δ.
    deltas = [r["delta"] for r in rows if r.get("delta") is not None]
    out["delta_std"] = statistics.stdev(deltas) if len(deltas) > 1 else None
    out["parity_reached"] = sum(r["parity_reached"] > 0 for r in rows)
    out["n"] = len(rows)
    return out


def main_table(summary: list[dict], variant: str, budget: int) -> tuple[str, dict | None]:
    rows = sorted((s for s in summary if s["variant"] == variant and s["budget"] == budget), key=lambda s: s["target"])
    if not rows:
        return "", None
    head = ("target", "seeds", "base 0-shot", "scratch", "merged 0-shot", "warm", "Δ (points)", "steps to parity",
            "wall to parity", "donors")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        lines.append(f"| {s['target']} | {s['n_seeds']} | {_pct(s['base_zero_shot'])} | {_pm(s, 'scratch')} | "
                     f"{_pm(s, 'merged_zero_shot')} | {_pm(s, 'warm')} | {_pm(s, 'delta', True)} | "
                     f"{_parity(s['parity_steps_pct'], s['parity_reached'], s['n_seeds'])} | "
                     f"{_parity(s['parity_wall_pct'], s['parity_reached'], s['n_seeds'])} | {', '.join(s['donors'])} |")
    m = _mean_row(rows)
    lines.append(f"| {m['target']} | | {_pct(m['base_zero_shot'])} | {_pct(m['scratch'])} | "
                 f"{_pct(m['merged_zero_shot'])} | {_pct(m['warm'])} | {_pm(m, 'delta', True)} | "
                 f"{_parity(m['parity_steps_pct'], m['parity_reached'], m['n'])} | "
                 f"{_parity(m['parity_wall_pct'], m['parity_reached'], m['n'])} | |")
    return "\n".join(lines) + "\n", m


def _parity(pct, reached: int, n: int) -> str:
    if not reached:
        return "never"
    s = f"{pct:.0f}%" if pct is not None else "–"
    return s if reached == n else f"{s} ({reached}/{n})"


# What each ablation changes with respect to main (protocol.VARIANTS holds the settings).
VARIANT_NOTES = {
    "k1": "top-1 donor", "k3": "top-3 donors", "factors": "LoRA merge: average the A and B factors",
    "cat": "LoRA merge: concatenate (exact ΔW, rank 2r)", "mwa": "MWA weights (training loss, p=1)",
    "select_acc": "select by MC accuracy on the sample", "select_grad": "select by the gradient proxy",
    "optimized": "CMA-ES weights on the sample (20 evals)",
    "train_scaling": "SVD merge at the baseline's LoRA scaling (alpha/r = 2, not 1)",
    "svd_a_init": "train_scaling, and A at a fresh LoRA's row norm (B carries σ)",
}


def _paired(rows: list[dict], variant: str, budget: int) -> list[tuple[dict, dict]]:
    """(variant row, main row) on the same target, seed and budget."""
    main = {(r["target"], r["seed"]): r for r in rows if r["variant"] == "main" and r["budget"] == budget}
    return [(r, main[(r["target"], r["seed"])]) for r in rows
            if r["variant"] == variant and r["budget"] == budget and (r["target"], r["seed"]) in main]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def ablation_table(rows: list[dict], budgets: list[int]) -> str:
    """Each variant against main on the same (target, seed) pairs: Δ vs scratch, and warm − main's warm."""
    variants = sorted({r["variant"] for r in rows} - {"main"})
    if not variants:
        return ""
    head = (["variant", "what changes", "runs"] + [f"Δ vs scratch @{b}" for b in budgets]
            + [f"vs main @{b}" for b in budgets] + ["merged 0-shot (main)", "select+merge s (main)"]
            + [f"wall to parity @{b} (main)" for b in budgets])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        pairs = {b: _paired(rows, v, b) for b in budgets}
        first = next((p for p in pairs.values() if p), [])
        if not first:
            continue
        d_scr = [_pct(_mean(a["delta"] for a, _ in pairs[b]), True) if pairs[b] else "–" for b in budgets]
        d_main = [_pct(_mean(a["warm"] - m["warm"] for a, m in pairs[b]), True) if pairs[b] else "–"
                  for b in budgets]
        z = (f"{_pct(_mean(a['merged_zero_shot'] for a, _ in first))} "
             f"({_pct(_mean(m['merged_zero_shot'] for _, m in first))})")
        o = f"{_mean(a['overhead_s'] for a, _ in first):.0f} ({_mean(m['overhead_s'] for _, m in first):.0f})"
        walls = [_wall(pairs[b]) for b in budgets]
        lines.append(f"| {v} | {VARIANT_NOTES.get(v, '')} | {len(first)} | " + " | ".join(d_scr + d_main)
                     + f" | {z} | {o} | " + " | ".join(walls) + " |")
    return "\n".join(lines) + "\n"


def _wall(pairs: list[tuple[dict, dict]]) -> str:
    """Mean wall clock to parity (where reached) of the variant, then main's, on the same pairs."""
    if not pairs:
        return "–"

    def one(rs: list[dict]) -> str:
        hit = [r["parity_wall_pct"] for r in rs if r["parity_status"] != "never" and r["parity_wall_pct"] is not None]
        return f"{statistics.fmean(hit):.0f}% ({len(hit)}/{len(rs)})" if hit else "never"

    return f"{one([a for a, _ in pairs])} ({one([m for _, m in pairs])})"


def ablation_by_target(rows: list[dict], budget: int) -> str:
    """Δ vs scratch (points) per variant and target at one budget, mean over the seeds the ablations ran
    (main restricted to those seeds too, so its row is comparable)."""
    seeds = {r["seed"] for r in rows if r["variant"] != "main"}
    sel = [r for r in rows if r["budget"] == budget and r["seed"] in seeds]
    variants = sorted({r["variant"] for r in sel}, key=lambda v: (v != "main", v))
    if len(variants) < 2:
        return ""
    targets = sorted({r["target"] for r in sel if r["variant"] != "main"})
    lines = ["| variant | " + " | ".join(targets) + " |", "|" + "---|" * (len(targets) + 1)]
    for v in variants:
        cells = [_pct(_mean(r["delta"] for r in sel if r["variant"] == v and r["target"] == t), True)
                 for t in targets]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def source_table(sources: dict[str, list[tuple[int, float]]]) -> str:
    """Scratch learning curves of the seed-0 source runs (the library adapters): accuracy per step."""
    if not sources:
        return ""
    steps = sorted({s for pts in sources.values() for s, _ in pts})
    lines = ["| task | " + " | ".join(f"step {s}" for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for t, pts in sources.items():
        d = dict(pts)
        lines.append(f"| {t} | " + " | ".join(_pct(d.get(s)) for s in steps) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(cfg, summary: list[dict], plots: list[str], sources: dict | None = None,
                    rows: list[dict] | None = None) -> str:
    budgets = cfg.budgets
    metric = getattr(cfg, "metric", "eval_mc_accuracy")
    intro = (f"Tasks: {', '.join(cfg.tasks)}; targets: {', '.join(cfg.targets)}; seeds: {cfg.seeds}; "
           f"LoRA r={cfg.lora_r}, lr {cfg.lr} (constant), batch {cfg.batch_size}; test rows per target: "
           f"{cfg.test_limit or 'all'}. Accuracy = multiple-choice accuracy (rank classification, "
           f"`{metric.removeprefix('eval_')}`: {'summed' if metric.endswith('accuracy') else 'per-byte'} "
           f"log-likelihood of each option), in %; "
           f"Δ = warm − scratch at the same budget; parity = steps (or wall clock incl. selection + merge) the "
           f"warm start needs to reach scratch's accuracy at that budget, in % of scratch's.")
    out = ["# recycle-bench results", "", intro, ""]
    verdicts = []
    for b in budgets:
        table, m = main_table(summary, "main", b)
        if not table:
            continue
        out += [f"## main (k=2, loss selection, uniform, SVD merge) — budget {b} steps", "", table]
        verdicts.append((b, m))
    if verdicts:
        out += ["## Against the targets of issue #7", "",
                "| budget | mean Δ ≥ +2 points | steps to parity ≤ 50% | wall to parity ≤ 60% |", "|---|---|---|---|"]
        for b, m in verdicts:
            steps_ok = (m["parity_steps_pct"] is not None and m["parity_reached"] == m["n"]
                        and m["parity_steps_pct"] <= TARGET_STEPS_PCT)
            wall_ok = (m["parity_wall_pct"] is not None and m["parity_reached"] == m["n"]
                       and m["parity_wall_pct"] <= TARGET_WALL_PCT)
            out.append(f"| {b} | {_pct(m['delta'], True)} "
                       f"{_ok(m['delta'] is not None and 100 * m['delta'] >= TARGET_GAIN)} | "
                       f"{_parity(m['parity_steps_pct'], m['parity_reached'], m['n'])} {_ok(steps_ok)} | "
                       f"{_parity(m['parity_wall_pct'], m['parity_reached'], m['n'])} {_ok(wall_ok)} |")
        out.append("")
    steps_of = getattr(cfg, "steps_of", lambda v: cfg.steps)
    abl_budgets = [b for b in budgets if b <= steps_of("ablation")]
    abl = ablation_table(rows or [], abl_budgets)
    if abl:
        out += ["## Ablations against main (same targets and seeds; points)", "",
                (f"Each variant changes one setting of main; runs train {steps_of('ablation')} steps. "
                 "'Δ vs scratch' is the variant's gain over training from the base; 'vs main' is its warm "
                 "accuracy minus main's warm accuracy on the same (target, seed) pairs. Wall to parity counts "
                 "selection + merge; an ablation whose scores all came from main's cache is charged main's "
                 "scoring time, as a run of its own would pay it."), "", abl]
        mid = abl_budgets[len(abl_budgets) // 2] if len(abl_budgets) > 1 else abl_budgets[0]
        out += [f"Δ vs scratch by target at budget {mid} (mean over the seeds the ablations ran):", "",
                ablation_by_target(rows or [], mid)]
    if sources:
        out += ["## Source runs (seed 0): scratch accuracy by step — the library adapters", "",
                source_table(sources)]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _ok(flag: bool) -> str:
    return "✅" if flag else "❌"


def write_plots(cfg, bd, summary: list[dict]) -> list[str]:
    """One panel per target: scratch vs. warm accuracy over steps (seed 0, main variant)."""
    METRIC = getattr(cfg, "metric", "eval_mc_accuracy")  # configs written before the field existed
    panels = []
    for t in cfg.targets:
        wd, sd = RunDir(bd.run(t, "main", cfg.seeds[0])), bd.source(t, cfg.seeds[0])
        if wd.done("warm") and (sd / "curve.json").is_file():
            panels.append((t, wd.curve("warm"), Curve.from_file(sd)))
    if not panels:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (t, warm, scratch) in zip(axes.flat, panels):
        for c, label, style in ((scratch, "scratch", "--"), (warm, "warm start", "-")):
            xs, ys = zip(*c.series(METRIC)) if c.series(METRIC) else ((), ())
            ax.plot(xs, [100 * y for y in ys], style, marker="o", ms=3, label=label)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("MC accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(bd.root) / "curves.png", dpi=110)
    plt.close(fig)
    return ["curves.png"]


__all__ = ["ablation_by_target", "ablation_table", "main_table", "render_markdown", "source_table", "write_plots"]
