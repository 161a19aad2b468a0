"""Content digests and fingerprints: what makes two checkpoints the same checkpoint.

A tensor's digest is blake2b-128 over its dtype, shape and bytes; a checkpoint's fingerprint hashes
its kind and the sorted (name, digest) pairs (plus, for adapters, what sets their scaling), so it is
independent of sharding and file names. Per-file digests are cached by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sqlite3
import threading
from pathlib import Path

from .headers import TensorMeta, read_header


def tensor_digest(m: TensorMeta, data) -> str:
    """The digest of one tensor from its header entry and its bytes (any buffer)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{m.dtype}{list(m.shape)}".encode())
    h.update(data)
    return h.hexdigest()


def fingerprint_from_digests(kind: str, digests: dict[str, str], lora: dict | None = None) -> str:
    """A checkpoint's fingerprint from the digests of all its tensors (``lora``: LoraInfo.to_dict())."""
    h = hashlib.blake2b(digest_size=16)
    h.update(kind.encode())
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    if lora is not None:
        _update_lora(h, lora)
    return h.hexdigest()


def fingerprint_pickle(kind: str, tensors, lora: dict | None = None) -> str:
    """The fingerprint of pickle weights, hashed from the loaded tensors ((name, tensor) pairs)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(kind.encode())
    for name, t in sorted(tensors):
        h.update(f"{name}{t.dtype}{list(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if lora is not None:
        _update_lora(h, lora)
    return h.hexdigest()


def _update_lora(h, lora: dict) -> None:
    lo = dict(lora)
    lo.pop("base_model")  # the same adapter file recorded against another path of its base is the same
    h.update(json.dumps(lo, sort_keys=True).encode())


def signature_hash(sig: dict[str, list[int]]) -> str:
    """The architecture signature (tensor names and shapes) as a short hash."""
    return hashlib.blake2b(json.dumps(sorted(sig.items())).encode(), digest_size=12).hexdigest()



def cache_dir() -> Path:
    d = Path(os.environ.get("WARMSTART_CACHE_DIR") or Path.home() / ".cache" / "warmstart")
    d.mkdir(parents=True, exist_ok=True)
    return d


class DigestCache:
    """Per-tensor content digests of safetensors files, keyed by path, size and mtime.

    Recomputing a fingerprint of an unchanged file costs one ``stat`` and one
    indexed lookup; a changed size or mtime invalidates the entry.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "digests.sqlite"
        self._local = threading.local()
        self.hashed_files = 0  # how many files were actually read (tests count this)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                      "mtime_ns INTEGER, tensors TEXT)")
            self._local.conn = c
        return c

    def peek(self, file: Path) -> dict[str, str] | None:
        """The cached digests of ``file`` if they are current (same size and mtime); never hashes."""
        file = Path(file).resolve()
        st = file.stat()
        try:
            row = self._conn().execute("SELECT size, mtime_ns, tensors FROM digests WHERE path=?",
                                       (str(file),)).fetchone()
        except sqlite3.DatabaseError:
            return None  # a broken cache is only a cache: recompute
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return json.loads(row[2])
        return None

    def put(self, file: Path, digests: dict[str, str], stat: os.stat_result | None = None) -> None:
        """Record digests computed elsewhere (the merge engine hashes while it reads). ``stat``: the
        file's stat from *before* hashing, so a file changed meanwhile is not recorded as current."""
        file = Path(file).resolve()
        st = stat or file.stat()
        try:
            self._conn().execute("INSERT OR REPLACE INTO digests VALUES (?,?,?,?)",
                                 (str(file), st.st_size, st.st_mtime_ns, json.dumps(digests)))
        except sqlite3.DatabaseError:
            pass

    def tensor_digests(self, file: Path) -> dict[str, str]:
        st = Path(file).stat()
        cached = self.peek(file)
        if cached is not None:
            return cached
        digests = _hash_tensors(Path(file).resolve())
        self.hashed_files += 1
        self.put(file, digests, st)
        return digests


def _hash_tensors(file: Path) -> dict[str, str]:
    tensors, _ = read_header(file)
    out = {}
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name, m in tensors.items():
            out[name] = tensor_digest(m, memoryview(mm)[m.start:m.end])
    return out


_default_cache: DigestCache | None = None


def default_digest_cache() -> DigestCache:
    global _default_cache
    if _default_cache is None or _default_cache.path != cache_dir() / "digests.sqlite":
        _default_cache = DigestCache()
    return _default_cache


__all__ = ["DigestCache", "cache_dir", "default_digest_cache", "fingerprint_from_digests", "fingerprint_pickle",
           "signature_hash", "tensor_digest"]
