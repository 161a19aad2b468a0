"""LoRA merges in adapter space: exactness against dense formulas written here, and PEFT reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from warmstart import testing
from warmstart.checkpoints import open_checkpoint
from warmstart.errors import IncompatibleError
from warmstart.merge import MergePlan, merge, merge_tensors
from warmstart.merge.lora import merge_adapters

MOD = "base_model.model.model.layers.0.self_attn.q_proj"


def _delta(adapter, mod=MOD):
    """s·B@A of one module, straight from the files and the adapter config (independent of warmstart)."""
    sd = load_file(adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    name = mod.removeprefix("base_model.model.")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    for pat, v in (cfg.get("rank_pattern") or {}).items():
        if __import__("re").match(rf"(.*\.)?({pat})$", name):
            r = v
    for pat, v in (cfg.get("alpha_pattern") or {}).items():
        if __import__("re").match(rf"(.*\.)?({pat})$", name):
            alpha = v
    s = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    return s * sd[f"{mod}.lora_B.weight"].double() @ sd[f"{mod}.lora_A.weight"].double()


@pytest.fixture(scope="module")
def odd_adapters(models, tmp_path_factory):
    """An rsLoRA adapter and one with rank/alpha patterns, on the zoo's base."""
    root = tmp_path_factory.mktemp("odd")
    rs = testing.make_adapter(models / "base", root / "rslora", seed=11, r=6, alpha=4, use_rslora=True)
    pat = testing.make_adapter(models / "base", root / "pattern", seed=12, r=4, alpha=8,
                               rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    return rs, pat


def test_cat_is_exact(models, odd_adapters, tmp_path):
    ins = [models / "lora_a", models / "lora_b", *odd_adapters]
    w = [0.1, 0.2, 0.3, 0.4]
    res = merge_adapters(ins, w, mode="cat", out=tmp_path / "cat")
    mods = [k[: -len(".lora_A.weight")] for k in load_file(tmp_path / "cat" / "adapter_model.safetensors")
            if k.endswith("lora_A.weight")]
    for mod in mods:
        want = sum(wi * _delta(a, mod) for wi, a in zip(w, ins))
        got = _delta(tmp_path / "cat", mod)
        assert (got - want).norm() / want.norm() < 1e-6, mod
    assert max(res.lora_errors.values()) < 1e-6
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 8 + 6 + 4  # rank Σ rᵢ (the pattern module has 4 + 8 + 6 + 2)
    assert "Exactness" in (tmp_path / "cat" / "README.md").read_text()


def test_svd_matches_dense_truncated_svd(models, tmp_path):
    ins = [models / "lora_a", models / "lora_b"]
    res = merge_adapters(ins, [0.5, 0.5], mode="svd", rank=5, out=tmp_path / "svd")
    want_full = 0.5 * _delta(ins[0]) + 0.5 * _delta(ins[1])
    U, S, Vh = torch.linalg.svd(want_full)
    want = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    got = _delta(tmp_path / "svd")
    assert torch.allclose(got, want, atol=1e-5)
    rel = ((want_full - want).norm() / want_full.norm()).item()
    assert res.lora_errors[MOD.removeprefix("base_model.model.")] == pytest.approx(rel, rel=1e-3)
    assert json.loads((tmp_path / "svd" / "adapter_config.json").read_text())["r"] == 5


def test_lora_scaling_keeps_the_product_and_sets_alpha(models, odd_adapters, tmp_path):
    """lora_scaling=s: alpha = s·r (patterns too), factors / √s, the same ΔW in every module."""
    ins = [models / "lora_a", models / "lora_b", *odd_adapters]
    w = [0.1, 0.2, 0.3, 0.4]
    for mode, kw in (("svd", {"rank": 5}), ("cat", {})):
        merge_adapters(ins, w, mode=mode, out=tmp_path / f"{mode}1", **kw)
        res2 = merge_adapters(ins, w, mode=mode, out=tmp_path / f"{mode}2", lora_scaling=2.0, **kw)
        if mode == "cat":  # the reported error accounts for the scaling: cat stays exact
            assert max(res2.lora_errors.values()) < 1e-6
        one, two = (json.loads((tmp_path / f"{mode}{i}" / "adapter_config.json").read_text()) for i in (1, 2))
        assert one["lora_alpha"] == one["r"] and two["lora_alpha"] == 2 * two["r"] and two["r"] == one["r"]
        assert two["alpha_pattern"] == {k: 2 * v for k, v in one["alpha_pattern"].items()}
        mods = [k[: -len(".lora_A.weight")] for k in load_file(tmp_path / f"{mode}1" / "adapter_model.safetensors")
                if k.endswith("lora_A.weight")]
        for mod in mods:
            a, b = _delta(tmp_path / f"{mode}1", mod), _delta(tmp_path / f"{mode}2", mod)
            assert (a - b).norm() / a.norm() < 1e-6, (mode, mod)
        f1 = load_file(tmp_path / f"{mode}1" / "adapter_model.safetensors")
        f2 = load_file(tmp_path / f"{mode}2" / "adapter_model.safetensors")
        k = f"{MOD}.lora_B.weight"
        assert torch.allclose(f2[k] * 2 ** 0.5, f1[k], atol=1e-6)
    # lora_a_norm: every row of A at that norm, B carries σ (and the scaling), the same ΔW
    merge_adapters(ins, w, mode="svd", rank=5, out=tmp_path / "svd3", lora_scaling=2.0, lora_a_norm=0.5)
    f3 = load_file(tmp_path / "svd3" / "adapter_model.safetensors")
    for k, t in f3.items():
        if k.endswith("lora_A.weight"):
            assert torch.allclose(t.double().norm(dim=1), torch.full((t.shape[0],), 0.5, dtype=torch.float64),
                                  atol=1e-5), k
            mod = k[: -len(".lora_A.weight")]
            a, b = _delta(tmp_path / "svd1", mod), _delta(tmp_path / "svd3", mod)
            assert (a - b).norm() / a.norm() < 1e-6, mod
    with pytest.raises(Exception, match="lora_scaling must be a positive number"):
        MergePlan(models=[str(i) for i in ins], lora_scaling=0)


def test_factors_is_plain_average(models, tmp_path):
    # run_lora checkpoints share r and alpha: factors = plain average of A and of B
    ins = [models / "run_lora" / f"checkpoint-{s}" for s in (10, 20, 30)]
    res = merge_adapters(ins, [0.2, 0.3, 0.5], mode="factors", out=tmp_path / "f")
    got = load_file(tmp_path / "f" / "adapter_model.safetensors")
    sds = [load_file(a / "adapter_model.safetensors") for a in ins]
    for k in got:
        assert torch.allclose(got[k], 0.2 * sds[0][k] + 0.3 * sds[1][k] + 0.5 * sds[2][k], atol=1e-6)
    assert max(res.lora_errors.values()) > 0.01  # honestly reported as approximate


def test_peft_reload_forward_equals_base_plus_delta(models, odd_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ins = [models / "lora_a", odd_adapters[0], odd_adapters[1]]
    w = [0.5, 0.3, 0.2]
    merge_adapters(ins, w, mode="cat", out=tmp_path / "cat")
    x = torch.tensor([[5, 9, 17, 33, 4, 60]])
    base = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    with torch.no_grad():
        sd = base.state_dict()
        mods = {k[: -len(".lora_A.weight")] for k in load_file(tmp_path / "cat" / "adapter_model.safetensors")
                if k.endswith("lora_A.weight")}
        for mod in mods:
            key = mod.removeprefix("base_model.model.") + ".weight"
            sd[key] = sd[key] + sum(wi * _delta(a, mod) for wi, a in zip(w, ins)).float()
        dense = AutoModelForCausalLM.from_pretrained(models / "base").eval()
        dense.load_state_dict(sd)
        want = dense(x).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"), tmp_path / "cat")
        got = peft.eval()(x).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_dense_method_on_lora(models, tmp_path):
    ins = [models / "lora_a", models / "lora_b"]
    res = merge_adapters(ins, [0.5, 0.5], method="ties", density=0.5, rank=32, out=tmp_path / "t")
    d = [_delta(a).float() for a in ins]
    want = merge_tensors("ties", d, torch.zeros_like(d[0]), [0.5, 0.5], density=0.5)
    got = _delta(tmp_path / "t")
    assert (got - want).norm() / want.norm() < 1e-5  # rank 32 = full rank here: re-factoring is exact
    assert max(res.lora_errors.values()) < 1e-5


def test_different_bases_refused(models, tmp_path):
    other = testing.make_adapter(models / "other_arch", tmp_path / "other", seed=1)
    with pytest.raises(IncompatibleError, match="different bases"):
        merge_adapters([models / "lora_a", other], mode="cat", out=tmp_path / "x")


def test_plan_and_cli_route_adapters(models, tmp_path):
    from typer.testing import CliRunner

    from warmstart.cli import app

    cks = [str(models / "run_lora" / f"checkpoint-{s}") for s in (10, 20, 30)]
    res = merge(MergePlan(models=cks, weighting="mwa:steps", penalty=1.0, lora_mode="svd"), tmp_path / "p")
    assert res.weights == pytest.approx([10 / 60, 20 / 60, 30 / 60])
    assert open_checkpoint(tmp_path / "p").kind == "lora"
    r = CliRunner().invoke(app, ["merge", *cks, "--weights", "mwa:loss", "--penalty", "2", "--lora-mode", "cat",
                                 "--out", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    assert max(json.loads(r.stdout)["lora_errors"].values()) < 1e-6


def test_plan_base_must_match_adapters(models, tmp_path):
    ins = [str(models / "lora_a"), str(models / "lora_b")]
    with pytest.raises(IncompatibleError, match="trained on"):
        merge(MergePlan(models=ins, base=str(models / "other_arch")), tmp_path / "x")
    merge(MergePlan(models=ins, base=str(models / "base")), tmp_path / "ok")
