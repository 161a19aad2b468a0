"""`warmstart optimize`: search merge weights with CMA-ES on held-out target data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import ConfigError
from ._common import AllowPickleOpt, ForceOpt, JsonOpt, ThreadsOpt, err, out, print_json, use_threads

EPILOG = """
Examples:

  warmstart optimize runs/a/final runs/b/final runs/c/final --base models/smol --target data/fr.jsonl \
--budget 40 --out merged/fr-opt

  warmstart optimize adapters/fr adapters/de adapters/es --base models/smol --target val_fr.jsonl \
--target val_de.jsonl --metric mc-accuracy --budget 60 --l1 0.05 --out merged/pareto

  warmstart optimize runs/a runs/b --base models/smol --target val.jsonl --method ties --search-density \
--allow-negative --json
"""


def _table(res) -> Table:
    s = res.search
    t = Table(title=f"{len(s.evaluations)} evaluations, "
                    f"cost = {'loss' if res.metric == 'loss' else '1 − ' + res.metric}")
    t.add_column("point")
    for c in res.candidates:
        t.add_column(Path(c).name, justify="right")
    if s.best.density is not None:
        t.add_column("density", justify="right")
    for tg in res.targets:
        t.add_column(Path(tg).name, justify="right")
    rows = [("uniform", s.uniform), ("chosen", s.best)]
    if len(res.targets) > 1:
        rows += [(f"pareto #{i}", s.evaluations[i]) for i in s.pareto if i != s.chosen]
    for label, e in rows:
        dens = [f"{e.density:.3f}"] if s.best.density is not None else []
        t.add_row(label, *[f"{w:.3f}" for w in e.weights], *dens, *[f"{c:.4f}" for c in e.costs])
    return t


def optimize_cmd(
    models: list[str] = typer.Argument(..., help="Candidates: full fine-tunes of --base, or LoRA adapters on it."),
    base: str = typer.Option(..., "--base", help="The base model the candidates were fine-tuned from."),
    target: list[Path] = typer.Option(..., "--target", "-t", help="Held-out target data (repeat for several sets)."),
    budget: int = typer.Option(40, "--budget", help="Number of evaluations (the uniform start included)."),
    metric: str = typer.Option("loss", "--metric", help="loss, accuracy (token accuracy) or mc-accuracy."),
    method: str = typer.Option("task_arithmetic", "--method",
                               help="Merge method for full models (LoRA is always mixed exactly)."),
    density: float = typer.Option(None, "--density", help="Fixed density for ties/dare/breadcrumbs."),
    search_density: bool = typer.Option(False, "--search-density",
                                        help="Also search one density (ties/dare/breadcrumbs)."),
    l1: float = typer.Option(0.0, "--l1", help="L1 penalty on the weights (LoraHub uses 0.05)."),
    allow_negative: bool = typer.Option(False, "--allow-negative", help="Let weights go below zero."),
    sample: int = typer.Option(64, "--sample", help="Rows sampled from each target (0 = all)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size"),
    out_dir: Path = typer.Option(None, "--out", "-o",
                                 help="Write selection.json, merge_plan.yaml, optimize.json, objective.png, model/."),
    allow_pickle: bool = AllowPickleOpt,
    threads: int = ThreadsOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Search merge weights (CMA-ES) that minimize loss or maximize accuracy on target data."""
    use_threads(threads)
    from rich.progress import Progress

    from ..checkpoints import resolve
    from ..data import load_target

    for t in target:  # inputs checked before torch loads: a mistake answers in about a second
        load_target(t)
    for ref in [*models, base]:
        resolve(ref)

    from ..optimize import optimize

    if budget < 2:
        raise ConfigError(f"--budget must be at least 2, got {budget}")
    params = {"density": density} if density is not None else {}
    with Progress(console=err, transient=True) as prog:
        tid = prog.add_task("optimizing", total=budget)
        best = [float("inf")]

        def tick(ev) -> None:
            best[0] = min(best[0], ev.objective)
            prog.update(tid, advance=1, description=f"objective {ev.objective:.4f} (best {best[0]:.4f})")

        res = optimize(models, base, target, out_dir, metric=metric, budget=budget, method=method, params=params,
                       l1=l1, allow_negative=allow_negative, search_density=search_density,
                       sample=sample or None, seed=seed, batch_size=batch_size, force=force,
                       allow_pickle=allow_pickle, on_eval=tick)
    if json_out:
        d = res.to_dict()
        d.pop("evaluations")
        print_json(d)
    else:
        out.print(_table(res))
    for k, v in res.outputs.items():
        err.print(f"wrote {k}: {v}")


def register(app: typer.Typer) -> None:
    app.command("optimize", epilog=EPILOG)(optimize_cmd)
