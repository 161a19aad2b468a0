"""The whole job in one resumable run: split → select → merge → warm → baseline → report.

Each stage writes into its own directory of the run directory and finishes by
writing ``stage.done.json`` (wall time, outputs) there; a stage directory is
only trusted with its marker. Re-running the same command skips every marked
stage and resumes at the first unmarked one, so a crash or Ctrl-C costs at
most the stage that was running. The run's settings are recorded in
``run.json``; a re-run with different settings is refused rather than mixed in.
The files and their format are :mod:`warmstart.rundir`'s; this module decides
when each is written.

The held-out eval split is carved from the target once (seeded) or given with
``eval``; selection samples only the train split, so nothing that picks a donor,
a weight or a hyperparameter ever sees the examples the report is scored on.
Warm start and baseline train with the same TrainConfig (budget, lr, seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _dist
from ._io import atomic_dir, atomic_write_json, check_not_input, read_json
from .checkpoints import open_checkpoint, resolve
# RunConfig re-exported: `from warmstart.pipeline import RunConfig` keeps working
from .config import RunConfig, TransferConfig, merge_plan_options
from .data import load_target, split_target, write_rows
from .errors import CheckpointError, ConfigError, IncompatibleError, LibraryError
from .library import Library, default_library_path, task_name_from_path
from .report import report_run
from .rundir import (MARKER, STAGES, Marker, MergeOutputs, ReportOutputs, RunDir, SelectOutputs, SplitOutputs,
                     TrainOutputs, read_selection, write_selection)
from .select import select
from .provenance import versions
from .train import finetune

ALL_RANKS = ("select", "warm", "baseline")  # stages every process of a multi-process launch takes part in
FAIL_ENV = "WARMSTART_FAIL_AT"  # tests: raise inside that stage, after its work, before its marker


# ----------------------------------------------------------------------------
# Markers


def _write_marker(stage_dir: Path, name: str, t0: float, outputs) -> Marker:
    """Finish a stage: its marker, written last (``FAIL_ENV`` fails the stage just before it)."""
    if os.environ.get(FAIL_ENV) == name:
        raise RuntimeError(f"injected failure at stage {name!r} ({FAIL_ENV})")
    m = Marker.done(name, t0, outputs)
    m.write(stage_dir)
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
class _Transfer:
    """A transfer run's inputs, resolved before anything is written (recorded in run.json as ``transfer``)."""

    source: str  # as given: a directory, or a library entry's id or name
    finetuned: Path
    kind: str  # the fine-tune: "lora" or "full"
    base_old: Path
    base_old_from: str  # where base_old came from: "--transfer-base-old", the library entry, adapter_config.json...
    alpha: float
    output: str  # what the merge stage writes: "adapter" (LoRA fine-tune, LoRA training) or "full"
    entry: int | None = None  # the library entry's id

    def record(self) -> dict:
        return {"source": self.source, "finetuned": str(self.finetuned), "kind": self.kind,
                "base_old": str(self.base_old), "base_old_from": self.base_old_from, "alpha": self.alpha,
                "output": self.output, "entry": self.entry}


@dataclass
class _Ctx:
    rd: RunDir
    cfg: RunConfig
    target: Path
    eval: Path | None
    base: Path
    library: Path | None
    log: Callable[[str], None]
    progress: bool = False
    transfer: _Transfer | None = None


def run(target: str | Path, library: str | Path | None, base: str | Path, out: str | Path,
        config: RunConfig | None = None, *, eval: str | Path | None = None, force: bool = False,
        log: Callable[[str], None] = lambda s: None, progress: bool = False) -> RunResult:
    """Run (or resume) the pipeline into ``out``; returns which stages ran and the report.

    ``progress`` shows the Trainer's progress bar (stderr) during the training stages.

    With a ``transfer`` section (``RunConfig(transfer=TransferConfig(source=..., alpha=...))``) the
    warm start is that fine-tune carried to ``base`` (:mod:`warmstart.transfer`) instead of a merge of
    selected donors; ``library`` is then needed only to look ``source`` up by entry id or name
    (None: ``source`` is a directory). Without one, None means the default library.

    Under ``accelerate launch`` / ``torchrun`` every process calls this: the
    training stages run on all of them (DDP), selection splits its candidates
    across them, and the other stages, every file and the log belong to the
    main process; all processes meet at a barrier after each stage.
    """
    cfg = (config or RunConfig()).validate()
    if library is None and not cfg.transfer.active:
        library = default_library_path()
    library = Path(library).resolve() if library is not None else None
    rd, base_dir = RunDir(out), resolve(base)
    tr = _resolve_transfer(cfg, library, base_dir, check=not rd.done("merge"))
    _check_inputs(rd, cfg, Path(target), Path(eval) if eval else None, library)
    # every process: all of them refuse, none waits at a barrier for the others
    _check_out(rd.root, base_dir, Path(target).resolve(), Path(eval).resolve() if eval else None, library,
               [tr.finetuned, tr.base_old] if tr else [])
    _dist.start()  # imports torch: only once every input has been checked
    main = _dist.is_main()
    ctx = _Ctx(rd, cfg, Path(target).resolve(), Path(eval).resolve() if eval else None,
               base_dir, library, log if main else (lambda s: None), progress and main, tr)
    if main:
        _claim_run_dir(ctx, str(base), force)
    _dist.barrier()
    ran, skipped = [], []
    for name in STAGES:
        if name == "baseline" and not cfg.baseline:
            continue
        if ctx.rd.done(name):
            skipped.append(name)
            ctx.log(f"{name}: done earlier ({ctx.rd.read_marker(name).wall_s:.1f} s), skipped")
            continue
        ctx.log(f"{name}: running")
        t0 = time.perf_counter()
        if main or name in ALL_RANKS:
            _STAGE_FNS[name](ctx, t0)
        _dist.barrier()
        ran.append(name)
        ctx.log(f"{name}: done in {ctx.rd.read_marker(name).wall_s:.1f} s")
    rep = read_json(ctx.rd.stage("report") / "report.json", "report")
    return RunResult(ctx.rd.root, ran, skipped, rep)


def _check_out(root: Path, base: Path, target: Path, eval: Path | None, library: Path | None,
               more: list[Path] = ()) -> None:
    """Before the first stage: the run directory is not a file, and neither equals, contains nor lies
    inside any input (base, target, eval, catalog, any library entry, a transfer's fine-tune and old
    base). Every stage writes below it."""
    if os.path.lexists(root) and not root.is_dir():
        raise ConfigError("--out names an existing file, not a run directory", path=root,
                          hint="choose a new directory")
    inputs = [base, target, eval, library, *more]
    if library is not None and library.is_file():
        with Library(library, create=False) as lib:
            inputs += [Path(e.path) for e in lib.list()]
    check_not_input(root, inputs)


def _check_inputs(rd: RunDir, cfg: RunConfig, target: Path, eval: Path | None, library: Path | None) -> None:
    """Fail in about a second, before torch loads and before --out is created: data files that are
    missing or malformed, a library that is not there (unless selection is already done)."""
    for p, what in ((target, "target data"), (eval, "eval data")):
        if p is not None and not p.exists():
            raise ConfigError(f"{what} not found", path=p.resolve())
    if not rd.done("split"):
        tc = cfg.train
        data = load_target(target, format=tc.format, mc_style=tc.mc_style)
        if eval is not None:
            load_target(eval, format=data.format, mc_style=tc.mc_style)
    if not rd.done("select") and not cfg.transfer.active:
        Library(library, create=False).close()


def _resolve_transfer(cfg: RunConfig, library: Path | None, base: Path, *, check: bool) -> _Transfer | None:
    """The transfer section's fine-tune and old base as directories, and (``check``: the merge stage is
    still to run) the transfer planned from the headers, so that a missing input, a base the fine-tune
    does not record, or shapes that do not fit fail now, in one line, before anything is written."""
    tc: TransferConfig = cfg.transfer
    if not tc.active:
        return None
    src, entry = Path(tc.source).expanduser(), None
    if src.exists():
        finetuned = resolve(src)
    else:
        if library is None or not library.is_file():
            raise ConfigError("--transfer-from: no such directory" + (
                "" if library is None else f", and no library at {library} to look it up in"),
                path=src.resolve(), hint="give the fine-tune's directory, or a library entry (id or name) "
                "with --library CATALOG")
        entry = _library_entry(library, tc.source)
        finetuned = resolve(entry.path)
    ck = open_checkpoint(finetuned)
    base_old, where = _old_base(tc, ck, entry)
    if base_old is None:
        raise ConfigError("--transfer-from: the fine-tune does not record the base it was trained from",
                          path=finetuned, hint="pass --transfer-base-old OLD_BASE (transfer.base_old)")
    try:
        old_dir = resolve(base_old)
    except CheckpointError as e:
        raise CheckpointError(f"the transfer's old base ({where}) not found: {e.message}", path=e.path or base_old,
                              hint="pass --transfer-base-old OLD_BASE (transfer.base_old)") from None
    adapter = ck.kind == "lora" and not cfg.train.full
    tr = _Transfer(tc.source, finetuned, ck.kind, old_dir, where, float(tc.alpha), "adapter" if adapter else "full",
                   entry.id if entry else None)
    if check:
        from .transfer import plan_transfer  # imports torch (the dtype tables): only for a transfer run

        plan = plan_transfer(old_dir, finetuned, base, alpha=tr.alpha, adapter_space=adapter)
        if not any(t.action in ("transfer", "transfer-vocab") for t in plan.tensors):
            raise IncompatibleError(f"nothing of the fine-tune carries over to the new base {base} (no tensor has "
                                    "the same name and shape in both bases)", path=finetuned,
                                    hint="transfer needs two versions of one architecture")
    return tr


def _library_entry(library: Path, ref: str):
    """A library entry by id, reference or path, else by its directory's name (which must be unique)."""
    with Library(library, create=False) as lib:
        try:
            return lib.get(ref)
        except LibraryError:
            named = [e for e in lib.list() if Path(e.path).name == ref]
    if len(named) == 1:
        return named[0]
    if named:
        raise LibraryError(f"--transfer-from {ref!r} names {len(named)} library entries "
                           f"({', '.join(f'#{e.id} {e.path}' for e in named)})", path=library,
                           hint="give the entry's id or path")
    raise LibraryError(f"--transfer-from {ref!r}: no such directory and no such library entry", path=library,
                       hint="see `warmstart library list`")


def _old_base(tc: TransferConfig, ck, entry) -> tuple[str | None, str]:
    """The old base: as given, else as recorded by the library entry, the adapter or the fine-tune's metadata."""
    if tc.base_old:
        return tc.base_old, "--transfer-base-old"
    if entry is not None and entry.base_model:
        return entry.base_model, f"the base of library entry #{entry.id}"
    if ck.kind == "lora" and ck.lora.base_model:
        return ck.lora.base_model, "base_model_name_or_path in adapter_config.json"
    init = ck.meta.get("init") if isinstance(ck.meta.get("init"), dict) else {}
    if isinstance(init.get("model"), str) and init["model"]:
        return init["model"], "the init recorded in warmstart.json"
    if ck.meta.get("base_model"):
        return ck.meta["base_model"], "base_model in warmstart.json"
    if ck.kind == "full" and ck.config.get("_name_or_path"):
        return ck.config["_name_or_path"], "_name_or_path in config.json"
    return None, ""


def _claim_run_dir(ctx: _Ctx, base_ref: str, force: bool) -> None:
    """Record the run's settings, or check that a resumed run uses the same ones."""
    info = {"target": str(ctx.target), "target_sha256": _file_hash(ctx.target),
            "eval": str(ctx.eval) if ctx.eval else None, "eval_sha256": _file_hash(ctx.eval),
            "base_path": str(ctx.base), "library": str(ctx.library) if ctx.library else None,
            "config": ctx.cfg.to_dict()}
    if ctx.transfer is not None:  # absent otherwise: run.json as before, old run directories resume
        info["transfer"] = ctx.transfer.record()
    path = ctx.rd.run_file
    if path.is_file() and not force:
        old = read_json(path, "run file")
        # a train setting warmstart added after this run was written (train is a typed section: every key
        # is always written) is not a difference: the run resumes. Other sections list only what was set.
        oc = old.get("config")
        if isinstance(oc, dict) and isinstance(oc.get("train"), dict) and isinstance(info["config"].get("train"), dict):
            info = {**info, "config": {**info["config"], "train": _known_to(oc["train"], info["config"]["train"])}}
        diff = sorted(k for k in info if json.dumps(old.get(k), sort_keys=True, default=str)
                      != json.dumps(info[k], sort_keys=True, default=str))
        if diff:
            changes = "; ".join(setting_changes({k: old.get(k) for k in diff}, {k: info[k] for k in diff}))
            raise ConfigError(f"this run directory holds a run with different {', '.join(diff)} ({changes})",
                              path=ctx.rd.root, hint="re-run with the same settings to resume, choose "
                              "another --out, or pass --force to start over")
        return
    if force and ctx.rd.root.exists():
        for name in STAGES:
            shutil.rmtree(ctx.rd.stage(name), ignore_errors=True)
    ctx.rd.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**info, "base": base_ref, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "versions": versions()})


def _known_to(old: Any, new: Any) -> Any:
    """``new`` without the dict keys that ``old`` lacks (recursively): settings added since ``old``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _known_to(old[k], v) for k, v in new.items() if k in old}
    return new


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
    tc = ctx.cfg.train
    data = load_target(ctx.target, format=tc.format, mc_style=tc.mc_style)
    if ctx.eval is not None:  # used whole: only an explicit train.eval_limit caps it (below)
        train, ev = data, load_target(ctx.eval, format=data.format, mc_style=tc.mc_style)
    else:
        train, ev = split_target(data, fraction=ctx.cfg.eval_fraction, max_rows=ctx.cfg.eval_max,
                                 seed=ctx.cfg.split_seed)
    given = len(ev)
    if tc.eval_limit and tc.eval_limit < given:
        # the rows finetune's eval_limit picks (seed 0), written out so eval.jsonl is exactly what is scored
        ev = ev.sample(tc.eval_limit, seed=0)
        ctx.log(f"split: evaluating on {len(ev)} of the {given} eval rows {'given' if ctx.eval else 'held out'} "
                f"(eval_limit {tc.eval_limit})")
    rows = {"used": len(ev), "given": given, "limit": tc.eval_limit, "source": "file" if ctx.eval else "carved"}
    ctx.rd.update_info(eval_rows=rows)
    with atomic_dir(ctx.rd.stage("split"), force=True) as tmp:
        write_rows(tmp / "train.jsonl", train)
        write_rows(tmp / "eval.jsonl", ev)
        _write_marker(tmp, "split", t0, SplitOutputs(
            format=data.format, train_rows=len(train), eval_rows=len(ev), eval_rows_given=given,
            eval_limit=tc.eval_limit, eval_source=rows["source"], train_fingerprint=train.fingerprint(),
            eval_fingerprint=ev.fingerprint()))


def _stage_select(ctx: _Ctx, t0: float) -> None:
    if ctx.transfer is not None:  # the warm start is a transfer: nothing to score
        if _dist.is_main():
            ctx.log("select: skipped, the warm start is a transfer")
            with atomic_dir(ctx.rd.stage("select"), force=True) as tmp:
                _write_marker(tmp, "select", t0, SelectOutputs(selection=None, donors=[], ranking=[], candidates=0,
                                                               skipped="transfer"))
        return
    train, _ = ctx.rd.split_files()
    sc = ctx.cfg.select_config()
    with Library(ctx.library, create=False) as lib:
        sel = select(train, str(ctx.base), sc, library=lib)
        from .optimize import optimize_selection  # imports torch (the merge engines), as the merge stage does

        sel = optimize_selection(sel, train, sc, library=lib)  # weights: optimized, the step after selection
    if sel is None:  # another process of a multi-process launch: it scored its share, rank 0 writes
        return
    gate = sel.own_gate or {}
    for x in gate.get("excluded", []):
        ctx.log(f"select: not a donor: {Path(x['ref']).name} never learned its own task ({x['metric']} "
                f"{x['start']:.4f} → {x['final']:.4f}, min_own_gain {gate['min_gain']})")
    with atomic_dir(ctx.rd.stage("select"), force=True) as tmp:
        name = write_selection(sel, tmp / ctx.rd.selection_file().name).name
        # what the selection cost is made of, for the report's wall-clock line
        _write_marker(tmp, "select", t0, SelectOutputs(
            selection=name, donors=sel.donors, ranking=sel.ranking, metric=sel.metric, scorer=sel.scorer,
            sample=sel.target["sample"], sample_rows=sel.target["n_examples"], candidates=len(sel.ranking),
            cached=sum(bool(r["cached"]) for r in sel.ranking),
            excluded=[x["id"] for x in gate.get("excluded", [])]))


def _stage_merge(ctx: _Ctx, t0: float) -> None:
    """Merge the donors; with none selected, the warm start is the base itself (said so)."""
    if ctx.transfer is not None:
        return _stage_transfer(ctx, t0)
    sel = read_selection(ctx.rd.selection_file())
    with atomic_dir(ctx.rd.stage("merge"), force=True) as tmp:
        if not sel.donors:
            ctx.log("merge: no donors selected; the warm start is the plain base")
            _write_marker(tmp, "merge", t0, MergeOutputs(init=str(ctx.base), recipe=None, note="no donors"))
            return
        from .merge import MergePlan, merge  # imports torch (the merge engines)

        plan = MergePlan.from_dict(sel.plan_dict(**_merge_options(ctx, sel.donors)), source=str(sel.path))
        res = merge(plan, tmp / "model")
        summary = {k: v for k, v in res.to_dict().items() if k in ("method", "weights", "inputs", "notes",
                                                                   "timings", "lora_errors")}
        _write_marker(tmp, "merge", t0, MergeOutputs(init="model", recipe=plan.to_dict(), result=summary))


def _stage_transfer(ctx: _Ctx, t0: float) -> None:
    """The merge stage of a transfer run: ``base + α·(finetuned − base_old)`` into merge/model, as an
    adapter when the fine-tune is a LoRA and training is LoRA (warm continues it), else a full model."""
    from .transfer import transfer, transfer_adapter  # imports torch

    tr = ctx.transfer
    ctx.log(f"merge: transfer of {tr.finetuned} (alpha {tr.alpha:g}) from {tr.base_old} onto {ctx.base}, "
            f"as {'an adapter' if tr.output == 'adapter' else 'a full model'}")
    with atomic_dir(ctx.rd.stage("merge"), force=True) as tmp:
        t = time.perf_counter()
        make = transfer_adapter if tr.output == "adapter" else transfer
        rep = make(tr.base_old, tr.finetuned, ctx.base, tmp / "model", alpha=tr.alpha)
        wall = round(time.perf_counter() - t, 3)
        for w in rep.warnings:
            ctx.log(f"merge: warning: {w}")
        s = rep.summary
        if tr.output == "adapter":  # warm continues this adapter: its rank and targets, not train.lora_*
            lo, tc = open_checkpoint(tmp / "model").lora, ctx.cfg.train
            if lo.r != tc.lora_r or sorted(lo.target_modules) != sorted(tc.lora_targets):
                ctx.log(f"merge: note: the warm start continues the adapter's LoRA (r {lo.r}, targets "
                        f"{', '.join(lo.target_modules)}); the baseline trains a fresh one (r {tc.lora_r}, targets "
                        f"{', '.join(tc.lora_targets)})")
        record = {**tr.record(), "base_new": str(ctx.base), "wall_s": wall,
                  "cos_bases": s.get("cos_bases"), "rel_drift": s.get("rel_drift"), "rel_diff": s.get("rel_diff"),
                  "cos_drift_diff": s.get("cos_drift_diff"), "counts": rep.counts(), "warnings": rep.warnings,
                  "report": "model/transfer_report.json"}
        _write_marker(tmp, "merge", t0, MergeOutputs(init="model", recipe=None, transfer=record))


def _merge_options(ctx: _Ctx, donors: list[dict]) -> dict:
    """The merge section's MergePlan keywords plus the run's LoRA rule (see config.merge_plan_options)."""
    return merge_plan_options(ctx.cfg, donors)


def _train_stage(ctx: _Ctx, t0: float, name: str, init: Path) -> None:
    train, ev = ctx.rd.split_files()
    cfg = ctx.cfg.train  # its eval_limit was applied by the split stage: eval.jsonl holds the rows scored
    out = ctx.rd.stage(name)
    # force: an unmarked dir is unfinished
    res = finetune(init, train, ev, out, cfg, force=True, label=name, progress=ctx.progress,
                   task=task_name_from_path(ctx.target))
    if not _dist.is_main():
        return  # finetune wrote nothing here either
    _write_marker(out, name, t0, TrainOutputs(init=str(init), kind=res.kind, train_time_s=res.train_time_s,
                                              final=res.final))


def _stage_warm(ctx: _Ctx, t0: float) -> None:
    _train_stage(ctx, t0, "warm", ctx.rd.read_marker("merge").outputs.init_path(ctx.rd.stage("merge")))


def _stage_baseline(ctx: _Ctx, t0: float) -> None:
    _train_stage(ctx, t0, "baseline", ctx.base)


def _stage_report(ctx: _Ctx, t0: float) -> None:
    render_report(ctx.rd.root, _t0=t0)


def render_report(run_dir: str | Path, *, _t0: float | None = None) -> dict:
    """(Re-)write RUN/report from the logged curves and markers; no model is loaded."""
    rd = RunDir(run_dir)
    if not rd.is_run():
        raise ConfigError("not a warmstart run directory (no run.json)", path=rd.root)
    t0 = time.perf_counter() if _t0 is None else _t0
    with atomic_dir(rd.stage("report"), force=True) as tmp:
        rep = report_run(rd.root, out=tmp)
        _write_marker(tmp, "report", t0, ReportOutputs(files=sorted(p.name for p in tmp.iterdir())))
    return rep


_STAGE_FNS = {"split": _stage_split, "select": _stage_select, "merge": _stage_merge, "warm": _stage_warm,
              "baseline": _stage_baseline, "report": _stage_report}

__all__ = ["ALL_RANKS", "FAIL_ENV", "MARKER", "STAGES", "RunConfig", "RunDir", "RunResult", "TransferConfig",
           "render_report", "run"]
