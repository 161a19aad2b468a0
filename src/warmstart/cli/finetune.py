"""`warmstart finetune`: train from a warm start (or the plain base) and log the eval curve."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ForceOpt, JsonOpt, ThreadsOpt, err, print_json, use_threads

EPILOG = """
Examples:

  # continue a merged LoRA adapter (its base is read from adapter_config.json)
  warmstart finetune --init runs/x/merge --train train.jsonl --eval eval.jsonl --out runs/x/warm

  # the baseline: a fresh LoRA on the plain base, same budget
  warmstart finetune --init models/SmolLM2-135M-Instruct --train train.jsonl --eval eval.jsonl \\
      --out runs/x/baseline --steps 60 --lr 2e-4 --batch-size 8 --lora-r 8

  # full fine-tuning of a merged or transferred model, settings from YAML
  warmstart finetune --init merged/ --train train.jsonl --eval eval.jsonl --out ft/ --full --config train.yaml

  # several GPUs: the same command under accelerate
  accelerate launch --num_processes 4 -m warmstart finetune --init merged/ --train train.jsonl \\
      --eval eval.jsonl --out ft/
"""

def _h(text: str, field: str) -> str:
    return f"{text} \\[default: {_default(field)}]".lstrip()


def _default(field: str) -> str:
    """The TrainConfig default shown in --help (derived, so the help cannot drift from the code)."""
    from ..train import TrainConfig

    v = getattr(TrainConfig(), field)
    if isinstance(v, bool):
        return field.replace("_", "-") if v else {"full": "lora"}.get(field, "no-" + field.replace("_", "-"))
    if isinstance(v, list):
        return ",".join(v)
    if v is None:
        return {"eval_limit": "all rows", "format": "detected"}[field]
    return str(v)


def build_config(config: Path | None, lora_targets: str | None = None, **flags):
    """TrainConfig from an optional YAML file plus the flags that were given (not None)."""
    from ..train import TrainConfig

    base = TrainConfig.from_yaml(config).to_dict() if config else TrainConfig().to_dict()
    base.update({k: v for k, v in flags.items() if v is not None})
    if lora_targets:
        base["lora_targets"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    return TrainConfig.from_dict(base, where=config)


def finetune_cmd(
    init: Path = typer.Option(..., "--init", help="Model directory (merged / transferred / base) or an adapter dir."),
    train: Path = typer.Option(..., "--train", help="Training data (JSONL, CSV, Parquet or datasets dir)."),
    eval_: Path = typer.Option(..., "--eval", help="Held-out evaluation data."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    adapter: Path = typer.Option(None, "--adapter", help="Initial LoRA adapter on --init to continue training."),
    config: Path = typer.Option(None, "--config", help="TrainConfig YAML; flags override it."),
    steps: int = typer.Option(None, "--steps", help=_h("Optimizer steps.", "steps")),
    lr: float = typer.Option(None, "--lr", help=_h("Peak learning rate.", "lr")),
    batch_size: int = typer.Option(None, "--batch-size", help=_h("Per-device batch size.", "batch_size")),
    grad_accum: int = typer.Option(None, "--grad-accum", help=_h("Gradient accumulation steps.", "grad_accum")),
    scheduler: str = typer.Option(None, "--scheduler", help=_h("linear, cosine, constant, constant_with_warmup.",
                                                               "scheduler")),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help=_h("", "warmup_steps")),
    seed: int = typer.Option(None, "--seed", help=_h("Seed for init, data order and eval sampling.", "seed")),
    lora_r: int = typer.Option(None, "--lora-r", help=_h("Rank of a fresh LoRA.", "lora_r")),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help=_h("LoRA alpha.", "lora_alpha")),
    lora_dropout: float = typer.Option(None, "--lora-dropout", help=_h("", "lora_dropout")),
    lora_targets: str = typer.Option(None, "--lora-targets", help=_h("Comma-separated module names.", "lora_targets")),
    rslora: bool = typer.Option(None, "--rslora/--no-rslora", help=_h("Rank-stabilised LoRA scaling.", "rslora")),
    full: bool = typer.Option(None, "--full/--lora", help=_h("Full fine-tuning instead of LoRA.", "full")),
    eval_every: int = typer.Option(None, "--eval-every", help=_h("Evaluate every N steps.", "eval_every")),
    eval_batch_size: int = typer.Option(None, "--eval-batch-size", help=_h("", "eval_batch_size")),
    eval_limit: int = typer.Option(None, "--eval-limit", help=_h("Evaluate on at most N rows (seeded sample).",
                                                                 "eval_limit")),
    max_length: int = typer.Option(None, "--max-length", help=_h("", "max_length")),
    precision: str = typer.Option(None, "--precision", help=_h("auto, fp32, bf16, fp16.", "precision")),
    format: str = typer.Option(None, "--format", help=_h("prompt_completion, messages or mc (detected if omitted).",
                                                         "format")),
    mc_style: str = typer.Option(None, "--mc-style", help=_h("text or letter, for multiple-choice rows.", "mc_style")),
    save_checkpoints: bool = typer.Option(None, "--save-checkpoints/--no-save-checkpoints",
                                          help=_h("", "save_checkpoints")),
    eval_dtype: str = typer.Option(None, "--eval-dtype", help=_h(
        "Eval-curve matmuls: auto (bfloat16 where fast), float32, bfloat16.", "eval_dtype")),
    padding_free: bool = typer.Option(None, "--padding-free/--no-padding-free", help=_h(
        "Train on each batch's rows concatenated into one row, without padding (same loss; checked on the "
        "first batch).", "padding_free")),
    eval_async: bool = typer.Option(None, "--eval-async/--no-eval-async", help=_h(
        "Evaluate on a second thread from a snapshot of the weights while training goes on: for a machine with "
        "a core the training does not use (e.g. --threads 1 on 2 cores).", "eval_async")),
    task: str = typer.Option(None, "--task", help="Task name recorded for the catalog (default: from the "
                             "--train file name)."),
    threads: int = ThreadsOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Fine-tune from any initialization; evaluate on the held-out split every N steps."""
    use_threads(threads)
    cfg = build_config(config, lora_targets, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                       scheduler=scheduler, warmup_steps=warmup_steps, seed=seed, lora_r=lora_r,
                       lora_alpha=lora_alpha, lora_dropout=lora_dropout, rslora=rslora, full=full,
                       eval_every=eval_every, eval_batch_size=eval_batch_size, eval_limit=eval_limit,
                       max_length=max_length, precision=precision, eval_dtype=eval_dtype, format=format,
                       mc_style=mc_style, save_checkpoints=save_checkpoints, padding_free=padding_free,
                       eval_async=eval_async)
    from ..train import finetune

    res = finetune(init, train, eval_, out, cfg, adapter=adapter, force=force, progress=not json_out, task=task)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process reports
        return
    if json_out:
        print_json(res.to_dict())
        return
    fin = {k.removeprefix("eval_"): v for k, v in res.final.items() if k.startswith("eval_")}
    err.print(f"wrote {res.kind} to {out} ({cfg.steps} steps, {res.train_time_s:.1f} s training); final: "
              + ", ".join(f"{k} {v:.4f}" for k, v in fin.items() if isinstance(v, float)))


def register(root: typer.Typer) -> None:
    root.command("finetune", epilog=EPILOG)(finetune_cmd)
