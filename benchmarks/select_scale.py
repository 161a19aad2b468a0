"""Selection among 10, 100 and 1,000 real-shaped adapters: ``--scorer halving`` against full loss scoring.

    python benchmarks/select_scale.py --stage build      # trains 10 adapters, derives 990, catalogues (~4 min)
    python benchmarks/select_scale.py --stage measure --sizes 10,100
    python benchmarks/select_scale.py --stage measure --sizes 1000 --full-sample 100

Model: SmolLM2-135M-Instruct (warmstart.bench.model). Target: ``--target`` (a bench task, default
country_es), 64 rows of its train split (the bench's select_n), k = 2, loss metric, the default
compute dtype, ``--threads`` torch threads (2).

Library. 10 *real* adapters: one short LoRA training (r=8 on q/k/v/o, ``--adapter-steps`` steps,
batch 8) on each of the other 10 bench tasks. The rest, up to 1,000, are *derived* from them: each
takes, layer by layer, the factors of one of two random real parents (a layer-wise crossover), scaled
by a random factor in [0.3, 1.2], plus Gaussian noise at 20 % of each factor's RMS. Why this stands
for a large real library: the shapes, ranks and singular spectra are those of trained adapters,
their effects on the target are spread around and between the real ones, and most have close
relatives — as the many checkpoints and re-runs of one task in a real catalog do, which is the
hard case for a pre-rank (close scores). It is not a library of 1,000 distinct tasks.

Measured in one process for each size N (each on its own catalog, so no score is cached across):
* halving: ``select(scorer="halving")`` end to end with the base already loaded (pre-rank backward
  pass, reading the catalogued summaries, the halving rounds, the final scores);
* full: ``select(scorer="loss")`` over every candidate for N ≤ ``--full-max``; above it, the loss
  scorer on a random ``--full-sample`` of the candidates, its time per candidate × N as the estimate;
* one LoRA training step (batch 8, the default path: labelled-position logits, bf16 autocast where
  ``precision: auto`` picks it; benchmarks/speed_floor.py's job), so costs read in training steps;
* agreement on the candidates full scoring ran on: top-2 overlap, whether the top-1 matches, regret
  (loss of halving's best − loss of the best full scoring found, nats on the 64 rows), and where
  full scoring's best stood in the pre-rank (the pre-rank's recall).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

TASKS_DEFAULT = "country_es"


def _data(work: Path, task: str) -> tuple[Path, Path]:
    from warmstart.bench.tasks import write_tasks

    d = write_tasks(work / "data", [task])[task]
    return d / "train.jsonl", d / "test.jsonl"


def _base() -> Path:
    from warmstart.bench.model import default_model_dir, prepare_model

    d = default_model_dir()
    if not (d / "config.json").exists():
        prepare_model(d)
    return d


def build(args, work: Path, base: Path) -> None:
    from warmstart.bench.tasks import TASKS
    from warmstart.train import TrainConfig, finetune

    real = []
    t0 = time.perf_counter()
    for t in [t for t in TASKS if t != args.target][:10]:
        out = work / "adapters" / f"real_{t}"
        if not out.exists():
            tr, te = _data(work, t)
            finetune(base, tr, te, out, TrainConfig(steps=args.adapter_steps, lr=2e-3, batch_size=8,
                                                    eval_every=args.adapter_steps, eval_limit=8), task=t)
        real.append(out)
    print(f"real adapters: {len(real)} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    derived = derive(real, work / "adapters", max(args.sizes) - len(real), seed=0)
    print(f"derived adapters: {len(derived)} ({time.perf_counter() - t0:.0f} s)")
    catalogue(work, base, real + derived, args.sizes)


def derive(real: list[Path], root: Path, n: int, seed: int) -> list[Path]:
    """Layer-wise crossover of two real parents, random scale, 20 % noise (see the module docstring)."""
    import re
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    parents = [load_file(str(p / "adapter_model.safetensors")) for p in real]
    layer = re.compile(r"\.layers\.(\d+)\.")
    out = []
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for i in range(n):
        d = root / f"derived_{i:04d}"
        out.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        a, b = rng.sample(range(len(real)), 2)
        scale = rng.uniform(0.3, 1.2)
        pick = {}
        tensors = {}
        for k, _t in parents[a].items():
            li = layer.search(k).group(1)
            src = pick.setdefault(li, rng.choice((a, b)))
            x = parents[src][k]
            noise = torch.randn(x.shape, generator=g) * float(x.pow(2).mean().sqrt()) * 0.2
            tensors[k] = ((x + noise) * (scale ** 0.5)).contiguous()  # √scale on A and on B: scale on B·A
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(real[a] / "adapter_config.json", d / "adapter_config.json")
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def catalogue(work: Path, base: Path, adapters: list[Path], sizes: list[int]) -> None:
    from warmstart._prerank import summarise
    from warmstart.library import Library

    t0 = time.perf_counter()
    for p in adapters[:20]:
        summarise(p)
    per = (time.perf_counter() - t0) / 20
    for n in sizes:
        db = work / f"lib{n}.db"
        if db.exists():
            continue
        t0 = time.perf_counter()
        with Library(work / f"lib{n}.tmp.db") as lib:
            for p in adapters[:n]:
                lib.add(p, base=str(base))
        (work / f"lib{n}.tmp.db").rename(db)
        print(f"catalogued {n}: {time.perf_counter() - t0:.1f} s ({per * 1000:.0f} ms of it per adapter for "
              "the summary)")
    (work / "catalogue.json").write_text(json.dumps({"summary_s_per_adapter": per}))


def train_step_s(base: Path, train: Path) -> float:
    """One LoRA training step, batch 8, the default path (benchmarks/speed_floor.py's job)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.data import load_target

    sys.path.insert(0, str(Path(__file__).parent))
    from speed_floor import job_train_step

    tok = AutoTokenizer.from_pretrained(base)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                   task_type="CAUSAL_LM"))
    _, new, *_ = job_train_step(pm, tok, load_target(train), 8, steps=3)
    return new


def measure(args, work: Path, base: Path) -> list[dict]:
    from warmstart.data import load_target
    from warmstart.library import Library
    from warmstart.select import SelectConfig, candidates_for, load_base, score_candidates, select, ScoreConfig

    train, _ = _data(work, args.target)
    step = train_step_s(base, train)
    print(f"one LoRA training step (batch 8): {step:.2f} s")
    model, tok = load_base(base)
    data = load_target(train).sample(64, 0)
    cfg = SelectConfig(n=64, k=2, min_own_gain=None)
    kw = dict(model=model, tokenizer=tok)
    results = []
    for n in args.sizes:
        with Library(work / f"lib{n}.db") as lib:
            lib.db.execute("DELETE FROM scores")  # a fresh cost every time the benchmark runs
            t0 = time.perf_counter()
            sel = select(train, base, cfg.replace(scorer="halving", shortlist=args.shortlist), library=lib, **kw)
            t_halving = time.perf_counter() - t0
            pre = {r["id"]: r.get("prescore") for r in sel.ranking}
            cands = [c for c in candidates_for(base, lib) if c.kind != "base"]
            if n <= args.full_max:
                t0 = time.perf_counter()
                lib.db.execute("DELETE FROM scores")
                full = select(train, base, cfg.replace(scorer="loss"), library=lib, **kw)
                t_full, estimated = time.perf_counter() - t0, False
                scored = {r["id"]: r["score"] for r in full.ranking if r["kind"] != "base"}
            else:
                sample = random.Random(1).sample(cands, args.full_sample)
                t0 = time.perf_counter()
                rows = score_candidates(data, base, sample, library=lib, config=ScoreConfig(), model=model,
                                        tokenizer=tok)
                per = (time.perf_counter() - t0) / max(1, sum(not r.cached for r in rows))
                t_full, estimated = per * (n + 1), True
                final = {r["id"] for r in sel.ranking if "rows" not in r and r["kind"] != "base"}
                rows += score_candidates(data, base, [c for c in cands if c.id in final], library=lib,
                                         config=ScoreConfig(), model=model, tokenizer=tok)
                scored = {r.id: r.score for r in rows}
            results.append(_agreement(n, sel, scored, pre, t_halving, t_full, estimated, step))
            print(json.dumps(results[-1]))
    # The step is timed again at the end and the smaller of the two is the unit: a load spike from other
    # jobs during one measurement would otherwise flatter every cost expressed in steps.
    again = train_step_s(base, train)
    print(f"one LoRA training step, again: {again:.2f} s")
    if again < step:
        for r in results:
            r["step_s"], r["halving_steps"] = round(again, 3), round(r["halving_s"] / again, 1)
            r["full_steps"] = round(r["full_s"] / again, 1)
    return results


def _agreement(n, sel, scored, pre, t_halving, t_full, estimated, step) -> dict:
    best_full = sorted(scored, key=lambda i: scored[i])
    mine = [d["id"] for d in sel.donors]
    pre_order = [r["id"] for r in sel.ranking if r["kind"] != "base"]
    stage = {r["id"]: r["rows"] for r in sel.ranking if "rows" in r}  # finalists, eliminated, then by pre-score
    pre_ranked = sorted((i for i in pre_order if pre.get(i) is not None), key=lambda i: pre[i])
    shortlisted = [i for i in pre_order if pre.get(i) is None]
    pos = shortlisted.index(best_full[0]) + 1 if best_full[0] in shortlisted else \
        len(shortlisted) + pre_ranked.index(best_full[0]) + 1
    return {"N": n, "halving_s": round(t_halving, 1), "halving_steps": round(t_halving / step, 1),
            "full_s": round(t_full, 1), "full_steps": round(t_full / step, 1), "full_estimated": estimated,
            "full_scored": len(scored), "top2_overlap": len(set(mine) & set(best_full[:2])) / 2,
            "top1_match": mine[:1] == best_full[:1],
            "regret_nats": round(scored[mine[0]] - scored[best_full[0]], 4) if mine else None,
            "regret2_nats": round(scored[mine[1]] - scored[best_full[1]], 4) if len(mine) > 1 else None,
            "full_best_shortlisted": best_full[0] in shortlisted, "full_best_stage_position": pos,
            # how far full scoring's top 2 got in the halving: "final", rows of the round that dropped it, 0 = pre-rank
            "full_top2_reached": [stage.get(i, "final") for i in best_full[:2]],
            "row_evaluations": sel.halving["row_evaluations"], "prerank_s": sel.halving["prerank_seconds"],
            "step_s": round(step, 3)}


def table(results: list[dict]) -> str:
    lines = ["| N | halving s (steps) | full scoring s (steps) | top-2 overlap | top-1 | regret #1 / #2 nats | "
             "full's top 2 reached | pre-rank s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        est = " est." if r["full_estimated"] else ""
        lines.append(f"| {r['N']} | {r['halving_s']} ({r['halving_steps']}) | {r['full_s']}{est} ({r['full_steps']}) "
                     f"| {r['top2_overlap']:.1f} | {'yes' if r['top1_match'] else 'no'} | {r['regret_nats']} / "
                     f"{r['regret2_nats']} | {', '.join(map(str, r['full_top2_reached']))} | {r['prerank_s']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("build", "measure", "all"), default="all")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--target", default=TASKS_DEFAULT)
    ap.add_argument("--adapter-steps", type=int, default=20)
    ap.add_argument("--shortlist", type=int, default=8)
    ap.add_argument("--full-max", type=int, default=100)
    ap.add_argument("--full-sample", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/warmstart-select-scale")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = _base()
    if args.stage in ("build", "all"):
        build(args, work, base)
    if args.stage in ("measure", "all"):
        res = measure(args, work, base)
        path = work / "results.json"
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([r for r in old if r["N"] not in args.sizes] + res, indent=1))
        print(table(res))


if __name__ == "__main__":
    main()
