"""Costs of the real-benchmark protocol (issue #18) on SmolLM2-135M-Instruct, one CPU thread.

Seconds per LoRA training step (batch 8, bf16 autocast where the CPU has it, the default
precision; fp32 eval agreement is in docs/performance.md), per full fine-tuning step, and per
evaluated question (rank classification, bf16), on each task's zero-shot prompts.

    OMP_NUM_THREADS=1 flock /tmp/cpu.lock python benchmarks/olmo_costs.py --out /tmp/olmo-costs [--task T ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", action="append")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--full", action="store_true", help="also time full fine-tuning steps")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from warmstart.bench.model import prepare_model
    from warmstart.bench.olmo import OLMO_TASKS, write_olmo_tasks
    from warmstart.train import TrainConfig, finetune

    base = prepare_model()
    tasks = a.task or list(OLMO_TASKS)
    data = write_olmo_tasks(a.out / "data", tasks, train_cap=8 * a.steps + 8, n_validation=8, n_test=a.eval_n)
    res = {}
    for t in tasks:
        row = {}
        kinds = [("lora", False)] + ([("full", True)] if a.full else [])
        for kind, full in kinds:
            tc = TrainConfig(steps=a.steps, batch_size=8, lr=1e-4, eval_every=a.steps, full=full,
                             metrics=["mc_accuracy"], eval_limit=8)
            with tempfile.TemporaryDirectory() as tmp:
                r = finetune(base, data[t] / "train.jsonl", data[t] / "validation.jsonl", Path(tmp) / "o", tc)
            row[f"{kind}_train_s"] = r.train_time_s
            row[f"{kind}_s_per_step"] = r.train_time_s / a.steps
            print(t, kind, row, flush=True)
        row.update(_eval_cost(base, data[t] / "test.jsonl"))
        res[t] = row
        print(t, json.dumps(row), flush=True)
    (a.out / "costs.json").write_text(json.dumps(res, indent=1))


def _eval_cost(base, test) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.data import load_target
    from warmstart.evaluate import evaluate

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    d = load_target(test)
    t0 = time.perf_counter()
    with torch.no_grad():
        m = evaluate(model, tok, d, metrics=["mc_accuracy"], batch_size=32, compute_dtype="auto")
    s = time.perf_counter() - t0
    return {"eval_s_per_question": s / len(d.examples), "zero_shot_sum": m["mc_accuracy_sum"],
            "zero_shot_norm": m["mc_accuracy_norm"], "eval_n": len(d.examples)}


if __name__ == "__main__":
    main()
