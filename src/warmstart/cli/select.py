"""`warmstart select`: rank the library's checkpoints on a target sample and choose donors."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .._io import check_output, read_config
from ..checkpoints import resolve
from ..data import load_target
from ..errors import ConfigError
from ..library import Library
from ..select import SelectConfig, dist_env, select
from ._common import ForceOpt, JsonOpt, LibraryOpt, ThreadsOpt, err, library_path, out, print_json, use_threads
from ._options import SELECT_HELP, config_error, given, opt, own_gate_opt, select_opt

EPILOG = """
Examples:

  warmstart select --target data/country_de/train.jsonl --base models/SmolLM2-135M-Instruct --out selection.yaml

  warmstart select --target data/arc --split validation --base models/base --metric mc-accuracy --k 3 \
--weights softmax:0.1 --json

  warmstart select --target data.jsonl --base models/base --scorer grad --n 128 --margin 0.05 --out sel.yaml --force

  accelerate launch --multi_gpu --num_processes 4 -m warmstart select --target data.jsonl --base models/base \
--out sel.yaml

  torchrun --nproc_per_node 2 -m warmstart select --target data.jsonl --base models/base --sample-size 128 \
--out sel.yaml
"""


def select_cmd(
    target: Path = typer.Option(..., "--target", "-t", help="Target data: .jsonl/.json/.csv/.parquet or a "
                                "save_to_disk directory."),
    base: str = typer.Option(..., "--base", "-b", help="Base model (path or hub id); candidates must fit it."),
    library: Path = LibraryOpt,
    config: Path = typer.Option(None, "--config", help="YAML of select settings (SelectConfig's fields, or a run "
                                "config's select: section); flags override it."),
    metric: str = select_opt("metric"),
    n: int = opt("select", "n", "--n", "--sample-size", help="Random sample size of the target (0 = all rows).",
                 show=str(SelectConfig().n)),
    seed: int = opt("select", "seed", "--seed", help="Sampling seed."),
    k: int = select_opt("k"),
    margin: float = select_opt("margin"),
    weights: str = select_opt("weights"),
    optimize_budget: int = select_opt("optimize_budget"),
    penalty: float = select_opt("penalty"),
    scorer: str = select_opt("scorer"),
    shortlist: int = select_opt("shortlist"),
    halving_rows: int = select_opt("halving_rows"),
    prerank_rows: int = select_opt("prerank_rows"),
    min_own_gain: float = select_opt("min_own_gain"),
    own_gate: bool = own_gate_opt(),
    split: str = opt("select", "split", "--split", help="Split of a dataset directory."),
    format: str = opt("select", "format", "--format", help="prompt_completion | messages | mc.", show="detect"),
    mc_style: str = opt("select", "mc_style", "--mc-style", help="Multiple choice as answer text or letter."),
    mc_mode: str = select_opt("mc_mode"),
    batch_size: int = opt("select", "batch_size", "--batch-size", help="Scoring batch size."),
    max_length: int = opt("select", "max_length", "--max-length", help="Token limit of a row."),
    dtype: str = opt("select", "dtype", "--dtype", help="float32, bfloat16 or float16."),
    compute_dtype: str = opt("select", "compute_dtype", "--compute-dtype",
                             help="Scoring matmuls: auto (bfloat16 where the CPU/GPU has it), float32 or bfloat16."),
    out_file: Path = typer.Option(None, "--out", "-o", help="Selection file to write (.yaml or .json)."),
    include_derived: bool = typer.Option(SelectConfig().include_derived, "--include-derived",
                                         help="Also score merges, transfers and warmstart runs' outputs."),
    threads: int = ThreadsOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Score every compatible checkpoint (and the base) on a target sample; write the donors."""
    use_threads(threads)

    flags = given(metric=metric, n=n, seed=seed, k=k, margin=margin, weights=weights, penalty=penalty,
                  scorer=scorer, split=split, format=format, mc_style=mc_style, batch_size=batch_size,
                  max_length=max_length, mc_mode=mc_mode, dtype=dtype, compute_dtype=compute_dtype,
                  optimize_budget=optimize_budget, min_own_gain=min_own_gain, shortlist=shortlist,
                  halving_rows=halving_rows, prerank_rows=prerank_rows)
    cfg = select_config(config, flags, own_gate=own_gate, include_derived=include_derived)
    rank, world = dist_env()
    if out_file is not None and rank == 0:
        check_output(out_file, force=force, inputs=[target, library_path(library), *_local(base)])
    # every input checked before a model loads (and before the library is opened: never created here)
    data = load_target(target, split=cfg.split, format=cfg.format, mc_style=cfg.mc_style)
    resolve(base)
    with Library(library_path(library), create=False) as lib, _progress(rank) as progress:
        if out_file is not None and rank == 0:  # nor over a library entry (a file in a checkpoint dir)
            check_output(out_file, force=force, inputs=[e.path for e in lib.list()])
        sel = select(data, base, cfg, library=lib, progress=progress)
        from ..optimize import optimize_selection  # lazy: keeps --help fast (merge imports torch)
        sel = optimize_selection(sel, data, cfg, library=lib)  # weights: optimized (the step after selection)
    if sel is None:  # another rank writes the result
        return
    if out_file is not None:
        _write_selection(sel, out_file, force)
    if json_out:
        print_json(sel.to_dict())
    else:
        out.print(ranking_table(sel))
    _summary(sel, out_file)


# The flag that sets each SelectConfig field (for messages in the user's own words).
FLAGS = {name: SELECT_HELP[name][0][0] for name in SELECT_HELP} | {
    "n": "--n", "seed": "--seed", "split": "--split", "format": "--format", "mc_style": "--mc-style",
    "batch_size": "--batch-size", "max_length": "--max-length", "dtype": "--dtype", "compute_dtype": "--compute-dtype"}


def select_config(path: Path | None, flags: dict, *, own_gate: bool | None = None,
                  include_derived: bool = False):
    """The SelectConfig of ``--config`` and the flags given, every problem in one error, in flag names."""

    d = {}
    if path is not None:
        d = read_config(path, "select config") or {}
        if isinstance(d, dict) and isinstance(d.get("select"), dict):
            d = d["select"]  # a run config: its select: section
    if not isinstance(d, dict):
        raise ConfigError("select config must be a mapping of settings", path=path)
    d = {**d, **flags}
    if flags.get("n") == 0:
        d["n"] = None  # --n 0: every row
    if own_gate is False:
        d["min_own_gain"] = None
    if include_derived:
        d["include_derived"] = True
    errs = SelectConfig.unknown_errors(d)
    cfg = SelectConfig(**{k: v for k, v in d.items() if k in SelectConfig.field_names()})
    errs += cfg.errors()
    if errs:
        raise config_error(ConfigError("invalid select settings: " + "; ".join(errs), path=path), FLAGS)
    return cfg


def _local(ref: str) -> list[Path]:
    """The base as a local directory when it is one (a hub id's cache dir is not the user's to write)."""
    p = Path(ref).expanduser()
    return [p] if p.exists() else []


def _write_selection(sel, out_file: Path, force: bool) -> None:
    """Without --force a file that appeared meanwhile (another writer that finished first) is kept and
    this command fails, instead of silently replacing it."""
    from ..rundir import write_selection  # lazy: keeps --help fast

    write_selection(sel, out_file, force=force)


class _progress:
    """A rich progress bar fed by select()'s progress events (on stderr, rank 0 only)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=err, transient=True, disable=self.rank != 0)
        self.prog.__enter__()
        self.task = self.prog.add_task("scoring", total=None)
        return self

    def __call__(self, event: str, payload) -> None:
        if event == "start":
            self.prog.update(self.task, total=payload, completed=0)
        elif event == "candidate":
            self.prog.update(self.task, description=f"scoring {payload.kind} {Path(payload.ref).name}")
        elif event == "rows":
            self.prog.advance(self.task, payload)

    def __exit__(self, *exc):
        self.prog.__exit__(*exc)


def ranking_table(sel) -> Table:
    donors = {d["id"]: d["weight"] for d in sel.donors}
    t = Table(title=f"{sel.metric} on {sel.target['sample']} of {Path(sel.target['path']).name}"
                    f" ({'higher' if sel.higher_is_better else 'lower'} is better, scorer {sel.scorer})")
    for c in ("rank", "id", "kind", "score", "cached", "donor weight", "checkpoint"):
        t.add_column(c, justify="right" if c in ("rank", "score", "donor weight") else "left", overflow="fold")
    for r in sel.ranking:
        w = donors.get(r["id"])
        score = "" if r["score"] is None else f"{r['score']:.4f}"  # halving: pre-ranked out, never scored
        if r.get("rows"):
            score += f" ({r['rows']} rows)"
        t.add_row(str(r["rank"]), str(r["id"]), r["kind"], score, "yes" if r["cached"] else "",
                  "" if w is None else f"{w:.3f}", checkpoint_label(r))
    return t


def checkpoint_label(row: dict) -> str:
    """The catalog's task name with the directory's own name (``capitals (checkpoint-20)``) where the
    task is known; else the reference itself, whole (a truncated path names nothing)."""
    if row.get("task"):
        return f"{row['task']} ({Path(row['ref']).name})"
    return row["ref"]


def _summary(sel, out_file: Path | None) -> None:
    n_cached = sum(r["cached"] for r in sel.ranking)
    n_scored = sum(r["score"] is not None for r in sel.ranking)
    err.print(f"{n_scored} scored ({n_cached} from cache), {len(sel.donors)} donor(s) chosen")
    if sel.halving:
        h = sel.halving
        err.print(f"halving: {h['prescored']} of {h['candidates']} pre-ranked, rounds "
                  + ", ".join(f"{r['candidates']}×{r['rows']} rows" for r in h["rounds"]) + f" ({h['seconds']:.1f} s)")
    for x in (sel.own_gate or {}).get("excluded", []):
        err.print(f"not a donor: {Path(x['ref']).name} never learned its own task ({x['metric']} {x['start']:.4f} "
                  f"→ {x['final']:.4f} in its {x['from']}; --min-own-gain {sel.own_gate['min_gain']})")
    if not sel.donors:
        err.print("no candidate qualifies as a donor (margin / own-task gate); train from the base")
    w = sel.weighting
    if w.get("scheme") == "optimized":
        err.print(f"weights optimized in {w['evaluations']} evaluations ({w['seconds']:.0f} s): {w['metric']} cost "
                  f"{w['cost_uniform']:.4f} at uniform → {w['cost_chosen']:.4f}")
    if out_file is not None:
        err.print(f"wrote {out_file}; merge with `warmstart merge --selection {out_file} --out merged/`")
    else:
        err.print("pass --out selection.yaml to write a selection file for `warmstart merge`")


def register(app: typer.Typer) -> None:
    app.command("select", epilog=EPILOG)(select_cmd)
