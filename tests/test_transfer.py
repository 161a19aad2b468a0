"""Fine-tuning transfer: exact formula, LoRA diffs, vocabulary and tensor-mismatch policies, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warmstart import testing
from warmstart.errors import ConfigError, IncompatibleError, OutputExistsError
from warmstart.transfer import transfer


def _sd(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(d).rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """Old base, a fine-tune and an adapter of it, and a 'new version' (a nearby variant) of the base."""
    root = tmp_path_factory.mktemp("transfer")
    old = testing.make_base(root / "old")
    testing.make_variant(old, root / "new", seed=11, scale=0.005)
    testing.make_variant(old, root / "ft", seed=12, scale=0.02)
    testing.make_adapter(old, root / "lora", seed=13, r=4, alpha=8, use_rslora=True,
                         targets=("q_proj", "v_proj", "down_proj"), rank_pattern={"down_proj": 2},
                         alpha_pattern={"v_proj": 3})
    return root


def test_full_finetune_matches_formula_for_each_alpha(zoo, tmp_path):
    before = [_tree_hash(zoo / n) for n in ("old", "ft", "new")]
    rep = transfer(zoo / "old", zoo / "ft", zoo / "new", tmp_path / "out", alpha=[0.5, 1.0, 1.5])
    old, ft, new = _sd(zoo / "old"), _sd(zoo / "ft"), _sd(zoo / "new")
    for a in (0.5, 1.0, 1.5):
        got = _sd(tmp_path / "out" / f"alpha-{a:g}")
        assert set(got) == set(new)
        for k in new:
            want = new[k].double() + a * (ft[k].double() - old[k].double())
            torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6)
    assert rep.counts() == {"transfer": len(new)}
    assert [_tree_hash(zoo / n) for n in ("old", "ft", "new")] == before  # inputs untouched
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "alpha-1")
    meta = json.loads((tmp_path / "out" / "alpha-1.5" / "warmstart.json").read_text())
    assert meta["alpha"] == 1.5 and meta["base_new"] == str(zoo / "new")
    assert "Fine-tuning transfer" in (tmp_path / "out" / "alpha-1" / "README.md").read_text()


def test_output_dtype_and_sharding(zoo, tmp_path):
    transfer(zoo / "old", zoo / "ft", zoo / "new", tmp_path / "bf", dtype="bfloat16", shard_size="20KB",
             compute_dtype="float64")
    idx = json.loads((tmp_path / "bf" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    got = _sd(tmp_path / "bf")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    old, ft, new = _sd(zoo / "old"), _sd(zoo / "ft"), _sd(zoo / "new")
    k = "model.layers.0.mlp.up_proj.weight"
    want = (new[k].double() + ft[k].double() - old[k].double()).to(torch.bfloat16)
    assert torch.equal(got[k], want)


def test_lora_diff_equals_materialised_merge(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo / "old", dtype=torch.float32),
                                       zoo / "lora").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    before = _tree_hash(zoo / "lora")
    r_lora = transfer(zoo / "old", zoo / "lora", zoo / "new", tmp_path / "via_lora", alpha=0.7)
    transfer(zoo / "old", tmp_path / "merged", zoo / "new", tmp_path / "via_full", alpha=0.7)
    a, b, new = _sd(tmp_path / "via_lora"), _sd(tmp_path / "via_full"), _sd(zoo / "new")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    changed = {t.name for t in r_lora.tensors if t.action == "transfer"}
    assert changed == {k for k in new if any(m in k for m in ("q_proj", "v_proj", "down_proj"))}
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], new["model.layers.0.self_attn.q_proj.weight"])
    assert _tree_hash(zoo / "lora") == before


def _with_tokens(src: Path, out: Path, tokens: list[str], seed: int, scale: float) -> Path:
    """A variant of ``src`` whose tokenizer gained ``tokens`` (embedding rows appended)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(tokens)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("policy", ["base", "finetuned"])
def test_vocab_grown_rows_matched_by_string(zoo, tmp_path, policy):
    from transformers import AutoTokenizer

    ft = _with_tokens(zoo / "old", tmp_path / "ft_tok", ["<tool>", "<ftonly>"], seed=21, scale=0.02)
    new = _with_tokens(zoo / "old", tmp_path / "new_tok", ["<x1>", "<tool>", "<x2>"], seed=22, scale=0.005)
    rep = transfer(zoo / "old", ft, new, tmp_path / "out", vocab_new_rows=policy)
    v_old = AutoTokenizer.from_pretrained(zoo / "old").get_vocab()
    v_ft, v_new = AutoTokenizer.from_pretrained(ft).get_vocab(), AutoTokenizer.from_pretrained(new).get_vocab()
    O, F, N, G = _sd(zoo / "old"), _sd(ft), _sd(new), _sd(tmp_path / "out")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        for s, j in v_new.items():
            if s in v_old:
                want = N[k][j] + (F[k][v_ft[s]] - O[k][v_old[s]])
            elif s in v_ft and policy == "finetuned":
                want = F[k][v_ft[s]]
            else:
                want = N[k][j]
            torch.testing.assert_close(G[k][j], want, rtol=0, atol=1e-6, msg=f"{k} row {s!r}")
    emb = next(t for t in rep.tensors if t.name == "model.embed_tokens.weight")
    assert emb.action == "transfer-vocab"
    assert emb.rows["shared"] == len(v_old) and emb.rows["new_from_finetuned"] == (1 if policy == "finetuned" else 0)


def test_vocab_shrunk_other_tokenizer(zoo, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    new = tmp_path / "new_small"
    tok = testing.make_tokenizer(new, vocab_size=300)
    torch.manual_seed(5)
    LlamaForCausalLM(testing.tiny_config(len(tok))).save_pretrained(new)
    rep = transfer(zoo / "old", zoo / "ft", new, tmp_path / "out", alpha=2.0)
    v_old, v_new = AutoTokenizer.from_pretrained(zoo / "old").get_vocab(), tok.get_vocab()
    O, F, N, G = _sd(zoo / "old"), _sd(zoo / "ft"), _sd(new), _sd(tmp_path / "out")
    k = "lm_head.weight"
    assert G[k].shape[0] == len(v_new) < len(v_old)
    for s, j in v_new.items():
        want = N[k][j] + 2.0 * (F[k][v_old[s]] - O[k][v_old[s]]) if s in v_old else N[k][j]
        torch.testing.assert_close(G[k][j], want, rtol=0, atol=1e-6)
    row = next(t for t in rep.tensors if t.name == k).rows
    assert row["old_rows_dropped"] == len(v_old) - row["shared"] > 0
    assert any("far apart" in w for w in rep.warnings)  # an unrelated init is not a new version


def test_tensors_on_one_side_and_shape_mismatch_are_reported(zoo, models, tmp_path):
    deeper = testing.make_base(tmp_path / "deeper", num_hidden_layers=3, tie_word_embeddings=True)
    rep = transfer(zoo / "old", zoo / "ft", deeper, tmp_path / "out")
    by = {t.name: t for t in rep.tensors}
    assert by["model.layers.2.mlp.up_proj.weight"].action == "keep-new"
    assert "only in the new base" in by["model.layers.2.mlp.up_proj.weight"].reason
    assert by["lm_head.weight"].action == "dropped"  # the new base ties its head
    got, new = _sd(tmp_path / "out"), _sd(deeper)
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], new["model.layers.2.mlp.up_proj.weight"])
    assert "lm_head.weight" not in got

    rep2 = transfer(zoo / "old", zoo / "ft", models / "other_arch", tmp_path / "out2")
    mism = [t for t in rep2.tensors if "shape mismatch" in t.reason]
    assert mism and all(t.action == "keep-new" for t in mism)
    assert any("kept from the new base" in w for w in rep2.warnings)
    n_out = len(_sd(tmp_path / "out2"))
    assert n_out == len(_sd(models / "other_arch"))


def test_dry_run_writes_nothing_and_reports_layers(zoo, tmp_path):
    rep = transfer(zoo / "old", zoo / "ft", zoo / "new", tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists() and rep.outputs == []
    assert [ly.layer for ly in rep.layers] == ["layer 000", "layer 001", "other"]
    assert 0 < rep.summary["rel_drift"] < rep.summary["rel_diff"] and rep.summary["cos_bases"] > 0.9
    assert not rep.warnings
    # Independent check of one tensor's cosine.
    O, F, N = _sd(zoo / "old"), _sd(zoo / "ft"), _sd(zoo / "new")
    k = "model.layers.1.self_attn.k_proj.weight"
    want = torch.nn.functional.cosine_similarity((N[k] - O[k]).flatten().double(), (F[k] - O[k]).flatten().double(), 0)
    assert abs(next(t for t in rep.tensors if t.name == k).cos_drift_diff - float(want)) < 1e-5


def test_user_errors(zoo, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        transfer(zoo / "old", zoo / "ft", zoo / "new", tmp_path / "exists")
    with pytest.raises(ConfigError):
        transfer(zoo / "old", zoo / "ft", zoo / "new", tmp_path / "o", alpha="a,b")
    with pytest.raises(IncompatibleError):
        transfer(zoo / "lora", zoo / "ft", zoo / "new", tmp_path / "o")
    with pytest.raises(ConfigError):
        transfer(zoo / "old", zoo / "ft", zoo / "new", zoo / "new" / "inside")


def test_config_from_finetuned_checks_shapes(zoo, models, tmp_path):
    transfer(zoo / "old", zoo / "ft", zoo / "new", tmp_path / "o", config_from="finetuned")
    assert json.loads((tmp_path / "o" / "warmstart.json").read_text())["config_from"] == "finetuned"
    with pytest.raises(IncompatibleError, match="config-from new"):
        transfer(zoo / "old", zoo / "ft", models / "other_arch", tmp_path / "o2", config_from="finetuned")


def test_cli_dry_run_json_and_error_exit(zoo, tmp_path):
    from typer.testing import CliRunner

    from warmstart.cli import app

    r = CliRunner().invoke(app, ["transfer", "--base-old", str(zoo / "old"), "--finetuned", str(zoo / "lora"),
                                 "--base-new", str(zoo / "new"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["finetuned_kind"] == "lora" and d["counts"]["transfer"] == 6
    r = CliRunner().invoke(app, ["transfer", "--base-old", str(zoo / "old"), "--finetuned", str(zoo / "ft"),
                                 "--base-new", str(zoo / "new"), "--out", str(tmp_path / "o"), "--alpha", "0.5,1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "alpha-0.5" / "model.safetensors").exists()


def test_adapter_of_another_base_is_warned(zoo, models):
    rep = transfer(zoo / "old", models / "lora_a", zoo / "new", dry_run=True)
    assert any("names" in w and "as its base" in w for w in rep.warnings)
    rep = transfer(zoo / "old", zoo / "lora", zoo / "new", dry_run=True)
    assert not any("as its base" in w for w in rep.warnings)


def test_tensor_only_in_finetune_is_dropped_and_named(zoo, tmp_path):
    import shutil

    from safetensors.torch import save_file

    ft = tmp_path / "ft_extra"
    shutil.copytree(zoo / "ft", ft)
    sd = load_file(ft / "model.safetensors")
    sd["value_head.weight"] = torch.ones(1, 32)
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    rep = transfer(zoo / "old", ft, zoo / "new", tmp_path / "out")
    extra = next(t for t in rep.tensors if t.name == "value_head.weight")
    assert extra.action == "dropped" and "only in the fine-tune" in extra.reason
    assert "value_head.weight" not in _sd(tmp_path / "out")
    assert any("dropped" in w for w in rep.warnings)


def test_nonfinite_input_is_refused_and_nothing_written(zoo, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from warmstart.errors import CheckpointError

    ft = tmp_path / "ft_nan"
    shutil.copytree(zoo / "ft", ft)
    sd = load_file(ft / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj"):
        transfer(zoo / "old", ft, zoo / "new", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
