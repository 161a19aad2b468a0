"""Streaming merge of full models: tensor by tensor, bounded memory, sharded atomic output.

Reading and writing go through :mod:`warmstart._tensorio` (pread in, streamed
shards out; why hand-written: see there). Reads for the next tensor run in a
thread pool while the current one is merged, and a writer thread appends
results; the GIL is released in pread, write, hashing and torch kernels, so
the three overlap.

The per-tensor math is :mod:`.methods`; LoRA inputs go to :mod:`.lora`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_json, check_output
from .._tensorio import ST_DTYPES, PreadReader, ShardWriter, numel, shard_layout
from ..checkpoints import Checkpoint, TensorMeta, _check_finite, open_checkpoint
from ..errors import ConfigError, IncompatibleError
from .methods import get_method, tensor_seed, validate
from .plan import MergePlan, parse_size
from .weights import compute_weights

# Files copied from the config source; weights, optimizer state and training logs are not.
SKIP_COPY = {"model.safetensors.index.json", "README.md", "warmstart.json", "trainer_state.json",
             "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "pytorch_model.bin.index.json"}


# ----------------------------------------------------------------------------
# Result types


@dataclass
class TensorReport:
    name: str
    shape: list[int]
    dtype: str
    inputs: int  # how many donors took part
    action: str  # merged | copied | vocab-resized | tied-embedding
    note: str = ""


@dataclass
class MergeResult:
    out: Path
    method: str
    weights: list[float]
    inputs: list[dict]
    tensors: list[TensorReport] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    lora_errors: dict[str, float] | None = None  # LoRA merges: relative ΔW error per module
    state_dict: dict | None = field(default=None, repr=False)  # in-memory adapter merges (out=None)
    adapter_config: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("state_dict")
        d["out"] = str(self.out) if self.out is not None else None
        return d


# ----------------------------------------------------------------------------
# Planning: which inputs feed which output tensor, under the mismatch policies


@dataclass
class _Item:
    name: str
    out_dtype: torch.dtype
    shape: tuple
    base: TensorMeta | None  # θ₀ (or the reference, for copies)
    srcs: list[tuple[int, TensorMeta]]  # (donor index, meta) of the donors that take part
    action: str = "merged"
    note: str = ""


def resolve_weights(plan: MergePlan, cks: list[Checkpoint], base_ck: Checkpoint | None) -> list[float]:
    """One weight per donor (the base first when ``include_base``), from the plan's weighting scheme."""
    specs = list(plan.models)
    ws = [m.weight for m in specs]
    if plan.include_base:
        cks, ws, specs = [base_ck] + cks, [plan.base_weight] + ws, [None] + specs
    scheme = plan.weighting or ("given" if any(w is not None for w in ws) else "uniform")
    if scheme == "given" and any(w is None for w in ws):
        who = ["base" if s is None else s.ref for s, w in zip(specs, ws) if w is None]
        raise ConfigError(f"no weight given for {who}", path=plan.source,
                          hint="give every model a weight (and base_weight with include_base), or use --weights uniform")
    losses = [c.metrics.final_loss if c.metrics else None for c in cks]
    steps = [c.metrics.global_step if c.metrics else None for c in cks]
    if scheme.startswith("mwa:") and None in (losses if scheme == "mwa:loss" else steps):
        losses, steps = _library_metrics(plan, cks, losses, steps)
    scores = [s.score if s is not None else None for s in specs]
    try:
        return compute_weights(scheme, n=len(cks), given=ws if scheme == "given" else None, losses=
                               losses if scheme == "mwa:loss" else None, steps=steps, scores=scores,
                               higher_is_better=plan.higher_is_better, penalty=plan.penalty,
                               temperature=plan.temperature)
    except ConfigError as e:
        raise ConfigError(e.message, path=plan.source or e.path, hint=e.hint) from None


def _library_metrics(plan: MergePlan, cks, losses, steps):
    """Fill missing training metrics from the library catalog (entries registered with their metrics)."""
    from ..library import Library, default_library_path

    path = Path(plan.library) if plan.library else default_library_path()
    if not path.exists():
        return losses, steps
    losses, steps = list(losses), list(steps)
    with Library(path, create=False) as lib:
        for i, c in enumerate(cks):
            if c is None or (losses[i] is not None and steps[i] is not None):
                continue
            try:
                e = lib.get(str(c.path))
            except Exception:  # not registered: the weighting reports the missing metric
                continue
            losses[i] = losses[i] if losses[i] is not None else e.final_loss
            steps[i] = steps[i] if steps[i] is not None else e.global_step
    return losses, steps


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return getattr(torch, name) if name else default


def _tied_source(ck: Checkpoint, name: str) -> TensorMeta | None:
    """A donor that ties embeddings has no lm_head: its effective lm_head is the input embedding."""
    if not name.endswith("lm_head.weight") or not ck.config.get("tie_word_embeddings", False):
        return None
    return next((m for k, m in ck.weights().meta.items() if k.endswith("embed_tokens.weight")), None)


def plan_tensors(plan: MergePlan, donors: list[Checkpoint], ref: Checkpoint, use_base: bool,
                 notes: list[str]) -> list[_Item]:
    """Match every reference tensor with its donor tensors; apply the missing/vocab policies loudly."""
    ref_meta = ref.weights().meta
    items, missing = [], []
    for name, rm in ref_meta.items():
        out_dtype = _dtype(plan.dtype, ST_DTYPES.get(rm.dtype, torch.float32)) if rm.dtype in (
            "F32", "F16", "BF16", "F64") else ST_DTYPES[rm.dtype]
        item = _Item(name, out_dtype, rm.shape, rm, [])
        if rm.dtype not in ("F32", "F16", "BF16", "F64"):
            item.action, item.note = "copied", "not a float tensor: copied from the reference"
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


def merge(plan: MergePlan, out: str | Path, *, force: bool = False,
          progress: Callable[[int, int, str], None] | None = None, allow_nonfinite: bool = False) -> MergeResult:
    """Run ``plan`` and write the merged model (or adapter) to ``out`` atomically.

    NaN/Inf in any input tensor is refused unless ``allow_nonfinite`` (it would poison the merge)."""
    t0 = time.perf_counter()
    out = Path(out)
    _check_device(plan.device)
    base_ck = open_checkpoint(plan.base, allow_nonfinite=allow_nonfinite) if plan.base else None
    cks = [open_checkpoint(m.ref, allow_nonfinite=allow_nonfinite) for m in plan.models]
    kinds = {c.kind for c in cks}
    if kinds == {"lora"}:
        from .lora import merge_plan_adapters

        return merge_plan_adapters(plan, cks, out, force=force, progress=progress)
    if "lora" in kinds or (base_ck is not None and base_ck.kind != "full"):
        raise IncompatibleError("cannot mix LoRA adapters and full models in one merge",
                                hint="merge the adapters first, or merge each adapter into its base model")
    check_output(out, force=force, inputs=[c.path for c in cks] + ([base_ck.path] if base_ck else []))
    method = get_method(plan.method)
    weights = resolve_weights(plan, cks, base_ck)
    donors = ([base_ck] if plan.include_base else []) + cks
    use_base = base_ck is not None and plan.method != "linear"
    params = _params(plan, method, len(donors), use_base)
    notes = [] if use_base or not base_ck else [
        "linear merge: the base takes part " + ("(include_base)" if plan.include_base else
                                                "NOT (it only supplies config/tokenizer; pass --include-base)")]
    ref = base_ck or cks[0]
    items = plan_tensors(plan, donors, ref, use_base, notes)
    timings = {"open": time.perf_counter() - t0}
    result = MergeResult(out, plan.method, weights, [], notes=notes)
    with atomic_dir(out, force=force) as tmp:
        digests = _stream(plan, method, params, items, donors, ref, use_base, weights, tmp, result, progress)
        timings["merge"] = time.perf_counter() - t0 - timings["open"]
        _copy_config(plan, base_ck or cks[0], tmp, items)
        all_cks = ([base_ck] if base_ck and not plan.include_base else []) + donors
        result.inputs = [_input_info(c, digests.get(id(c)), role) for c, role in
                         zip(all_cks, (["base"] if base_ck else []) + ["model"] * len(cks))]
        for i, c in enumerate(donors):
            result.inputs[[x["path"] for x in result.inputs].index(str(c.path))]["weight"] = weights[i]
        result.timings = {**timings, "total": time.perf_counter() - t0}
        write_card(tmp, plan, result)
    return result


def _check_device(name: str) -> None:
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


def _params(plan: MergePlan, method, n: int, use_base: bool) -> dict:
    params = validate(method, n, use_base or not method.needs_base, dict(plan.params))
    per_model = {k for m in plan.models for k in m.params}
    for k in per_model:  # mergekit-style per-model parameters become per-donor lists
        default = params.get(k)
        vals = ([default] if plan.include_base else []) + [m.params.get(k, default) for m in plan.models]
        params[k] = vals
    validate(method, n, True, {k: v for k, v in params.items() if not isinstance(v, list)})
    return params


def _stream(plan, method, params, items, donors, ref, use_base, weights, tmp, result, progress) -> dict:
    """Read (every input of the next tensor in parallel), merge, and hand each result to the shard writer."""
    entries = [(it.name, it.out_dtype, it.shape) for it in items]
    writer = ShardWriter(tmp, shard_layout(entries, parse_size(plan.shard_size)))
    reader = PreadReader()
    # Inputs whose digests the library's cache already holds are not hashed again; the others are
    # hashed from the bytes read here (and the cache filled), so fingerprints never cost a second read.
    digests = {id(c): ({} if not _digests_cached(c) else None) for c in donors + [ref]}
    owner = {(m.file, m.name): c for c in donors + [ref] for m in c.weights().meta.values()}
    dev, cdt = torch.device(plan.device), _dtype(plan.compute_dtype, torch.float32)

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
        need_base = it.base is not None and (use_base or it.action in ("copied", "vocab-resized") or not it.srcs)
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
                writer.put(_merge_item(it, method, params, base_t, ins, use_base, weights, dev, cdt))
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
    from ..checkpoints import default_digest_cache

    if ck.pickle:
        return True  # pickle checkpoints are fingerprinted by Checkpoint.fingerprint itself
    try:
        cache = default_digest_cache()
        return all(cache.peek(f) is not None for f in ck.weight_files)
    except Exception:  # a broken cache is only a cache
        return False


def _store_digests(ck: Checkpoint, digests: dict | None) -> None:
    """Hand the digests computed while reading to the cache, one file at a time."""
    from ..checkpoints import default_digest_cache

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


def _merge_item(it, method, params, base_t, ins, use_base, weights, dev, cdt) -> torch.Tensor:
    if it.action == "copied" or not ins:
        return base_t.to(it.out_dtype)
    if it.action == "vocab-resized":
        fill = base_t
        ins = [_resize_rows(t, it.shape[0], fill) for t in ins]
    idx = [i for i, _ in it.srcs]
    p = {k: ([v[i] for i in idx] if isinstance(v, list) else v) for k, v in params.items()}
    if "seed" in p:
        p["seed"] = tensor_seed(int(p["seed"]), it.name)
    b = base_t.to(dev, cdt) if use_base else None
    out = method.fn([t.to(dev, cdt) for t in ins], b, [weights[i] for i in idx], **p)
    return out.to(it.out_dtype).cpu()


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
        h = hashlib.blake2b(digest_size=16)  # Checkpoint.fingerprint, from the bytes we already read
        h.update(ck.kind.encode())
        for name in sorted(names):
            h.update(f"{name}={digests[name]};".encode())
        fp = h.hexdigest()
    else:
        fp = ck.fingerprint()
    m = ck.metrics
    return {"role": role, "ref": ck.ref, "path": str(ck.path), "kind": ck.kind, "fingerprint": fp,
            "final_loss": m.final_loss if m else None, "global_step": m.global_step if m else None}


def _copy_config(plan: MergePlan, default_src: Checkpoint, tmp: Path, items: list[_Item]) -> None:
    src = open_checkpoint(plan.config_from).path if plan.config_from else default_src.path
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in SKIP_COPY and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(f, tmp / f.name)
    cfg_path = tmp / "config.json"
    if cfg_path.exists() and plan.dtype:
        cfg = json.loads(cfg_path.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = plan.dtype
        atomic_write_json(cfg_path, cfg)


# ----------------------------------------------------------------------------
# Model card + warmstart.json


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("warmstart", "torch", "transformers", "safetensors", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_card(tmp: Path, plan: MergePlan, result: MergeResult, *, kind: str = "model") -> None:
    """README.md (human) + warmstart.json (machine) describing how the output was made."""
    versions = _versions()
    meta = {"made_by": "warmstart merge", "kind": kind, "plan": plan.to_dict(), "versions": versions,
            **{k: v for k, v in result.to_dict().items() if k not in ("tensors", "out", "modules")}}
    if result.inputs and result.inputs[0]["role"] == "base":
        meta["base_model"] = result.inputs[0]["path"]
    atomic_write_json(tmp / "warmstart.json", meta)
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
        f"Output dtype: {plan.dtype or 'as the reference'}; math in {plan.compute_dtype}.", "",
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
    (tmp / "README.md").write_text("\n".join(lines))


__all__ = ["MergeResult", "TensorReport", "merge", "plan_tensors", "resolve_weights", "write_card"]
