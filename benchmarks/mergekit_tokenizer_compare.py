"""Tokenizer merging: warmstart vs mergekit-yaml 0.1.5 on the models of mergekit's tests/test_tokenizer.py.

    PYTHONPATH=src python benchmarks/mergekit_tokenizer_compare.py [--mergekit /work/venv-mergekit/bin/mergekit-yaml]

Models (rebuilt here, as mergekit's tests build them): model_base (vocab 64), model_chatml (66: + <|im_start|>,
<|im_end|>), model_padded (64 rows, tokenizer with 4 unused added tokens). One line per config: tensors bitwise
equal or the max difference, tokenizer vocabulary equal, config vocab_size, chat template equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from warmstart.merge import MergePlan, merge

CASES = {  # name: (merge_method, base, [(model, weight)], extra top-level keys, params)
    "legacy": ("linear", "model_base", [("model_base", 1), ("model_padded", 1), ("model_chatml", 1)], {}, {}),
    "source_base": ("linear", "model_base", [("model_base", 1), ("model_padded", 1), ("model_chatml", 1)],
                    {"tokenizer_source": "base"}, {}),
    "source_union": ("linear", "model_base", [("model_base", 1), ("model_padded", 1), ("model_chatml", 1)],
                     {"tokenizer_source": "union"}, {}),
    "source_model": ("linear", "model_base", [("model_base", 1), ("model_padded", 1), ("model_chatml", 1)],
                     {"tokenizer_source": "{model_chatml}"}, {}),
    "slerp_union": ("slerp", "model_base", [("model_base", 1), ("model_chatml", 1)], {"tokenizer_source": "union"},
                    {"t": 0.5}),
    "nuslerp_union": ("nuslerp", "model_base", [("model_padded", 0.4), ("model_chatml", 0.6)],
                      {"tokenizer_source": "union"}, {}),
    "force_token": ("linear", "model_base", [("model_base", 1), ("model_chatml", 1)], {"tokenizer": {
        "source": "union", "tokens": {"_tok_10": {"source": "{model_chatml}", "force": True},
                                      "_tok_11": {"source": "{model_base}", "force": True}}}}, {}),
    "model_token_id": ("linear", "model_base", [("model_base", 1), ("model_chatml", 1)], {"tokenizer": {
        "source": "base", "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": "{model_chatml}", "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": "{model_base}", "token": "<s>"}, "force": True}}}},
        {}),
    "pad_to_multiple_of": ("linear", "model_chatml", [("model_chatml", 1)],
                           {"tokenizer": {"source": "base", "pad_to_multiple_of": 16}}, {}),
    "chat_template_chatml": ("linear", "model_base", [("model_base", 0.5), ("model_chatml", 0.5)],
                             {"chat_template": "chatml", "tokenizer_source": "base"}, {}),
    "chat_template_literal": ("linear", "model_base", [("model_base", 0.5), ("model_b", 0.5)],
                              {"chat_template": "{{messages[0]['content']}}"}, {}),
}


def build(root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from warmstart.testing import make_plain_tokenizer as tok

    for name, rows, added, seed in [("model_base", 64, [], 0), ("model_chatml", 66, ["<|im_start|>", "<|im_end|>"], 1),
                                    ("model_padded", 64, [f"<UNUSED_{i}>" for i in range(4)], 2),
                                    ("model_b", 64, [], 3)]:
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                                     num_hidden_layers=2, tie_word_embeddings=False)).save_pretrained(root / name)
        tok(64, added).save_pretrained(root / name)


def fill(x, root: Path):
    if isinstance(x, str):
        return x.replace("{model_", "{").format(**{n: str(root / f"model_{n}") for n in
                                                   ("base", "chatml", "padded", "b")}) if x.startswith("{model_") else x
    if isinstance(x, dict):
        return {k: fill(v, root) for k, v in x.items()}
    return x


def ours(case, root: Path, out: Path) -> None:
    import dataclasses

    if "tokenizer_source" in {f.name for f in dataclasses.fields(MergePlan)}:  # mergekit YAML is read as such
        merge(MergePlan.from_yaml(root / f"{case}.yaml"), out)
        return
    method, base, models, extra, params = CASES[case]
    extra = fill(extra, root)
    listed_base = any(m == base for m, _ in models)
    inc = method == "linear" and listed_base
    ms = [{"ref": str(root / m), "weight": float(w)} for m, w in models
          if not (m == base and (inc or method != "linear"))]
    if not ms:  # the base is the only model: a plain one-model "merge" (warmstart needs a model, not a base)
        ms, inc, base = [{"ref": str(root / base), "weight": 1.0}], False, None
    plan = MergePlan(models=ms, method=method, base=str(root / base) if base else None, include_base=inc,
                     base_weight=float(dict(models)[base]) if inc else None, params=params)
    plan.tokenizer_source = extra.get("tokenizer_source")  # MergePlan fields in branch mergekit16a
    plan.tokenizer, plan.chat_template = extra.get("tokenizer"), extra.get("chat_template")
    merge(plan, out)


def compare(a: Path, b: Path) -> str:
    from transformers import AutoTokenizer

    A, B = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if set(A) != set(B):
        return f"different tensor names {sorted(set(A) ^ set(B))[:3]}"
    diff = {k: ("shape" if A[k].shape != B[k].shape else float((A[k] - B[k]).abs().max())) for k in A
            if A[k].shape != B[k].shape or not torch.equal(A[k], B[k])}
    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    va, vb = (json.loads((a / "config.json").read_text())["vocab_size"],
              json.loads((b / "config.json").read_text())["vocab_size"])
    worst = max(diff.items(), key=lambda kv: -1 if kv[1] == "shape" else kv[1]) if diff else None
    return (f"tensors {'bitwise' if not diff else f'{len(diff)} differ, worst {worst}'}; vocab "
            f"{'equal' if ta.get_vocab() == tb.get_vocab() else 'DIFFERENT'} ({len(ta.get_vocab())}); vocab_size "
            f"{va} vs {vb}; chat template {'equal' if ta.chat_template == tb.chat_template else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", default="/work/venv-mergekit/bin/mergekit-yaml")
    ap.add_argument("cases", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        build(root)
        for case in args.cases or CASES:
            method, base, models, extra, params = CASES[case]
            cfg = {"merge_method": method, "base_model": str(root / base), "dtype": "float32",
                   "models": [{"model": str(root / m), "parameters": {"weight": w}} for m, w in models],
                   **fill(extra, root), **({"parameters": params} if params else {})}
            (root / f"{case}.yaml").write_text(yaml.safe_dump(cfg))
            r = subprocess.run([args.mergekit, str(root / f"{case}.yaml"), str(root / f"mk_{case}")],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            if r.returncode:
                print(f"{case:22s} mergekit failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            ours(case, root, root / f"ws_{case}")
            print(f"{case:22s} {compare(root / f'ws_{case}', root / f'mk_{case}')}")


if __name__ == "__main__":
    main()
