"""Checkpoint references, recognition, lazy tensor access and fingerprints.

A reference is a local path or a Hugging Face Hub id (``org/name`` or
``org/name@revision``). It resolves to a directory that holds one of

* a full model: ``config.json`` + ``*.safetensors`` (sharded with an index),
* a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``,
* a training run: ``checkpoint-*`` subdirectories and/or ``trainer_state.json``
  (see :func:`discover`, which expands a run into its checkpoints).

Weights are read lazily, one tensor at a time, from memory-mapped safetensors.
The safetensors header is parsed and validated here (not only by the Rust
reader) so that a truncated or corrupt file is reported with its name and the
problem before any work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import sqlite3
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._io import TMP_MARK, open_regular, read_json
from .errors import CheckpointError, IncompatibleError, WarmstartError

Kind = Literal["full", "lora"]

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,200})?$")
PICKLE_NAMES = ("pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
# Bytes per element for every dtype a safetensors header may carry.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER = 100 * 1024 * 1024


# ----------------------------------------------------------------------------
# Resolving a reference to a directory


def is_hub_id(ref: str) -> bool:
    return bool(HUB_ID_RE.match(ref)) and ".." not in ref


def looks_like_path(ref: str) -> bool:
    """A reference the user meant as a local path: ``./x``, ``../x``, ``/x``, ``~/x``, anything that is
    not ``org/name[@rev]``, or ``a/b`` whose first component ``a`` exists here (``runs/typo``)."""
    if ref.startswith((".", "/", "~")) or not is_hub_id(ref):
        return True
    return Path(Path(ref).parts[0]).exists()


def resolve(ref: str | Path, *, allow_pickle: bool = False) -> Path:
    """Turn a path or hub id into a local directory (hub ids via the local HF cache, then the Hub)."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError("not a directory (a checkpoint is a directory with config/adapter files)", path=p)
        if not os.access(p, os.R_OK | os.X_OK):
            raise CheckpointError("directory is not readable", path=p)
        return p.resolve()
    ref = str(ref)
    if looks_like_path(ref):
        raise CheckpointError("no such file or directory", path=ref, hint=_near_miss(Path(ref).expanduser()))
    return _resolve_hub(ref, allow_pickle=allow_pickle)


def _near_miss(p: Path) -> str | None:
    """'did you mean' for a typo in the last component (stdlib difflib: the closest sibling names)."""
    import difflib

    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return None
    try:
        names = [c.name for c in parent.iterdir()]
    except OSError:
        return None
    close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(str(parent / c) for c in close)}?" if close else None


# How long the Hub may take to answer whether a repository exists before we call the network down:
# huggingface_hub's own timeouts and retries add up to ~35 s on a machine without network.
HUB_PROBE_TIMEOUT_S = float(os.environ.get("WARMSTART_HUB_TIMEOUT", "5"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _not_found(ref: str, why: str) -> CheckpointError:
    """Both readings of a reference that is neither a local directory nor an available hub id."""
    return CheckpointError(f"no local directory {ref}; as a hub id: {why}",
                           hint="check the path, or download the model first")


def _resolve_hub(ref: str, *, allow_pickle: bool) -> Path:
    """The local cache first (no network), then a short probe of the Hub, then the download."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = ref.partition("@")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]
    if allow_pickle:
        patterns += ["*.bin"]
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        if _hub_offline():
            raise _not_found(ref, "not in the local cache and HF_HUB_OFFLINE is set") from None
    except (HfHubHTTPError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot resolve hub id ({e})", path=ref) from None
    try:  # one metadata request with a short timeout tells "no network" and "no such repo" apart, fast
        HfApi().model_info(repo_id, revision=revision or None, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise _not_found(ref, "no such repository on the Hub (or it is private)") from None
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 404:
            raise _not_found(ref, "no such repository on the Hub (or it is private)") from None
        raise CheckpointError(f"cannot resolve hub id ({str(e).splitlines()[0]})", path=ref) from None
    except Exception:  # connection refused, DNS failure, timeout: the types vary by transport
        raise _not_found(ref, "not in the local cache and no network") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot download hub id ({type(e).__name__}: {e})", path=ref) from None


# ----------------------------------------------------------------------------
# safetensors headers: parsed and validated without loading any tensor


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # safetensors dtype string, e.g. "F32"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Parse and validate a safetensors header: returns tensor metadata and ``__metadata__``.

    The checks are the reference implementation's (safetensors ``Metadata::validate``): every entry
    well-formed, no name twice, and the tensors tile the data section exactly (no overlap, no gap,
    no trailing bytes), so a file that safetensors itself refuses is refused here too, by name."""
    path = Path(path)
    try:
        with open_regular(path, "safetensors file") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("truncated safetensors file (shorter than its 8-byte header length)", path=path)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(f"corrupt safetensors header (header length {hlen} exceeds the file)", path=path)
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file ({e.strerror})", path=path) from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except _Duplicate as e:
        raise CheckpointError(f"corrupt safetensors header (tensor {e.args[0]!r} is named twice)", path=path) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})", path=path) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("corrupt safetensors header (__metadata__ is not a mapping of strings)", path=path)
    base = 8 + hlen
    data_len = size - base
    tensors = {name: _tensor_meta(name, info, path, base, data_len) for name, info in header.items()}
    _check_tiling(tensors, base, data_len, path)
    return tensors, metadata


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def _tensor_meta(name: str, info: Any, path: Path, base: int, data_len: int) -> TensorMeta:
    try:
        if not isinstance(info["shape"], list) or not isinstance(info["data_offsets"], list):
            raise ValueError
        dtype, shape, (s, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if not isinstance(dtype, str) or not all(type(x) is int and x >= 0 for x in (*shape, s, e)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"corrupt safetensors header (bad entry for tensor {name!r})", path=path) from None
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"unsupported dtype {dtype!r} for tensor {name!r}", path=path)
    numel = 1
    for d in shape:
        numel *= d
    if not (0 <= s <= e) or e - s != numel * DTYPE_SIZES[dtype]:
        raise CheckpointError(f"corrupt safetensors header (offsets of {name!r} do not match its shape)", path=path)
    if e > data_len:
        raise CheckpointError(
            f"truncated safetensors file (tensor {name!r} ends at byte {base + e}, file has {base + data_len})",
            path=path)
    return TensorMeta(name, dtype, shape, path, base + s, base + e)


def _check_tiling(tensors: dict[str, TensorMeta], base: int, data_len: int, path: Path) -> None:
    end = 0
    for m in sorted(tensors.values(), key=lambda m: (m.start, m.end)):
        if m.start - base < end:
            raise CheckpointError("corrupt safetensors header (tensor data overlaps)", path=path)
        if m.start - base > end:
            raise CheckpointError(f"corrupt safetensors header ({m.start - base - end} bytes before tensor "
                                  f"{m.name!r} belong to no tensor)", path=path)
        end = m.end - base
    if end != data_len:
        raise CheckpointError(f"corrupt safetensors header ({data_len - end} trailing bytes belong to no tensor)",
                              path=path)


# ----------------------------------------------------------------------------
# Lazy per-tensor reader over one or more safetensors files


class WeightReader:
    """Names, shapes and dtypes of every tensor; one tensor loaded at a time.

    Files are memory-mapped by safetensors' ``safe_open``; nothing is read until
    :meth:`get` asks for a tensor. Safe to share across threads for reading.
    """

    def __init__(self, files: list[Path], *, allow_nonfinite: bool = False):
        self.files = list(files)
        # NaN/Inf in a donor would silently poison every merged tensor it touches: refuse by default.
        self.allow_nonfinite = allow_nonfinite
        self.meta: dict[str, TensorMeta] = {}
        for f in self.files:
            tensors, _ = read_header(f)
            for name, m in tensors.items():
                if name in self.meta:
                    raise CheckpointError(f"tensor {name!r} appears in two shards ({self.meta[name].file.name})", path=f)
                self.meta[name] = m
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self.meta)

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def __len__(self) -> int:
        return len(self.meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name].shape

    def _handle(self, file: Path):
        from safetensors import safe_open

        with self._lock:
            h = self._handles.get(file)
            if h is None:
                try:
                    h = safe_open(str(file), framework="pt", device="cpu")
                except Exception as e:  # the Rust reader raises its own error type
                    raise CheckpointError(f"cannot open safetensors file ({e})", path=file) from None
                self._handles[file] = h
            return h

    def get(self, name: str, dtype=None):
        """Load one tensor (optionally cast, e.g. to ``torch.float32``)."""
        m = self.meta.get(name)
        if m is None:
            raise KeyError(name)
        t = self._handle(m.file).get_tensor(name)
        if not self.allow_nonfinite:
            _check_finite(t, name, m.file)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def items(self, dtype=None) -> Iterator[tuple[str, Any]]:
        for name in self.meta:
            yield name, self.get(name, dtype)

    def state_dict(self, dtype=None) -> dict[str, Any]:
        return dict(self.items(dtype))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_finite(t, name: str, file: Path) -> None:
    if t.is_floating_point() and t.element_size() == 1:  # FP8: torch has no isfinite kernel for it
        t = t.float()
    if t.is_floating_point() and not bool(t.isfinite().all()):
        bad = int((~t.isfinite()).sum())
        raise CheckpointError(f"tensor {name!r} contains {bad} NaN/Inf value(s)", path=file,
                              hint="fix the checkpoint; merge and transfer accept --allow-nonfinite to use it anyway")


class PickleWeightReader(WeightReader):
    """Reads ``.bin`` (pickle) weights — only ever built after an explicit opt-in."""

    def __init__(self, files: list[Path], *, allow_nonfinite: bool = False):
        import torch

        self.files = list(files)
        self.allow_nonfinite = allow_nonfinite
        self.meta = {}
        self._tensors = {}
        for f in self.files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"cannot load pickle weights ({type(e).__name__})", path=f) from None
            for k, v in sd.items():
                self._tensors[k] = v
                self.meta[k] = TensorMeta(k, str(v.dtype), tuple(v.shape), f, 0, v.numel() * v.element_size())
        self._lock = threading.Lock()
        self._handles = {}

    def get(self, name: str, dtype=None):
        t = self._tensors[name]
        if not self.allow_nonfinite:
            _check_finite(t, name, self.meta[name].file)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


# ----------------------------------------------------------------------------
# Content digests, cached by (path, size, mtime)


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
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{m.dtype}{list(m.shape)}".encode())
            h.update(memoryview(mm)[m.start:m.end])
            out[name] = h.hexdigest()
    return out


_default_cache: DigestCache | None = None


def default_digest_cache() -> DigestCache:
    global _default_cache
    if _default_cache is None or _default_cache.path != cache_dir() / "digests.sqlite":
        _default_cache = DigestCache()
    return _default_cache


# ----------------------------------------------------------------------------
# Training metrics from trainer_state.json


@dataclass
class TrainingMetrics:
    global_step: int | None = None
    final_loss: float | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    epoch: float | None = None

    @classmethod
    def from_trainer_state(cls, path: Path) -> TrainingMetrics:
        state = read_json(path, "trainer_state.json")
        if not isinstance(state, dict):
            raise CheckpointError("trainer_state.json is not a JSON object", path=path)
        try:
            return cls._parse(state)
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            raise CheckpointError(f"a value is not a number ({e})", path=path,
                                  hint="fix or remove trainer_state.json; the weights do not need it") from None

    @classmethod
    def _parse(cls, state: dict) -> TrainingMetrics:
        hist = state.get("log_history") or []
        if not isinstance(hist, list):
            raise TypeError("log_history is not a list")
        losses = [(_int(e.get("step", 0)), float(e["loss"])) for e in hist if isinstance(e, dict) and "loss" in e]
        evals: dict[str, float] = {}
        for e in hist:
            if isinstance(e, dict) and any(k.startswith("eval_") for k in e):
                evals = {k: float(v) for k, v in e.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        step, epoch = state.get("global_step"), state.get("epoch")
        return cls(global_step=None if step is None else _int(step), final_loss=losses[-1][1] if losses else None,
                   loss_history=losses, eval_metrics=evals, epoch=None if epoch is None else float(epoch))


def _int(v: Any) -> int:
    """A step count: an integer, or a float/str that is one (JSON writers differ); bools are not."""
    if isinstance(v, bool) or float(v) != int(float(v)):
        raise ValueError(f"step {v!r} is not an integer")
    return int(float(v))


# ----------------------------------------------------------------------------
# A recognised checkpoint


@dataclass(frozen=True)
class LoraInfo:
    base_model: str | None
    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    peft_type: str

    def scaling(self, module: str | None = None) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring rank/alpha patterns."""
        r, a = self.r, self.alpha
        if module is not None:
            r = _pattern_value(self.rank_pattern, module, r)
            a = _pattern_value(self.alpha_pattern, module, a)
        return a / (r ** 0.5) if self.use_rslora else a / r

    def to_dict(self) -> dict:
        return {"base_model": self.base_model, "r": self.r, "alpha": self.alpha, "use_rslora": self.use_rslora,
                "target_modules": list(self.target_modules), "rank_pattern": self.rank_pattern,
                "alpha_pattern": self.alpha_pattern, "peft_type": self.peft_type}


def _pattern_value(pattern: dict, module: str, default):
    # PEFT matches pattern keys as regex suffixes of the module name (peft.tuners.tuners_utils).
    for key, val in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


@dataclass
class Checkpoint:
    """A checkpoint directory that warmstart recognised.

    ``ref`` is what the user gave (path or hub id), ``path`` the local directory.
    """

    ref: str
    path: Path
    kind: Kind
    weight_files: list[Path]
    config: dict
    lora: LoraInfo | None = None
    metrics: TrainingMetrics | None = None
    pickle: bool = False
    meta: dict = field(default_factory=dict)  # warmstart.json next to the weights, if any
    allow_nonfinite: bool = False
    _reader: WeightReader | None = field(default=None, repr=False)

    # -- weights ---------------------------------------------------------
    def weights(self) -> WeightReader:
        if self._reader is None:
            cls = PickleWeightReader if self.pickle else WeightReader
            self._reader = cls(self.weight_files, allow_nonfinite=self.allow_nonfinite)
        return self._reader

    @property
    def base_model(self) -> str | None:
        if self.lora is not None:
            return self.lora.base_model
        return self.meta.get("base_model") or self.config.get("_name_or_path") or None

    @property
    def task(self) -> str | None:
        return self.meta.get("task")

    # -- identity --------------------------------------------------------
    def signature(self) -> dict[str, list[int]]:
        """Tensor names and shapes: the architecture signature."""
        return {k: list(m.shape) for k, m in sorted(self.weights().meta.items())}

    def signature_hash(self) -> str:
        return signature_hash(self.signature())

    def fingerprint(self, cache: DigestCache | None = None) -> str:
        """Content hash of the weights (and, for adapters, of what sets their scaling).

        Independent of sharding and file names: identical tensors give identical
        fingerprints. Cached per file by (path, size, mtime).
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(self.kind.encode())
        if self.pickle:
            import torch

            for name, t in sorted(self.weights().items()):
                h.update(f"{name}{t.dtype}{list(t.shape)}".encode())
                h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            cache = cache or default_digest_cache()
            digests: dict[str, str] = {}
            for f in self.weight_files:
                digests.update(cache.tensor_digests(f))
            for name in sorted(digests):
                h.update(f"{name}={digests[name]};".encode())
        if self.lora is not None:
            lo = self.lora.to_dict()
            lo.pop("base_model")
            h.update(json.dumps(lo, sort_keys=True).encode())
        return h.hexdigest()

    def describe(self) -> str:
        extra = f" r={self.lora.r}" if self.lora else ""
        return f"{self.kind}{extra} {self.path}"


def signature_hash(sig: dict[str, list[int]]) -> str:
    return hashlib.blake2b(json.dumps(sorted(sig.items())).encode(), digest_size=12).hexdigest()


# ----------------------------------------------------------------------------
# Recognising a directory


def _is_pickle_dir(d: Path) -> list[Path]:
    return [d / n for n in PICKLE_NAMES if (d / n).exists()]


def _full_model_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        idx = read_json(index, "safetensors index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError("safetensors index has no weight_map", path=index)
        for name in set(wm.values()):
            # a shard is a plain file name next to the index: "../other/x.safetensors" or "/abs/x" would
            # read another checkpoint's weights under this one's name
            if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name or "\\" in name:
                raise CheckpointError(f"index names shard {name!r}, which is not a file in the checkpoint "
                                      "directory", path=index)
        files = sorted({d / f for f in wm.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"shard {f.name} named in the index is missing", path=index)
        return files
    return sorted(p for p in d.glob("*.safetensors") if TMP_MARK not in p.name)


def _read_meta(d: Path) -> dict:
    f = d / "warmstart.json"
    if f.exists():
        m = read_json(f, "warmstart.json")
        return m if isinstance(m, dict) else {}
    return {}


def _metrics_for(d: Path) -> TrainingMetrics | None:
    ts = d / "trainer_state.json"
    return TrainingMetrics.from_trainer_state(ts) if ts.exists() else None


def is_checkpoint_dir(d: Path) -> bool:
    return (d / "adapter_config.json").exists() or (d / "config.json").exists() and (
        any(d.glob("*.safetensors")) or (d / "model.safetensors.index.json").exists() or bool(_is_pickle_dir(d)))


def open_checkpoint(ref: str | Path, *, allow_pickle: bool = False, allow_nonfinite: bool = False) -> Checkpoint:
    """Resolve ``ref`` and recognise a full model or a LoRA adapter, or raise with the reason.

    ``allow_nonfinite``: tensors read through :meth:`Checkpoint.weights` are checked for
    NaN/Inf as they are loaded (one pass over data already in memory) unless this is set.
    """
    d = resolve(ref, allow_pickle=allow_pickle)
    ref_s = str(ref) if not Path(ref).expanduser().exists() else str(d)
    if (d / "adapter_config.json").exists():
        ck = _open_adapter(ref_s, d, allow_pickle)
    elif (d / "config.json").exists():
        ck = _open_full(ref_s, d, allow_pickle)
    else:
        _explain_unknown(d)
    ck.allow_nonfinite = allow_nonfinite
    if ck._reader is not None:
        ck._reader.allow_nonfinite = allow_nonfinite
    return ck


def _explain_unknown(d: Path) -> None:
    if (d / "trainer_state.json").exists() or any(d.glob("checkpoint-*")):
        raise CheckpointError("this is a training run, not a single checkpoint",
                              path=d, hint="use `warmstart library scan` to register each checkpoint-*")
    if any(d.glob("*.safetensors")):
        raise CheckpointError("safetensors weights without config.json or adapter_config.json", path=d)
    if any(is_checkpoint_dir(c) for c in d.iterdir() if c.is_dir()):
        raise CheckpointError("this directory holds checkpoints in subdirectories, it is not one itself",
                              path=d, hint="use `warmstart library scan` to register them all")
    raise CheckpointError("unknown layout: expected config.json + *.safetensors (full model) "
                          "or adapter_config.json + adapter_model.safetensors (LoRA)", path=d)


def _pickle_or_fail(d: Path, allow_pickle: bool, what: str) -> list[Path]:
    pk = _is_pickle_dir(d)
    if not pk:
        raise CheckpointError(f"{what}: no weights found (*.safetensors)", path=d)
    if not allow_pickle:
        raise CheckpointError(f"pickle weights ({pk[0].name}) refused: loading them can run arbitrary code",
                              path=d, hint="convert it to safetensors; `library add`/`scan` accept --allow-pickle for files you trust")
    return [p for p in pk if p.suffix == ".bin"]


def _open_full(ref: str, d: Path, allow_pickle: bool) -> Checkpoint:
    config = read_json(d / "config.json", "config.json")
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", path=d / "config.json")
    files = _full_model_files(d)
    pickle = False
    if not files:
        files, pickle = _pickle_or_fail(d, allow_pickle, "full model"), True
    ck = Checkpoint(ref, d, "full", files, config, metrics=_metrics_for(d), pickle=pickle, meta=_read_meta(d))
    ck.weights()  # validate headers now: errors name the file before any work starts
    _check_config_matches(ck)
    return ck


_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _check_config_matches(ck: Checkpoint) -> None:
    """A config.json that disagrees with the weights would be copied into every output and only fail
    at load time; compare the two fields every causal LM has (header metadata only, no tensor read)."""
    cfg, meta = ck.config, ck.weights().meta
    layers = {int(m.group(1)) for k in meta if (m := _LAYER_RE.search(k))}
    n = cfg.get("num_hidden_layers")
    if layers and isinstance(n, int) and n > max(layers) + 1:  # more is fine: e.g. DeepSeek's extra MTP layer
        raise CheckpointError(f"config.json says num_hidden_layers={n}, the weights have {max(layers) + 1} layers",
                              path=ck.path / "config.json")
    emb = next((m for k, m in meta.items() if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    v = cfg.get("vocab_size")
    if emb is not None and isinstance(v, int) and len(emb.shape) == 2 and emb.shape[0] != v:
        raise CheckpointError(f"config.json says vocab_size={v}, {emb.name} has {emb.shape[0]} rows",
                              path=ck.path / "config.json")


def _open_adapter(ref: str, d: Path, allow_pickle: bool) -> Checkpoint:
    cfg_path = d / "adapter_config.json"
    cfg = read_json(cfg_path, "adapter_config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError("adapter_config.json is not a JSON object", path=cfg_path)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"unsupported PEFT type {peft_type!r} (only LoRA adapters are supported)", path=cfg_path)
    info = _lora_info(cfg, cfg_path, peft_type)
    f = d / "adapter_model.safetensors"
    pickle = False
    if f.exists():
        files = [f]
    else:
        files, pickle = _pickle_or_fail(d, allow_pickle, "LoRA adapter"), True
    ck = Checkpoint(ref, d, "lora", files, cfg, lora=info, metrics=_metrics_for(d), pickle=pickle, meta=_read_meta(d))
    lora_modules(ck)  # A/B shapes against each other and against r / rank_pattern, from the header only
    return ck


def _lora_info(cfg: dict, cfg_path: Path, peft_type: str) -> LoraInfo:
    """The fields that set an adapter's scaling, each type-checked: a wrong one would merge at the
    wrong scale (or raise deep inside a merge) instead of being refused here."""
    def bad(field_: str, why: str):
        return CheckpointError(f"field {field_!r} {why}", path=cfg_path)

    r = cfg.get("r")
    if type(r) is not int or r <= 0:
        raise bad("r", f"must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if type(alpha) not in (int, float) or not (alpha == alpha) or abs(alpha) == float("inf"):
        raise bad("lora_alpha", f"must be a number, got {alpha!r}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", f"must be a string or null, got {base!r}")
    targets = cfg.get("target_modules") or []
    if not isinstance(targets, (list, str)) or (isinstance(targets, list) and
                                                not all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", f"must be a list of names or a regex string, got {targets!r}")
    patterns = {}
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise bad(key, f"must be a mapping of module regex to value, got {type(pat).__name__}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise bad(key, f"key {k!r} is not a valid regular expression ({e})") from None
            ok = type(v) is int and v > 0 if kind is int else type(v) in (int, float) and v == v
            if not ok:
                raise bad(key, f"value for {k!r} must be a {'positive integer' if kind is int else 'number'}, "
                               f"got {v!r}")
        patterns[key] = dict(pat)
    return LoraInfo(base_model=base or None, r=r, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
                    target_modules=tuple(sorted(targets)) if isinstance(targets, list) else (targets,),
                    rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
                    peft_type=peft_type)


_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name in the base model, rank, and the base weight shape it needs."""

    name: str
    rank: int
    in_features: int
    out_features: int
    embedding: bool


def lora_modules(ck: Checkpoint) -> dict[str, LoraModule]:
    """Every LoRA pair of an adapter, checked from the header (no tensor is read): A is [r, in] and B
    [out, r] with the same r, and that r is what adapter_config.json says for the module (``r`` or its
    ``rank_pattern`` entry). PEFT refuses an adapter that breaks any of these; merged, it would be
    scaled by the wrong alpha/r without a word."""
    cfg_path = ck.path / "adapter_config.json"
    pairs: dict[str, dict[str, TensorMeta]] = {}
    for key, m in ck.weights().meta.items():
        if (mt := _LORA_KEY.match(key)):
            pairs.setdefault(mt["mod"], {})[mt["ab"]] = m
    out = {}
    for mod, ab in sorted(pairs.items()):
        name = mod[len(_PEFT_PREFIX):] if mod.startswith(_PEFT_PREFIX) else mod
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"module {name!r} has lora_{next(iter(ab))} without its partner", path=ck.path)
        A, B = ab["A"], ab["B"]
        if len(A.shape) != 2 or len(B.shape) != 2:
            raise CheckpointError(f"module {name!r}: LoRA factors must be matrices, got A {list(A.shape)} and B "
                                  f"{list(B.shape)}", path=A.file)
        if A.shape[0] != B.shape[1]:
            raise CheckpointError(f"module {name!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} disagree on "
                                  "the rank", path=A.file)
        want = _pattern_value(ck.lora.rank_pattern, name, ck.lora.r)
        if A.shape[0] != want:
            src = "its rank_pattern entry" if want != ck.lora.r else "r"
            raise CheckpointError(f"{src} says rank {want} for module {name!r}, its tensors have rank {A.shape[0]}",
                                  path=cfg_path, hint="the adapter would be scaled by the wrong alpha/r; fix r "
                                  "or rank_pattern in adapter_config.json")
        emb = "lora_embedding_A" in A.name
        out[name] = LoraModule(name, A.shape[0], A.shape[1], B.shape[0], emb)
    return out


def check_adapter_fits(adapter: Checkpoint, base: Checkpoint) -> None:
    """Refuse an adapter whose modules the base lacks, or whose factor shapes do not fit the base's
    weights: merged, it would give an adapter PEFT cannot attach (or a wrong ΔW shape)."""
    meta = base.weights().meta
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    for name, m in lora_modules(adapter).items():
        w = meta.get(f"{name}.weight")
        if w is None:
            raise IncompatibleError(f"adapter has LoRA factors for module {name!r}, which the base {base.path} "
                                    "does not have", path=adapter.path, hint="it was trained on another "
                                    "architecture or base")
        shapes = [(m.out_features, m.in_features)]
        if fan_in_fan_out or m.embedding:  # Conv1D / embedding weights are stored [in, out]
            shapes.append((m.in_features, m.out_features))
        if tuple(w.shape) not in shapes:
            raise IncompatibleError(f"module {name!r}: the adapter's factors make a {list(shapes[0])} update, the "
                                    f"base weight is {list(w.shape)}", path=adapter.path,
                                    hint=f"it was trained on another base than {base.path}")


def check_adapters_agree(adapters: list[Checkpoint]) -> None:
    """Adapters merged together must make updates of the same shape for every module they share."""
    seen: dict[str, tuple[tuple[int, int], Path]] = {}
    for ck in adapters:
        for name, m in lora_modules(ck).items():
            shape = (m.out_features, m.in_features)
            if name in seen and seen[name][0] != shape:
                raise IncompatibleError(f"module {name!r} is {list(seen[name][0])} in {seen[name][1]} but "
                                        f"{list(shape)} here", path=ck.path,
                                        hint="adapters of different architectures cannot be merged")
            seen.setdefault(name, (shape, ck.path))


# ----------------------------------------------------------------------------
# Loading through transformers: the one place a bare or damaged checkpoint meets it

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@contextlib.contextmanager
def _loading(path: str | Path, what: str, hint: str):
    """transformers and tokenizers raise ValueError, OSError, KeyError, JSONDecodeError, their own
    exception types... for what is, to the user, one problem: this directory cannot be loaded. Every
    one becomes a single CheckpointError naming the directory (bugs in warmstart are not in here)."""
    try:
        yield
    except (WarmstartError, MemoryError):
        raise
    except Exception as e:
        text = str(e).strip()
        msg = text.splitlines()[0][:300] if text else ""
        raise CheckpointError(f"cannot load the {what} ({type(e).__name__}{': ' + msg if msg else ''})",
                              path=path, hint=hint) from None


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)``; a missing, corrupt or unknown tokenizer is one line."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError("no tokenizer files (tokenizer.json, tokenizer_config.json, ...)", path=p,
                              hint="copy the tokenizer files of the model it was trained from into it")
    with _loading(p, "tokenizer", "copy the tokenizer files of the model it was trained from into it"):
        return AutoTokenizer.from_pretrained(p)


def load_causal_lm(path: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``; an unknown ``model_type``, a config
    transformers cannot read or weights that do not fit it are one line naming the directory."""
    from transformers import AutoModelForCausalLM

    with _loading(path, "model", "check model_type and architectures in config.json against the installed "
                                 "transformers version"):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# ----------------------------------------------------------------------------
# Discovering every checkpoint under a tree (training runs included)


def discover(root: str | Path) -> list[Path]:
    """Every checkpoint directory under ``root``: models, adapters, each ``checkpoint-*`` of a run.

    Temporary ``*.tmp-*`` directories (half-written outputs) and hidden
    directories are skipped. Returned in a stable order.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise CheckpointError("no such file or directory", path=root)
    if not root.is_dir():
        raise CheckpointError("not a directory", path=root)
    found = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and TMP_MARK not in n
                             and n not in ("__pycache__", "runs", "logs"))
        d = Path(dirpath)
        if is_checkpoint_dir(d):
            found.append(d.resolve())
    return sorted(found, key=lambda p: _natural_key(str(p)))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


__all__ = [
    "Checkpoint",
    "DigestCache",
    "LoraInfo",
    "TensorMeta",
    "TrainingMetrics",
    "WeightReader",
    "check_adapter_fits",
    "check_adapters_agree",
    "load_causal_lm",
    "load_tokenizer",
    "lora_modules",
    "discover",
    "is_hub_id",
    "looks_like_path",
    "open_checkpoint",
    "read_header",
    "resolve",
    "signature_hash",
]
