"""Scoring candidates: the library's checkpoints that fit a base, each scored on a target sample.

The engine beneath :func:`warmstart.select.select` and :mod:`warmstart._halving` (which both
import it; it imports neither): candidates and score rows, the cached scorer (loss or gradient
proxy), the one base model they are scored on, and the best-first order of scores. Moved out of
``select`` unchanged so ``_halving`` and ``select`` no longer import each other (#12).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _dist, _gradproxy
from . import metrics as _metrics
from ._precision import COMPUTE_DTYPES, resolve
from .checkpoints import Checkpoint, load_causal_lm, load_tokenizer, open_checkpoint
from .data import TargetData
from .errors import CheckpointError, ConfigError, IncompatibleError, WarmstartError
from .evaluate import evaluate, n_rows
from .library import Entry, Library

# CLI metric name -> (evaluate()'s key, higher is better), from the one metric table
METRICS = {m.name: (m.key, m.higher_is_better) for m in _metrics.TABLE.values()}
SCORERS = ("loss", "grad", "halving")
DEFAULT_MAX_LENGTH = 512


def metric_key(metric: str) -> tuple[str, bool]:
    m = _metrics.get(metric)
    return m.key, m.higher_is_better


# ----------------------------------------------------------------------------
# Candidates and scores


@dataclass
class Candidate:
    id: int | str  # library id, or "base"
    ref: str
    path: str
    kind: str  # "base" | "full" | "lora"
    fingerprint: str  # cache key; a LoRA's includes its base's fingerprint
    entry: Entry | None = None

    @property
    def sort_id(self) -> int:
        return -1 if self.kind == "base" else int(self.id)


@dataclass
class ScoreRow:
    id: int | str
    ref: str
    kind: str
    score: float | None
    cached: bool
    metrics: dict[str, float] = field(default_factory=dict)
    rows: int | None = None  # sample rows the score is on (halving's early rounds); None: the whole sample


def candidates_for(base: str | Path | Checkpoint, library: Library | None, *, include_base: bool = True,
                   ids: Sequence[int] | None = None, include_derived: bool = False) -> list[Candidate]:
    """The base plus every library entry compatible with it (files present), sorted by id.

    Derived entries (merges, transfers, the stages of warmstart runs: ``Entry.derived``) are left
    out unless ``include_derived``: a merge of donors offered as a donor counts them twice."""
    base_ck = open_checkpoint(base)
    if base_ck.kind != "full":
        raise ConfigError("--base must be a full model, got a LoRA adapter", path=base_ck.path)
    base_fp = base_ck.fingerprint()
    out = [Candidate("base", base_ck.ref, str(base_ck.path), "base", base_fp)] if include_base else []
    derived = None if include_derived else False
    for e in (library.list(compatible_with=base, derived=derived) if library else []):
        if e.missing or (ids is not None and e.id not in ids):
            continue
        fp = e.fingerprint
        if e.kind == "lora":  # the same adapter on another base scores differently
            fp = hashlib.blake2b(f"{e.fingerprint}@{base_fp}".encode(), digest_size=16).hexdigest()
        out.append(Candidate(e.id, e.ref, e.path, e.kind, fp, e))
    return out


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This process's share: every ``world_size``-th item from ``rank`` (balanced within one item)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"bad rank {rank} for world size {world_size}")
    return list(items[rank::world_size])


dist_env = _dist.rank_world  # (rank, world size) of an ``accelerate launch`` / torchrun; (0, 1) otherwise


def _cache_metric(key: str, scorer: str, max_length: int, mc_mode: str, compute_dtype: str = "float32") -> str:
    """The metric column of the cache: the name plus every setting that changes the value."""
    name = f"grad_{key}" if scorer == "grad" else key
    if compute_dtype == "bfloat16" and scorer != "grad":  # bf16 scores differ from float32 ones (slightly)
        name += ":bf16h"  # "h": with the bf16 head (_precision); the older bf16 path's ":bf16" scores are not reused
    if mc_mode != "rank":
        name += f":{mc_mode}"
    if max_length != DEFAULT_MAX_LENGTH:
        name += f"@{max_length}"
    return name


# ----------------------------------------------------------------------------
# Scoring


@dataclass
class ScoreConfig:
    metric: str = "loss"
    scorer: str = "loss"
    batch_size: int = 16
    max_length: int = DEFAULT_MAX_LENGTH
    mc_mode: str = "rank"
    dtype: str = "float32"
    device: str | None = None
    compute_dtype: str = "auto"  # matmuls of the loss scorer: auto | float32 | bfloat16 (warmstart._precision)

    def resolved_compute_dtype(self) -> str:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unknown compute dtype {self.compute_dtype!r}", hint="auto, float32 or bfloat16")
        if self.dtype != "float32":  # a model loaded in half precision computes in it whatever we ask
            return self.dtype
        return resolve(self.compute_dtype, self.device)


def score_candidates(target: TargetData, base: str | Path, candidates: Sequence[Candidate], *,
                     library: Library | None = None, config: ScoreConfig | None = None,
                     model=None, tokenizer=None, rank: int = 0, world_size: int = 1, wait: bool = True,
                     progress: Callable[[str, Any], None] | None = None) -> list[ScoreRow]:
    """Score each candidate on ``target`` (already sampled); cached scores are reused.

    ``model``/``tokenizer``: an already loaded base to score on (it is modified:
    adapters are attached and full checkpoints copied in). ``rank``/``world_size``:
    score only this process's share of the uncached candidates, then (if ``wait``)
    wait until the other processes have cached theirs (else return the rows known so far). ``progress(event, payload)``
    gets ("start", total_rows), ("candidate", Candidate) and ("rows", n).
    """
    cfg = config or ScoreConfig()
    key, _ = metric_key(cfg.metric)
    if cfg.scorer not in ("loss", "grad"):  # "halving" calls this with "loss" (select() dispatches it)
        raise ConfigError(f"unknown scorer {cfg.scorer!r}", hint="choose loss or grad")
    if cfg.scorer == "grad" and key != "loss":
        raise ConfigError("the gradient proxy predicts the loss; use --metric loss with --scorer grad")
    if _metrics.get(cfg.metric).needs_mc and target.format != "mc":
        raise ConfigError(f"--metric {cfg.metric} needs question/choices/answer rows; {target.path} is "
                          f"{target.format!r}", hint="use --metric loss or accuracy")
    cdt = cfg.resolved_compute_dtype()
    cache_name = _cache_metric(key, cfg.scorer, cfg.max_length, cfg.mc_mode, cdt)
    dfp, spec = target.fingerprint(), target.sample_spec

    def cached(c: Candidate) -> dict | None:
        return library.cached_score(c.fingerprint, dfp, spec, cache_name) if library else None

    # Shard the full list, not the uncached one: every process must agree on the split
    # even while the others are already writing scores.
    todo = [c for c in shard(candidates, rank, world_size) if cached(c) is None]
    results: dict[str, dict[str, float]] = {}

    def record(c: Candidate, vals: dict[str, float]) -> None:
        """Check and cache each score as soon as it exists: a killed run resumes where it stopped."""
        if any(v != v for v in vals.values()):  # NaN weights give a NaN score (SQLite would store NULL)
            raise CheckpointError("scoring this candidate gave NaN (NaN/Inf in its weights?)", path=c.path,
                                  hint="repair it, or `warmstart library remove` it")
        results[c.fingerprint] = vals
        if library:
            for m, v in vals.items():
                library.put_score(c.fingerprint, dfp, spec, _cache_metric(m, cfg.scorer, cfg.max_length,
                                                                          cfg.mc_mode, cdt), v)

    if todo:
        _score_uncached(target, base, todo, cfg, key, model, tokenizer, progress, record)
    if world_size > 1 and wait:
        _wait_for_all(candidates, cached)
    rows = []
    for c in candidates:
        if c.fingerprint in results:
            vals, was_cached = results[c.fingerprint], False
        else:
            hit = cached(c)
            if hit is None and world_size > 1 and not wait:
                continue  # another process's share, not written yet
            if hit is None:
                raise WarmstartError(f"no score for {c.ref} (another process did not finish)")
            vals, was_cached = {key: hit["value"]}, True
        rows.append(ScoreRow(c.id, c.ref, c.kind, vals.get(key), was_cached, vals))
    return rows


def _wait_for_all(candidates, cached, timeout: float = 24 * 3600) -> None:
    """Barrier through the library: every process writes its scores, all wait for the rest.

    A torch.distributed barrier is used when one is initialised (``accelerate launch``);
    polling the cache covers processes started some other way.
    """
    if _dist.barrier():
        return
    deadline = time.time() + timeout
    while any(cached(c) is None for c in candidates):
        if time.time() > deadline:
            raise WarmstartError("timed out waiting for the other selection processes")
        time.sleep(1.0)


def _score_uncached(target, base, todo, cfg, key, model, tokenizer, progress, record) -> None:
    """Score and ``record(candidate, metrics)`` each. Order: base, LoRAs (on the pristine base), full checkpoints."""
    if model is None:
        model, tokenizer = load_base(base, dtype=cfg.dtype, device=cfg.device)
    order = sorted(todo, key=lambda c: ({"base": 0, "lora": 1, "full": 2}[c.kind], c.sort_id))
    if cfg.scorer == "grad":
        scores = _gradproxy.score(model, tokenizer, target, order, base=base, batch_size=cfg.batch_size,
                                  max_length=cfg.max_length, progress=progress)
        for c in order:
            record(c, scores[c.fingerprint])
        return
    metrics = ("loss", "token_accuracy", "exact_match") + (("mc_accuracy",) if _metrics.get(cfg.metric).needs_mc
                                                           else ())
    compute_dtype = cfg.resolved_compute_dtype()
    if compute_dtype != "bfloat16":
        compute_dtype = None  # the model as loaded: float32 unchanged, float16 with float32 logits
    per = n_rows(target, "mc_accuracy" if "mc_accuracy" in metrics else "loss")
    if progress:
        progress("start", per * len(order))

    def run(c: Candidate, m) -> dict[str, float]:
        if progress:
            progress("candidate", c)
        res = evaluate(m, tokenizer, target, metrics=metrics, batch_size=cfg.batch_size,
                       max_length=cfg.max_length, mc_mode=cfg.mc_mode, compute_dtype=compute_dtype,
                       progress=(lambda n: progress("rows", n)) if progress else None)
        return {k: v for k, v in res.items() if k not in ("n_examples", "n_tokens", "mc_accuracy")}

    for c in order:
        if c.kind == "base":
            record(c, run(c, model))
    model = _score_loras(model, [c for c in order if c.kind == "lora"], run, record)
    fulls = [c for c in order if c.kind == "full"]
    try:
        for c in fulls:
            load_full_into(model, c.path)
            record(c, run(c, model))
    finally:
        if fulls:  # hand the caller's model back as the base it was
            load_full_into(model, base)


def _score_loras(model, loras: list[Candidate], run, record) -> Any:
    """Attach each adapter once, score it, drop the previous one; return the bare base model.
    An adapter with the resident one's config is copied into its layers instead (:func:`_swap_weights`).

    PEFT injects LoRA layers into ``model`` in place, so they are removed again
    (``unload``) even when scoring fails: a caller's model is never left altered.
    """
    if not loras:
        return model
    from peft import PeftModel

    pm, prev = None, None
    try:
        for c in loras:
            name = f"c{c.id}"
            try:
                if pm is not None and _swap_weights(pm, prev, c.path):
                    record(c, run(c, pm))
                    continue
                if pm is None:
                    pm = PeftModel.from_pretrained(model, c.path, adapter_name=name, is_trainable=False)
                else:
                    pm.load_adapter(c.path, adapter_name=name, is_trainable=False)
                    pm.set_adapter(name)
            except (ValueError, RuntimeError, KeyError) as e:  # PEFT's errors for an adapter that does not fit
                raise IncompatibleError(f"adapter does not fit the base ({e})", path=c.path) from None
            if prev is not None:
                pm.delete_adapter(prev)  # keep memory flat: one adapter resident at a time
            record(c, run(c, pm))
            prev = name
    finally:
        if pm is not None:
            model = pm.unload()  # removes the LoRA layers, leaving the untouched base weights
    return model


# Config fields that do not change what the resident adapter's layers compute.
_SWAP_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "task_type"}


def _swap_weights(pm, resident: str, path) -> bool:
    """Copy the adapter at ``path`` into the resident adapter's tensors when its config is the
    resident one's (same modules, rank, alpha, variant): True if done, False to load it the usual way.

    Written here because PEFT's ``load_adapter`` injects a new set of LoRA layers for every adapter
    (a walk over every module of the model, then ``delete_adapter`` walks them again): at SmolLM2-135M
    that was 0.43 s per candidate, 26 % of a 1,000-candidate halving selection (profiled), against
    ~10 ms to read 1.8 MB and copy it into the layers that are already there. The scores are the same:
    the same layers compute with the same weights (tested against PEFT's own loading)."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    new = PeftConfig.from_pretrained(str(path)).to_dict()
    old = pm.peft_config[resident].to_dict()
    if getattr(pm.peft_config[resident], "peft_type", None) != "LORA" or new.get("modules_to_save") or any(
            new.get(k) != old.get(k) for k in (set(new) | set(old)) - _SWAP_IGNORED):
        return False
    weights = load_peft_weights(str(path), device=str(next(pm.parameters()).device))
    res = set_peft_model_state_dict(pm, weights, adapter_name=resident)
    # every tensor of the resident adapter must have been overwritten, and nothing else touched
    tag = f".{resident}."
    missing = [k for k in res.missing_keys if tag in k or k.endswith(f".{resident}")]
    if missing or res.unexpected_keys:
        raise IncompatibleError(f"adapter does not fit the base (missing {missing[:1]}, unexpected "
                                f"{list(res.unexpected_keys)[:1]})", path=path)
    return True


# ----------------------------------------------------------------------------
# Models


def load_base(base: str | Path, *, dtype: str = "float32", device: str | None = None):
    """The base model and its tokenizer, loaded once for all candidates."""
    import torch

    path = open_checkpoint(base).path
    if device is None:  # one GPU per process under accelerate/torchrun
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    td = getattr(torch, str(dtype), None)
    if not isinstance(td, torch.dtype) or not td.is_floating_point:  # torch.int4 exists but cannot hold a model
        raise ConfigError(f"unknown dtype {dtype!r}", hint="float32, bfloat16 or float16")
    model = load_causal_lm(path, dtype=td).to(device)
    tok = load_tokenizer(path)
    model.eval()
    model.requires_grad_(False)  # scoring only (the gradient proxy sets its own); lets _precision keep bf16 copies
    return model, tok


def load_full_into(model, ref: str | Path) -> None:
    """Copy a full checkpoint's tensors into ``model`` in place (no new model object).

    Tied parameters (lm_head = embed_tokens) appear once in the file; a parameter
    is satisfied when any of its aliases is present.
    """
    import torch

    ck = open_checkpoint(ref)
    reader, ref = ck.weights(), ck.path  # ref: may be an opened Checkpoint; errors name its directory
    sd = model.state_dict()
    groups: dict[int, list[str]] = {}
    for k, t in sd.items():
        groups.setdefault(t.data_ptr(), []).append(k)
    with torch.no_grad():
        for names in groups.values():
            src = next((n for n in names if n in reader), None)
            if src is None:
                raise IncompatibleError(f"checkpoint has no tensor {names[0]!r}", path=ref)
            t = reader.get(src)
            dst = sd[names[0]]
            if tuple(t.shape) != tuple(dst.shape):
                raise IncompatibleError(f"tensor {src!r} has shape {tuple(t.shape)}, the base has "
                                        f"{tuple(dst.shape)}", path=ref)
            dst.copy_(t.to(dst.dtype))
    extra = set(reader.keys()) - set(sd)
    if extra:
        raise IncompatibleError(f"checkpoint has tensors the base lacks, e.g. {sorted(extra)[0]!r}", path=ref)


# ----------------------------------------------------------------------------
# Order


def rank_rows(rows: Sequence[ScoreRow], higher_is_better: bool) -> list[ScoreRow]:
    """Best first; ties broken by score, then by id (base first) — never by name."""
    scored = [r for r in rows if r.score is not None]
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scored, key=lambda r: (sign * r.score, -1 if r.kind == "base" else int(r.id)))


__all__ = [
    "METRICS",
    "SCORERS",
    "DEFAULT_MAX_LENGTH",
    "metric_key",
    "Candidate",
    "ScoreRow",
    "candidates_for",
    "shard",
    "dist_env",
    "ScoreConfig",
    "score_candidates",
    "load_base",
    "load_full_into",
    "rank_rows",
]
