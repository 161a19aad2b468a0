"""Uniform vs MWA vs CMA-ES-optimized merge weights for the same donors, on the real small model.

Donors: LoRA adapters trained briefly on some recycle-bench tasks (SmolLM2-135M-Instruct).
Target: another task. The optimizer sees only a sample of the target's *validation* split;
every weighting is then scored on the target's *test* split (held out from the search):
answer loss and multiple-choice accuracy (rank classification). All mixtures are evaluated
exactly (adapters active together with per-adapter scales), so the table compares weights
only, not merge approximations.

    nice -n 10 python benchmarks/optimize_weights.py --work /tmp/optbench \
        --donors country_fr,country_es,rhyme,add --target country_de --budget 24
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _write_jsonl(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_donor(base: Path, task: str, work: Path, steps: int) -> tuple[Path, float]:
    from warmstart.bench.tasks import generate
    from warmstart.train import TrainConfig, finetune

    out = work / "donors" / task
    if not (out / "adapter_config.json").exists():
        splits = generate(task)
        tr = _write_jsonl(splits["train"], work / "data" / task / "train.jsonl")
        va = _write_jsonl(splits["validation"], work / "data" / task / "validation.jsonl")
        cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=8, eval_every=steps, eval_limit=16, seed=0)
        finetune(base, tr, va, out, cfg)
    meta = json.loads((out / "warmstart.json").read_text())
    curve = json.loads((out / "curve.json").read_text()) if (out / "curve.json").exists() else {}
    loss = _final_train_loss(meta, curve)
    return out, loss


def _final_train_loss(meta: dict, curve: dict) -> float:
    for p in reversed(curve.get("points", [])):
        for k in ("train_loss", "loss"):
            if p.get(k) is not None:
                return float(p[k])
    final = meta.get("final") or {}
    return float(final.get("train_loss") or final.get("eval_loss") or 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/optbench"))
    ap.add_argument("--donors", default="country_fr,country_es,rhyme,add")
    ap.add_argument("--target", default="country_de")
    ap.add_argument("--donor-dirs", default=None,
                    help="Comma-separated existing LoRA adapters on the model (e.g. `warmstart demo` source runs) "
                         "instead of training donors here.")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--sample", type=int, default=24)
    ap.add_argument("--test-limit", type=int, default=100)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from warmstart.bench.model import prepare_model
    from warmstart.bench.tasks import generate
    from warmstart.checkpoints import open_checkpoint
    from warmstart.data import load_target
    from warmstart.evaluate import evaluate
    from warmstart.merge import compute_weights
    from warmstart.optimize import _LoraMixer, optimize

    torch.set_num_threads(2)
    base = prepare_model()
    t0 = time.time()
    if args.donor_dirs:
        donors = [(Path(d), _final_train_loss(json.loads((Path(d) / "warmstart.json").read_text()),
                                              json.loads((Path(d) / "curve.json").read_text())))
                  for d in args.donor_dirs.split(",")]
        args.donors = ",".join(Path(d).name for d, _ in donors)
    else:
        donors = [_train_donor(base, t, args.work, args.steps) for t in args.donors.split(",")]
    t_train = time.time() - t0
    splits = generate(args.target)
    val = _write_jsonl(splits["validation"], args.work / "data" / args.target / "validation.jsonl")
    test = _write_jsonl(splits["test"][: args.test_limit], args.work / "data" / args.target / "test.jsonl")

    t0 = time.time()
    res = optimize([d for d, _ in donors], base, [val], None, metric="loss", budget=args.budget,
                   sample=args.sample, seed=0)
    t_opt = time.time() - t0
    n = len(donors)
    weightings = {
        "uniform": [1.0 / n] * n,
        "MWA (train loss, p=1)": compute_weights("mwa:loss", n=n, losses=[l for _, l in donors], penalty=1.0),
        "optimized (CMA-ES)": res.search.best.weights,
    }
    mixer = _LoraMixer(open_checkpoint(base), [open_checkpoint(d) for d, _ in donors])
    tok = AutoTokenizer.from_pretrained(base)
    data = load_target(test)
    rows = []
    with torch.inference_mode():
        mixer.apply([0.0] * n, None)
        rows.append(("base (no donor)", [0.0] * n, evaluate(mixer.model, tok, data, metrics=["loss", "mc_accuracy"])))
        for name, w in weightings.items():
            mixer.apply(w, None)
            rows.append((name, w, evaluate(mixer.model, tok, data, metrics=["loss", "mc_accuracy"])))
    uni = rows[1][2]
    print(f"target {args.target} (test rows {len(data)}), donors {args.donors}; SmolLM2-135M-Instruct, CPU")
    print(f"donor training {t_train:.0f}s; optimize {t_opt:.0f}s for {len(res.search.evaluations)} evaluations "
          f"on {args.sample} validation rows")
    print()
    print("| weights | " + " | ".join(Path(d).name for d, _ in donors)
          + " | test loss | ratio vs uniform | mc accuracy |")
    print("|---|" + "---|" * n + "---|---|---|")
    for name, w, r in rows:
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in w) +
              f" | {r['loss']:.4f} | {r['loss'] / uni['loss']:.3f} | {r['mc_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
