"""`warmstart extract-lora`: a full fine-tune → a rank-r PEFT LoRA adapter on its base (truncated SVD of ΔW)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ForceOpt, JsonOpt, err, print_json

EPILOG = ("Example: warmstart extract-lora runs/ft --base models/base --out adapters/ft-r32 --rank 32. "
          "Same factors and adapter layout as mergekit-extract-lora; see docs/merge.md#lora-extraction.")


def extract_cmd(
    model: Path = typer.Argument(..., help="The full fine-tune (a model directory)."),
    base: Path = typer.Option(..., "--base", "-b", help="The base model it was fine-tuned from."),
    out: Path = typer.Option(..., "--out", "-o", help="Output adapter directory."),
    rank: int = typer.Option(128, "--rank", "-r", help="Maximum rank per module (mergekit's --max-rank)."),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="Drop singular values ≤ this (lower rank)."),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale",
                                          help="Split Σ as √Σ into A and B (default), or put all of it in A."),
    include: list[str] = typer.Option(None, "--include", "-i", help="Only modules matching this regex (repeat)."),
    exclude: list[str] = typer.Option(None, "--exclude", "-e", help="Skip modules matching this regex (repeat)."),
    save_module: list[str] = typer.Option(None, "--save-module",
                                          help="Save this module whole (modules_to_save), e.g. lm_head (repeat)."),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable",
                                             help="Leave out modules that are not Linear (norms) instead of "
                                                  "saving them whole."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run (cpu, cuda)."),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Extract a LoRA adapter from a full fine-tune: ΔW = model − base ≈ B·A per Linear module."""
    from ..merge.extract import extract_lora

    res = extract_lora(model, base, out, rank=rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon,
                       include=include or (), exclude=exclude or (), save_modules=save_module or (),
                       skip_undecomposable=skip_undecomposable, device=device, force=force)
    if json_out:
        print_json(res.to_dict())
        return
    worst = max(res.modules.items(), key=lambda kv: kv[1]["rel_error"])
    err.print(f"extracted {len(res.modules)} module(s) at rank ≤ {rank} → {res.out} "
              f"({res.timings['total']:.1f}s); worst ‖ΔW−BA‖/‖ΔW‖ {worst[1]['rel_error']:.3g} ({worst[0]})")
    if res.full_modules:
        err.print(f"note: saved whole (modules_to_save): {len(res.full_modules)} module(s), e.g. {res.full_modules[0]}")
    by_why: dict[str, list[str]] = {}
    for name, why in res.skipped.items():
        by_why.setdefault(why, []).append(name)
    for why, names in by_why.items():
        err.print(f"note: left out {len(names)} module(s), e.g. {names[0]}: {why}")


def register(app: typer.Typer) -> None:
    app.command("extract-lora", epilog=EPILOG, no_args_is_help=True,
                help="Extract a rank-r LoRA adapter from a full fine-tune (truncated SVD of model − base), "
                     "as mergekit-extract-lora.")(extract_cmd)
