#!/usr/bin/env bash
# The full recycle-bench run (issue #7): every task as a held-out target, leave-one-out
# libraries, seeds 0 and 1, then the ablations. Hours on 2 CPU cores; resumable: run the
# same command again and finished runs are skipped. Results: bench-out/results.md.
#
#   nohup nice -n 10 bash benchmarks/recycle_bench.sh > bench-out/bench.log 2>&1 &
set -euo pipefail
# On a machine shared with other jobs, OMP_NUM_THREADS=1 avoids OpenMP spin-waiting (more work per CPU-second).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-bench-out/full}
exec warmstart bench run --out "$OUT" --steps 40 --eval-every 10 --test-limit 100 --select-n 64 \
  --seed 0 --seed 1 \
  --variant main --variant k1 --variant k3 --variant factors --variant cat --variant mwa \
  --variant select_acc --variant select_grad
