"""Merge-weight optimization: search the weights of a merge on held-out target data.

After "If You Can't Use Them, Recycle Them" (https://arxiv.org/abs/2406.13955:
optimize the linear-combination weights of a pool of checkpoints) and LoraHub
(https://arxiv.org/abs/2307.13269: gradient-free weights for LoRA modules).
CMA-ES (the ``cma`` package) searches one weight per candidate, and optionally
one density for the sparsifying merge methods, to minimize loss (or maximize
accuracy) on one or more target sets within a budget of evaluations.

The inner loop never touches the disk:

* **full models**: donors are held in memory once; each evaluation merges them
  with :func:`warmstart.merge.merge_state_dicts` and loads the result into one
  model object (``load_state_dict``);
* **LoRA adapters**: all adapters are loaded on one base and all are active;
  each evaluation only sets every adapter's per-layer scaling to wᵢ·sᵢ, so the
  model computes exactly base + Σ wᵢ·sᵢ·BᵢAᵢ — no merge at all.

With several target sets the result is the Pareto front of the evaluated points
(a true non-dominated set) plus one chosen point (lowest sum of min-max
normalized costs by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import metrics as _metrics
from ._io import atomic_dir, atomic_write_json, atomic_write_text, check_output
from .checkpoints import load_causal_lm, load_tokenizer, open_checkpoint
from .data import TargetData, load_target
from .errors import ConfigError, IncompatibleError
from .evaluate import evaluate
from .merge import REGISTRY, MergePlan, get_method, merge, merge_state_dicts
from .provenance import update_artefact, versions
from .select import parse_weights, sample_target

# CLI metric name -> the evaluate() metric the search minimises (its cost: loss, or 1 − accuracy)
METRICS = {m.name: m.evaluate for m in _metrics.TABLE.values() if m.searchable}
WEIGHT_BOUND = 1.5  # LoraHub's search box is [-1.5, 1.5]; without negatives, [0, 1.5]
DENSITY_BOUNDS = (0.05, 1.0)


# ----------------------------------------------------------------------------
# Results


@dataclass
class Evaluation:
    index: int
    weights: list[float]
    density: float | None
    costs: list[float]  # per target; lower is better (loss, or 1 − accuracy)
    objective: float  # what CMA-ES minimized: mean cost relative to uniform + L1
    scores: list[dict] = field(default_factory=list)  # raw metric dicts per target


@dataclass
class SearchResult:
    evaluations: list[Evaluation]
    pareto: list[int]  # indices into evaluations
    chosen: int
    best_objective: int

    @property
    def uniform(self) -> Evaluation:
        return self.evaluations[0]

    @property
    def best(self) -> Evaluation:
        return self.evaluations[self.chosen]


# ----------------------------------------------------------------------------
# Pareto front and the chosen point (pure functions, tested on their own)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b when it is no worse on every cost and better on at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(costs: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points; of exact duplicates only the first is kept."""
    front = []
    for i, c in enumerate(costs):
        if any(dominates(d, c) for d in costs):
            continue
        if any(list(costs[j]) == list(c) for j in front):
            continue
        front.append(i)
    return front


def choose(costs: Sequence[Sequence[float]], candidates: Sequence[int]) -> int:
    """The candidate with the lowest sum of costs min-max normalized over all points."""
    t = len(costs[0])
    lo = [min(c[k] for c in costs) for k in range(t)]
    hi = [max(c[k] for c in costs) for k in range(t)]

    def total(i: int) -> float:
        return sum((costs[i][k] - lo[k]) / (hi[k] - lo[k]) if hi[k] > lo[k] else 0.0 for k in range(t))

    return min(candidates, key=lambda i: (total(i), i))


# ----------------------------------------------------------------------------
# The search: CMA-ES over weights (and optionally one density)


def search(fn: Callable[[list[float], float | None], tuple[list[float], list[dict]]], n: int, *,
           budget: int = 40, l1: float = 0.0, allow_negative: bool = False, density: float | None = None,
           search_density: bool = False, sigma0: float | None = None, popsize: int | None = None,
           seed: int = 0, on_eval: Callable[[Evaluation], None] | None = None) -> SearchResult:
    """Minimize ``fn(weights, density) -> (costs per target, raw scores)`` with CMA-ES.

    The first evaluation is the uniform point (weights 1/n), the start of the
    search and the reference the objective is normalized by:
    objective = mean_t cost_t / cost_t(uniform) + l1·Σ|wᵢ|.
    """
    import cma

    if n < 1 or (n < 2 and not search_density):
        raise ConfigError("weight search needs at least two candidates", hint="add candidates")
    if budget < 2:
        raise ConfigError(f"budget must be at least 2 evaluations, got {budget}")
    if l1 < 0:
        raise ConfigError(f"l1 must be >= 0, got {l1}")
    lo_w = -WEIGHT_BOUND if allow_negative else 0.0
    x0 = [1.0 / n] * n + ([density if density is not None else 0.5] if search_density else [])
    lo = [lo_w] * n + ([DENSITY_BOUNDS[0]] if search_density else [])
    hi = [WEIGHT_BOUND] * n + ([DENSITY_BOUNDS[1]] if search_density else [])
    evals: list[Evaluation] = []
    ref: list[float] = []

    def run(x) -> float:
        w = [float(v) for v in x[:n]]
        d = float(x[n]) if search_density else density
        costs, raw = fn(w, d)
        if not ref:
            ref.extend(abs(c) if abs(c) > 1e-6 else 1.0 for c in costs)  # a perfect uniform score: no scaling
        obj = sum(c / r for c, r in zip(costs, ref)) / len(costs) + l1 * sum(abs(v) for v in w)
        ev = Evaluation(len(evals), w, d, [float(c) for c in costs], float(obj), raw)
        evals.append(ev)
        if on_eval:
            on_eval(ev)
        return obj

    run(x0)
    opts = {"bounds": [lo, hi], "seed": seed + 1, "verbose": -9, "maxfevals": budget - 1}
    if popsize:
        opts["popsize"] = popsize
    # sigma0 of about half the uniform weight (at least 0.1) explores the box without leaving it at once.
    es = cma.CMAEvolutionStrategy(x0, sigma0 or max(0.1, 0.5 / n), opts)
    while len(evals) < budget and not es.stop():
        xs = es.ask()[: budget - len(evals)]
        es.tell(xs, [run(x) for x in xs]) if len(xs) == es.popsize else [run(x) for x in xs]
    costs = [e.costs for e in evals]
    front = pareto_front(costs)
    best_obj = min(range(len(evals)), key=lambda i: (evals[i].objective, i))
    chosen = best_obj if len(costs[0]) == 1 else choose(costs, front)
    return SearchResult(evals, front, chosen, best_obj)


# ----------------------------------------------------------------------------
# Mixers: set the model to a weighted combination of the candidates, in memory


class _FullMixer:
    """Donor state dicts held once in fp32; each call merges them and loads the result into one model."""

    def __init__(self, base, donors, method: str, params: dict):
        import torch

        sig = base.signature()
        for d in donors:
            if d.signature() != sig:
                raise IncompatibleError("candidate's tensors differ from the base's (names or shapes)", path=d.path,
                                        hint="optimize needs donors fine-tuned from --base")
        self.model = load_causal_lm(base.path, dtype=torch.float32).eval()
        self.base_sd = base.weights().state_dict(torch.float32)
        self.donor_sds = [d.weights().state_dict(torch.float32) for d in donors]
        self.method, self.params = method, params
        self.use_base = get_method(method).needs_base

    def apply(self, weights: list[float], density: float | None) -> None:
        params = dict(self.params, **({"density": density} if density is not None else {}))
        sd = merge_state_dicts(self.method, self.donor_sds, self.base_sd if self.use_base else None, weights, **params)
        _, unexpected = self.model.load_state_dict(sd, strict=False)
        if unexpected:
            raise IncompatibleError(f"merged tensors the model does not have, e.g. {unexpected[0]!r}")


class _LoraMixer:
    """All adapters loaded on one base and all active; a mixture is a per-adapter scale (exact, no merge).

    PEFT's LoRA layers add Σ_active scaling[a]·B_a A_a x; ``set_scale(a, w)`` sets
    scaling[a] = w·alpha/r (or w·alpha/√r, per layer, honouring rank/alpha patterns),
    so the forward pass computes base + Σ wᵢ·sᵢ·BᵢAᵢ exactly. This is what
    ``add_weighted_adapter(combination_type="cat")`` builds, without building it.
    """

    def __init__(self, base, adapters):
        import torch
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        for a in adapters:
            if a.config.get("use_dora") or a.config.get("modules_to_save"):
                raise IncompatibleError("adapters with DoRA or modules_to_save cannot be mixed exactly by scaling",
                                        path=a.path, hint="merge them into full models first")
        model = load_causal_lm(base.path, dtype=torch.float32)
        self.names = [f"c{i}" for i in range(len(adapters))]
        try:
            pm = PeftModel.from_pretrained(model, adapters[0].path, adapter_name=self.names[0])
            for name, a in zip(self.names[1:], adapters[1:]):
                pm.load_adapter(a.path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:  # shape mismatches surface as RuntimeError in torch
            raise IncompatibleError(f"cannot load the adapters on this base ({type(e).__name__}: {e})".split("\n")[0],
                                    path=base.path) from None
        pm.base_model.set_adapter(self.names, inference_mode=True)
        self.layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
        self.model = pm.eval()

    def apply(self, weights: list[float], density: float | None) -> None:
        for layer in self.layers:
            for name, w in zip(self.names, weights):
                layer.set_scale(name, w)


# ----------------------------------------------------------------------------
# optimize(): the whole stage


@dataclass
class OptimizeResult:
    candidates: list[str]
    kind: str
    base: str
    targets: list[str]
    metric: str
    method: str
    params: dict
    search: SearchResult
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        s = self.search
        return {"candidates": self.candidates, "kind": self.kind, "base": self.base, "targets": self.targets,
                "metric": self.metric, "method": self.method, "params": self.params,
                "n_evaluations": len(s.evaluations), "uniform": asdict(s.uniform), "chosen": asdict(s.best),
                "best_objective": asdict(s.evaluations[s.best_objective]),
                "pareto": [asdict(s.evaluations[i]) for i in s.pareto],
                "evaluations": [asdict(e) for e in s.evaluations], "outputs": self.outputs,
                "seconds": round(self.seconds, 2)}


def _metric_key(metric: str) -> str:
    return _metrics.searchable(metric).evaluate


def _cost(scores: dict, key: str) -> float:
    return float(scores["loss"]) if key == "loss" else 1.0 - float(scores[key])


def optimize(candidates: Sequence[str | Path], base: str | Path, targets: Sequence[str | Path],
             out: str | Path | None = None, *, metric: str = "loss", budget: int = 40,
             method: str = "task_arithmetic", params: dict | None = None, l1: float = 0.0,
             allow_negative: bool = False, search_density: bool = False, sample: int | None = 64, seed: int = 0,
             batch_size: int = 16, max_length: int = 512, force: bool = False, allow_pickle: bool = False,
             on_eval: Callable[[Evaluation], None] | None = None) -> OptimizeResult:
    """Search merge weights of ``candidates`` (all full models of ``base``, or all its LoRA adapters).

    Minimizes ``metric`` (loss, or 1 − accuracy) on each target set (a random
    ``sample`` of rows each). With ``out``: writes ``selection.json`` and
    ``merge_plan.yaml`` (the best weights), ``optimize.json`` (every evaluation,
    the Pareto front), ``objective.png`` and the merged model in ``model/``.
    """
    import torch

    t0 = time.time()
    key = _metric_key(metric)
    params = dict(params or {})
    if not targets:
        raise ConfigError("at least one --target is needed")
    base_ck = open_checkpoint(base, allow_pickle=allow_pickle)
    if base_ck.kind != "full":
        raise IncompatibleError("--base must be a full model", path=base_ck.path)
    cks = [open_checkpoint(c, allow_pickle=allow_pickle) for c in candidates]
    kinds = {c.kind for c in cks}
    if len(kinds) > 1:
        raise ConfigError("candidates mix full models and LoRA adapters", hint="optimize one kind at a time")
    kind = kinds.pop() if kinds else "full"
    _check_method(kind, method, search_density, params)
    if out is not None:
        check_output(Path(out), force=force, inputs=[base_ck.path] + [c.path for c in cks])
    # a TargetData is used as given (select() passes its already-drawn sample)
    datas = [t if isinstance(t, TargetData) else load_target(t).sample(sample, seed=seed) for t in targets]
    tok = load_tokenizer(base_ck.path)
    mixer = _LoraMixer(base_ck, cks) if kind == "lora" else _FullMixer(base_ck, cks, method, params)

    def fn(w: list[float], d: float | None):
        mixer.apply(w, d)
        with torch.inference_mode():
            raw = [evaluate(mixer.model, tok, data, metrics=[key], batch_size=batch_size, max_length=max_length)
                   for data in datas]
        return [_cost(r, key) for r in raw], raw

    res = search(fn, len(cks), budget=budget, l1=l1, allow_negative=allow_negative,
                 density=params.get("density"), search_density=search_density, seed=seed, on_eval=on_eval)
    result = OptimizeResult([c.ref for c in cks], kind, base_ck.ref, [d.path for d in datas], metric,
                            "task_arithmetic" if kind == "lora" else method, params, res)
    mixer = None  # free the donors before the engine streams them again from disk
    if out is not None:
        _write_outputs(Path(out), result, force)
    result.seconds = time.time() - t0
    return result


def _check_method(kind: str, method: str, search_density: bool, params: dict) -> None:
    m = get_method(method)  # unknown names raise ConfigError
    if kind == "lora" and not m.factor_space:
        raise ConfigError(f"LoRA candidates are mixed exactly in adapter space (base + Σ wᵢ·ΔWᵢ); "
                          f"method {method!r} needs full models", hint="drop --method or merge the adapters first")
    if search_density and (kind == "lora" or not m.sparsifies):
        names = ", ".join(n for n, x in REGISTRY.items() if x.sparsifies)
        raise ConfigError(f"--search-density applies to {names} on full models")
    if m.weighted_average and params.get("normalize", True):
        params["normalize"] = False  # with normalization every scaled copy of w is the same point
    if m.sparsifies:
        params.setdefault("normalize", False)  # the search owns the scale of the weights


# ----------------------------------------------------------------------------
# Outputs: the weights as a selection and a merge plan, the merged model, a plot


def _donors(result: OptimizeResult) -> list[dict]:
    w = result.search.best.weights
    return [{"ref": r, "kind": result.kind, "weight": round(x, 6)} for r, x in zip(result.candidates, w)]


def _plan_dict(result: OptimizeResult) -> dict:
    best = result.search.best
    params = dict(result.params)
    if best.density is not None:
        params["density"] = round(best.density, 6)
    plan = {"method": result.method, "base": result.base, "weighting": "given",
            "models": [{"ref": d["ref"], "weight": d["weight"]} for d in _donors(result)], "params": params}
    if result.kind == "lora":
        plan["lora_mode"] = "cat"  # exact: what the search evaluated
    return plan


def _selection_dict(result: OptimizeResult) -> dict:
    s = result.search
    return {"source": "warmstart optimize", "base": result.base, "method": result.method,
            "params": _plan_dict(result)["params"], "weighting": "given", "donors": _donors(result),
            "metric": result.metric, "targets": result.targets,
            "costs": {"uniform": s.uniform.costs, "chosen": s.best.costs}, "n_evaluations": len(s.evaluations)}


def _write_outputs(out: Path, result: OptimizeResult, force: bool) -> None:
    import yaml

    with atomic_dir(out, force=force) as tmp:
        atomic_write_json(tmp / "selection.json", _selection_dict(result))
        atomic_write_text(tmp / "merge_plan.yaml", yaml.safe_dump(_plan_dict(result), sort_keys=False))
        plot_history(result, tmp / "objective.png")
        _save_model(tmp / "model", result)
        result.outputs = {k: str(out / v) for k, v in (("selection", "selection.json"), ("plan", "merge_plan.yaml"),
                          ("plot", "objective.png"), ("model", "model"), ("report", "optimize.json"))}
        atomic_write_json(tmp / "optimize.json", result.to_dict())


def _save_model(d: Path, result: OptimizeResult) -> None:
    """The merged model at the chosen weights, written by the merge engine from the same plan.

    Full models: the streaming engine computes the same per-tensor function the search
    evaluated in memory; LoRA: an adapter-space ``cat`` merge, exact like the search's
    scaled mixture (rank Σrᵢ).
    """

    merge(MergePlan.from_dict(_plan_dict(result)), d)
    best = result.search.best
    extra = {"optimize": {"metric": result.metric, "targets": result.targets,
                          "costs_uniform": result.search.uniform.costs, "costs": best.costs,
                          "n_evaluations": len(result.search.evaluations), "cma": versions().get("cma")}}
    update_artefact(d, extra, _card_section(result))


def _card_section(result: OptimizeResult) -> str:
    s = result.search
    rows = "\n".join(f"| `{r}` | {w:.4f} |" for r, w in zip(result.candidates, s.best.weights))
    return (f"\n\n## Weights found by `warmstart optimize`\n\n"
            f"CMA-ES over merge weights ({len(s.evaluations)} evaluations) minimizing {result.metric} on "
            f"{', '.join(Path(t).name for t in result.targets)}, after "
            "[Recycle Them](https://arxiv.org/abs/2406.13955) and [LoraHub](https://arxiv.org/abs/2307.13269).\n\n"
            f"| donor | weight |\n|---|---|\n{rows}\n\n"
            f"Cost per target (lower is better): uniform weights {[round(c, 4) for c in s.uniform.costs]}, "
            f"these weights {[round(c, 4) for c in s.best.costs]}.\n")


def plot_history(result: OptimizeResult, path: Path) -> None:
    """Objective of every evaluation and the best so far; with several targets, their costs and the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evs = result.search.evaluations
    n_t = len(evs[0].costs)
    fig, axes = plt.subplots(1, 2 if n_t > 1 else 1, figsize=(11 if n_t > 1 else 6, 4), squeeze=False)
    ax = axes[0][0]
    xs, ys = [e.index for e in evs], [e.objective for e in evs]
    best = [min(ys[: i + 1]) for i in range(len(ys))]
    ax.scatter(xs, ys, s=12, alpha=0.6, label="evaluation")
    ax.plot(xs, best, color="C1", label="best so far")
    ax.axhline(ys[0], color="gray", ls="--", lw=1, label="uniform weights")
    ax.set(xlabel="evaluation", ylabel="objective (relative to uniform, lower is better)",
           title=f"CMA-ES on {result.metric}")
    ax.legend(fontsize=8)
    if n_t > 1:
        ax = axes[0][1]
        ax.scatter([e.costs[0] for e in evs], [e.costs[1] for e in evs], s=12, alpha=0.5, label="evaluated")
        front = sorted((evs[i] for i in result.search.pareto), key=lambda e: e.costs[0])
        ax.plot([e.costs[0] for e in front], [e.costs[1] for e in front], "o-", color="C3", label="Pareto front")
        ax.scatter([result.search.best.costs[0]], [result.search.best.costs[1]], marker="*", s=150, color="k",
                   label="chosen", zorder=3)
        ax.set(xlabel=f"cost on {Path(result.targets[0]).name}", ylabel=f"cost on {Path(result.targets[1]).name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# The step after selection: ``weights: optimized``


def optimize_selection(sel, target, config, *, library=None, paths: dict | None = None):
    """Replace a selection's uniform donor weights by CMA-ES-searched ones, in place, when its
    config asks for ``weights="optimized"`` (else the selection is returned unchanged).

    The step after :func:`warmstart.select.select` (``warmstart select``, ``warmstart run``):
    ``target`` is what select() was given (file or TargetData), sampled the same way again by
    :func:`warmstart.select.sample_target`; the donors' weights come from ``paths`` ({id: path})
    or their library entries. The weights are task-arithmetic coefficients (base + Σ wᵢ·ΔWᵢ, not
    normalized), so the selection records ``method: task_arithmetic``; the search starts at
    uniform (1/k each, the same model as the uniform linear merge) and only moves if the
    sample's cost drops. With fewer than two donors there is nothing to weigh.
    """
    if sel is None or parse_weights(config.weights)[0] != "optimized":
        return sel
    m = _metrics.get(sel.metric)
    metric = m.name if m.searchable else "loss"  # e.g. exact-match: search on the loss
    sel.weighting.pop("pending", None)
    if len(sel.donors) < 2:
        sel.weighting = {"scheme": "uniform", "note": "optimized weights need at least two donors"}
        return sel
    if paths is None:
        paths = {d["id"]: library.get(d["id"]).path for d in sel.donors}
    budget = config.optimize_budget
    res = optimize([paths[d["id"]] for d in sel.donors], sel.base, [sample_target(target, config)], metric=metric,
                   budget=budget, method="task_arithmetic", sample=None, seed=config.seed,
                   batch_size=config.batch_size, max_length=config.max_length)
    s = res.search
    for d, w in zip(sel.donors, s.best.weights):
        d["weight"] = round(float(w), 6)
    sel.method, sel.params = "task_arithmetic", {}
    sel.weighting = {"scheme": "optimized", "metric": metric, "budget": budget, "evaluations": len(s.evaluations),
                     "cost_uniform": s.uniform.costs[0], "cost_chosen": s.best.costs[0],
                     "seconds": round(res.seconds, 2)}
    return sel


__all__ = ["Evaluation", "OptimizeResult", "SearchResult", "choose", "dominates", "optimize", "optimize_selection",
           "pareto_front", "plot_history", "search"]
