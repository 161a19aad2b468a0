"""Streaming merge of full models: tensor by tensor, bounded memory, sharded atomic output.

Reading and writing go through :mod:`warmstart.checkpoints.streaming` (pread in, streamed
shards out; why hand-written: see there). Reads for the next tensor run in a
thread pool while the current one is merged, and a writer thread appends
results; the GIL is released in pread, write, hashing and torch kernels, so
the three overlap.

The per-tensor math is :mod:`.methods`. :func:`warmstart.merge.merge` (:mod:`.dispatch`) opens the
inputs and calls :func:`merge_models` for full models, :mod:`.lora` for adapters.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_json, check_output
from ..checkpoints import Checkpoint, TensorMeta, open_checkpoint
from ..checkpoints import check_finite as _check_finite
from ..checkpoints.digests import default_digest_cache
from ..checkpoints.dtypes import FLOAT_DTYPES
from ..checkpoints.streaming import ST_DTYPES, PreadReader, ShardWriter, numel, shard_layout
from ..errors import ConfigError, IncompatibleError
from ..provenance import parse_size, versions, write_artefact
from . import tokenizer as _tok
from .methods import get_method, tensor_seed, validate
from .plan import MergePlan
from .results import Item as _Item
from .results import MergeResult, TensorReport
from .results import torch_dtype as _dtype
from ..params import resolve
from .slices import plan_slices, set_num_layers

# Files copied from the config source; weights, optimizer state and training logs are not.
SKIP_COPY = {"model.safetensors.index.json", "README.md", "warmstart.json", "trainer_state.json",
             "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "pytorch_model.bin.index.json"}


# ----------------------------------------------------------------------------
# Planning: which inputs feed which output tensor, under the mismatch policies


def _tied_source(ck: Checkpoint, name: str) -> TensorMeta | None:
    """A donor that ties embeddings has no lm_head: its effective lm_head is the input embedding."""
    if not name.endswith("lm_head.weight") or not ck.config.get("tie_word_embeddings", False):
        return None
    return next((m for k, m in ck.weights().meta.items() if k.endswith("embed_tokens.weight")), None)


def plan_tensors(plan: MergePlan, donors: list[Checkpoint], ref: Checkpoint, use_base: bool,
                 notes: list[str], vocab=None, base_ck: Checkpoint | None = None) -> list[_Item]:
    """Match every reference tensor with its donor tensors; apply the missing/vocab policies loudly."""
    ref_meta = ref.weights().meta
    items, missing = [], []
    for name, rm in ref_meta.items():
        out_dtype = _dtype(plan.dtype, ST_DTYPES.get(rm.dtype, torch.float32)) if rm.dtype in FLOAT_DTYPES \
            else ST_DTYPES[rm.dtype]
        item = _Item(name, out_dtype, rm.shape, rm, [])
        if rm.dtype not in FLOAT_DTYPES:
            item.action, item.note = "copied", "not a float tensor: copied from the reference"
            items.append(item)
            continue
        if vocab is not None and _vocab_item(vocab, item, donors, base_ck):
            items.append(item)
            continue
        for i, d in enumerate(donors):
            m = d.weights().meta.get(name)
            if m is None and (m := _tied_source(d, name)) is not None:
                item.note = _join(item.note, f"input {i} ties embeddings: its {m.name} used as lm_head")
                item.action = "tied-embedding"
            if m is None:
                missing.append((name, d.ref))
                continue
            if m.shape != rm.shape:
                _check_vocab(plan, name, m, rm, d, item)
            item.srcs.append((i, m))
        items.append(item)
    _check_missing(plan, missing, items, notes)
    _check_extra(plan, donors, ref_meta, notes)
    return items


def _vocab_item(vocab, item: _Item, donors: list[Checkpoint], base_ck: Checkpoint | None) -> bool:
    """A vocabulary tensor under tokenizer merging: every input's rows re-indexed to the output vocabulary."""
    metas = [(i, d.weights().meta.get(item.name)) for i, d in enumerate(donors)]
    cks = {str(d.path): d for d in donors + ([base_ck] if base_ck else [])}
    rows = {str(donors[i].path): m.shape[0] for i, m in metas if m is not None}
    if base_ck is not None and item.base is not None:
        rows[str(base_ck.path)] = item.base.shape[0]
    if not vocab.is_vocab_tensor(item.name, rows, {k: _tok.model_vocab_size(c.config) for k, c in cks.items()}):
        return False
    item.srcs = [(i, m) for i, m in metas if m is not None]
    item.shape = (vocab.rows, *item.shape[1:])
    item.action, item.note = "vocab-permuted", f"re-indexed to the merged vocabulary ({vocab.rows} rows)"
    keys = [str(donors[i].path) for i, _ in item.srcs]
    bkey = str(base_ck.path) if base_ck is not None else None

    def permute(base_t, ins):
        d = dict(zip(keys, ins))
        if bkey is not None and base_t is not None:
            d[bkey] = base_t
        r = vocab.permute(d)
        return r.get(bkey, base_t), [r[k] for k in keys]

    item.permute = permute
    return True


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _check_vocab(plan, name, m, rm, d, item):
    if len(m.shape) == len(rm.shape) and m.shape[1:] == rm.shape[1:] and plan.vocab == "reference":
        item.action = "vocab-resized"
        item.note = _join(item.note, f"{d.ref}: {m.shape[0]} rows → {rm.shape[0]} (reference vocabulary)")
        return
    hint = ("pass --vocab reference to keep the reference model's vocabulary rows"
            if len(m.shape) == len(rm.shape) and m.shape[1:] == rm.shape[1:] else "these models cannot be merged")
    raise IncompatibleError(f"tensor {name!r} has shape {list(m.shape)}, the reference has {list(rm.shape)}",
                            path=d.path, hint=hint)


def _check_missing(plan, missing, items, notes):
    if not missing:
        return
    if plan.missing == "error":
        name, ref = missing[0]
        raise IncompatibleError(f"{len(missing)} tensor(s) missing from some inputs, e.g. {name!r}", path=ref,
                                hint="pass --missing reference to merge each tensor over the inputs that have it")
    by_name = {}
    for name, ref in missing:
        by_name.setdefault(name, []).append(ref)
    for it in items:
        if it.name in by_name:
            it.note = _join(it.note, f"missing in {by_name[it.name]}: merged over {len(it.srcs)} input(s)")
            if not it.srcs:
                it.action = "copied"
    notes.append(f"{len(by_name)} tensor(s) missing from some inputs were merged over the inputs that have them")


def _check_extra(plan, donors, ref_meta, notes):
    extra = {}
    for d in donors:
        for k in d.weights().meta:
            if k not in ref_meta:
                extra.setdefault(k, []).append(d.ref)
    if not extra:
        return
    example = sorted(extra)[0]
    tied = next((k for k in extra if k.endswith("lm_head.weight")), None)
    if tied and plan.missing == "error":
        raise IncompatibleError(f"input has an untied {tied!r} but the reference model ties its embeddings",
                                path=extra[tied][0], hint="pass --missing reference to keep the tied embedding "
                                "(the untied lm_head is dropped), or use an untied model as base/first input")
    if plan.missing == "error":
        raise IncompatibleError(f"{len(extra)} tensor(s) are not in the reference model, e.g. {example!r}",
                                path=extra[example][0],
                                hint="pass --missing reference to keep only the reference model's tensors")
    notes.append(f"dropped {len(extra)} tensor(s) the reference model does not have (e.g. {example!r})")


def _resize_rows(t: torch.Tensor, rows: int, fill: torch.Tensor | None) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows]
    pad = fill[t.shape[0]:rows].to(t.dtype) if fill is not None else torch.zeros(
        (rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


# ----------------------------------------------------------------------------
# The merge


def merge_models(plan: MergePlan, cks: list[Checkpoint], base_ck: Checkpoint | None, out: Path,
                 weights: list, *, force: bool = False, progress: Callable[[int, int, str], None] | None = None,
                 t0: float | None = None, notes: list[str] | None = None) -> MergeResult:
    """Stream the full models ``cks`` (opened by :func:`warmstart.merge.merge`) into ``out`` atomically.

    ``weights``: one per donor (the base first with ``include_base``) from :func:`.weights.resolve_weights`,
    None where they are resolved per tensor (gradients, filters, slices); ``notes``: what computing them
    assumed, added to the result's notes."""
    t0 = time.perf_counter() if t0 is None else t0
    check_output(out, force=force, inputs=[c.path for c in cks] + ([base_ck.path] if base_ck else []))
    method = get_method(plan.method)
    donors = ([base_ck] if plan.include_base else []) + cks
    use_base = base_ck is not None and not method.base_is_input
    p = _plan_items(plan, method, cks, base_ck, donors, weights, use_base)
    p.notes += notes or []
    timings = {"open": time.perf_counter() - t0}
    result = MergeResult(out, plan.method, p.weights, [], notes=p.notes)
    with atomic_dir(out, force=force) as tmp:
        digests = _stream(plan, method, p.items, donors, p.ref, use_base, tmp, result, progress)
        timings["merge"] = time.perf_counter() - t0 - timings["open"]
        _copy_config(plan, p.ref, tmp, p.items, p.n_layers)
        if p.vocab is not None:
            p.vocab.write(tmp)
        elif plan.chat_template is not None:
            _tok.write_chat_template(tmp, plan.chat_template, cks, base_ck)
        result.inputs = _inputs_report(base_ck, donors, p.weights, digests)
        result.timings = {**timings, "total": time.perf_counter() - t0}
        write_card(tmp, plan, result)
    return result


@dataclass
class _Planned:
    ref: Checkpoint
    items: list[_Item]
    weights: list
    notes: list[str]
    n_layers: int | None = None  # slices: the output's layer count
    vocab: object = None  # tokenizer merging's vocabulary plan


def _plan_items(plan: MergePlan, method, cks, base_ck, donors, weights, use_base) -> _Planned:
    """Every output tensor with its inputs, per-tensor weights and parameters; notes on what was assumed."""
    notes = [] if use_base or not base_ck else [
        "linear merge: the base takes part " + ("(include_base)" if plan.include_base else
                                                "NOT (it only supplies config/tokenizer; pass --include-base)")]
    refs = [(m.ref, m.lora) for m in plan.models]
    if len(set(refs)) < len(refs):  # native plans: each listing is one input (a mergekit YAML refuses this)
        notes.append("a model is listed more than once: each listing takes part as one input with its own weight")
    p = _Planned(base_ck or cks[0], [], weights, notes)
    if plan.slices:
        p.items, p.n_layers = plan_slices(plan, cks, base_ck, use_base, notes)
    else:
        p.vocab = _tok.build_vocab_plan(plan, cks, base_ck)
        p.items = plan_tensors(plan, donors, p.ref, use_base, notes, p.vocab, base_ck)
    _resolve_items(plan, method, p.items, donors, weights, use_base, notes)
    _mergekit_notes(plan, method, notes)
    if plan.dtype is None and plan.compute_dtype == "auto":  # mergekit: the result's dtype unless out_dtype
        for it in p.items:
            if it.action != "copied" and it.srcs and it.out_dtype.is_floating_point:
                it.out_dtype = _dtype(method.result_dtype or plan.input_dtype, it.out_dtype)
    if any(w is None for w in weights):
        p.weights, varies = _constant_weights(p.items, len(donors))
        if varies:
            notes.append("weights vary per tensor (gradients / filters / slices): see the recipe")
    return p


def _mergekit_notes(plan: MergePlan, method, notes: list[str]) -> None:
    """Values mergekit requires that the YAML left out: say which default was used."""
    if plan.compute_dtype == "auto" and method.uses_weights and not plan.slices and all(
            m.weight is None for m in plan.models) and "weight" not in plan.params:
        notes.append("no model weights given: uniform weights used (mergekit requires a weight per model)")
    for k in method.mergekit_requires:
        if k not in plan.params and not any(k in (sl.get("params") or {}) for sl in plan.slices or []):
            notes.append(f"{method.name} without {k}: {k} = {method.defaults[k]} used (mergekit requires {k})")


def _inputs_report(base_ck, donors, weights, digests) -> list[dict]:
    all_cks = ([base_ck] if base_ck and not any(c is base_ck for c in donors) else []) + donors
    inputs = [_input_info(c, digests.get(id(c)), "base" if c is base_ck else "model") for c in all_cks]
    for i, c in enumerate(donors):
        inputs[[x["path"] for x in inputs].index(str(c.path))]["weight"] = weights[i] if i < len(weights) else None
    return inputs


def check_device(name: str) -> None:
    """Fail before any work, in one line, when the device cannot run here (not mid-merge with a traceback)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {name!r} ({e})", hint="use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but this machine has no usable CUDA GPU",
                          hint="use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available", hint="use --device cpu")


def _layer_positions(names) -> dict[str, float]:
    """mergekit's t per tensor: i / (L − 1) for layer i of a stack of L (1 when L = 1), 0 outside the layers.

    The layer stack is found by name (``….layers.N.…``, GPT-2's ``h.N``, ``blocks.N``), per prefix, so a
    vision tower and a language model each get their own L."""
    found = {n: m for n in names if (m := _LAYER.search(n))}
    count: dict[str, set] = {}
    for n, m in found.items():
        count.setdefault(n[:m.start(2)], set()).add(int(m.group(2)))
    out = {}
    for n in names:
        m = found.get(n)
        if m is None:
            out[n] = 0.0
            continue
        L = max(count[n[:m.start(2)]]) + 1
        out[n] = int(m.group(2)) / (L - 1) if L > 1 else 1.0
    return out


_LAYER = re.compile(r"(^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _param_names(plan: MergePlan, method) -> tuple[set[str], set[str]]:
    """The parameter names a plan gives (checked against the method) and those given per model."""
    given = set(plan.params) | {k for m in plan.models for k in m.params}
    for sl in plan.slices or []:
        given |= set(sl.get("params") or {}) | {k for s in sl["sources"] for k in s.get("params") or {}}
    unknown = given - set(method.defaults) - {"weight"}
    if unknown:
        raise ConfigError(f"method {method.name!r} has no parameter(s) {sorted(unknown)}", path=plan.source,
                          hint="known: " + ", ".join(sorted(method.defaults)) or "none")
    # a parameter given per model becomes a per-source list (as before); a global one stays a scalar
    per_model = ({k for m in plan.models for k in m.params} | {
        k for sl in plan.slices or [] for s in sl["sources"] for k in s.get("params") or {}}) - {"weight"}
    return given, per_model


def _resolve_items(plan: MergePlan, method, items: list[_Item], donors, weights, use_base, notes) -> None:
    """Per tensor: each source's weight and per-model parameters, the shared parameters (mergekit's
    precedence: slice source > slice > global; filters match the input tensor's name for per-model
    parameters and the output's for shared ones), checked against the method before any work."""
    given, per_model = _param_names(plan, method)
    if plan.slices is None:
        specs = ([None] if plan.include_base else []) + list(plan.models)
        pos = _layer_positions([it.name for it in items])
        for it in items:
            it.specs, it.t = [specs[i] for i, _ in it.srcs], pos[it.name]
    if not method.uses_weights and any(m.weight is not None for m in plan.models):
        notes.append(f"{method.name} does not use model weights: the given weights have no effect")
    for it in items:
        if it.action == "copied" or not it.srcs:
            continue
        scopes = [it.slice_params, plan.params]
        ws, per = [], {k: [] for k in per_model}
        for (i, m), spec in zip(it.srcs, it.specs):
            mine = _spec_params(spec, plan)
            w = weights[i] if i < len(weights) and weights[i] is not None else resolve(
                "weight", [mine] + scopes, m.name, it.t)
            if w is None:
                if method.uses_weights:
                    raise ConfigError(f"no weight for {getattr(spec, 'ref', 'the base')!r} at tensor {it.name!r}",
                                      path=plan.source, hint="give every model a weight (mergekit requires it too)")
                w = 1.0
            ws.append(float(w))
            for k in per:
                per[k].append(resolve(k, [mine] + scopes, m.name, it.t, method.defaults.get(k)))
        p = {k: resolve(k, scopes, it.name, it.t, method.defaults.get(k))
             for k in set(method.defaults) | (given - {"weight"}) if k not in per}
        p.update(per)
        if method.points and len(ws) + use_base != method.points:
            raise ConfigError(f"{method.name} merges exactly two models: the base and one other, or two without a "
                              f"base; got {'the base + ' if use_base else ''}{len(ws)} at tensor {it.name!r}",
                              path=plan.source)
        try:
            validate(method, len(ws), use_base or not method.needs_base,
                     {k: v for k, v in p.items() if k not in method.defaults or v != method.defaults[k]})
        except ConfigError as e:
            raise ConfigError(f"{e.message} (tensor {it.name!r})", path=plan.source, hint=e.hint) from None
        it.weights, it.params = ws, p


def _constant_weights(items: list[_Item], n: int) -> tuple[list[float | None], bool]:
    """Per donor: its weight when the same for every tensor, else None; and whether any varies."""
    seen: list[set] = [set() for _ in range(n)]
    for it in items:
        for (i, _), w in zip(it.srcs, it.weights or []):
            seen[i].add(w)
    return [next(iter(s)) if len(s) == 1 else None for s in seen], any(len(s) > 1 for s in seen)


def _spec_params(spec, plan) -> dict | None:
    """The per-model settings of one source: a ModelSpec's params + weight, or a slice source's params."""
    if spec is None:
        return {"weight": plan.base_weight} if plan.base_weight is not None else None
    if isinstance(spec, dict):
        return spec.get("params")
    return {**spec.params, **({"weight": spec.weight} if spec.weight is not None else {})}


def _stream(plan, method, items, donors, ref, use_base, tmp, result, progress) -> dict:
    """Read (every input of the next tensor in parallel), merge, and hand each result to the shard writer."""
    entries = [(it.name, it.out_dtype, it.shape) for it in items]
    writer = ShardWriter(tmp, shard_layout(entries, parse_size(plan.shard_size)))
    reader = PreadReader()
    # Inputs whose digests the library's cache already holds are not hashed again; the others are
    # hashed from the bytes read here (and the cache filled), so fingerprints never cost a second read.
    digests = {id(c): ({} if not _digests_cached(c) else None) for c in donors + [ref]}
    owner = {(m.file, m.name): c for c in donors + [ref] for m in c.weights().meta.values()}
    dev = torch.device(plan.device)
    cdt = None if plan.compute_dtype == "auto" else _dtype(plan.compute_dtype, torch.float32)
    idt = _dtype(plan.input_dtype, None)

    def read(m: TensorMeta, buf: torch.Tensor) -> torch.Tensor:
        ck = owner[(m.file, m.name)]
        t = reader.read(m, digests[id(ck)], buf)
        # pread bypasses WeightReader.get's NaN/Inf check. A finite sum proves every entry finite
        # (one reduction, no mask allocation); only a non-finite sum pays for the exact check.
        if not getattr(ck, "allow_nonfinite", False) and t.is_floating_point() and not torch.isfinite(t.sum()):
            _check_finite(t, m.name, m.file)
        return t

    def submit(pool, it: _Item):
        # the reference tensor is read only when the math or a copy/resize needs it (not for a plain linear)
        need_base = it.base is not None and (use_base or it.action in ("copied", "vocab-resized", "vocab-permuted")
                                             or not it.srcs)
        metas = ([it.base] if need_base else []) + [m for _, m in it.srcs]
        # Buffers are allocated here, on the main thread: allocations made in the pool threads land in
        # per-thread malloc arenas and are freed elsewhere, which fragments memory (peak RSS +1 GB at 135M).
        return need_base, [pool.submit(read, m, torch.empty(m.nbytes, dtype=torch.uint8)) for m in metas]

    if progress:  # the total is known before the first (possibly slow) tensor
        progress(0, len(items), "")
    try:
        with ThreadPoolExecutor(max(1, plan.threads)) as pool:
            ahead = deque([submit(pool, items[0])] if items else [])
            for k, it in enumerate(items):
                has_base, futs = ahead.popleft()
                if k + 1 < len(items):
                    ahead.append(submit(pool, items[k + 1]))  # prefetch one tensor ahead
                ts = [f.result() for f in futs]
                base_t, ins = (ts[0], ts[1:]) if has_base else (None, ts)
                writer.put(_merge_item(it, method, base_t, ins, use_base, dev, cdt, idt))
                del ts, base_t, ins
                result.tensors.append(TensorReport(it.name, list(it.shape), str(it.out_dtype).replace("torch.", ""),
                                                   len(it.srcs), it.action, it.note))
                if progress:
                    progress(k + 1, len(items), it.name)
        result.modules = _module_summary(result.tensors)
    finally:
        try:
            writer.close()
        finally:
            reader.close()
    for c in donors + [ref]:
        _store_digests(c, digests[id(c)])
    return digests


def _digests_cached(ck: Checkpoint) -> bool:
    """True when the digest cache is current for every weight file (a lookup, no hashing)."""
    if ck.pickle:
        return True  # pickle checkpoints are fingerprinted by Checkpoint.fingerprint itself
    try:
        cache = default_digest_cache()
        return all(cache.peek(f) is not None for f in ck.weight_files)
    except Exception:  # a broken cache is only a cache
        return False


def _store_digests(ck: Checkpoint, digests: dict | None) -> None:
    """Hand the digests computed while reading to the cache, one file at a time."""
    if not digests or ck.pickle:
        return
    try:
        cache = default_digest_cache()
        for f in ck.weight_files:
            names = [m.name for m in ck.weights().meta.values() if m.file == f]
            if all(n in digests for n in names):
                cache.put(f, {n: digests[n] for n in names})
    except Exception:
        pass


def _merge_item(it, method, base_t, ins, use_base, dev, cdt, idt) -> torch.Tensor:
    """One output tensor. ``idt``: mergekit's dtype, every input rounded to it first; ``cdt``: the math's
    dtype (None: the rounded inputs' own, each method then computing as mergekit's does)."""
    if it.action == "copied" or not ins:
        return base_t.to(it.out_dtype)
    if it.action == "vocab-resized":
        fill = base_t
        ins = [_resize_rows(t, it.shape[0], fill) for t in ins]
    p = dict(it.params)
    if "seed" in p:
        p["seed"] = tensor_seed(int(p["seed"]), it.name)
    ins = [t.to(idt) for t in ins] if idt is not None else ins
    if base_t is not None and idt is not None:
        base_t = base_t.to(idt)
    if it.permute is not None:  # after the dtype rounding, as mergekit (rows averaged in the rounded dtype)
        base_t, ins = it.permute(base_t, ins)
    work = cdt or _promoted(ins + ([base_t] if use_base else []))
    b = base_t.to(dev, work) if use_base else None
    out = method.fn([t.to(dev, work) for t in ins], b, list(it.weights), **p)
    return out.to(it.out_dtype).cpu()


def _promoted(ts: list[torch.Tensor]) -> torch.dtype:
    d = ts[0].dtype
    for t in ts[1:]:
        d = torch.promote_types(d, t.dtype)
    return d


def _module_summary(tensors: list[TensorReport]) -> dict[str, dict]:
    """Counts per module (the tensor name without its last component), for the card and --json."""
    mods: dict[str, dict] = {}
    for t in tensors:
        mod = t.name.rsplit(".", 1)[0]
        d = mods.setdefault(mod, {"tensors": 0, "params": 0, "actions": {}})
        d["tensors"] += 1
        d["params"] += numel(t.shape)
        d["actions"][t.action] = d["actions"].get(t.action, 0) + 1
    return mods


def _input_info(ck: Checkpoint, digests: dict | None, role: str) -> dict:
    names = ck.weights().meta
    if digests is not None and set(digests) >= set(names) and not ck.pickle:
        fp = ck.fingerprint(digests=digests)  # from the bytes we already read
    else:
        fp = ck.fingerprint()
    m = ck.metrics
    return {"role": role, "ref": ck.ref, "path": str(ck.path), "kind": ck.kind, "fingerprint": fp,
            "final_loss": m.final_loss if m else None, "global_step": m.global_step if m else None}


def _copy_config(plan: MergePlan, default_src: Checkpoint, tmp: Path, items: list[_Item],
                 n_layers: int | None = None) -> None:
    src = open_checkpoint(plan.config_from).path if plan.config_from else default_src.path
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in SKIP_COPY and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(f, tmp / f.name)
    cfg_path = tmp / "config.json"
    out_dtype = plan.dtype or plan.input_dtype  # mergekit's config: out_dtype or dtype
    if cfg_path.exists() and (out_dtype or n_layers is not None):
        cfg = json.loads(cfg_path.read_text())
        for key in ("torch_dtype", "dtype") if out_dtype else ():
            if key in cfg or key == "dtype":
                cfg[key] = out_dtype
        if n_layers is not None:  # a frankenmerge's layer count (mergekit: the same config keys)
            set_num_layers(cfg, n_layers)
        atomic_write_json(cfg_path, cfg)


# ----------------------------------------------------------------------------
# Model card + warmstart.json


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_card(tmp: Path, plan: MergePlan, result: MergeResult, *, kind: str = "model",
               base_model: str | None = None) -> None:
    """README.md (human) + warmstart.json (machine) describing how the output was made.
    ``base_model``: recorded as such (an adapter's base); else the base input's path, if any."""
    vs = versions()
    meta = {"made_by": "warmstart merge", "kind": kind, "plan": plan.to_dict(), "versions": vs,
            **{k: v for k, v in result.to_dict().items() if k not in ("tensors", "out", "modules")}}
    if result.inputs and result.inputs[0]["role"] == "base":
        meta["base_model"] = result.inputs[0]["path"]
    if base_model is not None or kind == "adapter":
        meta["base_model"] = base_model
    write_artefact(tmp, meta, _card_lines(plan, result, kind, vs))


def _card_lines(plan: MergePlan, result: MergeResult, kind: str, versions: dict) -> list[str]:
    rows = "\n".join(f"| {i['role']} | `{i['ref']}` | {_fmt(i.get('weight'))} | `{i['fingerprint'][:16]}` | "
                     f"{_fmt(i.get('final_loss'))} | {_fmt(i.get('global_step'))} |" for i in result.inputs)
    counts: dict[str, int] = {}
    for t in result.tensors:
        counts[t.action] = counts.get(t.action, 0) + 1
    lines = [
        "---", "library_name: transformers" if kind == "model" else "library_name: peft", "tags: [warmstart, merge]",
        "---", "", f"# Merged {kind} ({plan.method})", "",
        f"Made with `warmstart merge` — method **{plan.method}** "
        f"(params: `{json.dumps(plan.params)}`), weighting `{plan.weighting or 'given/uniform'}`"
        + (f", MWA penalty {plan.penalty}" if (plan.weighting or "").startswith("mwa") else "") + ".", "",
        "| role | input | weight | fingerprint | final loss | step |", "|---|---|---|---|---|---|", rows, "",
        f"Tensors: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}. "
        f"Output dtype: {plan.dtype or plan.input_dtype or 'as the reference'}; math in {plan.compute_dtype}.", "",
    ]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.lora_errors is not None:
        worst = max(result.lora_errors.values(), default=0.0)
        lines += ["## Exactness (relative Frobenius error of ΔW per module)", "",
                  f"Worst module: {worst:.3g}.", "", "| module | rel. error |", "|---|---|"]
        lines += [f"| `{k}` | {v:.3g} |" for k, v in result.lora_errors.items()] + [""]
    lines += ["## Recipe", "", "```yaml", plan.to_yaml().rstrip(), "```", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return lines


__all__ = ["MergeResult", "TensorReport", "check_device", "merge_models", "plan_tensors", "write_card"]
