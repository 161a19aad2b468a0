"""Fine-tuning transfer across base-model versions.

    target = base_new + α · (finetuned_old − base_old)

after Lin et al., "Efficient Model Development through Fine-tuning Transfer"
(https://arxiv.org/abs/2503.20110). The diff vector of a fine-tune of an old
base is added to a newer base of the same architecture family; the paper finds
it works when the two bases are linearly connected (close in weight space).

Design:

* **Streamed.** Output tensors are produced one at a time from lazily read
  (memory-mapped) inputs, so the three models are never in memory together;
  several α values share that one pass over the inputs.
* **Wide arithmetic.** Differences are taken in fp32 (or fp64); the output
  dtype is the new base's unless the user asks for another.
* **LoRA fine-tunes.** A PEFT adapter's ΔW = s · B @ A (per-module scaling,
  rsLoRA and rank/alpha patterns via :meth:`LoraInfo.scaling`) *is* the diff;
  the old full fine-tuned model is never materialised.
* **Nothing skipped silently.** Every tensor gets an action and a reason in
  the report: vocabulary rows matched by token string, tensors on one side
  only, shape mismatches. The report also carries the compatibility numbers
  (per-layer cosine of the base drift with the diff, relative norms) and
  warnings when the bases look far apart.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_dir, atomic_write_json, check_output
from .checkpoints import Checkpoint, check_adapter_fits, open_checkpoint
from .checkpoints import check_finite as _check_finite
from .checkpoints.dtypes import FLOAT_DTYPES, st_to_torch, torch_float
from .checkpoints.streaming import PreadReader, ShardWriter, shard_layout
from .errors import CheckpointError, ConfigError, IncompatibleError
from .provenance import front_matter, parse_size, versions, write_artefact

# A relative drift ||base_new − base_old|| / ||base_old|| above this, or a cosine
# between the two bases below FAR_COSINE, means the bases are probably not
# linearly connected and transfer may not help (Lin et al., §5).
FAR_DRIFT = 0.5
FAR_COSINE = 0.8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# Config fields that fix the tensor shapes: a config taken from the fine-tune must agree on them.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings", "head_dim", "model_type")


# ----------------------------------------------------------------------------
# Report types


@dataclass
class TransferTensorReport:
    """What happened to one tensor of the output (or of an input that has no place in it).
    (Not the merge engine's ``TensorReport``: a transfer reports drift and diff statistics.)"""

    name: str
    action: str  # transfer | transfer-vocab | keep-new | dropped
    reason: str
    shape_new: list[int] | None = None
    shape_old: list[int] | None = None
    cos_drift_diff: float | None = None  # cos(base_new − base_old, finetuned − base_old)
    rel_diff: float | None = None  # ||diff|| / ||base_old||
    rel_drift: float | None = None  # ||base_new − base_old|| / ||base_old||
    rows: dict[str, int] | None = None  # vocabulary row accounting


@dataclass
class LayerStats:
    layer: str
    cos_drift_diff: float | None
    rel_diff: float | None
    rel_drift: float | None
    n_tensors: int


@dataclass
class TransferReport:
    base_old: str
    finetuned: str
    finetuned_kind: str
    base_new: str
    alphas: list[float]
    tensors: list[TransferTensorReport] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for t in self.tensors:
            c[t.action] = c.get(t.action, 0) + 1
        return c

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        return d


# ----------------------------------------------------------------------------
# Inputs: the fine-tune's diff, from a full model or a LoRA adapter


class _Finetuned:
    """Gives the fine-tune's full tensor or its diff from the old base, for one name."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.reader = ck.weights()
        self.lora_modules: dict[str, dict[str, str]] = {}
        self.read = None  # set by the pass to its pread-based reader
        if ck.kind == "lora":
            self._index_lora()

    def _index_lora(self) -> None:
        # PEFT saves `base_model.model.<module>.lora_A.weight`; the base tensor is `<module>.weight`
        # (embeddings: `lora_embedding_A`/`_B`, no `.weight`). Anything else is refused, not skipped.
        if self.ck.config.get("use_dora"):
            raise IncompatibleError("DoRA adapters are not supported by transfer (magnitude vectors)",
                                    path=self.ck.path, hint="merge the adapter into its base first")
        pat = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?:\.weight)?$")
        for key in self.reader.keys():
            m = pat.match(key)
            if m:
                self.lora_modules.setdefault(m.group(1) + ".weight", {})[m.group(2)] = key
            elif key.startswith("base_model.model."):
                # modules_to_save: a full replacement tensor for this module.
                self.lora_modules.setdefault(key[len("base_model.model."):], {})["full"] = key
            else:
                raise IncompatibleError(f"unrecognised adapter tensor {key!r}", path=self.ck.path)
        for name, parts in self.lora_modules.items():
            if "full" not in parts and len(parts) != 2:
                raise IncompatibleError(f"adapter has only {sorted(parts)} for {name!r}", path=self.ck.path)

    def _get(self, key: str, dtype):
        return self.read(key, dtype) if self.read is not None else self.reader.get(key, dtype)

    @property
    def is_lora(self) -> bool:
        return self.ck.kind == "lora"

    def names(self) -> list[str]:
        return list(self.lora_modules) if self.is_lora else self.reader.keys()

    def shape(self, name: str, old_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if not self.is_lora:
            return tuple(self.reader.meta[name].shape) if name in self.reader else None
        parts = self.lora_modules.get(name)
        if parts is None:
            return old_shape  # untouched by the adapter: the fine-tune equals the old base here
        if "full" in parts:
            return tuple(self.reader.meta[parts["full"]].shape)
        if "lora_A" in parts:
            return (self.reader.meta[parts["lora_B"]].shape[0], self.reader.meta[parts["lora_A"]].shape[1])
        a, b = self.reader.meta[parts["lora_embedding_A"]].shape, self.reader.meta[parts["lora_embedding_B"]].shape
        return (a[1], b[0])

    def touches(self, name: str) -> bool:
        return (name in self.lora_modules) if self.is_lora else (name in self.reader)

    def delta(self, name: str, dtype) -> Any:
        """ΔW = s · B @ A for an adapter module (PEFT's get_delta_weight, computed in ``dtype``)."""
        parts = self.lora_modules[name]
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        s = self.ck.lora.scaling(module)
        if "lora_A" in parts:
            d = self._get(parts["lora_B"], dtype) @ self._get(parts["lora_A"], dtype)
            if self.ck.config.get("fan_in_fan_out"):
                d = d.T
            return d * s
        # Embedding: PEFT computes transpose(B @ A) (peft.tuners.lora.layer.Embedding.get_delta_weight).
        d = self._get(parts["lora_embedding_B"], dtype) @ self._get(parts["lora_embedding_A"], dtype)
        return d.T * s

    def full(self, name: str, old: Any, dtype) -> Any:
        """The fine-tuned tensor (for an adapter: old + ΔW, or its modules_to_save copy)."""
        if not self.is_lora:
            return self._get(name, dtype)
        parts = self.lora_modules.get(name)
        if parts is None:
            return old
        if "full" in parts:
            return self._get(parts["full"], dtype)
        return old + self.delta(name, dtype)


# ----------------------------------------------------------------------------
# Vocabulary: rows matched by token string


def _vocab(path: Path) -> dict[str, int] | None:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception as e:  # tokenizers fail in many ways; all mean "cannot read it"
        raise IncompatibleError(f"cannot load the tokenizer ({type(e).__name__}: {e})", path=path) from None


@dataclass
class _VocabMap:
    """For each row of the new base: the row of the old base and of the fine-tune with the same token."""

    old_rows: list[int | None]
    ft_rows: list[int | None]
    identity: bool


def _vocab_map(v_old, v_ft, v_new, n_new: int, n_old: int, n_ft: int) -> _VocabMap:
    if v_old is None or v_new is None:
        if n_new == n_old == n_ft and (v_old == v_new == v_ft):
            return _VocabMap(list(range(n_new)), list(range(n_new)), True)
        raise IncompatibleError("vocabulary sizes differ and a tokenizer is missing, so rows cannot be matched",
                                hint="put the tokenizer files next to both base models")
    v_ft = v_ft if v_ft is not None else v_old
    if v_old == v_new == v_ft and n_new == n_old == n_ft:
        return _VocabMap(list(range(n_new)), list(range(n_new)), True)
    by_id = {i: s for s, i in v_new.items()}
    old_rows: list[int | None] = [None] * n_new
    ft_rows: list[int | None] = [None] * n_new
    for j in range(n_new):
        s = by_id.get(j)
        if s is None:
            continue  # padding row beyond the tokenizer: no token says what it means
        oi, fi = v_old.get(s), v_ft.get(s)
        old_rows[j] = oi if oi is not None and oi < n_old else None
        ft_rows[j] = fi if fi is not None and fi < n_ft else None
    return _VocabMap(old_rows, ft_rows, False)


# ----------------------------------------------------------------------------
# Output: sharded safetensors with an index, written as tensors arrive


def _open_writers(dirs: list[Path], report: TransferReport, new: Checkpoint, out_dtype, max_bytes: int) -> list:
    """One streamed shard writer per output: headers fixed up front from the plan, bytes appended in order.

    The merge engine's writer (and reader, below) are reused rather than duplicated: with
    ``save_file`` a whole shard would sit in memory, and with ``safe_open``'s memory maps
    every page read stays resident — three models' worth for a transfer.
    """
    st, mn = st_to_torch(), new.weights().meta
    entries = []
    for t in report.tensors:
        if t.action != "dropped":
            dt = st.get(mn[t.name].dtype, out_dtype)
            entries.append((t.name, out_dtype if out_dtype is not None and dt.is_floating_point else dt,
                            tuple(mn[t.name].shape)))
    return [ShardWriter(d, shard_layout(entries, max_bytes)) for d in dirs]


# ----------------------------------------------------------------------------
# Plan: one action per tensor, from headers only (nothing read yet)


def _vocab_size(cfg: dict) -> int | None:
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(v) if v else None


def _plan(old: Checkpoint, fin: _Finetuned, new: Checkpoint, vmap_for) -> list[TransferTensorReport]:
    mo, mn = old.weights().meta, new.weights().meta
    v_old, v_new = _vocab_size(old.config), _vocab_size(new.config)
    plan: list[TransferTensorReport] = []
    for name, m in mn.items():
        sn = list(m.shape)
        if name not in mo:
            plan.append(TransferTensorReport(name, "keep-new", "only in the new base", sn))
            continue
        so = list(mo[name].shape)
        sf = fin.shape(name, tuple(so))
        if not m.dtype.startswith(("F", "BF")):
            plan.append(TransferTensorReport(name, "keep-new", f"not floating point ({m.dtype})", sn, so))
        elif fin.is_lora and not fin.touches(name):
            plan.append(TransferTensorReport(name, "keep-new", "the adapter does not change it (diff is zero)", sn, so))
        elif sf is None:
            plan.append(TransferTensorReport(name, "keep-new", "missing from the fine-tune (diff unknown)", sn, so))
        elif (len(sn) >= 1 and sn[0] == v_new and so[0] == v_old and sf[0] >= 1 and sn[1:] == so[1:] == list(sf[1:])
              and not vmap_for(sn[0], so[0], sf[0]).identity):
            plan.append(TransferTensorReport(name, "transfer-vocab", "vocabulary rows matched by token string", sn, so))
        elif sn != so or list(sf) != so:
            why = f"shape mismatch: old base {so}, fine-tune {list(sf)}, new base {sn}"
            plan.append(TransferTensorReport(name, "keep-new", why, sn, so))
        else:
            plan.append(TransferTensorReport(name, "transfer", "new + α·(finetuned − old)", sn, so))
    for name in mo:
        if name not in mn:
            why = "only in the old base: the fine-tune's diff here has no place in the new model"
            plan.append(TransferTensorReport(name, "dropped", why, None, list(mo[name].shape)))
    for name in fin.names():
        if name not in mo and name not in mn:
            plan.append(TransferTensorReport(name, "dropped",
                                             "only in the fine-tune: no old-base counterpart to diff against"))
        # (a fine-tune tensor missing from the old base but present in the new one is reported above, kept)
    return plan


# ----------------------------------------------------------------------------
# Compatibility statistics, accumulated while streaming


class _Stats:
    """Dot products and squared norms, summed per layer and overall (float64 Python floats)."""

    def __init__(self):
        self.by_layer: dict[str, dict[str, float]] = {}

    @staticmethod
    def layer_of(name: str) -> str:
        m = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", name)
        return f"layer {int(m.group(1)):03d}" if m else "other"

    def add(self, name: str, old, new, diff) -> dict:
        drift = new - old  # explicit: ‖new‖² − 2⟨old,new⟩ + ‖old‖² would cancel catastrophically for close bases
        v = {"dot": _dot(drift, diff), "dd": _dot(drift, drift), "ff": _dot(diff, diff),
             "oo": _dot(old, old), "on": _dot(old, new), "nn": _dot(new, new), "n": 1}
        # Norm scales and biases (1-D, near 1 or 0) would dominate the sums and hide
        # how far the matrices moved; per-layer and overall numbers use matrices only.
        for key in (self.layer_of(name), "all") if old.dim() >= 2 else ():
            acc = self.by_layer.setdefault(key, dict.fromkeys(v, 0.0))
            for k, x in v.items():
                acc[k] += x
        # The squared norms are finite exactly when every element of old, new and diff is,
        # so they double as the NaN/Inf check of the result (no extra pass over the tensors).
        return {**_ratios(v), "finite": all(math.isfinite(v[k]) for k in ("oo", "nn", "ff"))}

    def layers(self) -> list[LayerStats]:
        out = []
        for key in sorted(k for k in self.by_layer if k != "all"):
            r = _ratios(self.by_layer[key])
            out.append(LayerStats(key, r["cos_drift_diff"], r["rel_diff"], r["rel_drift"],
                                  int(self.by_layer[key]["n"])))
        return out

    def overall(self) -> dict[str, float | None]:
        a = self.by_layer.get("all")
        if not a:
            return {}
        r = _ratios(a)
        r["cos_bases"] = _safe_div(a["on"], math.sqrt(a["oo"] * a["nn"]))
        return r


def _dot(a, b) -> float:
    # One fused BLAS pass per product, no elementwise temporary: the statistics were the
    # slowest part of the pass when written as (a * b).sum().
    import torch

    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _safe_div(a: float, b: float) -> float | None:
    return None if b <= 0 or not math.isfinite(b) else round(a / b, 6)


def _ratios(v: dict) -> dict:
    return {"cos_drift_diff": _safe_div(v["dot"], math.sqrt(v["dd"] * v["ff"])),
            "rel_diff": _safe_div(math.sqrt(v["ff"]), math.sqrt(v["oo"])),
            "rel_drift": _safe_div(math.sqrt(v["dd"]), math.sqrt(v["oo"]))}


def _warnings(overall: dict, layers: list[LayerStats], plan: list[TransferTensorReport]) -> list[str]:
    w = []
    drift, cos_b = overall.get("rel_drift"), overall.get("cos_bases")
    if drift is not None and drift > FAR_DRIFT or cos_b is not None and cos_b < FAR_COSINE:
        w.append(f"the two bases are far apart (relative drift {drift}, cosine {cos_b}): transfer works when "
                 "they are linearly connected (Lin et al. 2025); check the result before using it")
    elif drift is not None and overall.get("rel_diff") and drift > 10 * overall["rel_diff"]:
        w.append(f"the base drift ({drift}) is over 10x the fine-tuning diff ({overall['rel_diff']}): "
                 "the diff may be washed out")
    neg = [ly.layer for ly in layers if ly.cos_drift_diff is not None and ly.cos_drift_diff < -0.1]
    if neg:
        w.append(f"the base drift points against the diff (cosine < -0.1) in {len(neg)} layer(s): {', '.join(neg[:5])}")
    for action in ("dropped", "keep-new"):
        n = sum(1 for t in plan if t.action == action and "diff is zero" not in t.reason)
        if n:
            w.append(f"{n} tensor(s) {'dropped' if action == 'dropped' else 'kept from the new base without a diff'}"
                     " (see the per-tensor report)")
    return w


# ----------------------------------------------------------------------------
# The pass


_torch_dtype = torch_float  # the one dtype table's user names (checkpoints.dtypes)


def _alphas(alpha: float | str | Sequence[float]) -> list[float]:
    if isinstance(alpha, str):
        try:
            alpha = [float(a) for a in alpha.split(",") if a.strip()]
        except ValueError:
            raise ConfigError(f"--alpha {alpha!r} must be a number or a comma-separated list") from None
    vals = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if not vals or not all(math.isfinite(a) for a in vals):
        raise ConfigError(f"alpha must be one or more finite numbers, got {alpha!r}")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"alpha values repeat: {vals}")
    return vals


def alpha_dirname(a: float) -> str:
    return f"alpha-{a:g}"


def transfer(base_old: str | Path, finetuned: str | Path, base_new: str | Path, out: str | Path | None = None, *,
             alpha: float | str | Sequence[float] = 1.0, dtype: str | None = None, compute_dtype: str = "float32",
             vocab_new_rows: str = "base", config_from: str = "new", shard_size: str | int = "2GB",
             max_shard_size: str | int | None = None, dry_run: bool = False, force: bool = False,
             allow_pickle: bool = False, allow_nonfinite: bool = False,
             on_tensor: Callable[[str], None] | None = None,
             on_plan: Callable[[TransferReport], None] | None = None) -> TransferReport:
    """Write ``base_new + α·(finetuned − base_old)`` to ``out`` (one model per α) and return the report.

    With one α the model is ``out`` itself; with several, ``out/alpha-<α>/`` each.
    ``vocab_new_rows``: rows of tokens the old base lacks come from the new base
    (``"base"``) or from the fine-tune when it has the token (``"finetuned"``).
    ``config_from``: config, generation config and chat template from the new
    base (``"new"``) or the fine-tune (``"finetuned"``). ``on_plan`` sees the
    report before any tensor is read; ``dry_run`` computes the report only. NaN/Inf in any
    input tensor is refused unless ``allow_nonfinite``. ``shard_size``: the largest output shard, in
    decimal units as ``warmstart merge`` ("2GB" = 2·10⁹ bytes); ``max_shard_size`` is its old name.
    """
    if max_shard_size is not None:
        warnings.warn("transfer(max_shard_size=...) is deprecated; use shard_size (decimal units)",
                      DeprecationWarning, stacklevel=2)
        shard_size = max_shard_size
    max_bytes = parse_size(shard_size)
    alphas = _alphas(alpha)
    out_dtype, cdt = _torch_dtype(dtype), _torch_dtype(compute_dtype)
    if str(cdt).split(".")[-1] not in ("float32", "float64"):
        raise ConfigError(f"compute dtype must be float32 or float64, got {compute_dtype!r}")
    if vocab_new_rows not in ("base", "finetuned"):
        raise ConfigError(f"vocab_new_rows must be 'base' or 'finetuned', got {vocab_new_rows!r}")
    if config_from not in ("new", "finetuned"):
        raise ConfigError(f"config_from must be 'new' or 'finetuned', got {config_from!r}")
    if out is None and not dry_run:
        raise ConfigError("an output directory is required (or use dry_run)")
    old, fin, new = _open_inputs(base_old, finetuned, base_new, allow_pickle, allow_nonfinite)
    if out is not None and not dry_run:
        check_output(Path(out), force=force, inputs=[old.path, new.path, fin.ck.path])
    cfg = _output_config(old, fin.ck, new, config_from)

    vocabs = _Vocabs(old, fin.ck, new)
    plan = _plan(old, fin, new, vocabs.map)
    report = TransferReport(old.ref, fin.ck.ref, fin.ck.kind, new.ref, alphas, plan)
    if on_plan:
        on_plan(report)
    stats = _Stats()
    opts = dict(cdt=cdt, out_dtype=out_dtype, policy=vocab_new_rows)
    if dry_run:
        _stream(report, old, fin, new, vocabs, stats, None, alphas, opts, on_tensor)
    else:
        with atomic_dir(out, force=force) as tmp:
            dirs = [tmp] if len(alphas) == 1 else [tmp / alpha_dirname(a) for a in alphas]
            for d in dirs:
                d.mkdir(exist_ok=True)
            writers = _open_writers(dirs, report, new, out_dtype, max_bytes)
            try:
                _stream(report, old, fin, new, vocabs, stats, writers, alphas, opts, on_tensor)
            finally:
                for w in writers:
                    w.close()
            _finish_report(report, stats, old, fin.ck)
            for d, a in zip(dirs, alphas):
                _write_side_files(d, cfg, old, fin.ck, new, config_from, a, report, opts)
            if len(alphas) > 1:
                atomic_write_json(tmp / "transfer_report.json", report.to_dict())
        out = Path(out)
        report.outputs = [str(out if len(alphas) == 1 else out / alpha_dirname(a)) for a in alphas]
        return report
    _finish_report(report, stats, old, fin.ck)
    return report


def _open_inputs(base_old, finetuned, base_new, allow_pickle: bool, allow_nonfinite: bool
                 ) -> tuple[Checkpoint, _Finetuned, Checkpoint]:
    """The three inputs opened and checked (headers only): two full bases, a fine-tune that fits the old one."""
    old, new = (open_checkpoint(r, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
                for r in (base_old, base_new))
    for ck, what in ((old, "--base-old"), (new, "--base-new")):
        if ck.kind != "full":
            raise IncompatibleError(f"{what} must be a full model, not a LoRA adapter", path=ck.path)
    fin = _Finetuned(open_checkpoint(finetuned, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite))
    if fin.is_lora:
        check_adapter_fits(fin.ck, old)  # a module --base-old lacks, or a ΔW of another shape: refused here
    return old, fin, new


def plan_transfer(base_old: str | Path, finetuned: str | Path, base_new: str | Path, *,
                  alpha: float | str | Sequence[float] = 1.0, adapter_space: bool = False,
                  allow_pickle: bool = False, allow_nonfinite: bool = False) -> TransferReport:
    """The per-tensor plan of a transfer (what ``on_plan`` sees), from the headers only: no tensor is read.

    Raises what :func:`transfer` would raise before its pass (missing or unreadable inputs, an adapter
    that does not fit the old base, vocabularies that cannot be matched); with ``adapter_space`` also
    what :func:`transfer_adapter` refuses. The report has no statistics yet (they need the tensors)."""
    old, fin, new = _open_inputs(base_old, finetuned, base_new, allow_pickle, allow_nonfinite)
    report = TransferReport(old.ref, fin.ck.ref, fin.ck.kind, new.ref, _alphas(alpha),
                            _plan(old, fin, new, _Vocabs(old, fin.ck, new).map))
    if adapter_space:
        _check_adapter_space(report, fin)
    return report


def _check_adapter_space(report: TransferReport, fin: _Finetuned) -> None:
    """In adapter space the new base must take every adapted module as the old base did: same name, same shape."""
    if not fin.is_lora:
        raise ConfigError("an adapter-space transfer needs a LoRA adapter as the fine-tune", path=fin.ck.path)
    actions = {t.name: t for t in report.tensors}
    for name, parts in fin.lora_modules.items():
        if "full" in parts:
            raise IncompatibleError(f"the adapter saves a whole module ({name}, modules_to_save), which has no "
                                    "adapter-space transfer", path=fin.ck.path,
                                    hint="transfer to a full model instead (a run does when train.full is true)")
        t = actions.get(name)
        if t is None or t.action != "transfer":
            why = t.reason if t is not None else "not in either base"
            raise IncompatibleError(f"adapter module {name} does not carry over to the new base as an adapter "
                                    f"({why})", path=fin.ck.path,
                                    hint="the new base must have the same modules and shapes as the old one")


def transfer_adapter(base_old: str | Path, adapter: str | Path, base_new: str | Path, out: str | Path, *,
                     alpha: float = 1.0, force: bool = False, allow_nonfinite: bool = False) -> TransferReport:
    """A LoRA adapter's transfer kept in adapter space: the same A, each B scaled by α, on ``base_new``.

    ``base_new + s·(αB)@A`` is exactly :func:`transfer`'s full output for this adapter (its ΔW = s·B@A is
    the diff and every other tensor keeps the new base), but as an adapter that training continues
    (:func:`warmstart.train.finetune`). ``adapter_config.json`` is the adapter's with
    ``base_model_name_or_path`` set to the new base; ``transfer_report.json``, ``warmstart.json`` and
    a README are written beside it. The report carries the same compatibility numbers as
    :func:`transfer`'s (the adapted tensors are read to compute them)."""
    import torch
    from safetensors.torch import save_file

    a = _alphas(alpha)
    if len(a) != 1:
        raise ConfigError(f"an adapter-space transfer takes one alpha, got {a}")
    old, fin, new = _open_inputs(base_old, adapter, base_new, False, allow_nonfinite)
    check_output(Path(out), force=force, inputs=[old.path, new.path, fin.ck.path])
    report = TransferReport(old.ref, fin.ck.ref, fin.ck.kind, new.ref, a,
                            _plan(old, fin, new, _Vocabs(old, fin.ck, new).map))
    _check_adapter_space(report, fin)
    stats, cdt = _Stats(), torch.float32
    for t in report.tensors:
        if t.action == "transfer":
            o, n = old.weights().get(t.name, cdt), new.weights().get(t.name, cdt)
            r = stats.add(t.name, o, n, fin.delta(t.name, cdt))
            _set_stats(t, r)
            if not r["finite"] and not allow_nonfinite:
                raise CheckpointError(f"tensor {t.name!r} of the result has NaN/Inf values: one of the inputs does")
    _finish_report(report, stats, old, fin.ck)
    tensors = {}
    for key in fin.reader.keys():
        x = fin.reader.get(key)
        if re.search(r"\.lora_(?:embedding_)?B(?:\.weight)?$", key):
            x = (x.to(cdt) * a[0]).to(x.dtype)
        tensors[key] = x.contiguous()
    acfg = dict(fin.ck.config)
    acfg["base_model_name_or_path"] = str(new.path)
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", acfg)
        atomic_write_json(tmp / "transfer_report.json", report.to_dict())
        meta = {"warmstart": "transfer", "method": "fine-tuning transfer (Lin et al. 2025), in adapter space",
                "formula": "base_new + alpha * (finetuned - base_old), as the adapter (A, alpha * B)",
                "alpha": a[0], "base_old": old.ref, "finetuned": fin.ck.ref, "finetuned_kind": "lora",
                "base_new": new.ref, "base_model": new.ref, "output": "adapter", "config_from": "new",
                "tokenizer": "the new base's (none copied)", "vocab_new_rows": "base", "compute_dtype": "float32",
                "dtype": "the adapter's dtypes", "counts": report.counts(), "summary": report.summary,
                "warnings": report.warnings, "versions": versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if fin.ck.meta.get("task"):
            meta["task"] = fin.ck.meta["task"]
        write_artefact(tmp, meta, _model_card(meta))
    report.outputs = [str(Path(out))]
    return report


def _finish_report(report: TransferReport, stats: _Stats, old: Checkpoint, ft: Checkpoint) -> None:
    report.layers = stats.layers()
    report.summary = {**stats.overall(), "counts": report.counts()}
    report.warnings = _warnings(report.summary, report.layers, report.tensors)
    named = ft.base_model
    if ft.kind == "lora" and named and Path(named).expanduser().exists() and Path(named).resolve() != old.path:
        report.warnings.append(f"the adapter names {named} as its base, not --base-old {old.path}")


class _Vocabs:
    """Tokenizer vocabularies, loaded only if some tensor's rows need matching."""

    def __init__(self, old: Checkpoint, ft: Checkpoint, new: Checkpoint):
        self.paths = (old.path, ft.path, new.path)
        self._v = None
        self._maps: dict[tuple[int, int, int], _VocabMap] = {}

    def _same_files(self) -> bool:
        # Byte-identical tokenizer files mean identical vocabularies: skip loading three tokenizers.
        def blob(p: Path) -> bytes | None:
            fs = [p / f for f in ("tokenizer.json", "vocab.json", "tokenizer.model", "added_tokens.json")
                  if (p / f).exists()]
            return b"".join(f.read_bytes() for f in fs) if fs else None

        old, ft, new = (blob(p) for p in self.paths)
        return old is not None and old == new and ft in (None, old)

    def map(self, n_new: int, n_old: int, n_ft: int) -> _VocabMap:
        if n_new == n_old == n_ft and self._v is None and self._same_files():
            return _VocabMap(list(range(n_new)), list(range(n_new)), True)
        if self._v is None:
            self._v = tuple(_vocab(p) for p in self.paths)
        key = (n_new, n_old, n_ft)
        if key not in self._maps:
            v_old, v_ft, v_new = self._v
            self._maps[key] = _vocab_map(v_old, v_ft, v_new, n_new, n_old, n_ft)
        return self._maps[key]


def _stream(report, old, fin, new, vocabs, stats, writers, alphas, opts, on_tensor) -> None:
    import torch

    cdt, reader = opts["cdt"], PreadReader()

    def get(ck: Checkpoint, name: str, dtype=None):
        if ck.pickle:
            return ck.weights().get(name, dtype)
        t = reader.read(ck.weights().meta[name])
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    fin.read = lambda key, dtype: get(fin.ck, key, dtype)
    try:
        for t in report.tensors:
            if on_tensor:
                on_tensor(t.name)
            if t.action == "dropped":
                continue
            n = get(new, t.name, cdt if t.action != "keep-new" else None)
            if t.action == "keep-new":
                outs = [n] * len(alphas)
                finite = not n.is_floating_point() or math.isfinite(_dot(n, n))
            elif t.action == "transfer":
                o = get(old, t.name, cdt)
                d = fin.delta(t.name, cdt) if fin.is_lora and "full" not in fin.lora_modules[t.name] else \
                    fin.full(t.name, o, cdt) - o
                r = stats.add(t.name, o, n, d)
                _set_stats(t, r)
                finite = r["finite"]
                outs = [torch.add(n, d, alpha=a) for a in alphas]
            else:
                outs = _transfer_vocab(t, get(old, t.name, cdt), fin, n, vocabs, stats, alphas, opts)
                finite = math.isfinite(_dot(outs[0], outs[0]))
            # One finiteness check per output covers all three inputs (NaN/Inf propagate).
            if not finite and not new.allow_nonfinite:
                _raise_nonfinite(t.name, old, fin, new, get)
            for w, x in zip(writers or (), outs):
                w.put(_cast(x, opts["out_dtype"], new.weights().meta[t.name].dtype))
    finally:
        fin.read = None
        reader.close()


def _raise_nonfinite(name: str, old: Checkpoint, fin: _Finetuned, new: Checkpoint, get) -> None:
    """The result is not finite: re-read this tensor's inputs to name the file that holds the NaN/Inf
    (only on this failure path; the per-output check above is the fast path)."""
    keys = [(ck, name) for ck in (old, new) if name in ck.weights().meta]
    keys += [(fin.ck, k) for k in fin.lora_modules.get(name, {}).values()] if fin.is_lora else \
        [(fin.ck, name)] if name in fin.ck.weights().meta else []
    for ck, k in keys:
        _check_finite(get(ck, k), k, ck.weights().meta[k].file)
    raise CheckpointError(f"tensor {name!r} of the result has NaN/Inf values: one of the inputs does",
                          hint="check the three models with `warmstart library add`, or pass --allow-nonfinite")


def _set_stats(t: TransferTensorReport, r: dict) -> None:
    t.cos_drift_diff, t.rel_diff, t.rel_drift = r["cos_drift_diff"], r["rel_diff"], r["rel_drift"]


def _cast(x, out_dtype, st_dtype: str):
    import torch

    if not x.is_floating_point():
        return x
    if out_dtype is None:
        out_dtype = st_to_torch()[st_dtype] if st_dtype in FLOAT_DTYPES else torch.float32
    return x.to(out_dtype)


def _transfer_vocab(t, o, fin, n, vocabs, stats, alphas, opts) -> list:
    """Rows shared by token string get the diff; new rows follow the policy; the rest keep the new base."""
    import torch

    f = fin.full(t.name, o, opts["cdt"])
    vm = vocabs.map(n.shape[0], o.shape[0], f.shape[0])
    shared = [j for j in range(n.shape[0]) if vm.old_rows[j] is not None and vm.ft_rows[j] is not None]
    from_ft = [j for j in range(n.shape[0]) if vm.old_rows[j] is None and vm.ft_rows[j] is not None]
    idx_n = torch.tensor(shared, dtype=torch.long)
    idx_o = torch.tensor([vm.old_rows[j] for j in shared], dtype=torch.long)
    idx_f = torch.tensor([vm.ft_rows[j] for j in shared], dtype=torch.long)
    d = f[idx_f] - o[idx_o]
    _set_stats(t, stats.add(t.name, o[idx_o], n[idx_n], d))
    take_ft = opts["policy"] == "finetuned" and from_ft
    used_old = {vm.old_rows[j] for j in shared}
    t.rows = {"shared": len(shared), "new_from_finetuned": len(from_ft) if take_ft else 0,
              "new_from_base": n.shape[0] - len(shared) - (len(from_ft) if take_ft else 0),
              "old_rows_dropped": o.shape[0] - len(used_old)}
    outs = []
    for a in alphas:
        x = n.clone()
        x[idx_n] += a * d
        if take_ft:
            x[torch.tensor(from_ft)] = f[torch.tensor([vm.ft_rows[j] for j in from_ft])]
        outs.append(x)
    return outs


# ----------------------------------------------------------------------------
# Config, tokenizer, model card and metadata


def _output_config(old: Checkpoint, ft: Checkpoint, new: Checkpoint, config_from: str) -> dict:
    """The new base's config, or the fine-tune's if asked and its shape fields agree with the new base."""
    if config_from == "new":
        return dict(new.config)
    src = ft.config if ft.kind == "full" else old.config
    bad = [k for k in SHAPE_FIELDS if src.get(k) != new.config.get(k)]
    if bad:
        raise IncompatibleError(f"the fine-tune's config disagrees with the new base on {', '.join(bad)}; "
                                "the output has the new base's shapes", path=ft.path,
                                hint="use --config-from new")
    return dict(src)


def _write_side_files(d: Path, cfg: dict, old, ft, new, config_from, a, report, opts) -> None:
    src = new.path if config_from == "new" else (ft.path if ft.kind == "full" else old.path)
    cfg = dict(cfg)
    if opts["out_dtype"] is not None:
        cfg["dtype"] = str(opts["out_dtype"]).split(".")[-1]
        cfg.pop("torch_dtype", None)
    atomic_write_json(d / "config.json", cfg)
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy2(src / extra, d / extra)
    tok = _write_tokenizer(d, new.path, ft.path if config_from == "finetuned" else None)
    meta = {"warmstart": "transfer", "method": "fine-tuning transfer (Lin et al. 2025)",
            "formula": "base_new + alpha * (finetuned - base_old)", "alpha": a,
            "base_old": old.ref, "finetuned": ft.ref, "finetuned_kind": ft.kind, "base_new": new.ref,
            "base_model": new.ref, "config_from": config_from, "tokenizer": tok,
            "vocab_new_rows": opts["policy"], "compute_dtype": str(opts["cdt"]).split(".")[-1],
            "dtype": str(opts["out_dtype"]).split(".")[-1] if opts["out_dtype"] else "the new base's dtypes",
            "counts": report.counts(), "summary": report.summary, "warnings": report.warnings,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if ft.meta.get("task"):
        meta["task"] = ft.meta["task"]
    atomic_write_json(d / "transfer_report.json", report.to_dict())
    write_artefact(d, meta, _model_card(meta))


def _write_tokenizer(d: Path, new_path: Path, chat_from: Path | None) -> str:
    """The new base's tokenizer (its rows are the output's rows); optionally the fine-tune's chat template."""
    files = [f for f in TOKENIZER_FILES if (new_path / f).exists()]
    for f in files:
        shutil.copy2(new_path / f, d / f)
    if chat_from is None or not files:
        return "new base" if files else "none (the new base has no tokenizer files)"
    from transformers import AutoTokenizer

    try:
        t_ft = AutoTokenizer.from_pretrained(chat_from)
    except Exception:  # an adapter without tokenizer files: nothing to take
        return "new base (the fine-tune has no tokenizer)"
    if not getattr(t_ft, "chat_template", None):
        return "new base (the fine-tune has no chat template)"
    t_new = AutoTokenizer.from_pretrained(d)
    t_new.chat_template = t_ft.chat_template
    t_new.save_pretrained(d)
    return "new base, chat template from the fine-tune"


def _model_card(meta: dict) -> str:
    s = meta["summary"]
    lines = [
        *front_matter(base_model=meta["base_new"], tags=["warmstart", "fine-tuning-transfer"]), "",
        "# Fine-tuning transfer", "",
        f"Made by warmstart {meta['versions']['warmstart']} with fine-tuning transfer "
        "([Lin et al. 2025](https://arxiv.org/abs/2503.20110)):", "",
        f"    {meta['formula']}   (alpha = {meta['alpha']:g})", "",
        "| input | reference |", "|---|---|",
        f"| base_old | `{meta['base_old']}` |", f"| finetuned ({meta['finetuned_kind']}) | `{meta['finetuned']}` |",
        f"| base_new | `{meta['base_new']}` |", "",
        f"Differences computed in {meta['compute_dtype']}; weights stored as {meta['dtype']}. "
        f"Config from: {meta['config_from']}; tokenizer: {meta['tokenizer']}; "
        f"new vocabulary rows from: {meta['vocab_new_rows']}.", "",
        f"Tensors: {', '.join(f'{k} {v}' for k, v in meta['counts'].items())}. "
        f"Cosine(base drift, diff) {s.get('cos_drift_diff')}, relative diff {s.get('rel_diff')}, "
        f"relative base drift {s.get('rel_drift')}.", "",
        "The per-tensor report is in `transfer_report.json`.",
    ]
    if meta["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in meta["warnings"]]
    return "\n".join(lines) + "\n"


TensorReport = TransferTensorReport  # the name before #12 (deprecated: merge.TensorReport is another class)

__all__ = ["LayerStats", "TensorReport", "TransferReport", "TransferTensorReport", "alpha_dirname", "plan_transfer",
           "transfer", "transfer_adapter"]
