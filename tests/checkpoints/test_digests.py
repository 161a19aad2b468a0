"""Digests and fingerprints: one formula, whether hashed from the file, from the bytes the merge engine
read, or memoised on an opened checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest

from warmstart.checkpoints import DigestCache, open_checkpoint, read_header
from warmstart.checkpoints import digests as dg
from warmstart.checkpoints.streaming import PreadReader


def _independent_fingerprint(files, kind="full", lora=None) -> str:
    """The fingerprint written out from its definition: blake2b-128 of the kind and the sorted
    name=digest; pairs, a digest being blake2b-128 of dtype, shape and bytes."""
    digests = {}
    for f in files:
        raw = f.read_bytes()
        for name, m in read_header(f)[0].items():
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{m.dtype}{list(m.shape)}".encode() + raw[m.start:m.end])
            digests[name] = h.hexdigest()
    h = hashlib.blake2b(kind.encode(), digest_size=16)
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    if lora is not None:
        lo = dict(lora)
        lo.pop("base_model")
        h.update(json.dumps(lo, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["base", "base_sharded", "lora_b"])
def test_fingerprint_matches_its_definition(models, name):
    ck = open_checkpoint(models / name)
    lora = ck.lora.to_dict() if ck.lora else None
    assert ck.fingerprint() == _independent_fingerprint(ck.weight_files, ck.kind, lora)


def test_sharding_does_not_change_the_fingerprint(models):
    assert open_checkpoint(models / "base").fingerprint() == open_checkpoint(models / "base_sharded").fingerprint()


def test_engine_fingerprint_from_read_bytes_equals_the_library_one(models, tmp_path):
    """The merge engine hashes the bytes it reads (PreadReader digests) and fingerprints from them."""
    from warmstart.merge.engine import _input_info

    ck = open_checkpoint(models / "base_sharded")
    read, reader = {}, PreadReader()
    try:
        for m in ck.weights().meta.values():
            reader.read(m, read)
    finally:
        reader.close()
    want = open_checkpoint(models / "base_sharded").fingerprint(DigestCache(tmp_path / "fresh.sqlite"))
    assert _input_info(ck, read, "model")["fingerprint"] == want
    assert dg.fingerprint_from_digests("full", read) == want


def test_a_merge_records_the_inputs_library_fingerprints(models, tmp_path):
    from warmstart.merge import MergePlan, merge

    merge(MergePlan.from_dict({"models": [str(models / "ft_a"), str(models / "ft_b")], "method": "linear"}),
          tmp_path / "m")
    got = {i["path"]: i["fingerprint"] for i in json.loads((tmp_path / "m" / "warmstart.json").read_text())["inputs"]}
    for name in ("ft_a", "ft_b"):
        ck = open_checkpoint(models / name)
        assert got[str(ck.path)] == _independent_fingerprint(ck.weight_files)


def test_an_opened_checkpoint_hashes_once(models, monkeypatch):
    ck = open_checkpoint(models / "ft_a")
    fp = ck.fingerprint()

    def no_cache():
        raise AssertionError("the memoised fingerprint should not look at the cache again")

    monkeypatch.setattr(dg, "default_digest_cache", no_cache)
    monkeypatch.setattr("warmstart.checkpoints.checkpoint.default_digest_cache", no_cache)
    assert ck.fingerprint() == fp
    assert open_checkpoint(ck) is ck  # passed down, it is not opened again


def test_the_cache_hashes_a_file_once(models, tmp_path):
    cache = DigestCache(tmp_path / "d.sqlite")
    f = open_checkpoint(models / "base").weight_files[0]
    a = cache.tensor_digests(f)
    b = cache.tensor_digests(f)
    assert a == b and cache.hashed_files == 1


def test_signature_hash_is_of_names_and_shapes(models):
    ck = open_checkpoint(models / "base")
    sig = {k: list(m.shape) for k, m in ck.weights().meta.items()}
    want = hashlib.blake2b(json.dumps(sorted(sig.items())).encode(), digest_size=12).hexdigest()
    assert ck.signature_hash() == want == dg.signature_hash(sig)
