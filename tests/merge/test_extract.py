"""LoRA extraction (ΔW ≈ B·A by truncated SVD) against Eckart–Young, PEFT loading and the adapter-space merge."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from warmstart.errors import IncompatibleError
from warmstart.merge.extract import extract_lora, lora_factors

Q = "model.layers.0.self_attn.q_proj"


def _lora(out):
    sd = load_file(out / "adapter_model.safetensors")
    return sd, json.loads((out / "adapter_config.json").read_text())


def test_factors_are_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 40, generator=g)
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    for r in (1, 5, 24, 100):
        a, b = lora_factors(delta, r)
        assert a.shape == (min(r, 24), 40) and b.shape == (24, min(r, 24))
        err = np.linalg.norm(delta.double().numpy() - (b.double() @ a.double()).numpy())
        assert err == pytest.approx(np.sqrt((s[r:] ** 2).sum()), abs=1e-4)  # Eckart–Young: the tail of σ
    a, b = lora_factors(delta, 5)  # √Σ split: row norms of A = column norms of B = √σᵢ
    assert torch.allclose(a.norm(dim=1).double(), torch.from_numpy(np.sqrt(s[:5])), atol=1e-4)
    assert torch.allclose(b.norm(dim=0).double(), torch.from_numpy(np.sqrt(s[:5])), atol=1e-4)
    a, b = lora_factors(delta, 5, distribute_scale=False)  # all of Σ in A: B has orthonormal columns
    assert torch.allclose(b.T @ b, torch.eye(5), atol=1e-5)
    assert lora_factors(delta, 5, sv_epsilon=1e9) == (None, None)


def test_full_rank_adapter_loads_in_peft_and_reproduces_the_fine_tune(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = extract_lora(models / "ft_a", models / "base", tmp_path / "lora", rank=64)
    assert max(m["rel_error"] for m in res.modules.values()) < 1e-5  # rank ≥ min(shape): exact
    _, cfg = _lora(tmp_path / "lora")
    # r is the largest rank reached (min(shape) = 32); k/v_proj (16×32) reach 16, in rank_pattern
    assert cfg["lora_alpha"] == cfg["r"] == 32
    assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.{p}": 16 for i in (0, 1) for p in ("k_proj", "v_proj")}
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head", "input_layernorm",
                                           "post_attention_layernorm", "norm"}
    base = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "lora")
    ft = AutoModelForCausalLM.from_pretrained(models / "ft_a", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, ft(ids).logits, atol=1e-4)


def _rank2_variant(models, tmp_path):
    """The base with only q_proj of layer 0 changed, by an exact rank-2 ΔW."""
    d = tmp_path / "ft_rank2"
    shutil.copytree(models / "base", d)
    sd = load_file(d / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g) * 0.1
    sd[f"{Q}.weight"] = sd[f"{Q}.weight"] + delta
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, delta


def test_sv_epsilon_finds_the_true_rank_and_skips_unchanged_modules(models, tmp_path):
    ft, delta = _rank2_variant(models, tmp_path)
    res = extract_lora(ft, models / "base", tmp_path / "lora", rank=16, sv_epsilon=1e-4)
    assert list(res.modules) == [Q] and res.modules[Q]["rank"] == 2
    assert all("unchanged" in why for n, why in res.skipped.items() if n.endswith("_proj"))
    sd, cfg = _lora(tmp_path / "lora")
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj"]
    ba = sd[f"base_model.model.{Q}.lora_B.weight"] @ sd[f"base_model.model.{Q}.lora_A.weight"]
    assert torch.allclose(ba, delta, atol=1e-6)


def test_lora_only_extractions_merge_in_adapter_space(models, tmp_path):
    """--skip-undecomposable + embeddings excluded: plain A/B adapters, which `warmstart merge` combines."""
    from warmstart.merge import MergePlan, merge

    outs = []
    for name in ("ft_a", "ft_b"):
        res = extract_lora(models / name, models / "base", tmp_path / name, rank=8, skip_undecomposable=True,
                           exclude=[r"embed_tokens", r"lm_head"])
        assert not res.full_modules and "model.norm" in res.skipped
        outs.append(tmp_path / name)
    r = merge(MergePlan(models=[{"ref": str(o), "weight": 0.5} for o in outs], method="linear"),
              tmp_path / "merged")
    assert max(r.lora_errors.values()) < 1e-5  # cat mode: exact in adapter space


def test_refusals(models, tmp_path, cli):
    with pytest.raises(IncompatibleError, match="shape"):
        extract_lora(models / "other_arch", models / "base", tmp_path / "x", rank=4)
    with pytest.raises(IncompatibleError, match="LoRA adapter"):
        extract_lora(models / "lora_a", models / "base", tmp_path / "x", rank=4)
    r = cli("extract-lora", models / "ft_a", "--base", models / "base", "--out", tmp_path / "x", "-e", "(")
    assert r.code == 1 and r.err.startswith("error:") and "regular expression" in r.err
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_cli_json(models, tmp_path, cli):
    r = cli("extract-lora", models / "ft_b", "--base", models / "base", "--out", tmp_path / "a", "--rank", "4",
            "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["rank"] == 4 and len(d["modules"]) == 14 and all(m["rank"] == 4 for m in d["modules"].values())
    assert (tmp_path / "a" / "README.md").exists() and (tmp_path / "a" / "warmstart.json").exists()


def test_linear_biases_ride_on_lora_b(tmp_path):
    """Qwen2 has q/k/v biases: their change is stored as lora_B.bias (lora_bias) and PEFT applies it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = Qwen2ForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "ft")
    extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=16)
    sd, cfg_out = _lora(tmp_path / "lora")
    assert cfg_out["lora_bias"] is True and "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in sd
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    ft = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, ft(ids).logits, atol=1e-4)


def test_tied_embeddings_keep_the_fine_tuned_head(tmp_path):
    """A tied lm_head is saved whole from the embedding (as mergekit): PEFT unties it, the head follows the
    fine-tune."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from warmstart import testing

    base = testing.make_base(tmp_path / "base", tie_word_embeddings=True)
    testing.make_variant(base, tmp_path / "ft", seed=1)
    res = extract_lora(tmp_path / "ft", base, tmp_path / "lora", rank=64)
    assert "lm_head" in res.full_modules
    sd, _ = _lora(tmp_path / "lora")
    assert torch.equal(sd["base_model.model.lm_head.weight"], sd["base_model.model.model.embed_tokens.weight"])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "lora")
    ft = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, ft(ids).logits, atol=1e-4)
