"""The whole job in one resumable run: split → select → merge → warm → baseline → report.

Each stage writes into its own directory of the run directory and finishes by
writing ``stage.done.json`` (wall time, outputs) there; a stage directory is
only trusted with its marker. Re-running the same command skips every marked
stage and resumes at the first unmarked one, so a crash or Ctrl-C costs at
most the stage that was running. The run's settings are recorded in
``run.json``; a re-run with different settings is refused rather than mixed in.

The held-out eval split is carved from the target once (seeded) or given with
``eval``; selection samples only the train split, so nothing that picks a donor,
a weight or a hyperparameter ever sees the examples the report is scored on.
Warm start and baseline train with the same TrainConfig (budget, lr, seed).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import atomic_dir, atomic_write_json, output_root, read_json
from .config import RunConfig, merge_plan_options  # RunConfig re-exported: `from warmstart.pipeline import RunConfig` keeps working
from .errors import ConfigError
from .provenance import versions

STAGES = ("split", "select", "merge", "warm", "baseline", "report")
ALL_RANKS = ("select", "warm", "baseline")  # stages every process of a multi-process launch takes part in
MARKER = "stage.done.json"
FAIL_ENV = "WARMSTART_FAIL_AT"  # tests: raise inside that stage, after its work, before its marker


# ----------------------------------------------------------------------------
# The run directory


class RunDir:
    """Paths of a run and its completion markers."""

    def __init__(self, root: str | Path):
        self.root = output_root(root)

    def stage(self, name: str) -> Path:
        return self.root / name

    def marker(self, name: str) -> dict | None:
        p = self.stage(name) / MARKER
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            return None  # a torn marker means an unfinished stage

    def done(self, name: str) -> bool:
        return self.marker(name) is not None

    def stage_times(self) -> dict[str, float]:
        return {s: m["wall_s"] for s in STAGES if (m := self.marker(s))}

    def info(self) -> dict:
        return read_json(self.root / "run.json", "run file")


def _write_marker(stage_dir: Path, name: str, t0: float, outputs: dict) -> dict:
    fail = os.environ.get(FAIL_ENV)
    if fail == name:
        raise RuntimeError(f"injected failure at stage {name!r} ({FAIL_ENV})")
    m = {"stage": name, "wall_s": round(time.perf_counter() - t0, 3), "outputs": outputs,
         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(stage_dir / MARKER, m)
    return m


# ----------------------------------------------------------------------------
# The run


@dataclass
class RunResult:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    report: dict | None

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "ran": self.ran, "skipped": self.skipped, "report": self.report}


@dataclass
class _Ctx:
    rd: RunDir
    cfg: RunConfig
    target: Path
    eval: Path | None
    base: Path
    library: Path
    log: Callable[[str], None]
    progress: bool = False


def run(target: str | Path, library: str | Path, base: str | Path, out: str | Path,
        config: RunConfig | None = None, *, eval: str | Path | None = None, force: bool = False,
        log: Callable[[str], None] = lambda s: None, progress: bool = False) -> RunResult:
    """Run (or resume) the pipeline into ``out``; returns which stages ran and the report.

    ``progress`` shows the Trainer's progress bar (stderr) during the training stages.

    Under ``accelerate launch`` / ``torchrun`` every process calls this: the
    training stages run on all of them (DDP), selection splits its candidates
    across them, and the other stages, every file and the log belong to the
    main process; all processes meet at a barrier after each stage.
    """
    from .checkpoints import resolve

    cfg = (config or RunConfig()).validate()
    rd, base_dir = RunDir(out), resolve(base)
    _check_inputs(rd, cfg, Path(target), Path(eval) if eval else None, Path(library))
    # every process: all of them refuse, none waits at a barrier for the others
    _check_out(rd.root, base_dir, Path(target).resolve(), Path(eval).resolve() if eval else None,
               Path(library).resolve())
    from accelerate import PartialState  # imports torch: only once every input has been checked

    state = PartialState()  # sets up torch.distributed when launched with several processes
    main = state.is_main_process
    ctx = _Ctx(rd, cfg, Path(target).resolve(), Path(eval).resolve() if eval else None,
               base_dir, Path(library).resolve(), log if main else (lambda s: None), progress and main)
    if main:
        _claim_run_dir(ctx, str(base), force)
    state.wait_for_everyone()
    ran, skipped = [], []
    for name in STAGES:
        if name == "baseline" and not cfg.baseline:
            continue
        if ctx.rd.done(name):
            skipped.append(name)
            ctx.log(f"{name}: done earlier ({ctx.rd.marker(name)['wall_s']:.1f} s), skipped")
            continue
        ctx.log(f"{name}: running")
        t0 = time.perf_counter()
        if main or name in ALL_RANKS:
            _STAGE_FNS[name](ctx, t0)
        state.wait_for_everyone()
        ran.append(name)
        ctx.log(f"{name}: done in {ctx.rd.marker(name)['wall_s']:.1f} s")
    rep = read_json(ctx.rd.stage("report") / "report.json", "report")
    return RunResult(ctx.rd.root, ran, skipped, rep)


def _check_out(root: Path, base: Path, target: Path, eval: Path | None, library: Path) -> None:
    """Before the first stage: the run directory is not a file, and neither equals, contains nor lies
    inside any input (base, target, eval, catalog, any library entry). Every stage writes below it."""
    from ._io import check_not_input
    from .library import Library

    if os.path.lexists(root) and not root.is_dir():
        raise ConfigError("--out names an existing file, not a run directory", path=root,
                          hint="choose a new directory")
    inputs = [base, target, eval, library]
    if library.is_file():
        with Library(library, create=False) as lib:
            inputs += [Path(e.path) for e in lib.list()]
    check_not_input(root, inputs)


def _check_inputs(rd: RunDir, cfg: RunConfig, target: Path, eval: Path | None, library: Path) -> None:
    """Fail in about a second, before torch loads and before --out is created: data files that are
    missing or malformed, a library that is not there (unless selection is already done)."""
    from .data import load_target

    for p, what in ((target, "target data"), (eval, "eval data")):
        if p is not None and not p.exists():
            raise ConfigError(f"{what} not found", path=p.resolve())
    if not rd.done("split"):
        tc = cfg.train
        data = load_target(target, format=tc.format, mc_style=tc.mc_style)
        if eval is not None:
            load_target(eval, format=data.format, mc_style=tc.mc_style)
    if not rd.done("select"):
        from .library import Library

        Library(library, create=False).close()


def _claim_run_dir(ctx: _Ctx, base_ref: str, force: bool) -> None:
    """Record the run's settings, or check that a resumed run uses the same ones."""
    info = {"target": str(ctx.target), "target_sha256": _file_hash(ctx.target),
            "eval": str(ctx.eval) if ctx.eval else None, "eval_sha256": _file_hash(ctx.eval),
            "base_path": str(ctx.base), "library": str(ctx.library), "config": ctx.cfg.to_dict()}
    path = ctx.rd.root / "run.json"
    if path.is_file() and not force:
        old = read_json(path, "run file")
        diff = sorted(k for k in info if json.dumps(old.get(k), sort_keys=True, default=str)
                      != json.dumps(info[k], sort_keys=True, default=str))
        if diff:
            changes = "; ".join(setting_changes({k: old.get(k) for k in diff}, {k: info[k] for k in diff}))
            raise ConfigError(f"this run directory holds a run with different {', '.join(diff)} ({changes})",
                              path=ctx.rd.root, hint="re-run with the same settings to resume, choose "
                              "another --out, or pass --force to start over")
        return
    if force and ctx.rd.root.exists():
        import shutil

        for name in STAGES:
            shutil.rmtree(ctx.rd.stage(name), ignore_errors=True)
    ctx.rd.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**info, "base": base_ref, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "versions": versions()})


def setting_changes(old: Any, new: Any, limit: int = 6) -> list[str]:
    """``["config.train.steps: 20 (this run) → 40 (now)", ...]``: the settings that differ, by dotted name."""
    out = _leaf_changes(old, new, "")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def _leaf_changes(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str)
                for c in _leaf_changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    if json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
        return []
    return [f"{prefix.rstrip('.')}: {json.dumps(old, default=str)} (this run) → {json.dumps(new, default=str)} (now)"]


def _file_hash(p: Path | None) -> str | None:
    """Content hash of a data file (a directory dataset is identified by its path only)."""
    if p is None or not p.is_file():
        return None
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------
# Stages


def _stage_split(ctx: _Ctx, t0: float) -> None:
    """train.jsonl / eval.jsonl in the normalised row format, so each stage (and a user
    re-running `warmstart finetune` by hand) reads exactly the same rows."""
    from dataclasses import replace

    from .data import load_target

    tc = ctx.cfg.train
    data = load_target(ctx.target, format=tc.format, mc_style=tc.mc_style)
    if ctx.eval is not None:  # used whole: only an explicit train.eval_limit caps it (below)
        train, ev = data, load_target(ctx.eval, format=data.format, mc_style=tc.mc_style)
    else:
        idx = list(range(len(data)))
        random.Random(ctx.cfg.split_seed).shuffle(idx)
        n_eval = max(1, round(ctx.cfg.eval_fraction * len(idx)))
        if ctx.cfg.eval_max:
            n_eval = min(n_eval, ctx.cfg.eval_max)
        if len(idx) - n_eval < 1:
            raise ConfigError(f"target has {len(idx)} rows: too few to carve an eval split", path=ctx.target,
                              hint="add rows or pass --eval FILE")
        held = set(idx[:n_eval])
        ev = replace(data, examples=[e for i, e in enumerate(data.examples) if i in held])
        train = replace(data, examples=[e for i, e in enumerate(data.examples) if i not in held])
    given = len(ev)
    if tc.eval_limit and tc.eval_limit < given:
        # the rows finetune's eval_limit picks (seed 0), written out so eval.jsonl is exactly what is scored
        ev = ev.sample(tc.eval_limit, seed=0)
        ctx.log(f"split: evaluating on {len(ev)} of the {given} eval rows {'given' if ctx.eval else 'held out'} "
                f"(eval_limit {tc.eval_limit})")
    rows = {"used": len(ev), "given": given, "limit": tc.eval_limit, "source": "file" if ctx.eval else "carved"}
    run_json = ctx.rd.root / "run.json"
    atomic_write_json(run_json, {**read_json(run_json, "run file"), "eval_rows": rows})
    with atomic_dir(ctx.rd.stage("split"), force=True) as tmp:
        _write_rows(tmp / "train.jsonl", train)
        _write_rows(tmp / "eval.jsonl", ev)
        _write_marker(tmp, "split", t0, {"format": data.format, "train_rows": len(train), "eval_rows": len(ev),
                                         "eval_rows_given": given, "eval_limit": tc.eval_limit,
                                         "eval_source": rows["source"], "train_fingerprint": train.fingerprint(),
                                         "eval_fingerprint": ev.fingerprint()})


def _write_rows(path: Path, data) -> None:
    with open(path, "w") as f:
        for ex in data.examples:
            if ex.messages is not None:
                row = {"messages": ex.messages}
            elif data.format == "mc":
                row = {"question": ex.question, "choices": ex.choices, "answer": ex.answer}
            else:
                row = {"prompt": ex.prompt, "completion": ex.completion}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _split_files(ctx: _Ctx) -> tuple[Path, Path]:
    d = ctx.rd.stage("split")
    return d / "train.jsonl", d / "eval.jsonl"


def _stage_select(ctx: _Ctx, t0: float) -> None:
    from .library import Library
    from .optimize import optimize_selection
    from .select import select

    train, _ = _split_files(ctx)
    sc = ctx.cfg.select_config()
    with Library(ctx.library, create=False) as lib:
        sel = select(train, str(ctx.base), sc, library=lib)
        sel = optimize_selection(sel, train, sc, library=lib)  # weights: optimized, the step after selection
    if sel is None:  # another process of a multi-process launch: it scored its share, rank 0 writes
        return
    gate = sel.own_gate or {}
    for x in gate.get("excluded", []):
        ctx.log(f"select: not a donor: {Path(x['ref']).name} never learned its own task ({x['metric']} "
                f"{x['start']:.4f} → {x['final']:.4f}, min_own_gain {gate['min_gain']})")
    with atomic_dir(ctx.rd.stage("select"), force=True) as tmp:
        sel.to_file(tmp / "selection.yaml")
        # what the selection cost is made of, for the report's wall-clock line
        _write_marker(tmp, "select", t0, {"selection": "selection.yaml", "donors": sel.donors,
                                          "ranking": sel.ranking, "metric": sel.metric, "scorer": sel.scorer,
                                          "sample": sel.target["sample"], "sample_rows": sel.target["n_examples"],
                                          "candidates": len(sel.ranking),
                                          "cached": sum(bool(r["cached"]) for r in sel.ranking),
                                          "excluded": [x["id"] for x in gate.get("excluded", [])]})


def _read_selection(path: Path) -> dict:
    from ._io import read_config

    return read_config(path, "selection file") or {}


def _stage_merge(ctx: _Ctx, t0: float) -> None:
    """Merge the donors; with none selected, the warm start is the base itself (said so)."""
    sel_path = ctx.rd.stage("select") / "selection.yaml"
    donors = _read_selection(sel_path).get("donors") or []
    with atomic_dir(ctx.rd.stage("merge"), force=True) as tmp:
        if not donors:
            ctx.log("merge: no donors selected; the warm start is the plain base")
            _write_marker(tmp, "merge", t0, {"init": str(ctx.base), "recipe": None, "note": "no donors"})
            return
        from .merge import MergePlan, merge

        plan = MergePlan.from_selection(sel_path, **_merge_options(ctx, donors))
        res = merge(plan, tmp / "model")
        summary = {k: v for k, v in res.to_dict().items() if k in ("method", "weights", "inputs", "notes",
                                                                   "timings", "lora_errors")}
        _write_marker(tmp, "merge", t0, {"init": "model", "recipe": plan.to_dict(), "result": summary})


def _merge_options(ctx: _Ctx, donors: list[dict]) -> dict:
    """The merge section's MergePlan keywords plus the run's LoRA rule (see config.merge_plan_options)."""
    return merge_plan_options(ctx.cfg, donors)


def _warm_init(ctx: _Ctx) -> Path:
    init = Path(ctx.rd.marker("merge")["outputs"]["init"])
    return init if init.is_absolute() else ctx.rd.stage("merge") / init


def _train_stage(ctx: _Ctx, t0: float, name: str, init: Path) -> None:
    from .library import task_name_from_path
    from .train import finetune

    train, ev = _split_files(ctx)
    cfg = ctx.cfg.train  # its eval_limit was applied by the split stage: eval.jsonl holds the rows scored
    out = ctx.rd.stage(name)
    # force: an unmarked dir is unfinished
    res = finetune(init, train, ev, out, cfg, force=True, label=name, progress=ctx.progress,
                   task=task_name_from_path(ctx.target))
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return  # finetune wrote nothing here either
    _write_marker(out, name, t0, {"init": str(init), "kind": res.kind, "train_time_s": res.train_time_s,
                                  "final": res.final})


def _stage_warm(ctx: _Ctx, t0: float) -> None:
    _train_stage(ctx, t0, "warm", _warm_init(ctx))


def _stage_baseline(ctx: _Ctx, t0: float) -> None:
    _train_stage(ctx, t0, "baseline", ctx.base)


def _stage_report(ctx: _Ctx, t0: float) -> None:
    render_report(ctx.rd.root, _t0=t0)


def render_report(run_dir: str | Path, *, _t0: float | None = None) -> dict:
    """(Re-)write RUN/report from the logged curves and markers; no model is loaded."""
    from .report import report_run

    rd = RunDir(run_dir)
    if not (rd.root / "run.json").is_file():
        raise ConfigError("not a warmstart run directory (no run.json)", path=rd.root)
    t0 = time.perf_counter() if _t0 is None else _t0
    with atomic_dir(rd.stage("report"), force=True) as tmp:
        rep = report_run(rd.root, out=tmp)
        _write_marker(tmp, "report", t0, {"files": sorted(p.name for p in tmp.iterdir())})
    return rep


_STAGE_FNS = {"split": _stage_split, "select": _stage_select, "merge": _stage_merge, "warm": _stage_warm,
              "baseline": _stage_baseline, "report": _stage_report}

__all__ = ["ALL_RANKS", "FAIL_ENV", "MARKER", "STAGES", "RunConfig", "RunDir", "RunResult", "render_report", "run"]
