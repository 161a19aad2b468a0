"""Selection speed: one process switching adapters vs. a fresh process per candidate,
and the gradient proxy vs. the loss scorer (speed and agreement).

    python benchmarks/select_speed.py --quick                  # tiny model, ~2 min on 2 cores
    nice -n 10 python benchmarks/select_speed.py               # SmolLM2-135M-Instruct, 8 LoRA candidates

Setup: one LoRA adapter (r=8, q/v) per benchmark task (warmstart.bench.tasks,
multiple choice trained on the answer text), a few steps each, cached in
``--work``. The target is a 128-row random sample of one task's train split.

1. ``warmstart select`` in one process (base loaded once, adapters switched)
   against the reference: one fresh Python process per candidate that loads the
   base and the adapter and evaluates the same rows (same evaluate() code).
   Both wall clocks include interpreter start and model loading.
2. In one process with the base already loaded: the loss scorer vs. the
   gradient proxy on each quality target; Spearman correlation and top-2
   overlap of the two rankings (candidates only, base excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASKS = ["country_fr", "country_es", "country_de", "language_fr", "language_es", "country_code",
         "currency_code", "common_word"]


# ----------------------------------------------------------------------------
# Setup: base, task data, adapters


def setup_base(work: Path, quick: bool) -> Path:
    from warmstart import testing

    if quick:
        base = work / "base"
        if not base.exists():
            testing.make_base(base, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              max_position_embeddings=512)
        return base
    from warmstart.bench.model import default_model_dir

    d = default_model_dir()
    if (d / "config.json").exists():
        return d
    base = work / "random-135m"  # same shapes as SmolLM2-135M, random weights: timings hold, rankings do not
    if not base.exists():
        testing.make_base(base, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    return base


def task_files(work: Path, tasks: list[str]) -> dict[str, Path]:
    from warmstart.bench.tasks import generate

    out = {}
    for t in tasks:
        p = work / "data" / f"{t}.jsonl"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(r) + "\n" for r in generate(t)["train"]))
        out[t] = p
    return out


def train_adapter(base: Path, data: Path, out: Path, *, steps: int, lr: float, batch: int = 8) -> Path:
    """A plain LoRA loop (AdamW, answer-text completions): enough to make each adapter task-specific."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.data import collate, load_target, pad_id_of, tokenize

    if (out / "adapter_config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    rows = tokenize(load_target(data).sample(steps * batch, seed=1), tok, max_length=128)
    rows = rows * (steps * batch // len(rows) + 1)  # small train splits: cycle
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        loss = model(**collate(rows[s * batch:(s + 1) * batch], pad_id_of(tok))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base.resolve())
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


# ----------------------------------------------------------------------------
# Measurements


def reference_worker(base: str, adapter: str, target: str, n: int, batch: int) -> None:
    """The reference approach, run as its own process: load base (+ adapter), evaluate, print."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.data import load_target
    from warmstart.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter != "-":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    tok = AutoTokenizer.from_pretrained(base)
    res = evaluate(model, tok, load_target(target).sample(n, 0), metrics=("loss", "token_accuracy", "exact_match"),
                   batch_size=batch)
    print(json.dumps({"loss": res["loss"]}))


def one_process(base: Path, adapters: list[Path], lib: Path, target: Path, n: int, batch: int,
                env: dict) -> tuple[float, dict]:
    register(lib, base, adapters).close()  # a fresh library: nothing cached
    cmd = [sys.executable, "-m", "warmstart", "select", "--target", str(target), "--base", str(base),
           "--library", str(lib), "--n", str(n), "--batch-size", str(batch), "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    sel = json.loads(r.stdout)
    return dt, {row["ref"]: row["score"] for row in sel["ranking"]}


def process_per_candidate(base: Path, adapters: list[Path], target: Path, n: int, batch: int,
                          env: dict, limit: int | None = None) -> tuple[float, dict]:
    total, scores = 0.0, {}
    for a in [None, *adapters][:limit]:
        cmd = [sys.executable, __file__, "--reference-worker", str(base), str(a or "-"), str(target), str(n),
               str(batch)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        total += time.perf_counter() - t
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        scores[str((a or base).resolve())] = json.loads(r.stdout.strip().splitlines()[-1])["loss"]
    return total, scores


def register(lib_path: Path, base: Path, adapters: list[Path]):
    from warmstart.library import Library

    for suffix in ("", "-wal", "-shm"):
        Path(f"{lib_path}{suffix}").unlink(missing_ok=True)
    lib = Library(lib_path)
    for a in adapters:
        lib.add(a, base=str(base))
    return lib


def in_process(model, tok, base: Path, target: Path, n: int, batch: int, cands) -> dict:
    """Loss scorer vs grad proxy on one loaded base (no cache): times and both rankings."""
    from warmstart.data import load_target
    from warmstart.select import ScoreConfig, score_candidates

    data = load_target(target).sample(n, 0)
    out = {}
    for scorer in ("loss", "grad"):
        t = time.perf_counter()
        rows = score_candidates(data, base, cands, config=ScoreConfig(scorer=scorer, batch_size=batch),
                                model=model, tokenizer=tok)
        out[scorer] = (time.perf_counter() - t, {r.ref: r.score for r in rows if r.kind != "base"})
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of ranks (average ranks for ties)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def top_overlap(a: dict, b: dict, k: int = 2) -> float:
    ta = set(sorted(a, key=a.get)[:k])
    tb = set(sorted(b, key=b.get)[:k])
    return len(ta & tb) / k


# ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2-135M")
    ap.add_argument("--work", type=Path, default=None, help="cache for data and adapters")
    ap.add_argument("--n", type=int, default=128, help="target sample size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--quality-targets", type=int, default=None, help="tasks used as target for grad vs loss")
    ap.add_argument("--extra", type=int, default=None, help="extra random adapters for the grad-vs-loss N sweep")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--ref-candidates", type=int, default=None,
                    help="run the reference on only the first K of the N+1 candidates and scale its time by (N+1)/K")
    args = ap.parse_args()
    q = args.quick
    steps = args.train_steps or (30 if q else 12)
    lr = args.lr or (5e-3 if q else 1e-3)
    n_quality = args.quality_targets or (len(TASKS) if q else 3)
    extra = args.extra if args.extra is not None else (56 if q else 0)
    work = args.work or Path(f"/tmp/warmstart-select-bench{'-quick' if q else ''}")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                      TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    base = setup_base(work, q)
    data = task_files(work, TASKS)
    log(f"base {base}; training {len(TASKS)} adapters ({steps} steps) if not cached in {work}")
    adapters = []
    for t in TASKS:
        t0 = time.perf_counter()
        adapters.append(train_adapter(base, data[t], work / "adapters" / t, steps=steps, lr=lr))
        log(f"  adapter {t} ready ({time.perf_counter() - t0:.0f}s)")
    target = data[TASKS[0]]

    rows = []
    log("1. one process (adapter switching) vs process per candidate")
    log(f"   {len(adapters) + 1} candidates, {args.n} rows")
    t_one, s_one = one_process(base, adapters, work / "lib.db", target, args.n, args.batch_size, env)
    rows.append(("warmstart select, one process", f"{t_one:.1f}", ""))
    log(f"   one process: {t_one:.1f}s")
    if not args.skip_reference:
        k_ref = min(args.ref_candidates or len(adapters) + 1, len(adapters) + 1)
        t_ref, s_ref = process_per_candidate(base, adapters, target, args.n, args.batch_size, env, k_ref)
        assert len(s_one) == len(adapters) + 1 and set(s_ref) <= set(s_one), (sorted(s_one), sorted(s_ref))
        diff = max(abs(s_one[k] - s_ref[k]) for k in s_ref)
        t_ref *= (len(adapters) + 1) / k_ref
        label = "" if k_ref == len(adapters) + 1 else f", {k_ref} of {len(adapters) + 1} run, time scaled"
        rows.append((f"fresh process per candidate (reference{label})", f"{t_ref:.1f}", f"{t_ref / t_one:.2f}x slower"))
        rows.append(("max |score difference|", f"{diff:.2e}", ""))

    log("2. loss scorer vs gradient proxy (in process, base loaded)")
    from warmstart.select import candidates_for, load_base

    model, tok = load_base(base)
    lib = register(work / "lib2.db", base, adapters)
    cands = candidates_for(base, lib)
    quality = []
    for t in TASKS[:n_quality]:
        res = in_process(model, tok, base, data[t], args.n, args.batch_size, cands)
        (tl, sl), (tg, sg) = res["loss"], res["grad"]
        keys = sorted(sl)
        quality.append({"target": t, "t_loss": tl, "t_grad": tg, "spearman": spearman([sl[k] for k in keys],
                        [sg[k] for k in keys]), "top2": top_overlap(sl, sg),
                        "top1_loss": Path(min(sl, key=sl.get)).name, "top1_grad": Path(min(sg, key=sg.get)).name})
        log(f"  {quality[-1]}")
        (work / "results.json").write_text(json.dumps({"rows": rows, "quality": quality}, indent=2))
    sweep = None
    if extra:
        from warmstart import testing

        more = [testing.make_adapter(base, work / "extra" / f"r{i}", seed=100 + i) if not
                (work / "extra" / f"r{i}" / "adapter_config.json").exists() else work / "extra" / f"r{i}"
                for i in range(extra)]
        lib3 = register(work / "lib3.db", base, adapters + more)
        res = in_process(model, tok, base, target, args.n, args.batch_size, candidates_for(base, lib3))
        sweep = (len(adapters) + extra, res["loss"][0], res["grad"][0])

    mean = lambda k: sum(x[k] for x in quality) / len(quality)  # noqa: E731
    print(f"\n## select_speed ({'quick, tiny model' if q else base.name}), N={len(adapters)} LoRA candidates "
          f"+ base, {args.n} target rows, torch threads={args.threads}\n")
    print("| measurement | seconds | ratio |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"| loss scorer, N={len(adapters)} (base loaded, mean over {len(quality)} targets) "
          f"| {mean('t_loss'):.1f} | |")
    print(f"| grad proxy, N={len(adapters)} | {mean('t_grad'):.1f} | {mean('t_loss') / mean('t_grad'):.1f}x faster |")
    if sweep:
        print(f"| loss scorer, N={sweep[0]} | {sweep[1]:.1f} | |")
        print(f"| grad proxy, N={sweep[0]} | {sweep[2]:.1f} | {sweep[1] / sweep[2]:.1f}x faster |")
    print("\n| target | Spearman(grad, loss) | top-2 overlap | top-1 loss | top-1 grad |\n|---|---:|---:|---|---|")
    for x in quality:
        print(f"| {x['target']} | {x['spearman']:.2f} | {x['top2']:.0%} | {x['top1_loss']} | {x['top1_grad']} |")
    print(f"| **mean** | {mean('spearman'):.2f} | {mean('top2'):.0%} | | |")
    (work / "results.json").write_text(json.dumps({"rows": rows, "quality": quality, "sweep": sweep}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-worker":
        reference_worker(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
