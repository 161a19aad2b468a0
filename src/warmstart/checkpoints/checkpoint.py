"""A recognised checkpoint: opening a reference, recognising its layout, discovering a tree.

A reference resolves (:mod:`.refs`) to a directory that holds one of

* a full model: ``config.json`` + ``*.safetensors`` (sharded with an index),
* a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``,
* a training run: ``checkpoint-*`` subdirectories and/or ``trainer_state.json``
  (see :func:`discover`, which expands a run into its checkpoints).

Weights are read lazily, one tensor at a time (:mod:`.readers`); headers are validated when the
checkpoint is opened (:mod:`.headers`), so errors name the file before any work starts. An opened
:class:`Checkpoint` is meant to be passed down: its reader and its fingerprint are computed once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._io import TMP_MARK, read_json
from ..errors import CheckpointError
from .adapters import LoraInfo, _lora_info, lora_modules
from .digests import DigestCache, default_digest_cache, fingerprint_from_digests, fingerprint_pickle, signature_hash
from .readers import PickleWeightReader, WeightReader
from .refs import resolve

Kind = Literal["full", "lora"]

PICKLE_NAMES = ("pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


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
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

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

    def fingerprint(self, cache: DigestCache | None = None, *, digests: dict[str, str] | None = None) -> str:
        """Content hash of the weights (and, for adapters, of what sets their scaling).

        Independent of sharding and file names: identical tensors give identical
        fingerprints. Cached per file by (path, size, mtime), and on this object: an opened
        checkpoint passed down is hashed (or looked up) once. ``digests``: every tensor's digest,
        already computed from the bytes read (the merge engine hashes while it merges).
        """
        if self._fingerprint is not None and cache is None:
            return self._fingerprint
        lora = self.lora.to_dict() if self.lora is not None else None
        if self.pickle:
            fp = fingerprint_pickle(self.kind, self.weights().items(), lora)
        elif digests is not None:
            fp = fingerprint_from_digests(self.kind, {n: digests[n] for n in self.weights().meta}, lora)
        else:
            cache = cache or default_digest_cache()
            found: dict[str, str] = {}
            for f in self.weight_files:
                found.update(cache.tensor_digests(f))
            fp = fingerprint_from_digests(self.kind, found, lora)
        self._fingerprint = fp
        return fp

    def describe(self) -> str:
        extra = f" r={self.lora.r}" if self.lora else ""
        return f"{self.kind}{extra} {self.path}"


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
    An already opened :class:`Checkpoint` is returned as it is (with the flags it was opened with),
    so a function may take either a reference or the checkpoint its caller opened.
    """
    if isinstance(ref, Checkpoint):
        return ref
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
                              path=d, hint="convert it to safetensors; `library add`/`scan` accept --allow-pickle "
                              "for files you trust")
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


__all__ = ["Checkpoint", "Kind", "TrainingMetrics", "discover", "is_checkpoint_dir", "open_checkpoint"]
