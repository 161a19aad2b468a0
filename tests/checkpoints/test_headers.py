"""safetensors headers: offsets checked against the file's own bytes, refused dtypes and damage."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from warmstart.checkpoints import read_header
from warmstart.checkpoints.streaming import PreadReader
from warmstart.errors import CheckpointError, IncompatibleError


def _write(path, tensors):
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_offsets_point_at_the_tensor_bytes(tmp_path):
    ts = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
          "c": torch.tensor([True, False])}
    f = _write(tmp_path / "x.safetensors", ts)
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + hlen])  # the format, read independently
    metas, meta = read_header(f)
    assert meta == {"format": "pt"}
    for name, t in ts.items():
        m = metas[name]
        assert (m.dtype, list(m.shape)) == (hdr[name]["dtype"], list(t.shape))
        assert m.start == 8 + hlen + hdr[name]["data_offsets"][0] and m.nbytes == t.numel() * t.element_size()
        assert raw[m.start:m.end] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert torch.equal(PreadReader().read(m), t)


def test_an_unsigned_16_bit_tensor_is_described_but_not_merged(tmp_path):
    f = _write(tmp_path / "u.safetensors", {"u": torch.zeros(3, dtype=torch.uint16)})
    m = read_header(f)[0]["u"]
    assert (m.dtype, m.nbytes) == ("U16", 6)
    with pytest.raises(IncompatibleError, match="U16"):
        PreadReader().read(m)


def test_a_truncated_file_names_the_file_and_the_tensor(tmp_path):
    f = _write(tmp_path / "t.safetensors", {"w": torch.ones(100)})
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError) as e:
        read_header(f)
    assert str(f) in str(e.value) and "'w'" in str(e.value)


def test_an_unknown_dtype_is_refused_by_name(tmp_path):
    hdr = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    f = tmp_path / "d.safetensors"
    f.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0")
    with pytest.raises(CheckpointError, match="unsupported dtype 'F4'"):
        read_header(f)
