"""Tokenizer merging (tokenizer_source, tokenizer: block, chat_template) on the models of mergekit's
tests/test_tokenizer.py, checked row by row against the inputs (benchmarks/mergekit_tokenizer_compare.py
compares the same configs with mergekit itself)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from warmstart.errors import ConfigError
from warmstart.merge import MergePlan, merge
from warmstart.merge.tokenizer import tokenizer_problems


def _tok(vocab_size, added):
    from warmstart.testing import make_plain_tokenizer

    return make_plain_tokenizer(vocab_size, added)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """model_base (64 rows), model_chatml (66: + <|im_start|>, <|im_end|>), model_padded (64 rows, 4 unused tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab_zoo")
    for name, rows, added, seed in [("base", 64, [], 0), ("chatml", 66, ["<|im_start|>", "<|im_end|>"], 1),
                                    ("padded", 64, [f"<UNUSED_{i}>" for i in range(4)], 2)]:
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                     num_hidden_layers=1, tie_word_embeddings=False)).save_pretrained(root / name)
        _tok(64, added).save_pretrained(root / name)
    return root


def _merge(zoo, out, models, *, base="base", method="linear", tokenizer_source=None, tokenizer=None,
           chat_template=None, **kw):
    plan = MergePlan(models=[{"ref": str(zoo / m), "weight": 1.0} for m in models], method=method,
                     base=str(zoo / base) if base else None, **kw)
    # the MergePlan fields mergekit YAML fills (tokenizer_source / tokenizer / chat_template)
    plan.tokenizer_source, plan.tokenizer, plan.chat_template = tokenizer_source, tokenizer, chat_template
    merge(plan, out)
    return out


class Emb:
    def __init__(self, path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab = self.tok.get_vocab()
        self.w = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
        self.cfg = json.loads((path / "config.json").read_text())

    def __getitem__(self, token):
        return self.w[self.vocab[token]]


def test_union(zoo, tmp_path):
    out = Emb(_merge(zoo, tmp_path / "m", ["padded", "chatml"], include_base=True, base_weight=1.0,
                     tokenizer_source="union"))
    base, chat, pad = Emb(zoo / "base"), Emb(zoo / "chatml"), Emb(zoo / "padded")
    assert len(out.vocab) == 66 and out.cfg["vocab_size"] == 66 and out.w.shape[0] == 66
    assert len(out.tok.added_tokens_decoder) == 5 and not any(t.startswith("<UNUSED") for t in out.vocab)
    # a token only one model has: every input takes that model's row, so the average is that row
    assert torch.allclose(out["<|im_start|>"], chat["<|im_start|>"], atol=1e-6)
    # a token all have: the average of the three rows, looked up by token (not by id)
    want = (base["_tok_7"] + pad["_tok_7"] + chat["_tok_7"]) / 3
    assert torch.allclose(out["_tok_7"], want, atol=1e-6)


def test_base_and_model_sources(zoo, tmp_path):
    out = Emb(_merge(zoo, tmp_path / "b", ["chatml"], tokenizer_source="base", include_base=True, base_weight=1.0))
    base, chat = Emb(zoo / "base"), Emb(zoo / "chatml")
    assert len(out.vocab) == 64 and out.w.shape[0] == 64 and "<|im_start|>" not in out.vocab
    assert torch.allclose(out["_tok_40"], (base["_tok_40"] + chat["_tok_40"]) / 2, atol=1e-6)
    out = Emb(_merge(zoo, tmp_path / "c", ["chatml"], tokenizer_source=str(zoo / "chatml"), include_base=True,
                     base_weight=1.0))
    assert out.vocab == chat.vocab and out.w.shape[0] == 66
    # the base lacks <|im_end|>: it takes chatml's row (the only model that has it)
    assert torch.allclose(out["<|im_end|>"], chat["<|im_end|>"], atol=1e-6)


def test_forced_and_model_token_rows(zoo, tmp_path):
    block = {"source": "union", "tokens": {"_tok_10": {"source": str(zoo / "chatml"), "force": True},
                                           "_tok_11": {"source": str(zoo / "base"), "force": True}}}
    out = Emb(_merge(zoo, tmp_path / "f", ["chatml"], include_base=True, base_weight=1.0, tokenizer=block))
    base, chat = Emb(zoo / "base"), Emb(zoo / "chatml")
    assert torch.equal(out["_tok_10"], chat["_tok_10"]) and torch.equal(out["_tok_11"], base["_tok_11"])
    block = {"source": "base", "tokens": {
        "_tok_20": {"source": {"kind": "model_token", "model": str(zoo / "chatml"), "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": str(zoo / "base"), "token": "<s>"}, "force": True},
        "_tok_22": {"source": {"kind": "zero"}, "force": True}}}
    out = Emb(_merge(zoo, tmp_path / "t", ["chatml"], include_base=True, base_weight=1.0, tokenizer=block))
    assert torch.equal(out["_tok_20"], chat.w[64]) and torch.equal(out["_tok_21"], base["<s>"])
    assert not out["_tok_22"].any()


def test_pad_to_multiple_of(zoo, tmp_path):
    out = Emb(_merge(zoo, tmp_path / "p", ["chatml"], base=None,
                     tokenizer={"source": "base", "pad_to_multiple_of": 16}))
    chat = Emb(zoo / "chatml")
    assert out.cfg["vocab_size"] == 80 and out.w.shape[0] == 80 and len(out.vocab) == 66
    assert torch.equal(out.w[:66], chat.w)
    assert torch.allclose(out.w[66:], chat.w.mean(0).expand(14, -1))  # padding rows: the mean of the real ones
    lm = load_file(tmp_path / "p" / "model.safetensors")["lm_head.weight"]
    assert lm.shape[0] == 80


@pytest.mark.parametrize("template,needle", [("chatml", "<|im_start|>"), ("{{messages[0]['content']}}", None),
                                             ("auto", "ANCHOR")])
def test_chat_template(zoo, tmp_path, template, needle):
    from transformers import AutoTokenizer

    if template == "auto":  # base and padded share a template, chatml has another: the plurality wins
        zoo2 = tmp_path / "zoo"
        for name, t in [("base", "{{ 'ANCHOR' }}{{ messages[0]['content'] }}"), ("padded",
                        "{{ 'ANCHOR' }}{{ messages[0]['content'] }}"), ("chatml", "{{ 'OTHER' }}{{ messages }}")]:
            import shutil

            shutil.copytree(zoo / name, zoo2 / name)
            tok = AutoTokenizer.from_pretrained(zoo2 / name)
            tok.chat_template = t
            tok.save_pretrained(zoo2 / name)
        src = zoo2
    else:
        src = zoo
    models, kw = (["padded", "chatml"], {"tokenizer_source": "base"}) if template == "auto" else (["padded"], {})
    _merge(src, tmp_path / "m", models, include_base=True, base_weight=1.0, chat_template=template, **kw)
    got = AutoTokenizer.from_pretrained(tmp_path / "m").chat_template
    assert (needle or template) in got


def test_refusals(zoo, tmp_path):
    assert tokenizer_problems("union", {"source": "base"}, None)[0].startswith("give tokenizer_source or")
    probs = tokenizer_problems(None, {"source": "union", "pad_to_multiple_of": 0, "bogus": 1,
                                      "tokens": {"x": {"source": {"kind": "weird"}}}}, "vicuna")
    assert len(probs) == 4 and all("\n" not in p for p in probs)
    assert any("pad_to_multiple_of" in p for p in probs) and any("bogus" in p for p in probs)
    assert any("vicuna" in p for p in probs) and any("kind" in p for p in probs)
    with pytest.raises(ConfigError, match="not one of the merge's inputs"):
        _merge(zoo, tmp_path / "x", ["chatml"], include_base=True, base_weight=1.0,
               tokenizer={"tokens": {"_tok_3": {"source": str(tmp_path / "elsewhere"), "force": True}}})
    assert not (tmp_path / "x").exists()
