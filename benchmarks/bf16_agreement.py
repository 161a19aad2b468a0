"""Does bfloat16 change what warmstart decides? Paired float32 / bfloat16 on SmolLM2-135M-Instruct.

    python benchmarks/bf16_agreement.py select      # ~4 min: rankings, donors, accuracies per target
    python benchmarks/bf16_agreement.py train       # ~3 min: one training run in fp32 and in bf16 autocast

``select``: a small library of real adapters (one LoRA per bench task, r=8 q/k/v/o, ``--adapter-steps``
steps of warmstart finetune, cached in ``--work``), then for each target ``warmstart.select`` with
``compute_dtype="float32"`` and ``"bfloat16"`` on the same sample, for ``--metric loss`` and
``--metric mc-accuracy``; printed: per candidate both scores, whether the rankings and the chosen
donors (k=2) are identical, the largest score difference.
``train``: ``finetune`` from the base with ``precision`` fp32 and bf16 (same seed, data, eval rows);
printed: the eval curves side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TASKS = ["country_fr", "country_es", "language_fr", "currency_code"]


def _data(work: Path, task: str):
    from warmstart.bench.tasks import write_tasks

    d = write_tasks(work / "data", [task])[task]
    return d / "train.jsonl", d / "test.jsonl"


def _library(work: Path, base: Path, steps: int):
    from warmstart.library import Library
    from warmstart.train import TrainConfig, finetune

    lib = Library(work / "lib.db")
    for t in TASKS:
        out = work / "adapters" / t
        if not out.exists():
            tr, te = _data(work, t)
            finetune(base, tr, te, out, TrainConfig(steps=steps, lr=2e-3, batch_size=8, eval_every=steps,
                                                    eval_limit=8, precision="bf16", eval_dtype="bfloat16"))
        if not any(e.path == str(out.resolve()) for e in lib.list()):
            lib.add(out, base=str(base))
    return lib


def run_select(args, base: Path) -> None:
    from warmstart.select import select

    work = Path(args.work)
    lib = _library(work, base, args.adapter_steps)
    for target in args.targets:
        tr, _ = _data(work, target)
        for metric, n in (("loss", 64), ("mc-accuracy", args.mc_questions)):
            sels = {}
            for cd in ("float32", "bfloat16"):
                t = time.perf_counter()
                sels[cd] = select(tr, base, library=lib, metric=metric, n=n, k=2,
                                  compute_dtype=cd)
                sels[cd + "_s"] = time.perf_counter() - t
            a, b = sels["float32"], sels["bfloat16"]
            sa = {r["ref"].split("/")[-1]: r["score"] for r in a.ranking}
            sb = {r["ref"].split("/")[-1]: r["score"] for r in b.ranking}
            same_rank = [r["id"] for r in a.ranking] == [r["id"] for r in b.ranking]
            same_donors = [d["id"] for d in a.donors] == [d["id"] for d in b.donors]
            diff = max(abs(sa[k] - sb[k]) for k in sa)
            print(f"{target} {metric} n={n}: same ranking {same_rank}, same donors {same_donors}, "
                  f"max |Δscore| {diff:.4g}; fp32 {sels['float32_s']:.1f} s, bf16 {sels['bfloat16_s']:.1f} s")
            print("    " + ", ".join(f"{k} {sa[k]:.4f}/{sb[k]:.4f}" for k in sa), flush=True)


def run_train(args, base: Path) -> None:
    from warmstart.train import TrainConfig, finetune

    work = Path(args.work)
    tr, te = _data(work, args.targets[0])
    curves = {}
    for prec in ("fp32", "bf16"):
        cfg = TrainConfig(steps=args.train_steps, lr=2e-4, batch_size=8, scheduler="constant", eval_every=10,
                          eval_limit=args.eval_questions, metrics=["loss", "mc_accuracy"], precision=prec)
        t = time.perf_counter()
        res = finetune(base, tr, te, work / f"train-{prec}", cfg, force=True)
        curves[prec] = (res.curve.points, time.perf_counter() - t)
    print(f"target {args.targets[0]}: step | fp32 loss acc | bf16 loss acc")
    for p, q in zip(curves["fp32"][0], curves["bf16"][0]):
        print(f"  {p['step']:>3} | {p['eval_loss']:.4f} {p['eval_mc_accuracy']:.3f} | "
              f"{q['eval_loss']:.4f} {q['eval_mc_accuracy']:.3f}")
    print(f"  wall: fp32 {curves['fp32'][1]:.1f} s, bf16 {curves['bf16'][1]:.1f} s; train time (eval excluded): "
          f"fp32 {curves['fp32'][0][-1]['time_s']:.1f} s, bf16 {curves['bf16'][0][-1]['time_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["select", "train"])
    ap.add_argument("--targets", nargs="+", default=["country_fr", "currency_code"])
    ap.add_argument("--adapter-steps", type=int, default=15)
    ap.add_argument("--mc-questions", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--eval-questions", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/warmstart-bf16-agreement")
    args = ap.parse_args()
    import torch

    from warmstart.bench.model import default_model_dir

    torch.set_num_threads(args.threads)
    (run_select if args.part == "select" else run_train)(args, default_model_dir())


if __name__ == "__main__":
    main()
