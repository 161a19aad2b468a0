"""Streaming safetensors I/O shared by the merge engine and transfer.

Why hand-written I/O (instead of ``safe_open`` + ``save_file``):

* **Reading** uses ``os.preadv`` at the offsets from the (validated) safetensors
  header, straight into a fresh tensor buffer. ``safe_open`` memory-maps the
  files, and every page touched stays in the process's RSS until the file is
  closed, so merging three 1 GB models would show ~3 GB resident. With pread,
  resident memory is what the merge holds: about 2·(inputs + 1) + 2 tensors
  (the current tensor of every input, the prefetched next one, the result and
  one in the write queue), whatever the model size.
* **Writing** streams each shard: the header is computed up front (every output
  name, shape and dtype is known before any math), then tensor bytes are
  appended in header order. ``safetensors.torch.save_file`` needs a whole
  shard in memory at once. The files are standard safetensors (checked by the
  tests with ``safe_open`` and ``from_pretrained``).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..errors import IncompatibleError
from .digests import tensor_digest
from .dtypes import st_to_torch, torch_to_st
from .headers import TensorMeta

ST_DTYPES = st_to_torch()  # from the one dtype table (.dtypes)
TORCH_TO_ST = torch_to_st()


# ----------------------------------------------------------------------------
# Reading: pread into a fresh buffer (see module docstring), digests on the fly


class PreadReader:
    """Reads tensors with ``os.preadv`` at their header offsets into fresh buffers; one fd per file."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, m: TensorMeta, digests: dict | None = None, buf: torch.Tensor | None = None) -> torch.Tensor:
        buf = torch.empty(m.nbytes, dtype=torch.uint8) if buf is None else buf
        view, fd, done = memoryview(buf.numpy()), self._fd(m.file), 0
        while done < m.nbytes:
            n = os.preadv(fd, [view[done:]], m.start + done)
            if n <= 0:
                raise IncompatibleError(f"file ended while reading tensor {m.name!r}", path=m.file)
            done += n
        if digests is not None:  # the DigestCache's digest, so fingerprints match the library's
            digests[m.name] = tensor_digest(m, view)
        if m.dtype not in ST_DTYPES:
            raise IncompatibleError(f"tensor {m.name!r} has dtype {m.dtype}, which cannot be merged", path=m.file)
        t = buf.view(ST_DTYPES[m.dtype]).reshape(m.shape)
        # FP8 has almost no CPU kernels (no sum, no isfinite): hand it on as float32, exactly (every FP8
        # value is a float32); the output keeps the input's dtype unless the plan sets another
        return t.float() if m.dtype.startswith("F8_") else t

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ----------------------------------------------------------------------------
# Writing: streamed safetensors shards


def shard_layout(entries: list[tuple[str, torch.dtype, tuple]], shard_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for name, dt, shape in entries:
        nb = numel(shape) * dt.itemsize
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dt, shape, nb))
        size += nb
    if cur or not shards:
        shards.append(cur)
    return shards


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardWriter:
    """Appends tensors in layout order from a background thread; headers written up front."""

    def __init__(self, out: Path, shards: list[list]):
        self.out, self.shards = out, shards
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                          for i in range(n)]
        self.order = [(si, e[0]) for si, sh in enumerate(shards) for e in sh]
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _header(self, shard) -> bytes:
        hdr, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dt, shape, nb in shard:
            hdr[name] = {"dtype": TORCH_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(hdr, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        return len(raw).to_bytes(8, "little") + raw

    def _run(self):
        f, cur = None, -1
        try:
            for si, _name in self.order:
                t = self.q.get()
                if t is None:
                    return
                if si != cur:
                    if f:
                        f.close()
                    cur, f = si, open(self.out / self.names[si], "wb")
                    f.write(self._header(self.shards[si]))
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            if f is None:  # a model with no tensors still gets a valid empty file
                (self.out / self.names[0]).write_bytes(self._header([]))
        except BaseException as e:  # surfaced in put()/close()
            self.error = e
            while self.q.get() is not None:
                pass
        finally:
            if f:
                f.close()

    def put(self, t: torch.Tensor):
        if self.error:
            raise self.error
        self.q.put(t)

    def close(self) -> dict:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        if len(self.names) > 1:
            wm = {e[0]: self.names[si] for si, sh in enumerate(self.shards) for e in sh}
            total = sum(e[3] for sh in self.shards for e in sh)
            atomic_write_json(self.out / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": wm})
        return {"files": self.names}


__all__ = ["ST_DTYPES", "TORCH_TO_ST", "PreadReader", "ShardWriter", "numel", "shard_layout"]
