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

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _halving
from . import weighting as _weighting
from ._precision import COMPUTE_DTYPES
from ._scoring import (  # re-exported: select's public names since before the move
    DEFAULT_MAX_LENGTH,
    METRICS,
    SCORERS,
    Candidate,
    ScoreConfig,
    ScoreRow,
    candidates_for,
    dist_env,
    load_base,
    load_full_into,
    metric_key,
    rank_rows,
    score_candidates,
    shard,
)
from ._section import Section, boolean, number, one_of, positive_int, section
from .data import FORMATS, MC_STYLES, TargetData, load_target
from .checkpoints import Checkpoint, open_checkpoint
from .errors import ConfigError
from .evaluate import MC_MODES
from .library import Entry, Library
from .provenance import __version__

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




def parse_weights(spec: str) -> tuple[str, float | None]:
    """A ``--weights`` spec of the weighting registry ('softmax:0.5', 'mwa:loss', 'optimized', ...) ->
    (scheme, temperature or None)."""
    scheme, args = _weighting.parse(spec, where="select", what="weights")
    return scheme.name, args.get("temperature", 1.0 if scheme.arg == "temperature" else None)


def donor_weights(donors: Sequence[ScoreRow], entries: dict, spec: str, *, higher_is_better: bool,
                  penalty: float = 1.0) -> tuple[list[float], dict]:
    """Weights from the weighting registry; MWA uses each donor's training loss or step, and
    :func:`warmstart.weighting.mwa_losses`'s fallback (recorded in the weighting info)."""
    scheme, temp = parse_weights(spec)
    info: dict[str, Any] = {"scheme": scheme}
    kw: dict[str, Any] = {"scores": [d.score for d in donors], "higher_is_better": higher_is_better,
                          "penalty": penalty}
    if temp is not None:
        kw["temperature"] = info["temperature"] = temp
    needs = _weighting.SCHEMES[scheme].needs
    if "losses" in needs or "steps" in needs:
        info["penalty"] = penalty
        es = [entries.get(d.id) for d in donors]
        kw["steps"] = [e.global_step if e else None for e in es]
        losses = [e.final_loss if e else None for e in es]
        if "losses" in needs:
            losses, source = _weighting.mwa_losses(losses, kw["scores"], higher_is_better)
            if source:
                info["losses_from"] = source
        kw["losses"] = losses
    return _weighting.compute_weights(scheme, n=len(donors), **kw), info


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


# ----------------------------------------------------------------------------
# The settings of a selection, checked before any work


@section
class SelectConfig(Section):
    """Every setting of :func:`select` (the data, the model and the process layout are arguments).

    :meth:`errors` lists every bad field at once; :func:`select` calls it before the target is
    read, and :class:`warmstart.config.RunConfig` before a run starts. ``n``: target rows sampled
    (None: all). ``weights="optimized"``: the selection carries uniform weights and
    :func:`warmstart.optimize.optimize_selection` (the step after selection; ``warmstart select``
    and ``warmstart run`` call it) searches them with CMA-ES in ``optimize_budget`` evaluations.
    ``min_own_gain``: a candidate whose own training gained less than this on its own task
    (:func:`own_training`) is never a donor; None chooses by the target score alone.
    ``compute_dtype="auto"``: bfloat16 where the hardware runs it fast (docs/select.md).
    ``scorer="halving"``: pre-rank by catalogued summaries on ``prerank_rows`` rows, keep
    ``shortlist``, successive halving from ``halving_rows`` rows (:mod:`warmstart._halving`).
    """

    label = "select"

    metric: str = "loss"
    n: int | None = 256
    seed: int = 0
    k: int = 2
    margin: float | None = None
    weights: str = "uniform"
    penalty: float = 1.0
    scorer: str = "loss"
    split: str | None = None
    format: str | None = None
    mc_style: str = "text"
    batch_size: int = 16
    max_length: int = DEFAULT_MAX_LENGTH
    mc_mode: str = "rank"
    dtype: str = "float32"
    compute_dtype: str = "auto"
    optimize_budget: int = 20
    min_own_gain: float | None = DEFAULT_MIN_OWN_GAIN
    include_derived: bool = False
    shortlist: int = 8
    halving_rows: int = 8
    prerank_rows: int = 16

    def errors(self) -> list[str]:
        errs = []
        for name, check in (("metric", metric_key), ("weights", parse_weights)):
            v = getattr(self, name)
            if not isinstance(v, str):
                errs.append(f"{name} must be a name, got {v!r}")
                continue
            try:
                check(v)
            except ConfigError as e:
                errs.append(f"{name}: {e.message}" + (f" ({e.hint})" if e.hint else ""))
        errs += filter(None, [
            one_of("scorer", self.scorer, SCORERS),
            positive_int("n", self.n, none_ok=True), positive_int("seed", self.seed, zero_ok=True),
            *(positive_int(f, getattr(self, f)) for f in ("k", "batch_size", "max_length", "optimize_budget",
                                                            "shortlist", "halving_rows", "prerank_rows")),
            number("margin", self.margin, none_ok=True), number("penalty", self.penalty),
            number("min_own_gain", self.min_own_gain, none_ok=True),
            one_of("format", self.format, FORMATS, none_ok=True), one_of("mc_style", self.mc_style, MC_STYLES),
            one_of("mc_mode", self.mc_mode, MC_MODES),
            None if self.dtype in DTYPES else f"unknown dtype {self.dtype!r} (dtype: float32, bfloat16 or float16)",
            None if self.compute_dtype in COMPUTE_DTYPES else
            f"unknown compute dtype {self.compute_dtype!r} (compute_dtype: auto, float32 or bfloat16)",
            None if self.split is None or isinstance(self.split, str) else f"split must be a name, got {self.split!r}",
            boolean("include_derived", self.include_derived)])
        if self.scorer == "grad" and isinstance(self.metric, str) and self.metric.replace("_", "-") != "loss":
            errs.append("scorer grad predicts the loss: use metric loss (--metric loss) with it")
        return errs


DTYPES = ("float32", "bfloat16", "float16", "float64")  # the base model's dtype while scoring


def _config_of(config: SelectConfig | None, settings: dict) -> SelectConfig:
    """``config`` with the deprecated keyword settings applied (``select(t, b, k=3)``, until 0.3)."""
    if settings:
        import warnings

        warnings.warn("select(target, base, k=..., ...) is deprecated: pass config=SelectConfig(k=...)",
                      DeprecationWarning, stacklevel=3)
        errs = SelectConfig.unknown_errors(settings)
        if errs:
            raise ConfigError(f"invalid select config: {errs[0]}")
        config = (config or SelectConfig()).replace(**settings)
    return (config or SelectConfig()).validate()


def sample_target(target: str | Path | TargetData, cfg: SelectConfig) -> TargetData:
    """The target rows a selection scores (and the weight search evaluates): loaded, then sampled."""
    data = target if isinstance(target, TargetData) else load_target(
        target, split=cfg.split, format=cfg.format, mc_style=cfg.mc_style)
    return data.sample(cfg.n, cfg.seed)


def select(target: str | Path | TargetData, base: str | Path | Checkpoint, config: SelectConfig | None = None, *,
           library: Library | None = None, model=None, tokenizer=None, rank: int | None = None,
           world_size: int | None = None, progress: Callable[[str, Any], None] | None = None,
           **settings) -> Selection | None:
    """Load and sample the target, score the base and every compatible entry, choose donors.

    Every setting is in ``config`` (:class:`SelectConfig`), checked whole before the target is read
    (so a bad ``k`` is refused before any candidate is scored). Returns None on
    ranks other than 0 of a multi-process run (they only score). ``weights="optimized"`` returns
    uniform weights: :func:`warmstart.optimize.optimize_selection` searches them.
    """
    cfg = _config_of(config, settings)
    data = sample_target(target, cfg)
    if rank is None or world_size is None:
        rank, world_size = dist_env()
    # Opened once and passed down: the candidates, the catalog query, the model load and the restore
    # after full candidates all use this one checkpoint (and its memoised fingerprint).
    base = open_checkpoint(base)
    cands = candidates_for(base, library, include_derived=cfg.include_derived)
    halving = cfg.scorer == "halving"
    score_cfg = ScoreConfig(metric=cfg.metric, scorer="loss" if halving else cfg.scorer, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, mc_mode=cfg.mc_mode, dtype=cfg.dtype,
                            compute_dtype=cfg.compute_dtype)
    entries = {c.id: c.entry for c in cands if c.entry is not None}
    info = None
    if halving:
        rows, info = _select_halving(data, base, cands, library, score_cfg, k=cfg.k, shortlist=cfg.shortlist,
                                     halving_rows=cfg.halving_rows, prerank_rows=cfg.prerank_rows, seed=cfg.seed,
                                     world_size=world_size, min_own_gain=cfg.min_own_gain,
                                     model=model, tokenizer=tokenizer, progress=progress)
    else:
        rows = score_candidates(data, base, cands, library=library, config=score_cfg, model=model,
                                tokenizer=tokenizer, rank=rank, world_size=world_size, progress=progress)
    if rank != 0:
        return None
    optimized = _weighting.SCHEMES[parse_weights(cfg.weights)[0]].fn is None  # searched, not computed
    sel = build_selection(data, cands[0].ref, rows, metric=cfg.metric, scorer=cfg.scorer, k=cfg.k,
                          margin=cfg.margin, weights="uniform" if optimized else cfg.weights, penalty=cfg.penalty,
                          entries=entries, min_own_gain=cfg.min_own_gain, ordered=halving)
    sel.halving = info
    if optimized:  # the search is the next step's (optimize_selection), which reads these paths
        sel.weighting = {**sel.weighting, "pending": "optimized"}
    return sel


def _select_halving(data, base, cands, library, cfg, *, k, shortlist, halving_rows, prerank_rows, seed,
                    world_size, min_own_gain, model, tokenizer, progress):
    """Rows best first and the halving record. Candidates that can never be donors (own-task gate)
    are left out of the pre-rank and the rounds: scoring them would only spend the budget."""
    if world_size > 1:
        raise ConfigError("--scorer halving runs in one process", hint="launch it without accelerate/torchrun")
    never = unlearned({c.id: c.entry for c in cands if c.kind != "base"}, min_own_gain)
    return _halving.run(data, base, cands, library=library, cfg=cfg, hib=metric_key(cfg.metric)[1],
                        keep=max(k, 2), shortlist=shortlist, min_rows=halving_rows, prerank_rows=prerank_rows,
                        seed=seed, exclude=set(never), model=model, tokenizer=tokenizer, progress=progress)


__all__ = [
    "DEFAULT_MIN_OWN_GAIN", "METRICS", "SCORERS", "Candidate", "ScoreConfig", "ScoreRow", "Selection",
    "SelectConfig", "build_selection", "candidates_for", "choose_donors", "dist_env", "load_base",
    "load_full_into", "own_training", "rank_rows", "sample_target", "score_candidates", "select", "shard",
]
