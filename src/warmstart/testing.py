"""Tiny real models for tests, smoke runs and examples.

Everything here is built locally in seconds: a byte-level BPE tokenizer with a
chat template, a 2-layer Llama (hidden size 32), fine-tune-like variants
(perturbed weights), PEFT LoRA adapters and fake training runs with
``checkpoint-*`` directories and a ``trainer_state.json``. Nothing is
downloaded. The files are the real formats (``save_pretrained``), so every
code path that reads them is the one users hit.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "What is the capital of France? Paris. Germany: Berlin. Spain: Madrid.",
    "Question: 123 + 456 = 579. Answer: yes. Options A B C D.",
    "rhyme cat hat bat; syllables one two three four five six seven eight nine ten",
    "français español deutsch Österreich Ελλάδα 日本 中国 Россия",
]


def make_tokenizer(out: str | Path | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text encodes) with ChatML-style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    if out is not None:
        fast.save_pretrained(out)
    return fast


def make_plain_tokenizer(vocab_size: int, added=()):
    """A Llama fast tokenizer whose vocabulary is ``<unk> <s> </s> _tok_3 … _tok_{n-1}`` plus ``added``
    tokens (mergekit's tokenizer tests build theirs this way: one id per token, no merges)."""
    import os
    import tempfile

    import tokenizers
    from transformers import LlamaTokenizerFast

    names = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    t = tokenizers.Tokenizer.from_str(json.dumps({"version": "1.0", "model": {
        "type": "BPE", "vocab": dict(zip(names, range(vocab_size))), "merges": []}, "added_tokens": []}))
    with tempfile.TemporaryDirectory() as d:
        t.save(os.path.join(d, "tokenizer.json"))
        tok = LlamaTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    tok.add_tokens(list(added))
    return tok


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_base(out: str | Path, *, seed: int = 0, shard_size: str | None = None, **config_overrides) -> Path:
    """A tiny Llama + tokenizer saved with ``save_pretrained`` (sharded if ``shard_size``)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok), **config_overrides))
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kw)
    return out


def make_variant(base: str | Path, out: str | Path, *, seed: int, scale: float = 0.02,
                 shard_size: str | None = None, meta: dict | None = None) -> Path:
    """A fine-tune-like copy of ``base``: every weight perturbed by ``scale``·N(0,1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kw)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    if meta:
        (out / "warmstart.json").write_text(json.dumps(meta))
    return out


def make_adapter(base: str | Path, out: str | Path, *, seed: int, r: int = 4, alpha: int = 8,
                 targets=("q_proj", "v_proj"), use_rslora: bool = False, rank_pattern=None,
                 alpha_pattern=None, meta: dict | None = None) -> Path:
    """A PEFT LoRA adapter on ``base`` with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(out)
    # PEFT records the path it was given; keep it absolute so the adapter finds its base.
    cfg_path = out / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = str(Path(base).resolve())
    cfg_path.write_text(json.dumps(c, indent=2))
    if meta:
        (out / "warmstart.json").write_text(json.dumps(meta))
    return out


def trainer_state(steps: list[int], losses: list[float], eval_loss: float | None = None) -> dict:
    hist = [{"step": s, "loss": l, "epoch": s / max(steps)} for s, l in zip(steps, losses)]
    if eval_loss is not None:
        hist.append({"step": steps[-1], "eval_loss": eval_loss, "eval_accuracy": 0.5})
    return {"global_step": steps[-1], "epoch": 1.0, "log_history": hist}


def make_run(base: str | Path, out: str | Path, *, kind: str = "lora", steps=(10, 20, 30),
             seed: int = 0, task: str | None = None) -> Path:
    """A fake training run: ``checkpoint-<step>`` dirs with weights and trainer_state.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    losses = [2.0 / (1 + i) for i in range(len(steps))]
    for i, s in enumerate(steps):
        d = out / f"checkpoint-{s}"
        meta = {"task": task, "base_model": str(Path(base).resolve())} if task else None
        if kind == "lora":
            make_adapter(base, d, seed=seed * 100 + i, meta=meta)
        else:
            make_variant(base, d, seed=seed * 100 + i, meta=meta)
        (d / "trainer_state.json").write_text(json.dumps(trainer_state(list(steps[: i + 1]), losses[: i + 1])))
    (out / "trainer_state.json").write_text(json.dumps(trainer_state(list(steps), losses, eval_loss=1.0)))
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSON Lines (the format every warmstart dataset reader takes)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
