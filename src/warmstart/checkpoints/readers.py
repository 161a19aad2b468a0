"""Lazy per-tensor readers over one or more weight files (safetensors, or pickle after an opt-in)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .headers import TensorMeta, read_header



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
                    raise CheckpointError(f"tensor {name!r} appears in two shards ({self.meta[name].file.name})",
                                          path=f)
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
            check_finite(t, name, m.file)
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


def check_finite(t, name: str, file: Path) -> None:
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
            check_finite(t, name, self.meta[name].file)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


__all__ = ["PickleWeightReader", "WeightReader", "check_finite"]
