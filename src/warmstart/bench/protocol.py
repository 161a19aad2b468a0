"""The recycle-bench protocol (issue #7): leave-one-out warm start vs. scratch on real tasks.

For every task, a *source run* trains a fresh LoRA from the base on the task's
train split (the same recipe for all tasks). Seed 0's source runs are the
library; every source run is also the scratch baseline of its own task. For each
target, a library of the *other* tasks' adapters is built, and
:func:`warmstart.pipeline.run` (the code path of ``warmstart run``) selects
donors on a sample of the target's train split, merges them and trains from the
merge with the same recipe, budget, learning rate and seed.

Budgets. Training uses a constant learning rate, so the first ``b`` steps of a
run are exactly a ``b``-step run (same seed, same data order): one run per
(init, seed) evaluated every ``eval_every`` steps gives every budget on its
curve, and warm and scratch are compared at each budget (``budgets``). With a
decaying schedule each budget would need its own run.

Evaluation is multiple-choice accuracy by rank classification on a fixed
subset of each target's test split (the first ``test_limit`` rows, the same for
every run, so comparisons are paired). Every step is resumable: finished
outputs carry their markers and are skipped when the command is run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text, output_root, read_json
from ..data import load_target
from ..errors import ConfigError
from ..library import Library
from ..pipeline import RunConfig, run
from ..provenance import versions
from ..report import compute_parity
from ..rundir import Curve, RunDir
from ..train import TrainConfig, finetune
from . import tasks as _tasks  # module, not names: tests swap tasks.TASKS for a tiny pool
from .model import prepare_model
from .results import render_markdown, write_plots
from .tasks import write_tasks

METRIC = "eval_mc_accuracy"
# rank classification by summed log-likelihood (lm-eval "acc") or per byte of option text ("acc_norm")
METRICS = {"sum": "eval_mc_accuracy", "norm": "eval_mc_accuracy_norm"}

# Ablations are named variants: (select options, merge options) on top of the main recipe.
# main = the paper's setting with warmstart's defaults: top-2 by target loss, uniform weights,
# LoRA merged by SVD to the baseline's rank (so warm and scratch train equally many parameters).
# ``lora_scaling: 1.0, lora_a_norm: None`` pin what these variants ran with before warmstart run carried
# the baseline's scaling into the merge and put A at a fresh LoRA's norm (alpha = r and an even √σ
# split: the warm start then trained far slower than the baseline); ``train_scaling`` has the scaling
# only, ``svd_a_init`` both (what warmstart run does now).
_S1 = {"lora_scaling": 1.0, "lora_a_norm": None}
# ``min_own_gain: None`` pins selection by the target score alone, as every variant ran before
# select skipped donors that never learned their own task (2026-12-01, docs/select.md).
# ``compute_dtype: float32`` (and fp32 training and eval curves in ``train_config``) pins the precision
# every run was made with before bf16 autocast became the default on CPUs that have it (2026-12-01,
# docs/performance.md): a resumed bench must not mix fp32 and bf16 runs.
_G0 = {"min_own_gain": None, "compute_dtype": "float32"}
VARIANTS: dict[str, tuple[dict, dict]] = {
    "main": ({"k": 2, "metric": "loss", "weights": "uniform", **_G0}, {"lora_mode": "svd", **_S1}),
    "k1": ({"k": 1, "metric": "loss", "weights": "uniform", **_G0}, {"lora_mode": "svd", **_S1}),
    "k3": ({"k": 3, "metric": "loss", "weights": "uniform", **_G0}, {"lora_mode": "svd", **_S1}),
    "factors": ({"k": 2, "metric": "loss", "weights": "uniform", **_G0}, {"lora_mode": "factors"}),
    "cat": ({"k": 2, "metric": "loss", "weights": "uniform", **_G0}, {"lora_mode": "cat", **_S1}),
    "mwa": ({"k": 2, "metric": "loss", "weights": "mwa:loss", **_G0}, {"lora_mode": "svd", **_S1}),
    "select_acc": ({"k": 2, "metric": "mc-accuracy", "weights": "uniform", **_G0}, {"lora_mode": "svd", **_S1}),
    "select_grad": ({"k": 2, "metric": "loss", "scorer": "grad", "weights": "uniform", **_G0},
                    {"lora_mode": "svd", **_S1}),
    "optimized": ({"k": 2, "metric": "loss", "weights": "optimized", "optimize_budget": 20, **_G0},
                  {"lora_mode": "svd", **_S1}),
    "train_scaling": ({"k": 2, "metric": "loss", "weights": "uniform", **_G0},
                      {"lora_mode": "svd", "lora_a_norm": None}),
    # and with A at a fresh LoRA's row norm (1/√3), B carrying σ: see merge/lora.py _split
    "svd_a_init": ({"k": 2, "metric": "loss", "weights": "uniform", **_G0},
                   {"lora_mode": "svd", "lora_a_norm": 3 ** -0.5}),
}


@dataclass
class BenchConfig:
    tasks: list[str] | None = None  # the task pool (library); None = every registered task
    targets: list[str] | None = None  # targets to run; None = every task in the pool
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: list[str] = field(default_factory=lambda: ["main"])
    steps: int = 40
    eval_every: int = 10
    budgets: list[int] | None = None  # None: every evaluation step after 0
    lr: float = 2e-4
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: float = 16.0
    test_limit: int | None = 100
    select_n: int = 64
    task_seed: int = 0
    eval_batch_size: int = 32
    library_eval_limit: int | None = None  # source runs of non-target tasks may evaluate on fewer rows
    metric: str = METRIC  # what the tables compare (both are logged; changing it needs no re-run)
    # Ablation variants may train fewer steps than main (None: ``steps``). With a constant lr their
    # first b steps are exactly main's first b steps, so budgets ≤ ablation_steps stay comparable.
    ablation_steps: int | None = None
    # "variant": each ablation on every target before the next ablation; "target": every ablation on a
    # target before the next target (an interrupted run then has all variants on fewer targets)
    order: str = "variant"

    # fields that change results; a resumed run must keep them
    RECIPE = ("steps", "eval_every", "lr", "batch_size", "lora_r", "lora_alpha", "test_limit", "select_n",
              "task_seed", "library_eval_limit", "ablation_steps")

    def steps_of(self, variant: str) -> int:
        return self.steps if variant == "main" or not self.ablation_steps else self.ablation_steps

    def resolved(self) -> BenchConfig:
        tasks = list(self.tasks or _tasks.TASKS)
        targets = list(self.targets or tasks)
        errs = [f"unknown task {t!r}" for t in {*tasks, *targets} if t not in _tasks.TASKS]
        errs += [f"target {t!r} is not in the task pool" for t in targets if t in _tasks.TASKS and t not in tasks]
        errs += [f"unknown variant {v!r} (known: {', '.join(VARIANTS)})" for v in self.variants if v not in VARIANTS]
        if self.metric not in METRICS.values():
            errs.append(f"metric must be one of {', '.join(METRICS.values())}, got {self.metric!r}")
        if len(tasks) < 2:
            errs.append("leave-one-out needs at least two tasks")
        if self.steps % self.eval_every:
            errs.append(f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every})")
        budgets = self.budgets or list(range(self.eval_every, self.steps + 1, self.eval_every))
        errs += [f"budget {b} is not an evaluation step" for b in budgets
                 if b % self.eval_every or not 0 < b <= self.steps]
        if self.order not in ("variant", "target"):
            errs.append(f"order must be 'variant' or 'target', got {self.order!r}")
        a = self.ablation_steps
        if a is not None and (a % self.eval_every or not 0 < a <= self.steps):
            errs.append(f"ablation_steps ({a}) must be a multiple of eval_every ({self.eval_every}) "
                        f"and at most steps ({self.steps})")
        if errs:
            raise ConfigError("invalid bench config: " + "; ".join(errs))
        return dataclasses.replace(self, tasks=tasks, targets=targets, budgets=sorted(budgets))

    def train_config(self, seed: int, steps: int | None = None):
        return TrainConfig(steps=steps or self.steps, lr=self.lr, batch_size=self.batch_size, scheduler="constant",
                           seed=seed, lora_r=self.lora_r, lora_alpha=self.lora_alpha, eval_every=self.eval_every,
                           eval_batch_size=self.eval_batch_size, metrics=["loss", "mc_accuracy"],
                           precision="fp32", eval_dtype="float32")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Layout of the output directory


class BenchDir:
    def __init__(self, root: str | Path):
        self.root = output_root(root)

    def task(self, t: str) -> Path:
        return self.root / "tasks" / t

    def eval_file(self, t: str) -> Path:
        return self.root / "eval" / f"{t}.jsonl"

    def source(self, t: str, seed: int) -> Path:
        return self.root / "source" / f"{t}-s{seed}"

    def library(self, target: str) -> Path:
        return self.root / "libraries" / f"{target}.db"

    def run(self, target: str, variant: str, seed: int) -> Path:
        return self.root / "runs" / target / f"{variant}-s{seed}"


def _finished(d: Path) -> bool:
    return (d / "warmstart.json").is_file() and (d / "curve.json").is_file()


# ----------------------------------------------------------------------------
# Steps


def prepare_data(cfg: BenchConfig, bd: BenchDir, log: Callable[[str], None]) -> None:
    """Task files, and each task's fixed evaluation subset (the first ``test_limit`` test rows)."""
    write_tasks(bd.root / "tasks", cfg.tasks, cfg.task_seed, progress=log)
    for t in cfg.tasks:
        f = bd.eval_file(t)
        if not f.is_file():
            lines = (bd.task(t) / "test.jsonl").read_text().splitlines(keepends=True)
            atomic_write_text(f, "".join(lines[: cfg.test_limit] if cfg.test_limit else lines))


def source_run(cfg: BenchConfig, bd: BenchDir, base: Path, t: str, seed: int, log, progress: bool = False) -> Path:
    """Fresh LoRA from the base on task ``t`` (library adapter for seed 0, scratch baseline for ``t``)."""
    out = bd.source(t, seed)
    if _finished(out):
        return out
    tc = cfg.train_config(seed)
    ev = load_target(bd.eval_file(t))
    if cfg.library_eval_limit and t not in cfg.targets:
        ev = dataclasses.replace(ev, examples=ev.examples[: cfg.library_eval_limit])
    log(f"source run {t} seed {seed}: {cfg.steps} steps from the base")
    res = finetune(base, bd.task(t) / "train.jsonl", ev, out, tc, force=True, label=f"scratch {t}", progress=progress)
    _tag_task(out, t)
    log(f"source run {t} seed {seed}: {METRIC.removeprefix('eval_')} "
        f"{res.curve.points[0].get(METRIC, float('nan')):.3f} → {res.final.get(METRIC, float('nan')):.3f} "
        f"({res.train_time_s:.0f} s training)")
    return out


def _tag_task(out: Path, t: str) -> None:
    """Record the task in warmstart.json so `library scan` and select know what the adapter is for."""
    meta = read_json(out / "warmstart.json")
    if meta.get("task") != t:
        meta["task"] = t
        atomic_write_json(out / "warmstart.json", meta)


def build_library(cfg: BenchConfig, bd: BenchDir, target: str) -> Path:
    """A catalog holding the seed-0 adapter of every task except ``target`` (leave-one-out)."""
    path = bd.library(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Library(path) as lib:
        for t in cfg.tasks:
            if t != target:
                lib.add(bd.source(t, 0), task=t)
    return path


def warm_run(cfg: BenchConfig, bd: BenchDir, base: Path, target: str, variant: str, seed: int, log,
             progress: bool = False):
    """select → merge → train from the merge, through :func:`warmstart.pipeline.run`."""
    sel, mrg = VARIANTS[variant]
    rc = RunConfig(train=cfg.train_config(seed, cfg.steps_of(variant)), select={"n": cfg.select_n, **sel},
                   merge=dict(mrg), eval_max=None, baseline=False)
    lib = build_library(cfg, bd, target)
    out = bd.run(target, variant, seed)
    log(f"warm start {target} [{variant}] seed {seed}")
    return run(bd.task(target) / "train.jsonl", lib, base, out, rc, eval=bd.eval_file(target),
               log=lambda s: log(f"  {target}/{variant}/s{seed} {s}"), progress=progress)


# ----------------------------------------------------------------------------
# The whole protocol


def run_bench(out: str | Path, config: BenchConfig | None = None, *, base: str | Path | None = None,
              log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or resume) the protocol into ``out``; returns the aggregated results (also written).

    ``progress`` shows the Trainer's progress bar during source and warm-start runs."""
    cfg = (config or BenchConfig()).resolved()
    bd = BenchDir(out)
    _claim(bd, cfg)
    base = Path(base) if base else prepare_model(progress=log)
    prepare_data(cfg, bd, log)
    t0 = time.perf_counter()
    # Order = what finishes first is most useful: the library and the main comparison on the first
    # seed, the main comparison on the other seeds, then the ablations.
    jobs = [(s, v) for v in cfg.variants[:1] for s in cfg.seeds] + [(s, v) for s in cfg.seeds for v in cfg.variants[1:]]
    phases = [(seed, [variant]) for seed, variant in jobs]  # (seed, variants run per target)
    if cfg.order == "target":
        phases = phases[:len(cfg.seeds)] + [(s, list(cfg.variants[1:])) for s in cfg.seeds if cfg.variants[1:]]
    # Several workers may share a directory (the full run uses two, walking the targets in opposite
    # orders): each run is taken under a lock, and a run another worker holds is left to it. The
    # library (seed 0's source runs) is waited for instead, since every warm start needs all of it.
    for t in cfg.tasks:  # seed 0's source runs are the library, whatever seeds are compared
        with _exclusive(bd, f"source-{t}-s0", wait=True):
            source_run(cfg, bd, base, t, 0, log, progress)
    for seed, variants in phases:
        for t in cfg.targets:
            with _exclusive(bd, f"source-{t}-s{seed}", wait=seed == 0) as mine:
                if mine:
                    source_run(cfg, bd, base, t, seed, log, progress)
        for target in cfg.targets:
            for variant in variants:
                with _exclusive(bd, f"run-{target}-{variant}-s{seed}") as mine:
                    if not mine:
                        log(f"{target}/{variant}/s{seed}: another worker is running it, left to it")
                        continue
                    warm_run(cfg, bd, base, target, variant, seed, log, progress)
                write_results(cfg, bd)
    res = write_results(cfg, bd)
    log(f"bench finished in {time.perf_counter() - t0:.0f} s; results in {bd.root / 'results.md'}")
    return res


@contextlib.contextmanager
def _exclusive(bd: BenchDir, name: str, wait: bool = False):
    """Yields True when this process holds ``locks/<name>.lock`` (an flock: released when the
    process dies, so a killed worker never leaves a stale lock); False when another process holds
    it and ``wait`` is off. Without fcntl (not POSIX) every run is taken."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = bd.root / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _claim(bd: BenchDir, cfg: BenchConfig) -> None:
    """A resumed run must keep the recipe; targets, seeds and variants may grow."""
    path = bd.root / "bench.json"
    if path.is_file():
        old = read_json(path, "bench file").get("config", {})
        # a key missing from the old file predates that field: the directory has no runs that used it
        diff = [k for k in BenchConfig.RECIPE if k in old and old[k] != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"this bench directory was run with different {', '.join(diff)}", path=bd.root,
                              hint="use the same settings to resume, or another --out")
        if set(old.get("tasks") or []) != set(cfg.tasks):
            raise ConfigError("this bench directory has a different task pool", path=bd.root,
                              hint=f"it used: {', '.join(old.get('tasks') or [])}")
    bd.root.mkdir(parents=True, exist_ok=True)

    atomic_write_json(path, {"config": cfg.to_dict(), "versions": versions(),
                             "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


# ----------------------------------------------------------------------------
# Results


def _truncate(curve, budget: int):
    pts = [p for p in curve.points if p["step"] <= budget]
    return Curve(points=pts, meta={**curve.meta, "max_steps": budget,
                                   "train_time_s": max((p.get("time_s") or 0 for p in pts), default=0)})


def compare(warm_dir: Path, scratch_dir: Path, budget: int, metric: str = METRIC,
            scoring_s: float = 0.0) -> dict:
    """Warm vs. scratch at one budget: accuracies, zero-shots, parity in steps and wall clock.

    ``scoring_s`` is added to the selection time: an ablation that read every score from the
    cache main's run filled would have paid main's scoring time in a run of its own."""
    rd = RunDir(warm_dir)
    warm = _truncate(Curve.from_file(rd.stage("warm")), budget)
    scratch = _truncate(Curve.from_file(scratch_dir), budget)
    overhead = {k: m["wall_s"] for k in ("select", "merge") if (m := rd.marker(k))}
    if scoring_s:
        overhead["scoring (main's, cached)"] = scoring_s
    par = compute_parity(warm, scratch, metric, overhead)
    donors = (rd.marker("select") or {}).get("outputs", {}).get("donors") or []
    return {"budget": budget, "base_zero_shot": scratch.points[0].get(metric), "scratch": scratch.final(metric),
            "merged_zero_shot": warm.points[0].get(metric), "warm": warm.final(metric),
            "delta": warm.final(metric) - scratch.final(metric), "parity_status": par.status,
            "parity_steps_pct": par.percent_steps, "parity_wall_pct": par.percent_wall,
            "overhead_s": sum(overhead.values()), "donors": [_donor_task(d) for d in donors]}


def _donor_task(d: dict) -> str:
    name = Path(str(d.get("ref", ""))).name  # source/<task>-s0
    return name.rsplit("-s", 1)[0] if "-s" in name else name


def collect(cfg: BenchConfig, bd: BenchDir) -> list[dict]:
    rows = []
    for variant in cfg.variants:
        for seed in cfg.seeds:
            for target in cfg.targets:
                wd, sd = bd.run(target, variant, seed), bd.source(target, seed)
                if not (RunDir(wd).done("warm") and _finished(sd)):
                    continue
                scoring = _cached_scoring_s(bd, target, variant, seed)
                for b in (b for b in cfg.budgets if b <= cfg.steps_of(variant)):
                    rows.append({"target": target, "variant": variant, "seed": seed,
                                 **compare(wd, sd, b, cfg.metric, scoring)})
    return rows


def _cached_scoring_s(bd: BenchDir, target: str, variant: str, seed: int) -> float:
    """main's selection time when this variant's selection read every score from the cache."""
    if variant == "main":
        return 0.0
    ranking = ((RunDir(bd.run(target, variant, seed)).marker("select") or {}).get("outputs") or {}).get("ranking")
    main = RunDir(bd.run(target, "main", seed)).marker("select")
    if not ranking or not main or not all(r.get("cached") for r in ranking):
        return 0.0
    return float(main["wall_s"])


def summarize(rows: list[dict], keys=("base_zero_shot", "scratch", "merged_zero_shot", "warm", "delta")) -> list[dict]:
    """Per (variant, budget, target): mean and std over seeds; plus the mean over targets."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["budget"], r["target"]), []).append(r)
    out = []
    for (variant, budget, target), rs in groups.items():
        s = {"variant": variant, "budget": budget, "target": target, "n_seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None]
            s[k] = statistics.fmean(vals) if vals else None
            s[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        for k in ("parity_steps_pct", "parity_wall_pct"):
            vals = [r[k] for r in rs if r[k] is not None]
            s[k] = statistics.fmean(vals) if vals else None
        s["parity_reached"] = sum(r["parity_status"] != "never" for r in rs)
        s["donors"] = rs[0]["donors"]
        out.append(s)
    return out


def write_results(cfg: BenchConfig, bd: BenchDir) -> dict:
    rows = collect(cfg, bd)
    summary = summarize(rows)
    res = {"config": cfg.to_dict(), "rows": rows, "summary": summary}
    plots = write_plots(cfg, bd, summary)
    sources = source_curves(cfg, bd)
    res["sources"] = sources
    atomic_write_json(bd.root / "results.json", res)
    atomic_write_text(bd.root / "results.md", render_markdown(cfg, summary, plots, sources, rows))
    return res


def source_curves(cfg: BenchConfig, bd: BenchDir, seed: int = 0) -> dict[str, list[tuple[int, float]]]:
    """(step, accuracy) of every finished source run of ``seed``, by task."""
    return {t: [(int(s), v) for s, v in Curve.from_file(bd.source(t, seed)).series(cfg.metric)]
            for t in cfg.tasks if _finished(bd.source(t, seed))}


__all__ = [
    "METRIC",
    "METRICS",
    "VARIANTS",
    "BenchConfig",
    "BenchDir",
    "collect",
    "compare",
    "run_bench",
    "summarize",
    "write_results",
]
