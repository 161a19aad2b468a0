"""Inputs that used to give a silently wrong result (or a hang) are refused in one line: adapters whose
config disagrees with their tensors, with each other or with the base; safetensors headers the reference
reader refuses; an index pointing outside its checkpoint; a named pipe where weights should be."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct

import pytest
from _robustness import assert_user_error

from warmstart.checkpoints import open_checkpoint, read_header
from warmstart.errors import CheckpointError


def _cfg(d, **changes):
    p = d / "adapter_config.json"
    c = json.loads(p.read_text())
    c.update(changes)
    p.write_text(json.dumps(c))
    return d


def _edit_tensors(d, edit, name="adapter_model.safetensors"):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / name)
    sd = edit(sd) or sd
    save_file(sd, d / name, metadata={"format": "pt"})
    return d


@pytest.fixture
def lora(models, tmp_path):
    def make(name="lora", src="lora_a"):
        d = tmp_path / name
        shutil.copytree(models / src, d)
        return d
    return make


def _merge_refused(cli, tmp_path, ins, *needles, extra=()):
    out = tmp_path / "merged"
    r = cli("merge", *ins, *extra, "--out", out)
    assert_user_error(r, *needles, out=out)


# -- adapter_config vs tensors vs other adapters vs base ------------------------------------------


def test_config_rank_that_is_not_the_tensors_rank_is_refused(cli, lora, models, tmp_path):
    """r: 8 on rank-4 tensors would merge at alpha/8 instead of alpha/4 (ΔW half size) and load."""
    d = _cfg(lora(), r=8)
    with pytest.raises(CheckpointError, match="rank 8 .*tensors have rank 4"):
        open_checkpoint(d)
    _merge_refused(cli, tmp_path, [d, models / "lora_b"], "adapter_config.json", "rank 8", "rank 4")
    r = cli("library", "add", d, "--library", tmp_path / "lib.db")
    assert_user_error(r, "adapter_config.json", "rank")


def test_rank_pattern_that_is_not_the_tensors_rank_is_refused(cli, lora, models, tmp_path):
    d = _cfg(lora(), rank_pattern={"q_proj": 2})
    _merge_refused(cli, tmp_path, [d, models / "lora_b"], "rank_pattern", "rank 2", "q_proj")


def test_rank_pattern_that_matches_the_tensors_is_accepted(models, tmp_path):
    from warmstart import testing

    d = testing.make_adapter(models / "base", tmp_path / "rp", seed=1, r=4, rank_pattern={"q_proj": 2})
    ck = open_checkpoint(d)
    assert ck.lora.rank_pattern == {"q_proj": 2}


@pytest.mark.parametrize("field,value,needle", [
    ("rank_pattern", {"q_proj(": 2}, "not a valid regular expression"),
    ("rank_pattern", {"q_proj": "two"}, "positive integer"),
    ("rank_pattern", ["q_proj"], "mapping"),
    ("alpha_pattern", {"q_proj": None}, "number"),
    ("r", "4", "positive integer"),
    ("r", 0, "positive integer"),
    ("lora_alpha", [8], "number"),
    ("base_model_name_or_path", 3, "string"),
    ("target_modules", {"q": 1}, "target_modules"),
])
def test_bad_adapter_config_fields_are_one_line(cli, lora, models, tmp_path, field, value, needle):
    d = _cfg(lora(), **{field: value})
    _merge_refused(cli, tmp_path, [d, models / "lora_b"], "adapter_config.json", field, needle)


def test_lora_a_and_b_disagreeing_on_the_rank_are_refused(cli, lora, models, tmp_path):
    import torch

    def grow_b(sd):
        k = next(k for k in sorted(sd) if k.endswith("lora_B.weight"))
        sd[k] = torch.cat([sd[k], sd[k][:, :1]], dim=1)

    d = _edit_tensors(lora(), grow_b)
    _merge_refused(cli, tmp_path, [d, models / "lora_b"], "adapter_model.safetensors", "disagree on the rank")


def test_lora_a_without_b_is_refused(lora):
    def drop_b(sd):
        del sd[next(k for k in sorted(sd) if k.endswith("lora_B.weight"))]

    with pytest.raises(CheckpointError, match="without its partner"):
        open_checkpoint(_edit_tensors(lora(), drop_b))


def test_adapter_for_modules_the_base_lacks_is_refused_with_base(cli, lora, models, tmp_path):
    def rename(sd):
        return {k.replace("q_proj", "zz_proj"): v for k, v in sd.items()}

    d = _edit_tensors(_cfg(lora(), target_modules=["zz_proj", "v_proj"]), rename)
    _merge_refused(cli, tmp_path, [d, models / "lora_b"], "zz_proj", "does not have",
                   extra=["--base", models / "base"])
    r = cli("merge", d, models / "lora_b", "--out", tmp_path / "nobase")  # nothing to check against: fine
    assert r.code == 0, r.err


def test_adapters_of_different_shapes_are_refused_not_a_traceback(cli, models, tmp_path):
    from warmstart import testing

    d = testing.make_adapter(models / "other_arch", tmp_path / "wide", seed=1)
    _cfg(d, base_model_name_or_path=str((models / "base").resolve()))  # claims the same base
    _merge_refused(cli, tmp_path, [models / "lora_a", d], "q_proj", "[32, 32]", "[48, 48]")


def test_finetune_and_transfer_refuse_an_adapter_the_base_does_not_fit(cli, models, tmp_path):
    """Every path that opens an adapter with a base checks it against the base (merge above)."""
    from warmstart import testing

    wide = testing.make_adapter(models / "other_arch", tmp_path / "wide", seed=1)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "ft"
    r = cli("finetune", "--init", models / "base", "--adapter", wide, "--train", data, "--eval", data,
            "--out", out, "--steps", "1")
    assert_user_error(r, "q_proj", "[48, 48]", "[32, 32]", out=out)
    out = tmp_path / "tr"
    r = cli("transfer", "--base-old", models / "base", "--finetuned", wide, "--base-new", models / "ft_a",
            "--out", out)
    assert_user_error(r, "q_proj", "[48, 48]", "[32, 32]", out=out)


# -- safetensors headers --------------------------------------------------------------------------


def _raw_st(header_json: bytes, data: bytes) -> bytes:
    header_json += b" " * (-len(header_json) % 8)
    return struct.pack("<Q", len(header_json)) + header_json + data


def test_a_tensor_named_twice_is_refused(tmp_path):
    f = tmp_path / "dup.safetensors"
    f.write_bytes(_raw_st(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                          b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8))
    with pytest.raises(CheckpointError, match="'w' is named twice"):
        read_header(f)
    from safetensors import SafetensorError, safe_open  # the reference reader refuses it too

    with pytest.raises(SafetensorError):
        safe_open(str(f), "pt")


@pytest.mark.parametrize("header,data,needle", [
    (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8, "4 trailing bytes"),
    (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "4 bytes before tensor 'w'"),
    (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],'
     b'"data_offsets":[8,12]}}', b"\0" * 12, "before tensor 'v'"),
    (b'{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}', b"\0" * 4, "bad entry"),
    (b'{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4, "bad entry"),
    (b'{"__metadata__":[1]}', b"", "__metadata__"),
    pytest.param(b"[" * 100_000, b"", "corrupt", id="deeply-nested"),
])
def test_uncovered_bytes_and_odd_headers_are_refused(tmp_path, header, data, needle):
    f = tmp_path / "x.safetensors"
    f.write_bytes(_raw_st(header, data))
    with pytest.raises(CheckpointError, match="x.safetensors") as e:
        read_header(f)
    assert needle in str(e.value)


def test_trailing_bytes_in_a_model_are_refused_by_every_command(cli, models, tmp_path):
    d = tmp_path / "tail"
    shutil.copytree(models / "ft_a", d)
    with open(d / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    _merge_refused(cli, tmp_path, [d, models / "ft_b"], "tail/model.safetensors", "16 trailing bytes")


# -- index, named pipes ---------------------------------------------------------------------------


def test_index_pointing_outside_the_checkpoint_is_refused(cli, models, tmp_path):
    d = tmp_path / "ck" / "sharded"
    shutil.copytree(models / "base_sharded", d)
    other = tmp_path / "ck" / "other"
    shutil.copytree(models / "base_sharded", other)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(idx["weight_map"].values()))[0]
    (d / first).unlink()
    idx["weight_map"] = {k: (f"../other/{v}" if v == first else v) for k, v in idx["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="not a file in the checkpoint directory"):
        open_checkpoint(d)
    _merge_refused(cli, tmp_path, [d, models / "base_sharded"], "index.json", "../other/")


@pytest.fixture
def no_hang():
    """A hang becomes a failure instead of a stuck suite."""
    def boom(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_named_pipe_instead_of_a_file_is_refused_not_waited_on(cli, models, tmp_path, no_hang, name):
    d = tmp_path / "fifo"
    shutil.copytree(models / "ft_a", d)
    (d / name).unlink()
    os.mkfifo(d / name)
    r = cli("library", "add", d, "--library", tmp_path / "lib.db")
    assert_user_error(r, f"fifo/{name}", "not a regular file")
    _merge_refused(cli, tmp_path, [d, models / "ft_b"], "not a regular file")
