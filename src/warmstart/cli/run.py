"""`warmstart run` (the whole pipeline, resumable), `warmstart report`, `warmstart compare`."""

from __future__ import annotations

from pathlib import Path

import typer

from .._io import read_config
from ..config import RunConfig, apply_overrides
from ..errors import ConfigError
from ..pipeline import run
from ..select import dist_env
from ._common import JsonOpt, LibraryOpt, ThreadsOpt, err, library_path, print_json, use_threads
from ._options import given, opt, own_gate_opt, select_opt, switch

RUN_EPILOG = """
Examples:

  warmstart run --target data/capitals.jsonl --library lib.db \\
      --base ~/.cache/warmstart/models/SmolLM2-135M-Instruct --out runs/capitals

  # the recycle-bench recipe: gradient-proxy selection on 64 rows, 2 donors, SVD merge, 20 steps
  warmstart run --target train.jsonl --eval test.jsonl --library lib.db --base BASE \\
      --scorer grad --select-n 64 --k 2 --steps 20 --lr 2e-4 --batch-size 8 --out runs/x

  # three donors, their merge weights searched by CMA-ES on the target sample
  warmstart run --target data/capitals.jsonl --library lib.db --base BASE --k 3 --weights optimized --out runs/opt

  # any other setting: --set section.key=value (train., select., merge., or a top-level key)
  warmstart run --target t.jsonl --library lib.db --base BASE --set merge.lora_a_norm=null \\
      --set train.max_grad_norm=0.5 --set eval_max=500 --out runs/y

  # settings from YAML (train:, select:, merge:, eval_fraction:, ...); flags and --set override it
  warmstart run --target train.jsonl --eval heldout.jsonl --library lib.db --base BASE --config run.yaml --out runs/x

  # the warm start is a fine-tune of the old base carried to --base (base + α·(fine-tune − old base))
  # instead of selected and merged donors; the old base defaults to the one the fine-tune records
  warmstart run --target train.jsonl --eval heldout.jsonl --base models/v1.1 --out runs/x \
      --transfer-from runs/v1-lora-arc [--transfer-base-old models/v1] [--transfer-alpha 1.0]

  # after a crash or Ctrl-C: the same command resumes at the first unfinished stage
  warmstart run --target data/capitals.jsonl --library lib.db --base BASE --out runs/capitals
"""

TRAIN, SELECT, MERGE = "Training (warm start and baseline alike)", "Selection", "Merge"
TRANSFER = "Transfer (instead of selection and merge)"
EVAL = "Evaluation split"


def _t(name: str, *decls: str, help: str, **kw):
    return opt("train", name, *decls, help=help, panel=TRAIN, **kw)


def _e(name: str, *decls: str, help: str):
    return opt("run", name, *decls, help=help, panel=EVAL)


# Every flag defaults to None ("not given": --config's value, else the dataclass default, which
# --help shows, read from TrainConfig / SelectConfig / RunConfig: cli/_options.py).
def run_cmd(
    target: Path = typer.Option(..., "--target", "-t", help="Target dataset (train split; eval carved from it)."),
    base: str = typer.Option(..., "--base", help="Base model (directory or hub id) for baseline and selection."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory (created, or resumed)."),
    library: Path = LibraryOpt,
    transfer_from: str = opt("transfer", "source", "--transfer-from", help="Warm start: this fine-tune carried "
                             "to --base (a directory, or a library entry id/name with --library). No selection "
                             "or merge flags with it.", panel=TRANSFER, show="none"),
    transfer_base_old: str = opt("transfer", "base_old", "--transfer-base-old", help="The base the fine-tune was "
                                 "trained from.", panel=TRANSFER, show="the one the fine-tune records"),
    transfer_alpha: float = opt("transfer", "alpha", "--transfer-alpha", help="Scale α of the transferred diff.",
                                panel=TRANSFER),
    config: Path = typer.Option(None, "--config", help="Run config YAML; flags and --set override it."),
    eval_: Path = typer.Option(None, "--eval", help="Held-out eval data, used whole unless --eval-limit caps it "
                               r"\[default: carved from --target]."),
    sets: list[str] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                   help="Any setting of the run config (repeatable; value read as YAML), e.g. "
                                   "train.weight_decay=0.01, select.dtype=bfloat16, merge.params.density=0.5, "
                                   "merge_options.threads=4, eval_max=null. Applied after the flags."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip training from the plain base."),
    steps: int = _t("steps", "--steps", help="Training steps of each run."),
    lr: float = _t("lr", "--lr", help="Peak learning rate."),
    batch_size: int = _t("batch_size", "--batch-size", help="Per-device batch size."),
    grad_accum: int = _t("grad_accum", "--grad-accum", help="Gradient accumulation steps."),
    scheduler: str = _t("scheduler", "--scheduler", help="linear, cosine, constant, constant_with_warmup."),
    warmup_steps: int = _t("warmup_steps", "--warmup-steps", help="Learning-rate warmup steps."),
    weight_decay: float = _t("weight_decay", "--weight-decay", help="AdamW weight decay."),
    seed: int = _t("seed", "--seed", help="Seed of training, LoRA init and the selection sample."),
    lora_r: int = _t("lora_r", "--lora-r", help="Rank of the baseline's fresh LoRA (and of an SVD merge)."),
    lora_alpha: float = _t("lora_alpha", "--lora-alpha", help="LoRA alpha."),
    lora_dropout: float = _t("lora_dropout", "--lora-dropout", help="LoRA dropout."),
    lora_targets: str = _t("lora_targets", "--lora-targets", help="Comma-separated module names."),
    rslora: bool = switch("train", "rslora", "--rslora/--no-rslora", help="Rank-stabilised LoRA scaling.",
                          panel=TRAIN),
    full: bool = switch("train", "full", "--full/--lora", help="Full fine-tuning instead of LoRA.", panel=TRAIN),
    eval_every: int = _t("eval_every", "--eval-every", help="Evaluate every N steps."),
    eval_batch_size: int = _t("eval_batch_size", "--eval-batch-size", help="Evaluation batch size."),
    eval_limit: int = _t("eval_limit", "--eval-limit", help="Evaluate on at most N eval rows (seeded sample; "
                         "reported as rows used / given).", show="all rows"),
    max_length: int = _t("max_length", "--max-length", help="Token limit of a row."),
    precision: str = _t("precision", "--precision", help="auto, fp32, bf16, fp16."),
    scorer: str = select_opt("scorer", SELECT),
    shortlist: int = select_opt("shortlist", SELECT),
    select_n: int = opt("select", "n", "--select-n", help="Target rows sampled to score candidates (0 = all); the "
                        "selection cost grows with it.", panel=SELECT),
    metric: str = select_opt("metric", SELECT),
    k: int = select_opt("k", SELECT),
    margin: float = select_opt("margin", SELECT),
    weights: str = select_opt("weights", SELECT),
    penalty: float = select_opt("penalty", SELECT),
    optimize_budget: int = select_opt("optimize_budget", SELECT),
    min_own_gain: float = select_opt("min_own_gain", SELECT),
    own_gate: bool = own_gate_opt(SELECT),
    mc_mode: str = select_opt("mc_mode", SELECT),
    method: str = opt("merge", "method", "--method", help="Merge method (linear, ties, dare, ...).", panel=MERGE),
    lora_mode: str = opt("merge", "lora_mode", "--lora-mode", help="LoRA donors: svd (baseline's rank), cat "
                         "(exact), factors.", panel=MERGE, show="svd (all donors LoRA), else cat"),
    eval_fraction: float = _e("eval_fraction", "--eval-fraction", help="Share of --target held out (without "
                              "--eval)."),
    eval_max: int = _e("eval_max", "--eval-max", help="Most rows held out of --target (0 = no limit; without "
                       "--eval)."),
    split_seed: int = _e("split_seed", "--split-seed", help="Seed of the held-out split."),
    force: bool = typer.Option(False, "--force", help="Discard an existing run in --out and start over."),
    threads: int = ThreadsOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Select donors, merge, train from the merge and from the base, and report the difference.

    With --transfer-from the warm start is that fine-tune carried to --base instead (docs/transfer.md)."""
    use_threads(threads)

    tr = given(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, scheduler=scheduler,
               warmup_steps=warmup_steps, weight_decay=weight_decay, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
               lora_dropout=lora_dropout, rslora=rslora, full=full, eval_every=eval_every,
               eval_batch_size=eval_batch_size, eval_limit=eval_limit, max_length=max_length, precision=precision)
    if lora_targets is not None:
        tr["lora_targets"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    sel = given(scorer=scorer, metric=metric, k=k, margin=margin, weights=weights, penalty=penalty,
                optimize_budget=optimize_budget, min_own_gain=min_own_gain, mc_mode=mc_mode, shortlist=shortlist)
    if select_n is not None:
        sel["n"] = select_n or None  # 0: every row
    if own_gate is False:
        sel["min_own_gain"] = None
    top = given(eval_fraction=eval_fraction, split_seed=split_seed)
    if eval_max is not None:
        top["eval_max"] = eval_max or None
    if no_baseline:
        top["baseline"] = False
    cfg = run_config(config, tr, sel, given(method=method, lora_mode=lora_mode), top, sets or [],
                     given(source=transfer_from, base_old=transfer_base_old, alpha=transfer_alpha))
    # a transfer from a directory needs no library; from a library entry, --library (or the default one)
    lib = None if cfg.transfer.active and not library and Path(cfg.transfer.source).expanduser().exists() \
        else library_path(library)
    res = run(target, lib, base, out_dir, cfg, eval=eval_, force=force, progress=not json_out,
              log=lambda s: err.print(f"[bold]{s.split(':')[0]}[/]:{s.split(':', 1)[1]}" if ":" in s else s))

    if dist_env()[0] != 0:  # one answer per launch, from the main process
        return
    if json_out:
        print_json(res.to_dict())
        return
    err.print(f"report: {out_dir / 'report' / 'report.md'}")
    _print_headline(res.report)
    _print_costs(res.report)


def run_config(path: Path | None, train: dict, select: dict, merge: dict, top: dict, sets: list[str],
               transfer: dict | None = None) -> RunConfig:
    """--config, then the flags, then --set, checked once at the end: every problem in one error."""

    d = (read_config(path, "run config") or {}) if path else {}
    if not isinstance(d, dict):
        raise ConfigError("run config must be a mapping", path=path)
    for name, flags in (("train", train), ("select", select), ("merge", merge), ("transfer", transfer or {})):
        sec = d.get(name) if d.get(name) is not None else {}
        if flags and isinstance(sec, dict):  # else the section's own error is reported below
            d[name] = {**sec, **flags}
    d.update(top)
    return RunConfig.from_dict(apply_overrides(d, sets), where=path)


def _print_costs(rep: dict) -> None:
    """The selection's cost beside training's, and the eval rows when a cap left some out."""
    from ..report import eval_rows_text, selection_sentence

    if rep.get("selection"):
        err.print(selection_sentence(rep["selection"], rep).replace("**", "").replace("`", ""))
    if rep.get("transfer"):
        from ..report import transfer_sentence

        err.print(transfer_sentence(rep["transfer"]).replace("**", "").replace("`", ""), markup=False)
    r = rep.get("eval_rows") or {}
    if r and r.get("used") != r.get("given"):
        err.print(f"eval rows: {eval_rows_text(r)}")


def _print_headline(rep: dict) -> None:
    from ..report import parity_sentence

    m = rep["metric"].removeprefix("eval_")
    w, b = rep["warm"], rep.get("baseline")
    line = f"warm start {m} {w['final']:.4f}"
    if b:
        from ..report import delta_sentence

        line += f" vs baseline {b['final']:.4f}"
        if rep.get("delta") is not None:
            line += "; " + delta_sentence(rep).replace("**", "")
    err.print(line, highlight=False)
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
    _print_costs(rep)


def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (one per target)."),
    json_out: bool = JsonOpt,
) -> None:
    """Tabulate several runs: one row per target, the mean at the bottom (markdown on stdout).

    Runs without a report are skipped, one line each on stderr saying why and what to do."""
    from ..errors import ConfigError
    from ..report import collect_reports, compare_markdown, compare_rows

    reports, skipped = collect_reports(run_dirs)
    for d, why in skipped:
        err.print(f"skipped {d}: {why}", markup=False, highlight=False, soft_wrap=True)
    if not reports:
        raise ConfigError(f"none of the {len(run_dirs)} run directories has a report", hint=skipped[0][1])
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
