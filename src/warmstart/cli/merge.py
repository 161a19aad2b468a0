"""`warmstart merge`: a thin layer over warmstart.merge (plan from flags, a YAML file or a selection)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError
from ._common import ForceOpt, JsonOpt, LibraryOpt, err, print_json, use_threads

EPILOG = """
Examples:

  warmstart merge runs/a runs/b --method ties --base models/base --density 0.5 --out merged/ties

  warmstart merge runs/x/checkpoint-* --weights mwa:loss --penalty 2 --out merged/mwa

  warmstart merge lora/a lora/b --weights 0.3,0.7 --lora-mode svd --rank 16 --out merged/lora

  warmstart merge --config plan.yaml --out merged/x      (native or mergekit YAML)

  warmstart merge --selection sel.yaml --method linear --out merged/sel --json
"""


def _weights(spec: str | None) -> tuple[str | None, list[float] | None]:
    if spec is None:
        return None, None
    if "," in spec or _is_number(spec):
        try:
            return "given", [float(x) for x in spec.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {spec!r}: expected numbers like 0.3,0.7 or a scheme name") from None
    return spec, None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _param(kv: str):
    if "=" not in kv:
        raise ConfigError(f"--param {kv!r}: expected NAME=VALUE")
    k, v = kv.split("=", 1)
    import yaml

    return k.strip(), yaml.safe_load(v)


def merge_cmd(
    models: list[str] = typer.Argument(None, help="Models or adapters: paths, hub ids, or checkpoint-* globs."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    method: str = typer.Option(None, "--method", "-m", help="Merge method (default linear); "
                               "`warmstart merge --list-methods` lists them with their parameters."),
    base: str = typer.Option(None, "--base", "-b", help="Base model θ₀ (config/tokenizer source too)."),
    weights: str = typer.Option(None, "--weights", "-w",
                                help="Numbers 0.3,0.7 or a scheme: uniform, score, softmax:T, mwa:loss, mwa:steps "
                                "(score/softmax read the scores of a --selection)."),
    penalty: float = typer.Option(None, "--penalty", help="MWA penalty exponent p (0 = uniform)."),
    density: float = typer.Option(None, "--density", help="Fraction of each task vector kept (TIES/DARE/breadcrumbs)."),
    gamma: float = typer.Option(None, "--gamma", help="Breadcrumbs: fraction of largest entries dropped."),
    lam: float = typer.Option(None, "--lambda", help="Scale of the merged task vector."),
    t: float = typer.Option(None, "--t", help="SLERP interpolation factor."),
    seed: int = typer.Option(None, "--seed", help="DARE seed."),
    param: list[str] = typer.Option(None, "--param", help="Any method parameter NAME=VALUE (repeatable)."),
    config: Path = typer.Option(None, "--config", "-c", help="Merge plan YAML (native or mergekit)."),
    selection: Path = typer.Option(None, "--selection", help="Selection file written by `warmstart select`."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype: float32, bfloat16, float16."),
    input_dtype: str = typer.Option(None, "--input-dtype", help="Round every input to this dtype before the "
                                    "math, as mergekit's `dtype:` (a mergekit YAML sets it); `none`: math in "
                                    "float32 on the inputs as stored, --dtype the output only (warmstart's)."),
    shard_size: str = typer.Option(None, "--shard-size", help="Largest output shard, e.g. 2GB (= 2·10⁹ bytes)."),
    lora_mode: str = typer.Option(None, "--lora-mode", help="Adapters: cat (exact), svd (rank-r), factors."),
    rank: int = typer.Option(None, "--rank", help="Rank of an svd-merged adapter (default: the sources' rank)."),
    lora_scaling: float = typer.Option(None, "--lora-scaling", help="alpha/r of a cat/svd-merged adapter "
                                       "(default 1; set it to the scaling you will train it with)."),
    lora_a_norm: float = typer.Option(None, "--lora-a-norm", help="svd: row norm of A, B carries σ (default: "
                                      "σ split evenly; 0.577 = a fresh LoRA's A, for adapters you will train)."),
    include_base: bool = typer.Option(None, "--include-base/--no-include-base",
                                      help="Linear: the base takes part as one more model."),
    base_weight: float = typer.Option(None, "--base-weight", help="Weight of the base with --include-base."),
    missing: str = typer.Option(None, "--missing", help="Tensors missing/extra in some inputs: error | reference."),
    vocab: str = typer.Option(None, "--vocab", help="Vocabulary size mismatch: error | reference (resize rows)."),
    device: str = typer.Option(None, "--device", help="Device for the math (cpu, cuda)."),
    threads: int = typer.Option(None, "--threads", min=1, help="Threads for reading and for torch's math "
                                "(default: one per CPU; docs/performance.md)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Merge inputs that hold NaN/Inf values (refused by default)."),
    library: Path = LibraryOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
    list_methods: bool = typer.Option(False, "--list-methods", is_eager=True, callback=lambda v: _list_methods(v),
                                      help="List the merge methods, their parameters and defaults, and exit."),
) -> None:
    """Merge full models (streamed) or LoRA adapters (in adapter space) into one."""
    use_threads(threads)
    _precheck(models or [], base, config, selection)
    from ..merge import MergePlan  # lazy: keeps --help fast (imports torch, after the cheap checks)

    scheme, given = _weights(weights)
    flags = {"method": method, "base": base, "penalty": penalty, "dtype": dtype, "shard_size": shard_size,
             "lora_mode": lora_mode, "rank": rank, "lora_scaling": lora_scaling, "lora_a_norm": lora_a_norm,
             "include_base": include_base,
             "base_weight": base_weight,
             "missing": missing, "vocab": vocab, "device": device, "threads": threads, "weighting": scheme}
    flags = {k: v for k, v in flags.items() if v is not None}
    mparams = {k: v for k, v in {"density": density, "gamma": gamma, "lambda": lam, "t": t, "seed": seed}.items()
               if v is not None}
    mparams.update(dict(_param(p) for p in param or []))
    if config and selection:
        raise ConfigError("give --config or --selection, not both")
    if config:
        data = MergePlan.from_yaml(config).to_dict()
    elif selection:
        from ..rundir import read_selection  # lazy: keeps --help fast

        sel = read_selection(selection)
        data = MergePlan.from_dict(sel.plan_dict(method=flags.get("method")), source=str(selection)).to_dict()
        data["higher_is_better"] = sel.higher_is_better
    else:
        data = {"models": []}
    if models:
        data["models"] = [{"ref": m} for m in models]
    if given is not None:
        if len(given) != len(data["models"]):
            raise ConfigError(f"--weights has {len(given)} numbers for {len(data['models'])} models")
        for m, w in zip(data["models"], given):
            m["weight"] = w
    data.update(flags)
    if input_dtype is not None:  # "none" switches a mergekit YAML to warmstart's dtype semantics
        none = input_dtype.lower() == "none"
        if none and not data.get("dtype"):
            data["dtype"] = data.get("input_dtype")  # mergekit's dtype stays the output's dtype
        data["input_dtype"] = None if none else input_dtype
        data["compute_dtype"] = "float32" if none else "auto"
    data["params"] = {**data.get("params", {}), **mparams}
    plan = MergePlan.from_dict(data, source=str(config or selection) if (config or selection) else None)
    result = _run(plan, out, force, quiet=json_out, allow_nonfinite=allow_nonfinite,
                  metrics=_catalog_metrics(plan, library))
    if json_out:
        print_json(result.to_dict())
    else:
        err.print(f"merged {len(plan.models) or len(result.inputs)} input(s) with {plan.method} → {result.out} "
                  f"({result.timings.get('total', 0):.1f}s); weights "
                  f"{[round(w, 4) if isinstance(w, float) else w for w in result.weights]}")
        for n in result.notes:
            err.print(f"note: {n}")


def _precheck(models: list[str], base: str | None, config: Path | None, selection: Path | None) -> None:
    """Missing inputs reported in about a second, before torch loads (the plan checks the rest)."""
    from ..checkpoints import resolve  # lazy: keeps --help fast
    for f, what in ((config, "merge plan"), (selection, "selection file")):
        if f is not None and not Path(f).is_file():
            raise ConfigError(f"{what} not found", path=f)
    for ref in [*models, *([base] if base else [])]:
        if not any(c in ref for c in "*?["):  # globs are expanded by the plan
            resolve(ref)


def _run(plan, out, force, quiet, allow_nonfinite=False, metrics=None):
    from ..merge import merge  # lazy: keeps --help fast

    with _merge_progress(quiet) as progress:
        return merge(plan, out, force=force, progress=progress, allow_nonfinite=allow_nonfinite, metrics=metrics)


def _catalog_metrics(plan, library: Path | None) -> dict:
    """MWA weights need each donor's training loss or step: trainer_state.json has them, else the library
    catalog's entry (registered with its metrics). Looked up here and handed to the merge, which never
    opens the catalog. Only for MWA plans, and only when the catalog exists."""
    from ..checkpoints import resolve  # lazy: keeps --help fast
    from ..library import Library, default_library_path  # lazy: keeps --help fast
    from ..weighting import parse

    needs = parse(plan.weighting)[0].needs if plan.weighting else ()
    path = Path(library) if library else default_library_path()
    if not {"losses", "steps"} & set(needs) or plan.slices or not path.exists():
        return {}
    refs = [m.ref for m in plan.models] + ([plan.base] if plan.include_base and plan.base else [])
    out = {}
    with Library(path, create=False) as lib:
        for ref in refs:
            try:
                key = str(resolve(ref))
                e = lib.get(key)
            except Exception:  # not there or not registered: the weighting reports the missing metric
                continue
            out[key] = (e.final_loss, e.global_step)
    return out


def _list_methods(value: bool) -> None:
    """`--list-methods`: the registry, as the plan validation reads it."""
    if not value:
        return
    from ..merge import REGISTRY  # lazy: keeps --help fast

    for name, m in sorted(REGISTRY.items()):
        params = ", ".join(f"{k}={v!r}" for k, v in m.defaults.items()) or "no parameters"
        facts = [f for f, on in (("needs --base", m.needs_base), ("task vectors", m.task_vectors),
                                 ("exact for LoRA cat/svd/factors", m.factor_space), ("seeded", m.seeded),
                                 ("ignores weights", not m.uses_weights)) if on]
        typer.echo(f"{name}: {m.doc}\n    {params}" + (f"\n    ({'; '.join(facts)})" if facts else ""))
    raise typer.Exit()


class _merge_progress:
    """A live bar on a terminal; in a log (stderr not a terminal), one plain line every LOG_EVERY_S seconds
    (rich draws nothing there, so a long merge would otherwise be silent until it ends)."""

    LOG_EVERY_S = 10.0

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.last = quiet, None, None

    def __enter__(self):
        import time

        self.t0 = self.last = time.perf_counter()
        if not self.quiet and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.description}"), console=err, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=None)
        return self

    def __call__(self, done: int, total: int, name: str) -> None:
        import time

        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, description=name)
        elif not self.quiet and time.perf_counter() - self.last >= self.LOG_EVERY_S and done < total:
            self.last = time.perf_counter()
            err.print(f"merging: {done}/{total} tensors, {self.last - self.t0:.0f} s", markup=False)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=EPILOG, no_args_is_help=True,
                help="Merge checkpoints: full models streamed tensor by tensor, LoRA adapters in adapter space "
                     "(cat exact, svd rank-r, factors), weights uniform/given/score/MWA.")(merge_cmd)
