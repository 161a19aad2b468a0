"""Selection: score every compatible checkpoint on a sample of the target, keep the best.

The "relevance" step of Mashup Learning: a checkpoint that already fits the
target is a good donor to merge. Made cheap enough for hundreds of checkpoints:

* the base model is loaded once; LoRA candidates are attached to it one by one
  with PEFT's ``load_adapter`` + ``set_adapter`` (each adapter read once, the
  base never reloaded) and full checkpoints are copied tensor by tensor into
  the same model object;
* every score is cached in the library under (checkpoint fingerprint, dataset
  fingerprint, sample spec, metric), so a second run costs no forward pass;
* ``scorer="grad"`` replaces the N evaluations by one backward pass at the base
  and N inner products (see :mod:`warmstart._gradproxy`);
* ``scorer="halving"`` pre-ranks the candidates by their catalogued summaries against one
  backward pass, then runs successive halving on the shortlist with the loss scorer
  (:mod:`warmstart._halving`): cost nearly flat in the library's size;
* ``weights="optimized"`` searches the donors' merge weights with CMA-ES on the
  same target sample (:mod:`warmstart.optimize`; LoRA mixtures are evaluated
  exactly, by scaling the active adapters) and records them for the merge;
* under ``accelerate launch`` the uncached candidates are split across
  processes by rank; each writes its scores to the library and rank 0, after a
  barrier, reads them all back and writes the selection.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _dist, _gradproxy
from .checkpoints import load_causal_lm, load_tokenizer, open_checkpoint
from .data import TargetData, load_target
from .errors import CheckpointError, ConfigError, IncompatibleError, WarmstartError
from .evaluate import evaluate, n_rows
from .library import Entry, Library

# CLI metric name -> (evaluate()'s key, higher is better)
METRICS = {
    "loss": ("loss", False),
    "accuracy": ("token_accuracy", True),
    "exact-match": ("exact_match", True),
    "mc-accuracy": ("mc_accuracy_sum", True),
    "mc-accuracy-norm": ("mc_accuracy_norm", True),
}
SCORERS = ("loss", "grad", "halving")
DEFAULT_MAX_LENGTH = 512


def metric_key(metric: str) -> tuple[str, bool]:
    m = metric.replace("_", "-")
    if m not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}", hint=f"choose one of {', '.join(METRICS)}")
    return METRICS[m]


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


def candidates_for(base: str | Path, library: Library | None, *, include_base: bool = True,
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
        name += ":bf16"
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
        from ._precision import COMPUTE_DTYPES, resolve

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
    if key.startswith("mc_") and target.format != "mc":
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
    metrics = ("loss", "token_accuracy", "exact_match") + (("mc_accuracy",) if key.startswith("mc_") else ())
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
    return model, tok


def load_full_into(model, ref: str | Path) -> None:
    """Copy a full checkpoint's tensors into ``model`` in place (no new model object).

    Tied parameters (lm_head = embed_tokens) appear once in the file; a parameter
    is satisfied when any of its aliases is present.
    """
    import torch

    reader = open_checkpoint(ref).weights()
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
# Choosing donors and the selection file


@dataclass
class Selection:
    target: dict
    base: str
    metric: str
    scorer: str
    higher_is_better: bool
    ranking: list[dict]
    donors: list[dict]
    weighting: dict
    k: int = 2
    margin: float | None = None
    created: dict = field(default_factory=dict)
    method: str | None = None  # set when the weights were searched for a method (optimized: task_arithmetic)
    params: dict | None = None
    own_gate: dict | None = None  # {min_gain, excluded: [{id, ref, metric, start, final, gain, from}]}
    halving: dict | None = None  # scorer halving: shortlist, rounds, row evaluations, seconds

    def to_dict(self) -> dict:
        return asdict(self)


def rank_rows(rows: Sequence[ScoreRow], higher_is_better: bool) -> list[ScoreRow]:
    """Best first; ties broken by score, then by id (base first) — never by name."""
    scored = [r for r in rows if r.score is not None]
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scored, key=lambda r: (sign * r.score, -1 if r.kind == "base" else int(r.id)))


def choose_donors(ranked: Sequence[ScoreRow], *, k: int, margin: float | None,
                  higher_is_better: bool, exclude: Sequence[int | str] = ()) -> list[ScoreRow]:
    """Top-k non-base rows; with ``margin``, only rows better than the base by at least that much.
    Rows whose id is in ``exclude`` (donors that never learned their own task) are skipped."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    base = next((r for r in ranked if r.kind == "base"), None)
    out = []
    for r in ranked:
        if r.kind == "base" or r.id in exclude:
            continue
        if margin is not None and base is not None:
            gain = (r.score - base.score) if higher_is_better else (base.score - r.score)
            if gain < margin:
                continue
        out.append(r)
    return out[:k]


# A donor must have learned its own task (``min_own_gain``): the gradient proxy and a small target
# sample can rank an adapter first whose own training never moved (recycle-bench: the currency_code,
# rhyme and syllables adapters ended at most one question above their step-0 accuracy), and merging
# it gains nothing. 0.02 = two points of accuracy: above the one-question steps of a 50-100 row eval.
DEFAULT_MIN_OWN_GAIN = 0.02
_OWN_METRICS = ("eval_mc_accuracy", "eval_accuracy", "eval_exact_match", "eval_token_accuracy")  # report's order


def own_training(entry: Entry | None) -> dict | None:
    """What a candidate's own training shows, from the best evidence there is, or None.

    1. ``curve.json`` next to the weights (written by ``warmstart finetune``): the first
       accuracy-like metric logged at step 0 and at the end, gain = final − start (points);
       with only the eval loss, gain = its relative fall (start − final) / start;
    2. the training-loss history the catalog recorded from ``trainer_state.json``:
       gain = relative fall of the training loss from its first to its last logged value.
    """
    if entry is None:
        return None
    curve = Path(entry.path) / "curve.json"
    if curve.is_file():
        import json

        try:
            pts = sorted((p for p in json.loads(curve.read_text()).get("points", []) if isinstance(p, dict)),
                         key=lambda p: p.get("step", 0))
        except (ValueError, OSError, AttributeError, TypeError):
            pts = []  # an unreadable curve is no evidence; the history below may still be
        if len(pts) >= 2 and pts[0].get("step") == 0:
            for key in _OWN_METRICS + ("eval_loss",):
                vals = [p[key] for p in pts[1:] if isinstance(p.get(key), (int, float)) and p[key] == p[key]]
                a, b = pts[0].get(key), (vals[-1] if vals else None)  # step 0 and the last evaluation
                if isinstance(a, (int, float)) and a == a and b is not None:
                    gain = (b - a) if key != "eval_loss" else ((a - b) / a if a else 0.0)
                    return {"metric": key, "start": a, "final": b, "gain": gain, "from": "curve.json"}
    hist = [h for h in (entry.loss_history or []) if isinstance(h, (list, tuple)) and len(h) == 2]
    if len(hist) >= 2 and hist[0][1]:
        a, b = float(hist[0][1]), float(hist[-1][1])
        return {"metric": "train_loss", "start": a, "final": b, "gain": (a - b) / a, "from": "trainer_state.json"}
    return None


def unlearned(cands_entries: dict, min_gain: float | None) -> dict:
    """{id: evidence} of the candidates whose own training gained less than ``min_gain``."""
    if min_gain is None:
        return {}
    out = {}
    for cid, e in cands_entries.items():
        ev = own_training(e)
        if ev is not None and ev["gain"] < min_gain:
            out[cid] = ev
    return out


WEIGHT_SCHEMES = ("uniform", "score", "softmax", "mwa:loss", "mwa:steps", "optimized")


def parse_weights(spec: str) -> tuple[str, float | None]:
    """'uniform' | 'score' | 'softmax:T' | 'mwa:loss' | 'mwa:steps' | 'optimized' -> (scheme, temperature)."""
    if spec.startswith("softmax"):
        _, _, t = spec.partition(":")
        try:
            return "softmax", float(t) if t else 1.0
        except ValueError:
            raise ConfigError(f"bad softmax temperature in {spec!r}", hint="e.g. softmax:0.5") from None
    if spec not in WEIGHT_SCHEMES:
        raise ConfigError(f"unknown weights {spec!r}", hint=f"choose one of {', '.join(WEIGHT_SCHEMES)} "
                          "(softmax:T with a temperature)")
    return spec, None


def donor_weights(donors: Sequence[ScoreRow], entries: dict, spec: str, *, higher_is_better: bool,
                  penalty: float = 1.0) -> tuple[list[float], dict]:
    """Weights from ``warmstart.merge.weights``; MWA uses each donor's training loss or step.

    mwa:loss falls back to the target-sample loss when a donor has no training loss
    and the selection metric is the loss (recorded in the weighting info).
    """
    from .merge.weights import compute_weights

    scheme, temp = parse_weights(spec)
    info: dict[str, Any] = {"scheme": scheme}
    kw: dict[str, Any] = {"scores": [d.score for d in donors], "higher_is_better": higher_is_better,
                          "penalty": penalty}
    if temp is not None:
        kw["temperature"] = info["temperature"] = temp
    if scheme.startswith("mwa"):
        info["penalty"] = penalty
        es = [entries.get(d.id) for d in donors]
        kw["steps"] = [e.global_step if e else None for e in es]
        losses = [e.final_loss if e else None for e in es]
        if scheme == "mwa:loss" and any(x is None for x in losses) and not higher_is_better:
            losses, info["losses_from"] = [d.score for d in donors], "target sample"
        kw["losses"] = losses
    return compute_weights(scheme, n=len(donors), **kw), info


def _stage(r: ScoreRow) -> dict:
    """Halving's extra ranking fields: rows the score is on (0: pre-ranked out), the pre-score."""
    if r.rows is None:
        return {}
    return {"rows": r.rows, **({"prescore": r.metrics["prescore"]} if "prescore" in r.metrics else {})}


def _task_of(entries: dict, entry_id) -> str | None:
    e = entries.get(entry_id)
    return e.task if e is not None else None


def build_selection(target: TargetData, base: str, rows: Sequence[ScoreRow], *, metric: str, scorer: str,
                    k: int, margin: float | None, weights: str, penalty: float,
                    entries: dict, min_own_gain: float | None = None, ordered: bool = False) -> Selection:
    """``ordered``: ``rows`` are already best first (halving); donors come only from rows scored on
    the whole sample."""
    _, hib = metric_key(metric)
    ranked = list(rows) if ordered else rank_rows(rows, hib)
    never = unlearned({r.id: entries.get(r.id) for r in ranked if r.kind != "base"}, min_own_gain)
    donors = choose_donors([r for r in ranked if r.rows is None and r.score is not None], k=k, margin=margin,
                           higher_is_better=hib, exclude=list(never))
    w, info = donor_weights(donors, entries, weights, higher_is_better=hib, penalty=penalty) if donors else ([], {
        "scheme": parse_weights(weights)[0]})
    from . import __version__

    return Selection(
        target={"path": str(target.path), "fingerprint": target.fingerprint(), "sample": target.sample_spec,
                "format": target.format, "split": target.split, "n_examples": len(target)},
        base=str(base), metric=metric, scorer=scorer, higher_is_better=hib,
        ranking=[{"rank": i + 1, "id": r.id, "ref": r.ref, "kind": r.kind, "task": _task_of(entries, r.id),
                  "score": r.score, "cached": r.cached, **_stage(r)} for i, r in enumerate(ranked)],
        donors=[{"id": d.id, "ref": d.ref, "kind": d.kind, "task": _task_of(entries, d.id), "score": d.score,
                 "weight": wi} for d, wi in zip(donors, w)],
        weighting=info, k=k, margin=margin,
        own_gate={"min_gain": min_own_gain,
                  "excluded": [{"id": r.id, "ref": r.ref, **never[r.id]} for r in ranked if r.id in never]},
        created={"warmstart": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def select(target: str | Path | TargetData, base: str | Path, *, library: Library | None = None,
           metric: str = "loss", n: int | None = 256, seed: int = 0, k: int = 2, margin: float | None = None,
           weights: str = "uniform", penalty: float = 1.0, scorer: str = "loss", split: str | None = None,
           format: str | None = None, mc_style: str = "text", batch_size: int = 16,
           max_length: int = DEFAULT_MAX_LENGTH, mc_mode: str = "rank", dtype: str = "float32",
           compute_dtype: str = "auto", model=None, tokenizer=None, rank: int | None = None,
           world_size: int | None = None, optimize_budget: int = 20,
           min_own_gain: float | None = DEFAULT_MIN_OWN_GAIN,
           progress: Callable[[str, Any], None] | None = None,
           include_derived: bool = False, shortlist: int = 8, halving_rows: int = 8,
           prerank_rows: int = 16) -> Selection | None:
    """Load and sample the target, score the base and every compatible entry, choose donors.

    ``weights="optimized"`` then searches the donors' weights with CMA-ES
    (``optimize_budget`` evaluations on the same sample, starting from uniform).
    ``min_own_gain``: a candidate whose own training gained less than this on its own task
    (:func:`own_training`) is never a donor; None chooses by the target score alone.
    Returns None on ranks other than 0 of a multi-process run (they only score).
    ``compute_dtype="auto"`` scores in bfloat16 where the hardware runs it fast (float32
    logits and sums; see docs/select.md for the measured agreement), ``"float32"`` as before.
    ``scorer="halving"``: pre-rank by catalogued summaries on ``prerank_rows`` rows, keep
    ``shortlist``, successive halving from ``halving_rows`` rows (:mod:`warmstart._halving`).
    """
    metric_key(metric)
    parse_weights(weights)
    if min_own_gain is not None and not (isinstance(min_own_gain, (int, float)) and min_own_gain == min_own_gain):
        raise ConfigError(f"min_own_gain must be a number or null, got {min_own_gain!r}")
    data = target if isinstance(target, TargetData) else load_target(
        target, split=split, format=format, mc_style=mc_style)
    data = data.sample(n, seed)
    if rank is None or world_size is None:
        rank, world_size = dist_env()
    cands = candidates_for(base, library, include_derived=include_derived)
    halving = scorer == "halving"
    cfg = ScoreConfig(metric=metric, scorer="loss" if halving else scorer, batch_size=batch_size,
                      max_length=max_length, mc_mode=mc_mode, dtype=dtype, compute_dtype=compute_dtype)
    entries = {c.id: c.entry for c in cands if c.entry is not None}
    info = None
    if halving:
        rows, info = _select_halving(data, base, cands, library, cfg, k=k, shortlist=shortlist,
                                     halving_rows=halving_rows, prerank_rows=prerank_rows, seed=seed,
                                     world_size=world_size, min_own_gain=min_own_gain,
                                     model=model, tokenizer=tokenizer, progress=progress)
    else:
        rows = score_candidates(data, base, cands, library=library, config=cfg, model=model, tokenizer=tokenizer,
                                rank=rank, world_size=world_size, progress=progress)
    if rank != 0:
        return None
    optimized = parse_weights(weights)[0] == "optimized"
    sel = build_selection(data, cands[0].ref, rows, metric=metric, scorer=scorer, k=k, margin=margin,
                          weights="uniform" if optimized else weights, penalty=penalty, entries=entries,
                          min_own_gain=min_own_gain, ordered=halving)
    sel.halving = info
    if optimized:
        optimize_weights(sel, data, {c.id: c.path for c in cands}, budget=optimize_budget, seed=seed,
                         batch_size=batch_size, max_length=max_length)
    return sel


def _select_halving(data, base, cands, library, cfg, *, k, shortlist, halving_rows, prerank_rows, seed,
                    world_size, min_own_gain, model, tokenizer, progress):
    """Rows best first and the halving record. Candidates that can never be donors (own-task gate)
    are left out of the pre-rank and the rounds: scoring them would only spend the budget."""
    from . import _halving

    if world_size > 1:
        raise ConfigError("--scorer halving runs in one process", hint="launch it without accelerate/torchrun")
    never = unlearned({c.id: c.entry for c in cands if c.kind != "base"}, min_own_gain)
    return _halving.run(data, base, cands, library=library, cfg=cfg, hib=metric_key(cfg.metric)[1],
                        keep=max(k, 2), shortlist=shortlist, min_rows=halving_rows, prerank_rows=prerank_rows,
                        seed=seed, exclude=set(never), model=model, tokenizer=tokenizer, progress=progress)


def optimize_weights(sel: Selection, data: TargetData, paths: dict, *, budget: int = 20, seed: int = 0,
                     batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH) -> Selection:
    """Replace the donors' uniform weights by CMA-ES-searched ones (:func:`warmstart.optimize.optimize`).

    The weights are task-arithmetic coefficients (base + Σ wᵢ·ΔWᵢ, not normalized), so the
    selection records ``method: task_arithmetic``; the search starts at uniform (1/k each,
    the same model as the uniform linear merge) and only moves if the sample's cost drops.
    With fewer than two donors there is nothing to weigh and the selection is unchanged.
    """
    from .optimize import METRICS as OPT_METRICS
    from .optimize import optimize

    metric = sel.metric.replace("_", "-")
    metric = metric if metric in OPT_METRICS else "loss"  # e.g. exact-match: search on the loss
    if len(sel.donors) < 2:
        sel.weighting = {"scheme": "uniform", "note": "optimized weights need at least two donors"}
        return sel
    res = optimize([paths[d["id"]] for d in sel.donors], sel.base, [data], metric=metric, budget=budget,
                   method="task_arithmetic", sample=None, seed=seed, batch_size=batch_size, max_length=max_length)
    s = res.search
    for d, w in zip(sel.donors, s.best.weights):
        d["weight"] = round(float(w), 6)
    sel.method, sel.params = "task_arithmetic", {}
    sel.weighting = {"scheme": "optimized", "metric": metric, "budget": budget, "evaluations": len(s.evaluations),
                     "cost_uniform": s.uniform.costs[0], "cost_chosen": s.best.costs[0],
                     "seconds": round(res.seconds, 2)}
    return sel


__all__ = [
    "DEFAULT_MIN_OWN_GAIN", "METRICS", "SCORERS", "Candidate", "ScoreConfig", "ScoreRow", "Selection",
    "build_selection", "candidates_for", "choose_donors", "dist_env", "load_base", "load_full_into",
    "optimize_weights", "own_training", "rank_rows", "score_candidates", "select", "shard",
]
