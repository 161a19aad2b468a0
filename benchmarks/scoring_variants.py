"""Scoring's LM head and weights under bf16 compute, variant by variant (issue 14).

    python benchmarks/scoring_variants.py              # SmolLM2-135M-Instruct, 1 torch thread, ~4 min

The selection jobs of ``speed_floor.py`` (MC: one LoRA candidate × ``--mc-questions`` questions × 4
options; loss: the same candidate on ``--select-rows`` rows), each timed under every variant,
interleaved in one process (``--reps`` rounds after one untimed warm-up round):

* ``float32``: ``compute_dtype="float32"``, the reference for the metrics;
* ``previous``: bf16 autocast over float32 weights (each cast at every matmul), the LM head in float32
  at the positions that predict a target (``warmstart._precision.BF16_HEAD = BF16_WEIGHTS = False``);
* ``bf16 head``: the same body, the bf16 head with the deciding logits (top 8 per position, the
  targets) recomputed in float32 (``BF16_WEIGHTS = False``);
* ``default``: what warmstart runs: the bf16 head, each vanilla LoRA layer as one matmul with the merged
  weight bf16(W + s·B·A), and the linear weights' bf16 copies kept across
  forwards and calls instead of autocast's cast at every matmul (``aten::copy_`` was 11-12 % of the
  MC job's profile); timed in the steady state of a selection, where the base is cast once for all
  candidates (the first call's cast is in the warm-up round);
* ``plain bf16 head``: plain autocast over the whole model, the head included (its tied float32 weight
  cast at every forward, the logits rounded to bf16).

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
    @contextlib.contextmanager
    def plain_autocast(model, dtype):  # the head too runs under autocast: bf16 logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    # name: (compute context, _precision.BF16_HEAD, _precision.BF16_WEIGHTS, compute_dtype)
    variants = {"float32": (_precision.compute, True, True, "float32"),
                "previous": (_precision.compute, False, False, "auto"),
                "bf16 head": (_precision.compute, True, False, "auto"),
                "default": (_precision.compute, True, True, "auto"),
                "plain bf16 head": (plain_autocast, True, True, "auto")}
    jobs = {"MC selection": (train.sample(args.mc_questions, 0), ["loss", "mc_accuracy"]),  # as speed_floor's jobs
            "loss selection": (train.sample(args.select_rows, 0), ["loss", "token_accuracy"])}

    def run(variant, job):
        compute, _precision.BF16_HEAD, _precision.BF16_WEIGHTS, dtype = variants[variant]
        ev.compute = packed.compute = compute  # the name each scoring module calls
        data, metrics = jobs[job]
        t = time.perf_counter()
        r = evaluate(pm, tok, data, metrics=metrics, batch_size=16, compute_dtype=dtype)
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
        _precision.BF16_HEAD = _precision.BF16_WEIGHTS = True
    print("| job | variant | min s | median s | previous / variant (min) | metrics |\n|---|---|---|---|---|---|")
    for j, (_, names) in jobs.items():
        base = min(times["previous", j])
        for v in variants:
            t = times[v, j]
            shown = ", ".join(f"{k} {metrics[v, j][k]:.4f}" for k in names)
            print(f"| {j} | {v} | {min(t):.2f} | {statistics.median(t):.2f} | {base / min(t):.2f}× | {shown} |")


if __name__ == "__main__":
    main()
