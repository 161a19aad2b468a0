"""Evaluation on a second thread (``train.eval_async``) against evaluation in line (issue #14, docs/performance.md).

    python benchmarks/eval_async.py            # ~5 min; needs two free cores (training 1 thread + evaluation 1)

A bench-style fine-tune: SmolLM2-135M-Instruct, a fresh LoRA (r=8, q/k/v/o), batch 8, 40 steps, evaluations
at 0, 10, 20, 30, 40 on 100 held-out multiple-choice questions of a bench task (the settings of
docs/performance.md's eval-share figure), one torch thread. Each variant runs ``--reps`` times, alternated
(in line, second thread, in line, …), each in this process. Prints per run the wall clock of ``finetune``,
its training time, the evaluations' seconds, the wait at the end, evaluation's share of the run, and
whether the two curves' eval values are equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="country_fr")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-questions", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    from warmstart.threads import configure

    configure(1)
    from warmstart.bench.model import default_model_dir, prepare_model
    from warmstart.bench.tasks import generate
    from warmstart.report import eval_cost
    from warmstart.testing import write_jsonl
    from warmstart.train import TrainConfig, finetune

    base = default_model_dir()
    if not (base / "config.json").exists():
        prepare_model(base)
    work = Path(tempfile.mkdtemp(prefix="warmstart-eval-async-"))
    rows = generate(args.target)
    train = write_jsonl(work / "train.jsonl", rows["train"])
    test = write_jsonl(work / "test.jsonl", rows["test"][: args.eval_questions])
    cfg = TrainConfig(steps=args.steps, eval_every=args.eval_every, batch_size=8, lr=2e-4, lora_r=8)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    curves = {}
    for i in range(args.reps):
        for asyn in (False, True):
            t = time.perf_counter()
            res = finetune(base, train, test, work / f"run{i}-{int(asyn)}", dataclasses.replace(cfg, eval_async=asyn),
                           progress=False)
            wall = time.perf_counter() - t
            c, cost = res.curve, eval_cost(res.curve)  # the report's own figure
            runs[asyn].append({"wall": wall, "train": c.train_time_s, "eval": cost["seconds"],
                               "waited": cost.get("waited_s", 0.0), "share": cost["share"]})
            curves[(i, asyn)] = [{k: v for k, v in p.items() if k.startswith("eval_")} for p in c.points]
    same = all(curves[(i, False)] == curves[(i, True)] for i in range(args.reps))
    print(f"target {args.target}, {args.steps} steps, evaluations every {args.eval_every} on "
          f"{args.eval_questions} questions, 1 torch thread; eval values equal in every pair: {same}")
    print("| evaluation | run | finetune wall s | training s | evaluations s | waited s | eval share of the run |")
    print("|---|---|---|---|---|---|---|")
    for asyn in (False, True):
        for i, r in enumerate(runs[asyn]):
            print(f"| {'second thread' if asyn else 'in line'} | {i + 1} | {r['wall']:.1f} | {r['train']:.1f} | "
                  f"{r['eval']:.1f} | {r['waited']:.1f} | {100 * r['share']:.0f} % |")
    w0 = statistics.fmean(r["wall"] for r in runs[False])
    w1 = statistics.fmean(r["wall"] for r in runs[True])
    print(f"mean wall clock: in line {w0:.1f} s, second thread {w1:.1f} s ({w0 / w1:.2f}x)")


if __name__ == "__main__":
    main()
