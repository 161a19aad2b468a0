"""Checkpoint recognition, lazy access, signatures, fingerprints and every malformed input."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from warmstart.checkpoints import DigestCache, discover, is_hub_id, open_checkpoint, read_header, resolve
from warmstart.errors import CheckpointError

# -- formats -------------------------------------------------------------------


def test_full_model_unsharded(models):
    ck = open_checkpoint(models / "base")
    assert ck.kind == "full"
    assert [f.name for f in ck.weight_files] == ["model.safetensors"]
    w = ck.weights()
    assert "model.embed_tokens.weight" in w
    assert w.shape("model.layers.0.self_attn.q_proj.weight") == (32, 32)
    t = w.get("model.norm.weight", torch.float32)
    assert t.shape == (32,) and t.dtype == torch.float32


def test_sharded_model_reads_the_same_tensors(models):
    one, many = open_checkpoint(models / "base"), open_checkpoint(models / "base_sharded")
    assert len(many.weight_files) > 1
    assert set(one.weights().keys()) == set(many.weights().keys())
    for name in one.weights().keys():
        assert torch.equal(one.weights().get(name), many.weights().get(name)), name


def test_lora_adapter_info(models):
    ck = open_checkpoint(models / "lora_b")
    assert ck.kind == "lora"
    assert ck.lora.r == 8 and ck.lora.alpha == 16 and not ck.lora.use_rslora
    assert ck.lora.target_modules == ("q_proj", "v_proj")
    assert ck.base_model == str((models / "base").resolve())
    assert ck.lora.scaling() == pytest.approx(2.0)
    assert any(k.endswith("lora_A.weight") for k in ck.weights().keys())
    assert ck.task == "task_b"  # from warmstart.json


def test_rslora_and_patterns_scaling(tmp_path, models):
    from warmstart.testing import make_adapter

    d = make_adapter(models / "base", tmp_path / "rs", seed=0, r=4, alpha=8, use_rslora=True,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4})
    info = open_checkpoint(d).lora
    assert info.scaling("model.layers.0.self_attn.q_proj") == pytest.approx(8 / 4 ** 0.5)
    assert info.scaling("model.layers.0.self_attn.v_proj") == pytest.approx(4 / 2 ** 0.5)


def test_training_run_is_expanded_by_discover(models):
    found = discover(models / "run_lora")
    assert [p.name for p in found] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    ck = open_checkpoint(found[1])
    assert ck.metrics.global_step == 20
    assert ck.metrics.loss_history == [(10, 2.0), (20, 1.0)]
    assert ck.metrics.final_loss == 1.0


def test_training_run_root_refused_as_single_checkpoint(models):
    with pytest.raises(CheckpointError, match="training run"):
        open_checkpoint(models / "run_lora")


def test_discover_natural_order_and_skips_tmp(tmp_path, models, copy_of):
    run = tmp_path / "r"
    run.mkdir()
    for step in (100, 20, 3):
        copy_of(models / "lora_a", f"r/checkpoint-{step}")
    copy_of(models / "lora_a", "r/checkpoint-5.tmp-123-abc")
    assert [p.name for p in discover(run)] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]


# -- identity ------------------------------------------------------------------


def test_signature_same_arch_different_weights(models):
    a, b, other = (open_checkpoint(models / n) for n in ("ft_a", "ft_b", "other_arch"))
    assert a.signature_hash() == b.signature_hash()
    assert a.signature_hash() != other.signature_hash()
    assert a.signature()["model.embed_tokens.weight"] == list(a.weights().shape("model.embed_tokens.weight"))


def test_fingerprint_stable_across_sharding_and_sensitive_to_one_value(models, copy_of):
    base, sharded = open_checkpoint(models / "base"), open_checkpoint(models / "base_sharded")
    assert base.fingerprint() == sharded.fingerprint()
    assert base.fingerprint() != open_checkpoint(models / "ft_a").fingerprint()
    d = copy_of(models / "base")
    f = d / "model.safetensors"
    sd = open_checkpoint(d).weights().state_dict()
    sd["model.norm.weight"] = sd["model.norm.weight"].clone()
    sd["model.norm.weight"][3] += 1e-3
    save_file(sd, f, metadata={"format": "pt"})
    assert open_checkpoint(d).fingerprint() != base.fingerprint()


def test_fingerprint_cached_by_path_size_mtime(models, copy_of, tmp_path):
    d = copy_of(models / "ft_a")
    cache = DigestCache(tmp_path / "d.sqlite")
    fp1 = open_checkpoint(d).fingerprint(cache)
    assert cache.hashed_files == 1
    assert open_checkpoint(d).fingerprint(cache) == fp1
    assert cache.hashed_files == 1  # unchanged file: not re-read
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000))
    assert open_checkpoint(d).fingerprint(cache) == fp1
    assert cache.hashed_files == 2  # touched: re-hashed, same content


def test_adapter_fingerprint_includes_scaling(models, copy_of):
    d = copy_of(models / "lora_a")
    fp = open_checkpoint(d).fingerprint()
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 32
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(d).fingerprint() != fp


# -- references ----------------------------------------------------------------


@pytest.mark.parametrize("ref,ok", [("org/name", True), ("HuggingFaceTB/SmolLM2-135M@main", True),
                                    ("a/b/c", False), ("../etc/passwd", False), ("noslash", False)])
def test_hub_id_validation(ref, ok):
    assert is_hub_id(ref) is ok


def test_hub_id_offline_not_cached_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="no local directory some-org/some-model; as a hub id: not in the "
                       "local cache and HF_HUB_OFFLINE is set"):
        resolve("some-org/some-model")


def test_hub_id_from_local_cache(monkeypatch, tmp_path, models):
    """A hub id resolves through huggingface_hub's cache layout, offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(models / "base", snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    ck = open_checkpoint("acme/tiny")
    assert ck.kind == "full" and ck.ref == "acme/tiny"
    assert ck.fingerprint() == open_checkpoint(models / "base").fingerprint()


# -- malformed input: one clear error each ---------------------------------------


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint("/definitely/not/here")


def test_missing_config(models, copy_of):
    d = copy_of(models / "base")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="without config.json"):
        open_checkpoint(d)


def test_config_not_json(models, copy_of):
    d = copy_of(models / "base")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        open_checkpoint(d)


def test_truncated_safetensors(models, copy_of):
    d = copy_of(models / "base")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_checkpoint(d)
    assert "model.safetensors" in str(e.value)


_BAD = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'


@pytest.mark.parametrize("payload,match", [
    (b"\x01\x02", "shorter than"),
    (struct.pack("<Q", 10 ** 12) + b"{}", "header length"),
    (struct.pack("<Q", 5) + b"{oops", "corrupt safetensors header"),
    (struct.pack("<Q", len(_BAD)) + _BAD + b"\0" * 16, "offsets of 'w' do not match its shape"),
])
def test_corrupt_safetensors_headers(tmp_path, payload, match):
    f = tmp_path / "x.safetensors"
    f.write_bytes(payload)
    with pytest.raises(CheckpointError, match=match):
        read_header(f)


def test_adapter_without_base_or_rank(models, copy_of):
    d = copy_of(models / "lora_a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["r"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="adapter_config.json.*'r'"):
        open_checkpoint(d)


def test_adapter_without_base_is_recognised_but_has_no_base(models, copy_of):
    d = copy_of(models / "lora_a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(d).base_model is None


def test_unknown_peft_type(models, copy_of):
    d = copy_of(models / "lora_a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported PEFT type 'IA3'"):
        open_checkpoint(d)


def test_pickle_refused_unless_allowed(models, copy_of):
    d = copy_of(models / "base")
    sd = open_checkpoint(d).weights().state_dict()
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights.*refused") as e:
        open_checkpoint(d)
    assert "--allow-pickle" in str(e.value)
    ck = open_checkpoint(d, allow_pickle=True)
    assert ck.pickle and torch.equal(ck.weights().get("model.norm.weight"), sd["model.norm.weight"])


def test_unknown_layout(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown layout"):
        open_checkpoint(tmp_path / "x")


def test_index_naming_missing_shard(models, copy_of):
    d = copy_of(models / "base_sharded")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}.*missing"):
        open_checkpoint(d)


def test_nan_inf_refused_on_read_unless_allowed(models, copy_of):
    d = copy_of(models / "ft_a")
    sd = open_checkpoint(d).weights().state_dict()
    sd["model.layers.1.mlp.up_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    w = open_checkpoint(d).weights()
    assert torch.equal(w.get("model.norm.weight"), sd["model.norm.weight"])  # clean tensors still read
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' contains 2 NaN/Inf") as e:
        w.get("model.layers.1.mlp.up_proj.weight")
    assert "model.safetensors" in str(e.value) and "--allow-nonfinite" in str(e.value)
    t = open_checkpoint(d, allow_nonfinite=True).weights().get("model.layers.1.mlp.up_proj.weight")
    assert t[0, 0].isnan()
