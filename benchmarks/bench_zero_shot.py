"""Zero-shot multiple-choice accuracy of SmolLM2-135M-Instruct on every recycle-bench task.

Rank classification (warmstart.evaluate) on each task's test split, with two prompt
forms: the plain ``Question: ...\\nAnswer:`` template of warmstart.data and the model's
own chat template (user turn = question, options scored as the assistant reply).
Chance is 25%.

    nice -n 10 python benchmarks/bench_zero_shot.py --out bench-out/zero_shot.json
    nice -n 10 python benchmarks/bench_zero_shot.py --limit 100 --form plain --out bench-out/zero_shot_100.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def chat_template_for(tok) -> str:
    """The model's chat prompt with ``{question}`` where the user turn goes (for data.load_target)."""
    return tok.apply_chat_template([{"role": "user", "content": "{question}"}], tokenize=False,
                                   add_generation_prompt=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="bench-out/tasks")
    ap.add_argument("--out", default="bench-out/zero_shot.json")
    ap.add_argument("--task", action="append")
    ap.add_argument("--limit", type=int, default=None, help="first N test rows per task")
    ap.add_argument("--form", action="append", choices=["plain", "chat"], help="prompt forms (default both)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.bench import prepare_model, write_tasks
    from warmstart.data import load_target
    from warmstart.evaluate import evaluate

    paths = write_tasks(args.data, args.task)
    mdir = prepare_model()
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(mdir)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    forms = {"plain": None, "chat": chat_template_for(tok)}
    forms = {k: v for k, v in forms.items() if k in (args.form or forms)}
    print(f"{'task':<14} {'n':>4} {'plain sum':>9} {'plain norm':>10} {'chat sum':>9} {'chat norm':>9} {'s':>5}")
    for name, d in paths.items():
        t0, row = time.time(), results.get(name, {})
        for form, tpl in forms.items():
            if form in row:
                continue
            data = load_target(d, split="test", mc_template=tpl)
            if args.limit:
                data.examples = data.examples[: args.limit]
            m = evaluate(model, tok, data, metrics=["mc_accuracy"], batch_size=32)
            row[form] = {"sum": m["mc_accuracy_sum"], "norm": m["mc_accuracy_norm"], "n": m["n_examples"]}
        results[name] = row
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        nan = {"n": 0, "sum": float("nan"), "norm": float("nan")}
        p, c = row.get("plain", nan), row.get("chat", nan)
        print(f"{name:<14} {p['n']:>4} {p['sum']:>9.3f} {p['norm']:>10.3f} {c['sum']:>9.3f} {c['norm']:>9.3f} "
              f"{time.time() - t0:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
