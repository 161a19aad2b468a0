"""`warmstart run` (the whole pipeline, resumable), `warmstart report`, `warmstart compare`."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import JsonOpt, LibraryOpt, ThreadsOpt, err, library_path, print_json, use_threads

RUN_EPILOG = """
Examples:

  warmstart run --target data/capitals.jsonl --library lib.db \\
      --base ~/.cache/warmstart/models/SmolLM2-135M-Instruct --out runs/capitals

  # settings from YAML (train:, select:, merge:, eval_fraction:, ...), a given eval split
  warmstart run --target train.jsonl --eval heldout.jsonl --library lib.db --base BASE \\
      --config run.yaml --out runs/x

  # three donors, their merge weights searched by CMA-ES on the target sample
  warmstart run --target data/capitals.jsonl --library lib.db --base BASE --k 3 --weights optimized --out runs/opt

  # after a crash or Ctrl-C: the same command resumes at the first unfinished stage
  warmstart run --target data/capitals.jsonl --library lib.db --base BASE --out runs/capitals
"""


def run_cmd(
    target: Path = typer.Option(..., "--target", "-t", help="Target dataset (train split; eval carved from it)."),
    base: str = typer.Option(..., "--base", help="Base model (directory or hub id) for baseline and selection."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory (created, or resumed)."),
    library: Path = LibraryOpt,
    config: Path = typer.Option(None, "--config", help="Run config YAML; flags below override it."),
    eval_: Path = typer.Option(None, "--eval", help="Held-out eval data (default: carved from --target)."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip training from the plain base."),
    steps: int = typer.Option(None, "--steps", help="Training steps for both runs."),
    lr: float = typer.Option(None, "--lr", help="Learning rate for both runs."),
    batch_size: int = typer.Option(None, "--batch-size"),
    seed: int = typer.Option(None, "--seed"),
    lora_r: int = typer.Option(None, "--lora-r"),
    full: bool = typer.Option(None, "--full/--lora", help="Full fine-tuning instead of LoRA."),
    eval_every: int = typer.Option(None, "--eval-every"),
    k: int = typer.Option(None, "--k", help="Donors to select."),
    weights: str = typer.Option(None, "--weights", help="Donor weights: uniform, score, softmax:T, mwa:loss, "
                                "mwa:steps or optimized (CMA-ES on the target sample)."),
    method: str = typer.Option(None, "--method", help="Merge method (linear, ties, ...)."),
    force: bool = typer.Option(False, "--force", help="Discard an existing run in --out and start over."),
    threads: int = ThreadsOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Select donors, merge, train from the merge and from the base, and report the difference."""
    use_threads(threads)
    from ..pipeline import RunConfig, run

    cfg = RunConfig.from_yaml(config) if config else RunConfig()
    tr = {k_: v for k_, v in dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, lora_r=lora_r, full=full,
                                 eval_every=eval_every).items() if v is not None}
    if tr:
        from ..train import TrainConfig

        cfg.train = TrainConfig.from_dict({**cfg.train.to_dict(), **tr})
    if k is not None:
        cfg.select = {**cfg.select, "k": k}
    if weights is not None:
        cfg.select = {**cfg.select, "weights": weights}
    if method is not None:
        cfg.merge = {**cfg.merge, "method": method}
    if no_baseline:
        cfg.baseline = False
    res = run(target, library_path(library), base, out_dir, cfg, eval=eval_, force=force, progress=not json_out,
              log=lambda s: err.print(f"[bold]{s.split(':')[0]}[/]:{s.split(':', 1)[1]}" if ":" in s else s))
    from ..select import dist_env

    if dist_env()[0] != 0:  # one answer per launch, from the main process
        return
    if json_out:
        print_json(res.to_dict())
        return
    err.print(f"report: {out_dir / 'report' / 'report.md'}")
    _print_headline(res.report)


def _print_headline(rep: dict) -> None:
    from ..report import parity_sentence

    m = rep["metric"].removeprefix("eval_")
    w, b = rep["warm"], rep.get("baseline")
    line = f"warm start {m} {w['final']:.4f}"
    if b:
        line += f" vs baseline {b['final']:.4f} (Δ {rep['delta']:+.4f})"
    err.print(line)
    for s in parity_sentence(rep["parity"]) if rep.get("parity") else []:
        err.print(s.replace("**", ""))


def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory made by `warmstart run`."),
    json_out: bool = JsonOpt,
) -> None:
    """Re-render report.md, report.json and the plots of a run from its logged curves."""
    from ..pipeline import render_report

    rep = render_report(run_dir)
    if json_out:
        print_json(rep)
        return
    err.print(f"wrote {run_dir / 'report'}/report.md, report.json, curves_step.png, curves_wall.png")
    _print_headline(rep)


def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (one per target)."),
    json_out: bool = JsonOpt,
) -> None:
    """Tabulate several runs: one row per target, the mean at the bottom (markdown on stdout)."""
    from .._io import read_json
    from ..report import compare_markdown, compare_rows

    reports = [read_json(Path(d) / "report" / "report.json", "report (run `warmstart report RUN_DIR` first)")
               for d in run_dirs]
    rows = compare_rows(reports)
    if json_out:
        print_json(rows)
    else:
        import sys

        sys.stdout.write(compare_markdown(rows))


def register(root: typer.Typer) -> None:
    root.command("run", epilog=RUN_EPILOG)(run_cmd)
    root.command("report", epilog="\nExample:\n\n  warmstart report runs/capitals\n")(report_cmd)
    root.command("compare", epilog="\nExample:\n\n  warmstart compare runs/* > comparison.md\n")(compare_cmd)
