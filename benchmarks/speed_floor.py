"""Each heavy job of warmstart against its matmul floor on this machine and against the previous code path.

    python benchmarks/speed_floor.py                 # SmolLM2-135M-Instruct, 1 torch thread, ~4 min
    python benchmarks/speed_floor.py --threads 2 --target country_es --eval-questions 50

Jobs, at the bench's settings (warmstart.bench.protocol.BenchConfig):

* loss selection: one LoRA candidate (r=8, q/v) scored on 64 target rows (``select --metric loss``;
  the cost per candidate; loading and adapter switching are the same in both paths and not timed);
* MC selection: the same candidate on ``--mc-questions`` questions × 4 options (``--metric mc-accuracy``);
* one LoRA training step: batch 8, forward + backward + AdamW on the adapter (the Trainer's step
  without its bookkeeping; ``new`` = the batch flattened into one row without padding
  (``train.padding_free``) + logits at labelled positions + bf16 autocast where precision ``auto``
  picks it; averaged over ``--train-steps`` batches);
* one training-time eval: ``--eval-questions`` test questions × 4 options (loss + mc accuracy).

``old`` is the previous implementation, kept callable: float32, one (prompt + option) row per option
and one padded (prompt + completion) row per loss row (``shared_prompt=False``), padded batches and
logits at every position in training (``pm(**batch).loss``). ``new`` is what warmstart runs now by
default (``compute_dtype="auto"``: bf16 on this CPU when it has AVX512-BF16/AMX; packed prompts and
packed loss rows; padding-free training batches; logits at labelled positions). The floors are the
new path's shapes: packed rows count the instruction prefix a row's questions share once. Old and
new are timed back to back in one process, so a shared machine's load hits both alike.

The floor is the time of the job's linear-layer matmuls alone, measured (not taken from a spec
sheet) with ``torch.mm`` at the job's own shapes — rows = the tokens of one of its batches without
padding, (hidden × out) of each projection and of the LM head at the positions that predict a
target — in float32 and in bfloat16. Attention scores, norms, activations and the optimizer are not
in the floor, so it is a lower bound no implementation reaches. Training's floor counts each
matmul twice (forward, and the input gradient in backward; the frozen weights need no weight
gradient and the LoRA's are negligible).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _setup(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.bench.model import default_model_dir, prepare_model
    from warmstart.bench.tasks import generate
    from warmstart.data import TargetData, load_target
    from warmstart.testing import write_jsonl

    d = default_model_dir()
    if not (d / "config.json").exists():
        prepare_model(d)
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)  # a random (non-zero) adapter: timings do not depend on its values
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.05)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = generate(args.target)
    train: TargetData = load_target(write_jsonl(work / "train.jsonl", rows["train"]))
    test = load_target(write_jsonl(work / "test.jsonl", rows["test"][: args.eval_questions]))
    return pm, tok, train, test


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ----------------------------------------------------------------------------
# Floors: matmul time at the job's shapes


def _mm_time(m: int, k: int, n: int, dtype, reps: int = 3) -> float:
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return (time.perf_counter() - t) / reps


def _layer_shapes(cfg) -> list[tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down


def floor_s(cfg, batches: list[tuple[int, int]], dtype, passes: float = 1, head_dtype=None) -> tuple[float, float]:
    """(seconds, GFLOP) of the matmuls for ``batches`` = [(tokens, head positions)], each measured at its shape;
    the LM head in ``head_dtype`` (default ``dtype``).

    Batches of similar size share a measurement (rounded to 32 rows) to keep this quick.
    """
    cache: dict = {}

    def t(m, k, n, dt=dtype):
        key = (max(32, round(m / 32) * 32), k, n, dt)
        if key not in cache:
            cache[key] = _mm_time(*key)
        return cache[key] * m / key[0]

    sec = flop = 0.0
    shapes = _layer_shapes(cfg)
    for tokens, heads in batches:
        sec += cfg.num_hidden_layers * sum(t(tokens, k, n) for k, n in shapes)
        sec += t(heads, cfg.hidden_size, cfg.vocab_size, head_dtype or dtype)
        flop += 2 * tokens * cfg.num_hidden_layers * sum(k * n for k, n in shapes)
        flop += 2 * heads * cfg.hidden_size * cfg.vocab_size
    return sec * passes, flop * passes / 1e9


# ----------------------------------------------------------------------------
# Jobs: old and new path


def _rows_batches(rows, batch_size):
    """(tokens, target positions) per batch of the row path (length-sorted, padding excluded)."""
    order = sorted(rows, key=lambda r: -len(r["input_ids"]))
    out = []
    for s in range(0, len(order), batch_size):
        b = order[s:s + batch_size]
        out.append((sum(len(r["input_ids"]) for r in b), sum(sum(x != -100 for x in r["labels"][1:]) for r in b)))
    return out


def _packed_batches(groups, batch_size):
    from warmstart._packed import _batches, build_row, pack

    packed = [pack(g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: packed[i]["prompt"])
    out = []
    for b in _batches(order, groups, batch_size):
        row = build_row([packed[i] for i in b])
        out.append((len(row["input_ids"]), len({p for per in row["targets"] for opt in per for p, _ in opt})))
    return out


def job_loss_selection(pm, tok, data, bs):
    from warmstart.data import tokenize
    from warmstart.evaluate import evaluate

    m = ["loss", "token_accuracy", "exact_match"]
    t_old, old = _timed(lambda: evaluate(pm, tok, data, metrics=m, batch_size=bs, compute_dtype="float32",
                                         shared_prompt=False))
    t_new, new = _timed(lambda: evaluate(pm, tok, data, metrics=m, batch_size=bs, compute_dtype="auto"))
    rows = tokenize(data, tok)
    packed = _packed_batches([[r] for r in rows], bs)
    fewer = 1 - sum(t for t, _ in packed) / sum(len(r["input_ids"]) for r in rows)
    agree = f"loss {old['loss']:.4f} vs {new['loss']:.4f}; packed rows: {fewer:.0%} fewer tokens than the rows"
    return t_old, t_new, packed, 1, agree


def job_mc(pm, tok, data, bs):
    from warmstart.data import encode_pair
    from warmstart.evaluate import evaluate

    m = ["loss", "mc_accuracy"]
    t_old, old = _timed(lambda: evaluate(pm, tok, data, metrics=m, batch_size=bs, compute_dtype="float32",
                                         shared_prompt=False))
    t_new, new = _timed(lambda: evaluate(pm, tok, data, metrics=m, batch_size=bs, compute_dtype="auto"))
    groups = [[encode_pair(tok, ex.prompt, o) for o in ex.options] for ex in data.examples]
    agree = (f"acc {old['mc_accuracy']:.3f} vs {new['mc_accuracy']:.3f}, "
             f"loss {old['loss']:.4f} vs {new['loss']:.4f}")
    return t_old, t_new, _packed_batches(groups, bs), 1, agree


def job_train_step(pm, tok, data, bs, steps=3):
    import torch

    from warmstart.data import collate, pad_id_of, tokenize
    from warmstart.train import _labelled_logits_loss, _with_keep, flatten

    rows = tokenize(data, tok)[: bs * steps]
    batches = [collate(rows[i * bs:(i + 1) * bs], pad_id_of(tok)) for i in range(steps)]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-5)
    pm.train()

    def old(b):
        return pm(**b).loss

    def new(b):
        kb = _with_keep(dict(b))
        labels = kb.pop("labels")
        return _labelled_logits_loss(pm(**kb), labels)

    from warmstart._precision import resolve

    bf16 = resolve("auto", "cpu") == "bfloat16"  # what precision="auto" now picks (Trainer autocast)

    def bf16_padded(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return new(b)

    flat = [flatten(rows[i * bs:(i + 1) * bs]) for i in range(steps)]

    def new_default(i):  # padding_free: the batch's rows as one row (train.flatten)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return new(flat[i])

    t = {"old": 0.0, "sparse": 0.0, "bf16 padded": 0.0, "new": 0.0}
    for i, b in enumerate([batches[0]] + batches):  # the first round warms up, untimed
        j = max(i - 1, 0)
        for name, fn, arg in (("old", old, b), ("sparse", new, b), ("bf16 padded", bf16_padded, b),
                              ("new", new_default, j)):
            s = time.perf_counter()
            fn(arg).backward()
            opt.step()
            opt.zero_grad()
            if i:
                t[name] += time.perf_counter() - s
    pm.eval()
    spans = [(int(b["attention_mask"].sum()), int((b["labels"][:, 1:] != -100).sum())) for b in batches]
    pad = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    note = (f"{steps} steps each, interleaved; labelled logits alone (fp32) {t['sparse'] / steps:.2f} s; "
            f"+ bf16 (padded) {t['bf16 padded'] / steps:.2f} s; padding {100 * pad:.0f} % (none when padding-free)")
    return t["old"] / steps, t["new"] / steps, spans, 2 / steps, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="country_fr")
    ap.add_argument("--select-rows", type=int, default=64)
    ap.add_argument("--mc-questions", type=int, default=32)
    ap.add_argument("--eval-questions", type=int, default=100)
    ap.add_argument("--select-batch", type=int, default=16, help="select's batch_size (its default)")
    ap.add_argument("--train-steps", type=int, default=6, help="training steps timed per variant")
    ap.add_argument("--work", default="/tmp/warmstart-speed-floor")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    pm, tok, train, test = _setup(args)
    cfg = pm.config
    from warmstart.evaluate import evaluate

    for kw in ({"compute_dtype": "float32", "shared_prompt": False}, {"compute_dtype": "auto"}):  # warm-up
        evaluate(pm, tok, train.sample(2, 5), **kw)
    jobs = [
        ("loss selection (1 candidate)", lambda: job_loss_selection(pm, tok, train.sample(args.select_rows, 0),
                                                                    args.select_batch)),
        ("MC selection (1 candidate)", lambda: job_mc(pm, tok, train.sample(args.mc_questions, 0), args.select_batch)),
        ("LoRA training step (batch 8)", lambda: job_train_step(pm, tok, train.sample(8 * args.train_steps, 1), 8,
                                                                args.train_steps)),
        ("training-time eval", lambda: job_mc(pm, tok, test, 32)),
    ]
    print(f"threads {args.threads}; target {args.target}; {len(test)} eval questions; "
          f"bf16 compute: {__import__('warmstart._precision', fromlist=['x']).resolve('auto', 'cpu')}")
    print("| job | old s | new s | speed-up | fp32 floor s | bf16 floor s | new / bf16 floor "
          "| bf16 floor, fp32 head s | new / that | GFLOP | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    res = {}
    for name, fn in jobs:
        t_old, t_new, batches, passes, agree = fn()
        f32, gf = floor_s(cfg, batches, torch.float32, passes)
        b16, _ = floor_s(cfg, batches, torch.bfloat16, passes)
        # scoring keeps the LM head in float32 by design (warmstart._precision); training's autocast does not
        mixed = b16 if "training step" in name else floor_s(cfg, batches, torch.bfloat16, passes, torch.float32)[0]
        res[name] = (t_old, t_new)
        print(f"| {name} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.2f}× | {f32:.2f} | {b16:.2f} | "
              f"{t_new / b16:.1f}× | {mixed:.2f} | {t_new / mixed:.1f}× | {gf:.0f} | {agree} |", flush=True)
    (so, sn), (eo, en) = res["LoRA training step (batch 8)"], res["training-time eval"]
    for label, s, e in (("old", so, eo), ("new", sn, en)):
        frac = 5 * e / (40 * s + 5 * e)  # the bench: 40 steps, evals at 0, 10, 20, 30, 40
        print(f"{label}: one eval = {e / s:.1f} training steps; eval share of a 40-step bench run: {100 * frac:.0f} %")


if __name__ == "__main__":
    main()
