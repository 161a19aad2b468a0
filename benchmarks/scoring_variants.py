"""Two routes to the bf16 floor for scoring that were measured and not taken (issue 14).

    python benchmarks/scoring_variants.py              # SmolLM2-135M-Instruct, 1 torch thread, ~2 min

The selection jobs of ``speed_floor.py`` (MC: one LoRA candidate × ``--mc-questions`` questions × 4
options; loss: the same candidate on ``--select-rows`` rows), each timed under three variants,
interleaved in one process (``--reps`` rounds after one untimed warm-up round):

* ``default``: what warmstart runs (bf16 autocast over float32 weights; the LM head in float32 at
  the positions that predict a target, ``warmstart._precision.compute``);
* ``bf16 weights``: the base model's linear weights stored in bfloat16 for the run, so autocast casts
  no weight (the profile of ``default`` shows ``aten::copy_`` at 11-12 % of the MC job: those casts);
* ``+ bf16 head``: the same, and the LM head in bf16 too (plain autocast; the logits rounded to bf16).

It prints the time of each (min and median of the rounds) and the metrics each variant computes,
so the cost in agreement is beside the gain.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="country_fr")
    ap.add_argument("--mc-questions", type=int, default=32)
    ap.add_argument("--select-rows", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (at least 1)")
    ap.add_argument("--work", default="/tmp/warmstart-scoring-variants")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")

    import torch

    torch.set_num_threads(args.threads)
    import speed_floor

    import warmstart._packed as packed
    import warmstart.evaluate as ev
    from warmstart.evaluate import evaluate
    from warmstart import _precision

    args.eval_questions = args.mc_questions
    pm, tok, train, _ = speed_floor._setup(args)
    linears = [m for n, m in pm.named_modules()
               if type(m) is torch.nn.Linear and "lora_" not in n and "lm_head" not in n]
    fp32_w = [m.weight.data for m in linears]
    bf16_w = [w.bfloat16() for w in fp32_w]

    @contextlib.contextmanager
    def plain_autocast(model, dtype):  # the head too runs under autocast: bf16 logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    variants = {"default": (fp32_w, _precision.compute), "bf16 weights": (bf16_w, _precision.compute),
                "+ bf16 head": (bf16_w, plain_autocast)}
    jobs = {"MC selection": (train.sample(args.mc_questions, 0), ["loss", "mc_accuracy"]),  # as speed_floor's jobs
            "loss selection": (train.sample(args.select_rows, 0), ["loss", "token_accuracy"])}

    def run(variant, job):
        weights, compute = variants[variant]
        for m, w in zip(linears, weights):
            m.weight.data = w
        ev.compute = packed.compute = compute  # the name each scoring module calls
        data, metrics = jobs[job]
        t = time.perf_counter()
        r = evaluate(pm, tok, data, metrics=metrics, batch_size=16, compute_dtype="auto")
        return time.perf_counter() - t, r

    times = {(v, j): [] for v in variants for j in jobs}
    metrics = {}
    try:
        for rep in range(args.reps + 1):
            for j in jobs:
                for v in variants:
                    dt, r = run(v, j)
                    if rep:
                        times[v, j].append(dt)
                    metrics[v, j] = r
    finally:
        ev.compute = packed.compute = _precision.compute
    print("| job | variant | min s | median s | vs default (min) | metrics |\n|---|---|---|---|---|---|")
    for j, (_, names) in jobs.items():
        base = min(times["default", j])
        for v in variants:
            t = times[v, j]
            shown = ", ".join(f"{k} {metrics[v, j][k]:.4f}" for k in names)
            print(f"| {j} | {v} | {min(t):.2f} | {statistics.median(t):.2f} | {base / min(t):.2f}× | {shown} |")


if __name__ == "__main__":
    main()
