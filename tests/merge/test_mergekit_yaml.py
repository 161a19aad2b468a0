"""mergekit YAML semantics: typing errors, settings (gradients / filters), dtype, slices, model+lora.

The numbers are checked against independent formulas here; tests/merge/test_mergekit_parity.py
checks the same configurations against mergekit's own outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warmstart.errors import ConfigError
from warmstart.merge import MergePlan, merge
from warmstart.params import check, evaluate

M = Path(__file__).resolve().parent.parent / "fixtures" / "mergekit" / "models"


def _sd(d: Path) -> dict:
    return load_file(d / "model.safetensors")


def _plan(tmp_path, text: str) -> Path:
    f = tmp_path / "mk.yaml"
    f.write_text(text.replace("{M}", str(M)))
    return f


# ---------------------------------------------------------------------------- settings


def test_gradient_and_filters_evaluate_as_documented():
    g = [0, 0.3, 0.7, 1]  # 4 points over t ∈ [0, 1]: t = 0.5 lies halfway between 0.3 and 0.7
    assert evaluate(g, "x", 0.0) == 0 and evaluate(g, "x", 1.0) == 1
    assert evaluate(g, "x", 0.5) == pytest.approx(0.5) and evaluate(g, "x", 1 / 6) == pytest.approx(0.15)
    f = [{"filter": "mlp", "value": [1, 0]}, {"filter": "self_attn", "value": 0.2}, {"value": 9}]
    assert evaluate(f, "model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.75)
    assert evaluate(f, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.2
    assert evaluate(f, "lm_head.weight", 0.0) == 9
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0.0) is None  # falls to the next scope
    assert evaluate("1e-3", "x", 0) == 0.001  # YAML leaves 1e-3 a string; mergekit reads it as a number


@pytest.mark.parametrize("bad", ["abc", [[1]], [], {"filter": "mlp"}, [{"filter": 3, "value": 1}],
                                 [{"value": 1, "extra": 2}], None.__class__])
def test_bad_settings_are_reported(bad):
    assert check(bad, "models[0].parameters.weight") is not None


# ---------------------------------------------------------------------------- refusals name the file and key


@pytest.mark.parametrize("body,msg", [
    ("merge_method: linear\nmodels: [{model: {M}/a, parameters: {weight: abc}}]\n",
     "models[0].parameters.weight must be a number"),
    ("merge_method: linear\nmodels: [{model: {M}/a, parameters: {weight: [[1, 2]]}}]\n",
     "models[0].parameters.weight must be a number"),
    ("merge_method: ties\nbase_model: {M}/base\nmodels: [{model: {M}/a}]\nparameters: {density: [a, b]}\n",
     "parameters.density must be a number"),
    ("merge_method: ties\nbase_model: {M}/base\nmodels: [{model: {M}/a, parameters: {densty: 0.3}}]\n",
     "no parameter(s) ['densty']"),
    ("merge_method: linear\nname: x\nmodels: [{model: {M}/a}]\n", "unsupported mergekit key(s) ['name']"),
    ("merge_method: linear\nmodules: {}\nmodels: [{model: {M}/a}]\n", "per-module syntax"),
    ("merge_method: linear\nmodels: [{model: {M}/a, weight: 1}]\n", "unknown key(s) ['weight']"),
    ("merge_method: linear\nmodels: [{model: {M}/a}, {model: {M}/a}]\n", "listed twice"),
    ("merge_method: nope\nmodels: [{model: {M}/a}]\n", "merge_method 'nope' is not supported"),
    ("merge_method: linear\nmodels: [{model: {M}/a}]\ndtype: bf16\n", "dtype must be one of"),
    ("merge_method: linear\nmodels: [{model: {M}/a}]\nout_dtype: [1]\n", "out_dtype must be one of"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: {M}/a, layer_range: [2, 1]}]\n", "layer_range"),
    ("merge_method: linear\nmodels: [{model: {M}/a, parameters: {weight: 0.5}}, "
     "{model: {M}/b, parameters: {weight: -0.5}}]\n", "sum to zero"),
])
def test_mergekit_refusals_are_one_line_naming_file(tmp_path, body, msg):
    f = _plan(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        MergePlan.from_yaml(f)
    assert msg in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


PAD = ("merge_method: linear\nbase_model: {M}/a\nmodels: [{model: {M}/a, parameters: {weight: 1.0}}]\n"
       "tokenizer: {source: base, pad_to_multiple_of: 16}\ndtype: float32\n")


def test_pad_to_multiple_config_is_not_misreported(tmp_path):
    """mergekit's test_pad_to_multiple_of: the base is the only model (a linear over one input)."""
    plan = MergePlan.from_yaml(_plan(tmp_path, PAD))
    assert [m.ref for m in plan.models] == [str(M / "a")] and plan.tokenizer["pad_to_multiple_of"] == 16


def test_slerp_model_count_error_names_the_plan(tmp_path):
    f = _plan(tmp_path, "merge_method: slerp\nbase_model: {M}/a\nmodels: [{model: {M}/b}, {model: {M}/c}]\n"
                        "parameters: {t: 0.5}\n")
    p = subprocess.run([sys.executable, "-m", "warmstart", "merge", "--config", str(f), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(err) == 1 and str(f) in err[0] and "slerp merges exactly two" in err[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- semantics, independent formulas


def test_dtype_rounds_inputs_and_out_dtype_sets_the_output(tmp_path):
    f = _plan(tmp_path, "merge_method: linear\nmodels:\n  - {model: {M}/a, parameters: {weight: 0.7}}\n"
                        "  - {model: {M}/b, parameters: {weight: 0.6}}\ndtype: bfloat16\nout_dtype: float32\n")
    merge(MergePlan.from_yaml(f), tmp_path / "o")
    got, a, b = _sd(tmp_path / "o"), _sd(M / "a"), _sd(M / "b")
    for k in a:
        ra, rb = a[k].bfloat16().float(), b[k].bfloat16().float()  # inputs rounded first
        # mergekit accumulates with addcmul_ (one rounding per term on CPU, not two), divides by the fp32 Σw
        want = (torch.addcmul(ra * 0.7, rb, torch.tensor(0.6)) / torch.tensor([0.7, 0.6]).sum()).bfloat16().float()
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want), k
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float32"
    # warmstart's semantics on request: no input rounding, fp32 math, dtype = the output only
    plan = MergePlan.from_dict({**MergePlan.from_yaml(f).to_dict(), "input_dtype": None, "compute_dtype": "float32"})
    merge(plan, tmp_path / "o2")
    got2 = _sd(tmp_path / "o2")
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(got2[k], (a[k] * 0.7 + b[k] * 0.6) / 1.3, atol=1e-7) and not torch.equal(got2[k], got[k])


def test_linear_weight_gradient_per_layer(tmp_path):
    f = _plan(tmp_path, "merge_method: linear\nmodels:\n  - {model: {M}/a, parameters: {weight: [0, 1]}}\n"
                        "  - {model: {M}/b, parameters: {weight: 1}}\n")
    merge(MergePlan.from_yaml(f), tmp_path / "o")
    got, a, b = _sd(tmp_path / "o"), _sd(M / "a"), _sd(M / "b")
    for i in range(4):  # 4 layers: t = i/3, weight of a = t
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        w = i / 3
        assert torch.allclose(got[k], (a[k] * w + b[k]) / (w + 1), atol=1e-6), k
    assert torch.allclose(got["lm_head.weight"], b["lm_head.weight"], atol=1e-7)  # t = 0 outside the layers


def test_task_negation_runs(tmp_path):
    f = _plan(tmp_path, "merge_method: task_arithmetic\nbase_model: {M}/base\nmodels:\n"
                        "  - {model: {M}/a, parameters: {weight: 0.5}}\n"
                        "  - {model: {M}/b, parameters: {weight: -0.5}}\n")
    merge(MergePlan.from_yaml(f), tmp_path / "o")
    got, a, b, base = _sd(tmp_path / "o"), _sd(M / "a"), _sd(M / "b"), _sd(M / "base")
    for k in a:
        assert torch.allclose(got[k], base[k] + 0.5 * (a[k] - base[k]) - 0.5 * (b[k] - base[k]), atol=1e-6)


def test_slices_frankenmerge_maps_layers(tmp_path):
    f = _plan(tmp_path, "merge_method: passthrough\nslices:\n  - sources: [{model: {M}/a, layer_range: [0, 3]}]\n"
                        "  - sources: [{model: {M}/b, layer_range: [1, 4]}]\n")
    merge(MergePlan.from_yaml(f), tmp_path / "o")
    got, a, b = _sd(tmp_path / "o"), _sd(M / "a"), _sd(M / "b")
    src = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    for k_out, (sd, j) in enumerate(src):
        for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{k_out}.{n}"], sd[f"model.layers.{j}.{n}"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # last slice
    assert not any(".layers.6." in k for k in got)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # loads: the config matches the tensors


def test_model_plus_lora_applies_the_adapter(tmp_path):
    f = _plan(tmp_path, "merge_method: linear\nmodels:\n  - {model: {M}/base+{M}/lora_a, parameters: {weight: 1}}\n")
    merge(MergePlan.from_yaml(f), tmp_path / "o")
    got, base = _sd(tmp_path / "o"), _sd(M / "base")
    ad = load_file(M / "lora_a" / "adapter_model.safetensors")
    cfg = json.loads((M / "lora_a" / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    k = "model.layers.2.self_attn.v_proj.weight"
    A = next(v for n, v in ad.items() if "layers.2.self_attn.v_proj.lora_A" in n)
    B = next(v for n, v in ad.items() if "layers.2.self_attn.v_proj.lora_B" in n)
    assert torch.allclose(got[k], base[k] + s * B @ A, atol=1e-6) and not torch.allclose(got[k], base[k])
    k2 = "model.layers.2.self_attn.k_proj.weight"  # not targeted: unchanged
    assert torch.equal(got[k2], base[k2])
    assert not list(tmp_path.glob(".o.lora-*"))  # the temporary model is gone


def test_mergekit_plan_round_trips_through_native_yaml(tmp_path):
    f = _plan(tmp_path, "merge_method: slerp\nbase_model: {M}/a\nslices:\n  - sources:\n"
                        "      - {model: {M}/a, layer_range: [0, 4]}\n      - {model: {M}/b, layer_range: [0, 4]}\n"
                        "parameters:\n  t: [{filter: mlp, value: [1, 0]}, {value: 0.5}]\ndtype: float16\n")
    plan = MergePlan.from_yaml(f)
    g = tmp_path / "native.yaml"
    g.write_text(plan.to_yaml())
    again = MergePlan.from_yaml(g)
    assert again == plan and again.input_dtype == "float16" and again.compute_dtype == "auto"


def test_cli_input_dtype_none_gives_warmstart_semantics(tmp_path):
    from typer.testing import CliRunner

    from warmstart.cli import app

    f = _plan(tmp_path, "merge_method: linear\nmodels:\n  - {model: {M}/a, parameters: {weight: 0.7}}\n"
                        "  - {model: {M}/b, parameters: {weight: 0.6}}\ndtype: bfloat16\n")
    for flag, name in ((None, "mk"), ("none", "ws")):
        args = ["merge", "--config", str(f), "--out", str(tmp_path / name)] + (["--input-dtype", flag] if flag else [])
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    a, b = _sd(M / "a"), _sd(M / "b")
    k = "model.layers.1.mlp.gate_proj.weight"
    mk, ws = _sd(tmp_path / "mk")[k], _sd(tmp_path / "ws")[k]
    assert mk.dtype == ws.dtype == torch.bfloat16  # dtype: the output either way
    exact = (a[k].double() * 0.7 + b[k].double() * 0.6) / 1.3
    # fp32 math on unrounded inputs, one rounding at the end: within half a bf16 ulp of the exact value
    assert torch.allclose(ws.double(), exact, rtol=2 ** -8, atol=0)
    assert not torch.equal(mk, ws)  # mergekit's: inputs rounded first
