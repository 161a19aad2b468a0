"""`warmstart select`: rank the library's checkpoints on a target sample and choose donors."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import ForceOpt, JsonOpt, LibraryOpt, ThreadsOpt, err, library_path, out, print_json, use_threads

EPILOG = """
Examples:

  warmstart select --target data/country_de/train.jsonl --base models/SmolLM2-135M-Instruct --out selection.yaml

  warmstart select --target data/arc --split validation --base models/base --metric mc-accuracy --k 3 --weights softmax:0.1 --json

  warmstart select --target data.jsonl --base models/base --scorer grad --n 128 --margin 0.05 --out sel.yaml --force

  accelerate launch --multi_gpu --num_processes 4 -m warmstart select --target data.jsonl --base models/base --out sel.yaml

  torchrun --nproc_per_node 2 -m warmstart select --target data.jsonl --base models/base --sample-size 128 --out sel.yaml
"""


def select_cmd(
    target: Path = typer.Option(..., "--target", "-t", help="Target data: .jsonl/.json/.csv/.parquet or a "
                                "save_to_disk directory."),
    base: str = typer.Option(..., "--base", "-b", help="Base model (path or hub id); candidates must fit it."),
    library: Path = LibraryOpt,
    metric: str = typer.Option("loss", "--metric", "-m",
                               help="loss | accuracy | exact-match | mc-accuracy | mc-accuracy-norm."),
    n: int = typer.Option(256, "--n", "--sample-size",
                          help="Random sample size of the target (0 = all rows)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    k: int = typer.Option(2, "--k", "-k", help="Number of donors."),
    margin: float = typer.Option(None, "--margin", help="Only donors better than the base by at least this."),
    weights: str = typer.Option("uniform", "--weights", "-w",
                                help="uniform | score | softmax:T | mwa:loss | mwa:steps | optimized (CMA-ES "
                                "on the target sample)."),
    optimize_budget: int = typer.Option(20, "--optimize-budget",
                                        help="Evaluations of the weight search (with --weights optimized)."),
    penalty: float = typer.Option(1.0, "--penalty", help="MWA penalty exponent p."),
    scorer: str = typer.Option("loss", "--scorer", help="loss (evaluate each), grad (first-order proxy) or "
                               "halving (pre-rank by catalogued summaries, then successive halving; for "
                               "large libraries, docs/select.md)."),
    shortlist: int = typer.Option(8, "--shortlist", help="halving: candidates kept by the pre-rank."),
    halving_rows: int = typer.Option(8, "--halving-rows", help="halving: rows of the first round (doubled "
                                     "each round)."),
    prerank_rows: int = typer.Option(16, "--prerank-rows", help="halving: rows of the pre-rank's backward pass."),
    min_own_gain: float = typer.Option(0.02, "--min-own-gain",
                                       help="A donor must have gained at least this on its own task in its own "
                                       "training (accuracy points, or relative loss fall; docs/select.md)."),
    own_gate: bool = typer.Option(True, "--own-gate/--no-own-gate",
                                  help="Skip donors that never learned their own task (--min-own-gain)."),
    split: str = typer.Option(None, "--split", help="Split of a dataset directory."),
    format: str = typer.Option(None, "--format", help="prompt_completion | messages | mc (default: detect)."),
    mc_style: str = typer.Option("text", "--mc-style", help="Multiple choice as answer text or letter."),
    mc_mode: str = typer.Option("rank", "--mc-mode", help="mc-accuracy by option text rank, or letter."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(512, "--max-length"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype",
                                      help="Scoring matmuls: auto (bfloat16 where the CPU/GPU has it), "
                                      "float32 or bfloat16."),
    out_file: Path = typer.Option(None, "--out", "-o", help="Selection file to write (.yaml or .json)."),
    include_derived: bool = typer.Option(False, "--include-derived",
                                         help="Also score merges, transfers and warmstart runs' outputs."),
    threads: int = ThreadsOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Score every compatible checkpoint (and the base) on a target sample; write the donors."""
    use_threads(threads)
    from .._io import check_output
    from ..checkpoints import resolve
    from ..data import load_target
    from ..library import Library
    from ..select import dist_env, select

    _check_numbers(batch_size=batch_size, max_length=max_length, n=n, k=k, optimize_budget=optimize_budget,
                   shortlist=shortlist, halving_rows=halving_rows, prerank_rows=prerank_rows)
    rank, world = dist_env()
    if out_file is not None and rank == 0:
        check_output(out_file, force=force, inputs=[target, library_path(library), *_local(base)])
    # every input checked before a model loads (and before the library is opened: never created here)
    if dtype not in ("float32", "bfloat16", "float16", "float64"):
        from ..errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}", hint="float32, bfloat16 or float16")
    data = load_target(target, split=split, format=format, mc_style=mc_style)
    resolve(base)
    with Library(library_path(library), create=False) as lib, _progress(rank) as progress:
        if out_file is not None and rank == 0:  # nor over a library entry (a file in a checkpoint dir)
            check_output(out_file, force=force, inputs=[e.path for e in lib.list()])
        sel = select(data, base, library=lib, metric=metric, n=n or None, seed=seed, k=k, margin=margin,
                     weights=weights, penalty=penalty, scorer=scorer, split=split, format=format,
                     mc_style=mc_style, batch_size=batch_size, max_length=max_length, mc_mode=mc_mode,
                     dtype=dtype, compute_dtype=compute_dtype, optimize_budget=optimize_budget,
                     min_own_gain=min_own_gain if own_gate else None, progress=progress,
                     include_derived=include_derived, shortlist=shortlist, halving_rows=halving_rows,
                     prerank_rows=prerank_rows)
    if sel is None:  # another rank writes the result
        return
    if out_file is not None:
        _write_selection(sel, out_file, force)
    if json_out:
        print_json(sel.to_dict())
    else:
        out.print(ranking_table(sel))
    _summary(sel, out_file)


def _check_numbers(**values: int) -> None:
    """Counts that must be positive (n, k: zero has a meaning, negatives none): refused before any work."""
    from ..errors import ConfigError

    for name, v in values.items():
        low = 0 if name in ("n", "k") else 1
        if v < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


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
