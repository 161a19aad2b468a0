"""Tables and plots of the recycle-bench results (``results.md``, ``curves.png``)."""

from __future__ import annotations

import statistics
from pathlib import Path

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


def ablation_table(summary: list[dict], budgets: list[int]) -> str:
    variants = sorted({s["variant"] for s in summary}, key=lambda v: (v != "main", v))
    if len(variants) < 2:
        return ""
    head = ["variant", "targets"] + [f"Δ @{b}" for b in budgets] + ["merged 0-shot", f"parity reached @{budgets[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = []
        for b in budgets:
            rows = [s for s in summary if s["variant"] == v and s["budget"] == b]
            cells.append(_pct(_mean_row(rows)["delta"], True) if rows else "–")
        last = [s for s in summary if s["variant"] == v and s["budget"] == budgets[-1]]
        m = _mean_row(last)
        lines.append(f"| {v} | {m['n']} | " + " | ".join(cells) + f" | {_pct(m['merged_zero_shot'])} | "
                     f"{m['parity_reached']}/{m['n']} |")
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


def render_markdown(cfg, summary: list[dict], plots: list[str], sources: dict | None = None) -> str:
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
            out.append(f"| {b} | {_pct(m['delta'], True)} {_ok(m['delta'] is not None and 100 * m['delta'] >= TARGET_GAIN)} | "
                       f"{_parity(m['parity_steps_pct'], m['parity_reached'], m['n'])} "
                       f"{_ok(m['parity_steps_pct'] is not None and m['parity_reached'] == m['n'] and m['parity_steps_pct'] <= TARGET_STEPS_PCT)} | "
                       f"{_parity(m['parity_wall_pct'], m['parity_reached'], m['n'])} "
                       f"{_ok(m['parity_wall_pct'] is not None and m['parity_reached'] == m['n'] and m['parity_wall_pct'] <= TARGET_WALL_PCT)} |")
        out.append("")
    abl = ablation_table(summary, budgets)
    if abl:
        out += ["## Ablations (mean over targets; Δ in points)", "", abl]
    if sources:
        out += ["## Source runs (seed 0): scratch accuracy by step — the library adapters", "",
                source_table(sources)]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _ok(flag: bool) -> str:
    return "✅" if flag else "❌"


def write_plots(cfg, bd, summary: list[dict]) -> list[str]:
    """One panel per target: scratch vs. warm accuracy over steps (seed 0, main variant)."""
    from ..pipeline import RunDir
    from ..report import Curve
    METRIC = getattr(cfg, "metric", "eval_mc_accuracy")  # configs written before the field existed
    panels = []
    for t in cfg.targets:
        wd, sd = RunDir(bd.run(t, "main", cfg.seeds[0])), bd.source(t, cfg.seeds[0])
        if wd.done("warm") and (sd / "curve.json").is_file():
            panels.append((t, Curve.from_file(wd.stage("warm")), Curve.from_file(sd)))
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


__all__ = ["ablation_table", "main_table", "render_markdown", "source_table", "write_plots"]
