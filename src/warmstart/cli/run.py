"""`warmstart run` (the whole pipeline, resumable), `warmstart report`, `warmstart compare`."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import JsonOpt, LibraryOpt, ThreadsOpt, err, library_path, print_json, use_threads

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

  # after a crash or Ctrl-C: the same command resumes at the first unfinished stage
  warmstart run --target data/capitals.jsonl --library lib.db --base BASE --out runs/capitals
"""

# The defaults --help shows. The flags themselves default to None so that only a flag given on the
# command line overrides --config; these strings mirror TrainConfig, select() and RunConfig
# (tests/test_pipeline.py checks that they agree).
DEFAULTS = {
    "steps": "40", "lr": "0.0002", "batch_size": "8", "grad_accum": "1", "scheduler": "linear",
    "warmup_steps": "0", "weight_decay": "0.0", "seed": "0", "lora_r": "8", "lora_alpha": "16.0",
    "lora_dropout": "0.0", "lora_targets": "q_proj,k_proj,v_proj,o_proj", "rslora": "no-rslora", "full": "lora",
    "eval_every": "10", "eval_batch_size": "16", "eval_limit": "all rows", "max_length": "512",
    "precision": "auto", "scorer": "loss", "select_n": "256", "metric": "loss", "k": "2", "margin": "none",
    "weights": "uniform", "penalty": "1.0", "optimize_budget": "20", "min_own_gain": "0.02",
    "own_gate": "own-gate", "mc_mode": "rank", "shortlist": "8", "method": "linear",
    "lora_mode": "svd (all donors LoRA), else cat", "eval_fraction": "0.2", "eval_max": "200", "split_seed": "0",
}

TRAIN, SELECT, MERGE = "Training (warm start and baseline alike)", "Selection", "Merge"
EVAL = "Evaluation split"


def _dflt(name: str) -> str:
    return rf" \[default: {DEFAULTS[name]}]"  # escaped: rich would read [default: …] as markup


def _opt(name: str, *decls: str, help: str, panel: str):
    return typer.Option(None, *decls, help=help + _dflt(name), show_default=False, rich_help_panel=panel)


def run_cmd(
    target: Path = typer.Option(..., "--target", "-t", help="Target dataset (train split; eval carved from it)."),
    base: str = typer.Option(..., "--base", help="Base model (directory or hub id) for baseline and selection."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory (created, or resumed)."),
    library: Path = LibraryOpt,
    config: Path = typer.Option(None, "--config", help="Run config YAML; flags and --set override it."),
    eval_: Path = typer.Option(None, "--eval", help="Held-out eval data, used whole unless --eval-limit caps it "
                               r"\[default: carved from --target]."),
    sets: list[str] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                   help="Any setting of the run config (repeatable; value read as YAML), e.g. "
                                   "train.weight_decay=0.01, select.dtype=bfloat16, merge.params.density=0.5, "
                                   "eval_max=null. Applied after the flags."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip training from the plain base."),
    steps: int = _opt("steps", "--steps", help="Training steps of each run.", panel=TRAIN),
    lr: float = _opt("lr", "--lr", help="Peak learning rate.", panel=TRAIN),
    batch_size: int = _opt("batch_size", "--batch-size", help="Per-device batch size.", panel=TRAIN),
    grad_accum: int = _opt("grad_accum", "--grad-accum", help="Gradient accumulation steps.", panel=TRAIN),
    scheduler: str = _opt("scheduler", "--scheduler", help="linear, cosine, constant, constant_with_warmup.",
                          panel=TRAIN),
    warmup_steps: int = _opt("warmup_steps", "--warmup-steps", help="Learning-rate warmup steps.", panel=TRAIN),
    weight_decay: float = _opt("weight_decay", "--weight-decay", help="AdamW weight decay.", panel=TRAIN),
    seed: int = _opt("seed", "--seed", help="Seed of training, LoRA init and the selection sample.", panel=TRAIN),
    lora_r: int = _opt("lora_r", "--lora-r", help="Rank of the baseline's fresh LoRA (and of an SVD merge).",
                       panel=TRAIN),
    lora_alpha: float = _opt("lora_alpha", "--lora-alpha", help="LoRA alpha.", panel=TRAIN),
    lora_dropout: float = _opt("lora_dropout", "--lora-dropout", help="LoRA dropout.", panel=TRAIN),
    lora_targets: str = _opt("lora_targets", "--lora-targets", help="Comma-separated module names.", panel=TRAIN),
    rslora: bool = typer.Option(None, "--rslora/--no-rslora", help="Rank-stabilised LoRA scaling." + _dflt("rslora"),
                                show_default=False, rich_help_panel=TRAIN),
    full: bool = typer.Option(None, "--full/--lora", help="Full fine-tuning instead of LoRA." + _dflt("full"),
                              show_default=False, rich_help_panel=TRAIN),
    eval_every: int = _opt("eval_every", "--eval-every", help="Evaluate every N steps.", panel=TRAIN),
    eval_batch_size: int = _opt("eval_batch_size", "--eval-batch-size", help="Evaluation batch size.", panel=TRAIN),
    eval_limit: int = _opt("eval_limit", "--eval-limit", help="Evaluate on at most N eval rows (seeded sample; "
                           "reported as rows used / given).", panel=TRAIN),
    max_length: int = _opt("max_length", "--max-length", help="Token limit of a row.", panel=TRAIN),
    precision: str = _opt("precision", "--precision", help="auto, fp32, bf16, fp16.", panel=TRAIN),
    scorer: str = _opt("scorer", "--scorer", help="loss (evaluate each candidate), grad (first-order proxy, "
                       "one backward pass) or halving (pre-rank, then successive halving: large libraries).",
                       panel=SELECT),
    shortlist: int = _opt("shortlist", "--shortlist", help="--scorer halving: candidates kept by the pre-rank.",
                          panel=SELECT),
    select_n: int = _opt("select_n", "--select-n", help="Target rows sampled to score candidates (0 = all); the "
                         "selection cost grows with it.", panel=SELECT),
    metric: str = _opt("metric", "--metric", help="Selection metric: loss, accuracy, exact-match, mc-accuracy, "
                       "mc-accuracy-norm (grad: loss only).", panel=SELECT),
    k: int = _opt("k", "--k", help="Donors to select.", panel=SELECT),
    margin: float = _opt("margin", "--margin", help="Only donors better than the base by at least this.",
                         panel=SELECT),
    weights: str = _opt("weights", "--weights", help="Donor weights: uniform, score, softmax:T, mwa:loss, "
                        "mwa:steps or optimized (CMA-ES on the target sample).", panel=SELECT),
    penalty: float = _opt("penalty", "--penalty", help="MWA penalty exponent.", panel=SELECT),
    optimize_budget: int = _opt("optimize_budget", "--optimize-budget", help="Evaluations of the weight search "
                                "(--weights optimized).", panel=SELECT),
    min_own_gain: float = _opt("min_own_gain", "--min-own-gain", help="A donor must have gained this much on its "
                               "own task in its own training (docs/select.md).", panel=SELECT),
    own_gate: bool = typer.Option(None, "--own-gate/--no-own-gate", help="Skip donors that never learned their "
                                  "own task." + _dflt("own_gate"), show_default=False, rich_help_panel=SELECT),
    mc_mode: str = _opt("mc_mode", "--mc-mode", help="mc-accuracy by option rank, or letter.", panel=SELECT),
    method: str = _opt("method", "--method", help="Merge method (linear, ties, dare, ...).", panel=MERGE),
    lora_mode: str = _opt("lora_mode", "--lora-mode", help="LoRA donors: svd (baseline's rank), cat (exact), "
                          "factors.", panel=MERGE),
    eval_fraction: float = _opt("eval_fraction", "--eval-fraction", help="Share of --target held out (without "
                                "--eval).", panel=EVAL),
    eval_max: int = _opt("eval_max", "--eval-max", help="Most rows held out of --target (0 = no limit; without "
                         "--eval).", panel=EVAL),
    split_seed: int = _opt("split_seed", "--split-seed", help="Seed of the held-out split.", panel=EVAL),
    force: bool = typer.Option(False, "--force", help="Discard an existing run in --out and start over."),
    threads: int = ThreadsOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Select donors, merge, train from the merge and from the base, and report the difference."""
    use_threads(threads)
    from ..pipeline import RunConfig, run

    cfg = RunConfig.from_yaml(config) if config else RunConfig()
    tr = dict(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, scheduler=scheduler,
              warmup_steps=warmup_steps, weight_decay=weight_decay, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
              lora_dropout=lora_dropout, rslora=rslora, full=full, eval_every=eval_every,
              eval_batch_size=eval_batch_size, eval_limit=eval_limit, max_length=max_length, precision=precision)
    if lora_targets is not None:
        tr["lora_targets"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    sel = _given(scorer=scorer, metric=metric, k=k, margin=margin, weights=weights, penalty=penalty,
                 optimize_budget=optimize_budget, min_own_gain=min_own_gain, mc_mode=mc_mode,
                 shortlist=shortlist)
    if select_n is not None:
        sel["n"] = select_n or None  # 0: every row
    if own_gate is False:
        sel["min_own_gain"] = None
    top = _given(eval_fraction=eval_fraction, split_seed=split_seed)
    if eval_max is not None:
        top["eval_max"] = eval_max or None
    if no_baseline:
        top["baseline"] = False
    d = cfg.to_dict()
    d["train"].update(_given(**tr))
    d["select"] = {**d["select"], **sel}
    d["merge"] = {**d["merge"], **_given(method=method, lora_mode=lora_mode)}
    cfg = RunConfig.from_dict({**d, **top}).with_overrides(sets or [])
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
    _print_costs(res.report)


def _print_costs(rep: dict) -> None:
    """The selection's cost beside training's, and the eval rows when a cap left some out."""
    from ..report import eval_rows_text, selection_sentence

    if rep.get("selection"):
        err.print(selection_sentence(rep["selection"], rep).replace("**", "").replace("`", ""))
    r = rep.get("eval_rows") or {}
    if r and r.get("used") != r.get("given"):
        err.print(f"eval rows: {eval_rows_text(r)}")


def _given(**flags) -> dict:
    """The flags given on the command line (a flag left out is None and keeps the config's value)."""
    return {k: v for k, v in flags.items() if v is not None}


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
