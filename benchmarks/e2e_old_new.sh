#!/bin/bash
# A bench-style `warmstart run` with an old checkout and with this one, back to back (docs/performance.md).
#   benchmarks/e2e_old_new.sh OLD_CHECKOUT [WORK]       e.g. benchmarks/e2e_old_new.sh /work/wt/old-caa85ac
# Needs the 10 real adapters and the country_es data of benchmarks/select_scale.py --stage build.
set -e
OLD=$(cd "$1" && pwd); NEW=$(cd "$(dirname "$0")/.." && pwd); E=${2:-/tmp/e2e}
W=/tmp/warmstart-select-scale
B=$HOME/.cache/warmstart/models/SmolLM2-135M-Instruct
mkdir -p "$E" && cd "$E"
TRAIN='train: {steps: 20, eval_every: 10, lr: 0.0002, batch_size: 8, lora_r: 8, eval_limit: 50, eval_batch_size: 32}'
printf '%s\nselect: {n: 64, k: 2, metric: loss, scorer: loss}\n' "$TRAIN" > old.yaml
printf '%s\nselect: {n: 64, k: 2, metric: loss, scorer: loss, min_own_gain: null}\n' "$TRAIN" > new.yaml  # no gate before
rm -f lib_template.db*
PYTHONPATH=$OLD/src python -c "
import glob; from warmstart.library import Library
lib = Library('lib_template.db'); [lib.add(p) for p in sorted(glob.glob('$W/adapters/real_*'))]"
for which in old new; do
  src=$OLD/src; [ $which = new ] && src=$NEW/src
  rm -rf run_$which lib_$which.db*; cp lib_template.db lib_$which.db
  PYTHONPATH=$src /usr/bin/time -f "$which: wall %e s" python -c "import sys, torch; torch.set_num_threads(2)
sys.argv = ['warmstart', 'run', '--target', '$W/data/country_es/train.jsonl', '--eval', '$W/data/country_es/test.jsonl',
            '--library', 'lib_$which.db', '--base', '$B', '--config', '$which.yaml', '--out', 'run_$which', '--json']
from warmstart.cli import main; main()" > res_$which.json
done
