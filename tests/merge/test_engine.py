"""Streaming engine, plans and CLI on the tiny model zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from warmstart import testing
from warmstart.errors import CheckpointError, ConfigError, IncompatibleError, OutputExistsError
from warmstart.merge import MergePlan, merge, merge_state_dicts
from warmstart.rundir import read_selection

ATOL = 1e-6

def from_selection(f, **kw):
    """A merge plan from a selection file, as `warmstart merge --selection` and `run` build it."""
    return MergePlan.from_dict(read_selection(f).plan_dict(**kw), source=str(f))



def _sd(d: Path) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, models):
    return testing.make_run(models / "base", tmp_path_factory.mktemp("runs") / "run_full", kind="full",
                            steps=(10, 20, 30), seed=9)


def test_linear_streamed_equals_formula_and_loads(models, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")], weighting="given",
                     method="linear", shard_size="30KB")
    plan.models[0].weight, plan.models[1].weight = 0.25, 0.75
    res = merge(plan, tmp_path / "out")
    a, b, got = _sd(models / "ft_a"), _sd(models / "ft_b"), _sd(tmp_path / "out")
    assert set(got) == set(a)
    for k in a:
        assert torch.allclose(got[k], 0.25 * a[k] + 0.75 * b[k], atol=ATOL), k
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert all(r.action == "merged" for r in res.tensors)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "linear" in card and "ft_a" in card and "fingerprint" in card
    meta = json.loads((tmp_path / "out" / "warmstart.json").read_text())
    assert meta["weights"] == [0.25, 0.75] and len(meta["inputs"][0]["fingerprint"]) == 32


def test_fingerprints_match_library(models, tmp_path):
    from warmstart.checkpoints import open_checkpoint

    res = merge(MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")]), tmp_path / "o")
    assert res.inputs[0]["fingerprint"] == open_checkpoint(models / "ft_a").fingerprint()


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.8}),
    ("ties", {"density": 0.4}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("model_stock", {}),
])
def test_disk_merge_equals_in_memory(models, tmp_path, method, params):
    # base_sharded has the same weights as base (same seed) in several files
    plan = MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")], method=method,
                     base=str(models / "base_sharded"), params=params)
    merge(plan, tmp_path / "out")
    sds = [_sd(models / "ft_a"), _sd(models / "ft_b")]
    want = merge_state_dicts(method, sds, _sd(models / "base_sharded"), [0.5, 0.5], **params)
    got = _sd(tmp_path / "out")
    for k in want:
        assert torch.allclose(got[k], want[k], atol=ATOL), k


def test_include_base_is_explicit(models, tmp_path):
    donors = [str(models / "ft_a"), str(models / "ft_b")]
    r1 = merge(MergePlan(models=donors, base=str(models / "base")), tmp_path / "no")
    merge(MergePlan(models=donors, base=str(models / "base"), include_base=True), tmp_path / "yes")
    a, b, base = _sd(models / "ft_a"), _sd(models / "ft_b"), _sd(models / "base")
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(_sd(tmp_path / "no")[k], (a[k] + b[k]) / 2, atol=ATOL)
    assert torch.allclose(_sd(tmp_path / "yes")[k], (a[k] + b[k] + base[k]) / 3, atol=ATOL)
    assert any("NOT" in n for n in r1.notes)


def test_output_dtype_and_atomic_force(models, tmp_path):
    plan = MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")], dtype="bfloat16")
    merge(plan, tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in _sd(tmp_path / "out").values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(OutputExistsError):
        merge(plan, tmp_path / "out")
    merge(plan, tmp_path / "out", force=True)
    assert not list(tmp_path.glob("out.tmp-*"))


def test_failure_leaves_no_output(models, copy_of, tmp_path):
    bad = copy_of(models / "ft_b")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        merge(MergePlan(models=[str(models / "ft_a"), str(bad)]), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def _drop_tensor(d: Path, name: str):
    sd = load_file(d / "model.safetensors")
    sd.pop(name)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_policy(models, copy_of, tmp_path):
    b = copy_of(models / "ft_b")
    k = "model.layers.1.mlp.down_proj.weight"
    _drop_tensor(b, k)
    plan = dict(models=[str(models / "ft_a"), str(b)])
    with pytest.raises(IncompatibleError, match="missing"):
        merge(MergePlan(**plan), tmp_path / "o1")
    res = merge(MergePlan(**plan, missing="reference"), tmp_path / "o2")
    assert torch.allclose(_sd(tmp_path / "o2")[k], _sd(models / "ft_a")[k])
    rep = next(r for r in res.tensors if r.name == k)
    assert rep.inputs == 1 and "missing" in rep.note
    # extra tensors (here: the reference lacks one) are refused or dropped loudly
    with pytest.raises(IncompatibleError, match="not in the reference"):
        merge(MergePlan(models=[str(b), str(models / "ft_a")]), tmp_path / "o3")
    res = merge(MergePlan(models=[str(b), str(models / "ft_a")], missing="reference"), tmp_path / "o4")
    assert any("dropped 1" in n for n in res.notes)


def test_vocab_mismatch_policy(models, tmp_path):
    base = models / "base"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(models / "ft_b")
    m.resize_token_embeddings(400)  # a donor whose tokenizer grew: more embedding rows
    m.save_pretrained(tmp_path / "big")
    big = tmp_path / "big"
    emb = "model.embed_tokens.weight"
    plan = dict(models=[str(models / "ft_a"), str(big)], missing="reference")
    # other tensors also differ in values but not shape; only embeddings/lm_head differ in rows
    with pytest.raises(IncompatibleError, match="--vocab reference"):
        merge(MergePlan(**plan, method="task_arithmetic", base=str(base)), tmp_path / "o1")
    merge(MergePlan(**plan, method="task_arithmetic", base=str(base), vocab="reference"), tmp_path / "o2")
    got, a, b0, bb = _sd(tmp_path / "o2"), _sd(models / "ft_a"), _sd(base), _sd(big)
    rows = b0[emb].shape[0]
    assert got[emb].shape == b0[emb].shape
    want = b0[emb] + 0.5 * (a[emb] - b0[emb]) + 0.5 * (bb[emb][:rows] - b0[emb])  # uniform weights
    assert torch.allclose(got[emb], want, atol=1e-5)
    # the other way round: a donor with fewer rows is padded with the base's rows (δ = 0 there)
    merge(MergePlan(models=[str(models / "ft_a")], method="task_arithmetic", base=str(big), vocab="reference",
                    missing="reference"), tmp_path / "o3")
    got = _sd(tmp_path / "o3")[emb]
    assert torch.allclose(got[:rows], a[emb], atol=1e-6) and torch.allclose(got[rows:], bb[emb][rows:])


def test_tied_embeddings(models, tmp_path):
    tied = testing.make_base(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in _sd(tied)
    # an untied reference + a tied donor: the donor's embedding serves as its lm_head
    res = merge(MergePlan(models=[str(models / "base"), str(tied)]), tmp_path / "o1")
    got, u, t = _sd(tmp_path / "o1"), _sd(models / "base"), _sd(tied)
    assert torch.allclose(got["lm_head.weight"], (u["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2,
                          atol=ATOL)
    assert next(r for r in res.tensors if r.name == "lm_head.weight").action == "tied-embedding"
    # a tied reference + an untied donor: refused unless the policy says to keep the tie
    with pytest.raises(IncompatibleError, match="ties its embeddings"):
        merge(MergePlan(models=[str(tied), str(models / "base")]), tmp_path / "o2")
    merge(MergePlan(models=[str(tied), str(models / "base")], missing="reference"), tmp_path / "o3")
    assert "lm_head.weight" not in _sd(tmp_path / "o3")


# ----------------------------------------------------------------------------
# Plans


def test_plan_yaml_round_trip(tmp_path):
    plan = MergePlan(models=[{"ref": "a", "weight": 0.3}, {"ref": "b", "weight": 0.7}], method="ties",
                     base="base", params={"density": 0.5}, dtype="bfloat16")
    f = tmp_path / "plan.yaml"
    f.write_text(plan.to_yaml())
    again = MergePlan.from_yaml(f)
    assert again == plan and again.source == str(f)


@pytest.mark.parametrize("text,msg", [
    ("models: [a, b]\nmethod: ties\nbogus: 1\n", "unknown key"),
    ("models: [a, b]\nmethod: ties\nparams: {density: -0.5}\n", "density"),
    ("models: [{ref: a, weight: 1}, {ref: b, weight: -1}]\n", "sum to zero"),
    ("models: [a]\nmethod: nope\n", "unknown method"),
    ("models: [a\n", "not valid YAML"),
])
def test_plan_errors_name_the_file(tmp_path, text, msg):
    f = tmp_path / "plan.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg) as e:
        MergePlan.from_yaml(f)
    assert str(f) in str(e.value)


def test_mergekit_yaml_accepted(models, tmp_path):
    f = tmp_path / "mk.yaml"
    f.write_text(f"""
merge_method: ties
base_model: {models / 'base'}
models:
  - model: {models / 'ft_a'}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {models / 'ft_b'}
    parameters: {{weight: 0.4, density: 0.3}}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
""")
    plan = MergePlan.from_yaml(f)
    assert plan.method == "ties" and [m.weight for m in plan.models] == [0.6, 0.4]
    merge(plan, tmp_path / "out")
    sds = [_sd(models / "ft_a"), _sd(models / "ft_b")]
    want = merge_state_dicts("ties", sds, _sd(models / "base"), [0.6, 0.4], density=[0.5, 0.3])
    got = _sd(tmp_path / "out")
    assert all(torch.allclose(got[k], want[k], atol=ATOL) for k in want)
    # mergekit's linear with the base listed among models: the base is one more input, in its listed place
    # (the order of the sum is mergekit's), and still the config source
    f.write_text(f"merge_method: linear\nbase_model: {models/'base'}\nmodels:\n  - model: {models/'ft_a'}\n"
                 f"    parameters: {{weight: 1.0}}\n  - model: {models/'base'}\n    parameters: {{weight: 1.0}}\n")
    plan = MergePlan.from_yaml(f)
    assert [m.ref for m in plan.models] == [str(models / "ft_a"), str(models / "base")]
    assert plan.base is None and plan.config_from == str(models / "base")


def test_from_selection(models, tmp_path):
    f = tmp_path / "sel.yaml"
    f.write_text(json.dumps({"base": str(models / "base"), "metric": "loss", "weighting": "given", "ranking": [],
                             "donors": [{"ref": str(models / "ft_a"), "kind": "full", "score": 1.0, "weight": 0.7},
                                        {"ref": str(models / "ft_b"), "kind": "full", "score": 2.0, "weight": 0.3}]}))
    plan = from_selection(f, method="task_arithmetic")
    assert plan.base == str(models / "base") and [m.weight for m in plan.models] == [0.7, 0.3]
    res = merge(plan, tmp_path / "out")
    assert res.weights == [0.7, 0.3]


def test_mwa_weights_from_trainer_state(full_run, tmp_path):
    cks = sorted(full_run.glob("checkpoint-*"))
    res = merge(MergePlan(models=[str(c) for c in cks], weighting="mwa:loss", penalty=2.0), tmp_path / "out")
    losses = [2.0, 1.0, 2.0 / 3]  # testing.make_run: loss 2/(1+i)
    raw = [(1 / l) ** 2 for l in losses]
    assert res.weights == pytest.approx([r / sum(raw) for r in raw])


# ----------------------------------------------------------------------------
# CLI


def test_cli_merge_json(models, tmp_path):
    from typer.testing import CliRunner

    from warmstart.cli import app

    r = CliRunner().invoke(app, ["merge", str(models / "ft_a"), str(models / "ft_b"), "--method", "ties",
                                 "--base", str(models / "base"), "--weights", "0.3,0.7", "--density", "0.5",
                                 "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["weights"] == [0.3, 0.7] and data["method"] == "ties"
    r = CliRunner().invoke(app, ["merge", str(models / "ft_a"), "--method", "ties", "--out", str(tmp_path / "p")])
    assert r.exit_code != 0


def test_cli_user_errors_are_one_line(models, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "warmstart", "merge", str(models / "ft_a"), str(models / "ft_b"),
                        "--method", "ties", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 1 and "needs a base" in p.stderr and "Traceback" not in p.stderr


def test_nonfinite_inputs_refused(models, copy_of, tmp_path):
    from warmstart.errors import CheckpointError

    bad = copy_of(models / "ft_b")
    sd = load_file(bad / "model.safetensors")
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        merge(MergePlan(models=[str(models / "ft_a"), str(bad)]), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    merge(MergePlan(models=[str(models / "ft_a"), str(bad)]), tmp_path / "o", allow_nonfinite=True)


def test_mwa_metrics_handed_in(full_run, models, copy_of, tmp_path):
    """Merging never opens the catalog: metrics a checkpoint lacks are handed in by the caller
    (the CLI's --library lookup: tests/merge/test_weights.py)."""
    cks = [copy_of(c, f"ck{i}") for i, c in enumerate(sorted(full_run.glob("checkpoint-*")))]
    for c in cks:
        (c / "trainer_state.json").unlink()
    plan = MergePlan(models=[str(c) for c in cks], weighting="mwa:steps", penalty=1.0)
    metrics = {str(c.resolve()): (None, s) for c, s in zip(cks, (10, 20, 30))}
    assert merge(plan, tmp_path / "out", metrics=metrics).weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ConfigError, match="missing"):
        merge(plan, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_cli_flags_override_config(models, tmp_path):
    from typer.testing import CliRunner

    from warmstart.cli import app

    f = tmp_path / "plan.yaml"
    f.write_text(MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")], method="ties",
                           base=str(models / "base"), params={"density": 0.2}).to_yaml())
    r = CliRunner().invoke(app, ["merge", "--config", str(f), "--density", "0.7", "--out", str(tmp_path / "o"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "warmstart.json").read_text())
    assert meta["plan"]["params"]["density"] == 0.7 and meta["plan"]["method"] == "ties"


def test_scalar_and_integer_tensors(models, copy_of, tmp_path):
    a, b = copy_of(models / "ft_a"), copy_of(models / "ft_b")
    for d, v in ((a, 1.0), (b, 3.0)):
        sd = load_file(d / "model.safetensors")
        sd["extra.scale"] = torch.tensor(v)  # 0-dim
        sd["extra.ids"] = torch.arange(5) * int(v)  # integer: copied from the reference
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    res = merge(MergePlan(models=[str(a), str(b)]), tmp_path / "o")
    got = _sd(tmp_path / "o")
    assert got["extra.scale"].shape == () and got["extra.scale"].item() == pytest.approx(2.0)
    assert torch.equal(got["extra.ids"], torch.arange(5))
    assert next(r for r in res.tensors if r.name == "extra.ids").action == "copied"


def test_from_selection_uses_method_and_params_named_in_file(models, tmp_path):
    """An optimize selection records the method its weights were searched for; a select one does not."""
    f = tmp_path / "sel.json"
    donors = [{"ref": str(models / "ft_a"), "kind": "full", "weight": 1.2},
              {"ref": str(models / "ft_b"), "kind": "full", "weight": 0.4}]
    f.write_text(json.dumps({"base": str(models / "base"), "method": "ties", "params": {"density": 0.3},
                             "donors": donors}))
    plan = from_selection(f)
    assert plan.method == "ties" and plan.params == {"density": 0.3}
    assert from_selection(f, method="linear").method == "linear"
    f.write_text(json.dumps({"base": str(models / "base"), "donors": donors}))
    assert from_selection(f).method == "linear"
