"""Fixed inputs for every artefact kind's model card, shared by tests/test_provenance.py and the script
that captured the cards written before #12 (tests/fixtures/cards_before_12.json). Only plain objects:
the same code builds them against the old and the new package."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

VERSIONS = {"warmstart": "0.1.0", "torch": "2.0", "transformers": "4.0", "safetensors": "0.4", "peft": "0.10"}


def train_meta(output: str) -> dict:
    return {"kind": "finetune", "task": "capitals", "output": output,
            "init": {"model": "/m/base", "adapter": "/m/lora" if output == "lora" else None,
                     "method": "continue-adapter" if output == "lora" else "full"},
            "config": {"steps": 40, "lr": 0.001, "batch_size": 8, "grad_accum": 2, "seed": 3, "full": output != "lora",
                       "lora_r": 8, "lora_alpha": 16, "rslora": False},
            "train_data": {"path": "/d/train.jsonl", "rows": 120, "fingerprint": "abc123"},
            "eval_data": {"path": "/d/eval.jsonl", "rows": 30, "fingerprint": "def456"},
            "final": {"step": 40, "eval_loss": 1.23456, "eval_token_accuracy": 0.5}, "train_time_s": 12.345,
            "trainable_params": 1000, "versions": VERSIONS, "created": "2026-01-01T00:00:00Z"}


def transfer_meta(warnings: bool) -> dict:
    return {"warmstart": "transfer", "method": "fine-tuning transfer (Lin et al. 2025)",
            "formula": "base_new + alpha * (finetuned - base_old)", "alpha": 0.5, "base_old": "/m/old",
            "finetuned": "/m/ft", "finetuned_kind": "lora", "base_new": "/m/new", "base_model": "/m/new",
            "config_from": "new", "tokenizer": "new base", "vocab_new_rows": "base", "compute_dtype": "float32",
            "dtype": "bfloat16", "counts": {"transfer": 10, "keep-new": 2},
            "summary": {"cos_drift_diff": 0.01, "rel_diff": 0.2, "rel_drift": 0.3},
            "warnings": ["the bases are far apart"] if warnings else [], "versions": VERSIONS,
            "created": "2026-01-01T00:00:00Z"}


def merge_case(kind: str):
    """(plan, result) of a merge: a full model with a base, or an adapter with LoRA errors and notes."""
    from warmstart.merge import MergePlan, MergeResult, TensorReport

    if kind == "model":
        plan = MergePlan.from_dict({"models": ["/m/a", "/m/b"], "base": "/m/base",
                                    "method": "ties", "params": {"density": 0.5}, "weighting": "mwa:loss",
                                    "penalty": 2.0})
        inputs = [{"role": "base", "ref": "/m/base", "path": "/m/base", "kind": "full", "fingerprint": "f" * 32,
                   "final_loss": None, "global_step": None, "weight": None},
                  {"role": "model", "ref": "/m/a", "path": "/m/a", "kind": "full", "fingerprint": "a" * 32,
                   "final_loss": 1.5, "global_step": 100, "weight": 0.6},
                  {"role": "model", "ref": "/m/b", "path": "/m/b", "kind": "full", "fingerprint": "b" * 32,
                   "final_loss": 2.25, "global_step": 50, "weight": 0.4}]
        tensors = [TensorReport("x.weight", [2, 2], "float32", 2, "merged"),
                   TensorReport("y.weight", [2], "float32", 0, "copied")]
        return plan, MergeResult(Path("/out"), "ties", [0.6, 0.4], inputs, tensors, notes=["a note"])
    plan = MergePlan.from_dict({"models": ["/m/la", "/m/lb"], "method": "linear",
                                "lora_mode": "svd", "rank": 4})
    inputs = [{"role": "adapter", "ref": r, "path": r, "kind": "lora", "fingerprint": c * 32, "final_loss": 0.5,
               "global_step": 10, "weight": 0.5} for r, c in (("/m/la", "c"), ("/m/lb", "d"))]
    tensors = [TensorReport("m.lora_A.weight", [4, 8], "float32", 0, "lora-svd")]
    return plan, MergeResult(Path("/out"), "linear", [0.5, 0.5], inputs, tensors,
                             lora_errors={"m": 0.0123, "n": 0.5})


def extract_case():
    from warmstart.merge.extract import ExtractResult

    result = ExtractResult(Path("/out"), 8, modules={"a.q_proj": {"rank": 8, "rel_error": 0.01234, "shape": [4, 4]},
                                                     "a.v_proj": {"rank": 4, "rel_error": 0.2, "shape": [4, 4]}})
    cfg = {"modules_to_save": ["lm_head"]}
    return cfg, SimpleNamespace(path=Path("/m/ft")), SimpleNamespace(path=Path("/m/base")), result
