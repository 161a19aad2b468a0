"""safetensors headers, parsed and validated without loading any tensor.

The header is parsed here (not only by the Rust reader) so that a truncated or corrupt file is
reported with its name and the problem before any work starts.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import open_regular
from ..errors import CheckpointError
from .dtypes import DTYPE_SIZES

MAX_HEADER = 100 * 1024 * 1024



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


__all__ = ["MAX_HEADER", "TensorMeta", "read_header"]
