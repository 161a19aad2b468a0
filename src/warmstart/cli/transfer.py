"""`warmstart transfer`: carry a fine-tune to a new base version (base_new + α·diff)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import ConfigError
from ._common import AllowPickleOpt, ForceOpt, JsonOpt, ThreadsOpt, err, out, print_json, use_threads

EPILOG = """
Examples:

  warmstart transfer --base-old models/llama-3.0-8b --finetuned runs/fr-full/final --base-new models/llama-3.1-8b \
--out transferred/fr

  warmstart transfer --base-old models/smol-v1 --finetuned runs/fr-lora/checkpoint-500 --base-new models/smol-v2 \
--out transferred/fr-alphas --alpha 0.5,0.75,1.0 --dtype bfloat16

  warmstart transfer --base-old models/smol-v1 --finetuned runs/fr-lora --base-new models/smol-v2 --dry-run --json

  warmstart transfer --base-old models/smol-v1 --finetuned runs/fr-lora --base-new models/smol-v2 \
--out transferred/fr-adapter --as-adapter
"""


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4g}"


def _plan_table(report, limit: int = 40) -> Table:
    t = Table(title="per-tensor plan (non-trivial entries)")
    for c in ("tensor", "action", "reason"):
        t.add_column(c, overflow="fold")
    rows = [x for x in report.tensors if x.action != "transfer" and "diff is zero" not in x.reason]
    for x in rows[:limit]:
        t.add_row(x.name, x.action, x.reason + (f" {x.rows}" if x.rows else ""))
    if len(rows) > limit:
        t.add_row(f"… {len(rows) - limit} more", "", "see transfer_report.json or --json")
    return t


def _layer_table(report) -> Table:
    t = Table(title="compatibility: base drift vs fine-tuning diff, per layer")
    for c in ("layer", "cos(drift, diff)", "|diff|/|old|", "|drift|/|old|", "tensors"):
        t.add_column(c, justify="right" if c != "layer" else "left")
    for ly in report.layers:
        t.add_row(ly.layer, _fmt(ly.cos_drift_diff), _fmt(ly.rel_diff), _fmt(ly.rel_drift), str(ly.n_tensors))
    s = report.summary
    t.add_row("[bold]all[/]", _fmt(s.get("cos_drift_diff")), _fmt(s.get("rel_diff")), _fmt(s.get("rel_drift")),
              str(sum(ly.n_tensors for ly in report.layers)))
    return t


def _print_report(report, json_out: bool) -> None:
    """The report on stdout (JSON, or the per-layer table), then its warnings on stderr."""
    if json_out:
        print_json(report.to_dict())
    else:
        out.print(_layer_table(report))
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {w}")


def transfer_cmd(
    base_old: str = typer.Option(..., "--base-old", help="The base the fine-tune was trained from (path or hub id)."),
    finetuned: str = typer.Option(..., "--finetuned", help="The fine-tune of --base-old: a full model or a LoRA "
                                  "adapter."),
    base_new: str = typer.Option(..., "--base-new", help="The new base version to carry the fine-tune to."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Output directory (with several alphas: one alpha-<a>/ "
                                 "each)."),
    alpha: str = typer.Option("1.0", "--alpha", "-a", help="Scale of the diff; a comma-separated list writes one "
                              "model each."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype (float32, bfloat16, float16); default the new "
                              "base's."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype", help="float32 or float64 for the differences."),
    vocab_new_rows: str = typer.Option("base", "--vocab-new-rows",
                                       help="Rows of tokens the old base lacks: from the new 'base' or the "
                                       "'finetuned' model."),
    config_from: str = typer.Option("new", "--config-from", help="Config and chat template from the 'new' base or "
                                    "the 'finetuned' model."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest output shard, e.g. 2GB (= 2·10⁹ bytes)."),
    max_shard_size: str = typer.Option(None, "--max-shard-size", hidden=True,
                                       help="Deprecated alias of --shard-size (now decimal units too)."),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="A LoRA fine-tune stays an adapter on --base-new "
                                    "(same A, B scaled by α; one α): exactly the full output, merged."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compute and print the compatibility report only; write "
                                 "nothing."),
    allow_pickle: bool = AllowPickleOpt,
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Use inputs that hold NaN/Inf values (refused by default)."),
    threads: int = ThreadsOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Carry a fine-tune to a new base version: base_new + α·(finetuned − base_old), streamed."""
    use_threads(threads)
    from rich.progress import Progress

    from ..checkpoints import resolve

    for ref in (base_old, finetuned, base_new):  # before torch loads: a typo answers in about a second
        resolve(ref)

    from ..transfer import transfer, transfer_adapter

    if as_adapter:
        given = {"--dtype": dtype is not None, "--max-shard-size": max_shard_size is not None,
                 "--dry-run": dry_run, "--allow-pickle": allow_pickle, "--compute-dtype": compute_dtype != "float32",
                 "--vocab-new-rows": vocab_new_rows != "base", "--config-from": config_from != "new",
                 "--shard-size": shard_size != "2GB"}
        ignored = [flag for flag, v in given.items() if v]
        if ignored:
            raise ConfigError(f"--as-adapter writes an adapter; {', '.join(ignored)} apply to full outputs only")
        if out_dir is None:
            raise ConfigError("--out is required")
        report = transfer_adapter(base_old, finetuned, base_new, out_dir, alpha=alpha, force=force,
                                  allow_nonfinite=allow_nonfinite)
        _print_report(report, json_out)
        err.print(f"wrote {out_dir} (adapter on {base_new})")
        return

    if max_shard_size is not None:
        err.print("[yellow]warning:[/] --max-shard-size is deprecated: use --shard-size (decimal units, "
                  "2GB = 2·10⁹ bytes, as warmstart merge)")

    if out_dir is None and not dry_run:
        raise ConfigError("--out is required (or pass --dry-run for the report only)")

    def show_plan(report) -> None:
        if not json_out and any(x.action != "transfer" and "diff is zero" not in x.reason for x in report.tensors):
            err.print(_plan_table(report))

    with Progress(console=err, transient=True) as prog:
        tid = prog.add_task("transfer", total=None)

        def tick(name: str) -> None:
            prog.update(tid, advance=1, description=name[-48:])

        report = transfer(base_old, finetuned, base_new, out_dir, alpha=alpha, dtype=dtype,
                          compute_dtype=compute_dtype, vocab_new_rows=vocab_new_rows, config_from=config_from,
                          shard_size=max_shard_size or shard_size, dry_run=dry_run, force=force,
                          allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, on_tensor=tick, on_plan=show_plan)
    _print_report(report, json_out)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts().items())
    err.print(f"tensors: {counts}")
    for o in report.outputs:
        err.print(f"wrote {o}")
    if dry_run:
        err.print("dry run: nothing written")


def register(app: typer.Typer) -> None:
    app.command("transfer", epilog=EPILOG)(transfer_cmd)
