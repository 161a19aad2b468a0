"""``scorer="halving"``: selection whose cost hardly grows with the library.

1. Pre-rank (only when there are more candidates than the shortlist): one backward pass at the
   base on ``prerank_rows`` target rows gives the gradient G; every LoRA candidate's stored
   summary (:mod:`warmstart._prerank`, computed when it was catalogued) gives its predicted loss
   change in a few matrix-vector products. The best ``shortlist`` go on; candidates without a
   summary (full checkpoints, DoRA) always go on.
2. Successive halving (Jamieson & Talwalkar 2016, https://arxiv.org/abs/1502.07943) on the
   shortlist with the real scorer: score the survivors on ``min_rows`` rows (a nested random
   subset of the sample), keep the best half, double the rows; the last survivors (at least
   ``keep``) and the base are scored on the whole sample, under the loss scorer's own cache key,
   so their scores are exactly what ``scorer="loss"`` gives them.

Cost in candidate-evaluations of the whole sample: about 1 (base) + keep + shortlist·min_rows/n
per round, plus the backward pass; independent of the library size except for the pre-scores.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

from . import _prerank
from ._gradproxy import base_gradient
from ._precision import compute
from ._scoring import ScoreRow, load_base, rank_rows, score_candidates
from .errors import ConfigError


def nested_subset(data, m: int, seed: int):
    """``m`` rows of ``data`` (file order kept); the rows for m are a subset of those for 2m."""
    n = len(data)
    if m >= n:
        return data
    idx = sorted(random.Random(f"halving:{seed}").sample(range(n), n)[:m])
    return replace(data, examples=[data.examples[i] for i in idx], sample_spec=f"{data.sample_spec}|sub={m}")


def prescores(model, tokenizer, data, pool, library, *, rows: int, seed: int, cfg, chunk: int = 64) -> dict:
    """{candidate fingerprint: predicted loss change} for the candidates that have a summary.
    Summaries are read from the catalog ``chunk`` at a time: 1,000 of them would hold ~1 GB at once."""
    have, need = [], set()
    for c in pool:
        if not (library and c.entry and c.kind == "lora"):
            continue
        # the header names the modules; the tensors are read once, below, chunk by chunk
        blob = library.prerank_header(c.entry.fingerprint) or library.ensure_prerank(c.entry.fingerprint, c.path)
        if blob is not None:
            have.append(c)
            need |= _prerank.modules_of(blob)
    if not have:
        return {}
    dtype = cfg.resolved_compute_dtype()  # bf16 autocast where the scorer uses it: same ranking, ~4x cheaper
    with compute(model, dtype if dtype == "bfloat16" else None):
        _, grads = base_gradient(model, tokenizer, nested_subset(data, rows, seed), params=need,
                                 batch_size=cfg.batch_size, max_length=cfg.max_length)
    out = {}
    for i in range(0, len(have), chunk):
        part = have[i:i + chunk]
        sums = [library.prerank(c.entry.fingerprint) for c in part]
        out.update(zip((c.fingerprint for c in part), _prerank.prescore_many(grads, sums, [c.path for c in part])))
    return out


def run(data, base, cands, *, library, cfg, hib: bool, keep: int, shortlist: int, min_rows: int,
        prerank_rows: int, seed: int, exclude=(), model=None, tokenizer=None, progress=None):
    """(rows best first, info): final rows (whole sample) ranked, then the eliminated (later rounds
    first, each with ``rows`` = the rows it was scored on), then the pre-ranked-out (``rows`` = 0,
    score None, ``metrics["prescore"]``), then the excluded (never scored)."""
    for name, v in (("shortlist", shortlist), ("halving_rows", min_rows), ("prerank_rows", prerank_rows)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_base(base, dtype=cfg.dtype, device=cfg.device)
    bases = [c for c in cands if c.kind == "base"]
    pool = [c for c in cands if c.kind != "base" and c.id not in exclude]
    pre = prescores(model, tokenizer, data, pool, library, rows=prerank_rows, seed=seed,
                    cfg=cfg) if len(pool) > shortlist else {}
    t_pre = time.perf_counter() - t0
    unsummarised = [c for c in pool if c.fingerprint not in pre]
    by_pre = sorted((c for c in pool if c.fingerprint in pre), key=lambda c: (pre[c.fingerprint], c.sort_id))
    survivors = unsummarised + by_pre[:max(0, shortlist - len(unsummarised))]
    cut = by_pre[len(survivors) - len(unsummarised):]
    sign = -1.0 if hib else 1.0
    eliminated, rounds, m = [], [], min_rows
    while len(survivors) > keep and m < len(data):
        res = score_candidates(nested_subset(data, m, seed), base, survivors, library=library, config=cfg,
                               model=model, tokenizer=tokenizer, progress=progress)
        res.sort(key=lambda r: (sign * r.score, r.metrics.get("loss", 0.0), int(r.id)))
        n_keep = max(keep, math.ceil(len(res) / 2))
        eliminated = [replace(r, rows=m) for r in res[n_keep:]] + eliminated
        rounds.append({"rows": m, "candidates": len(res), "kept": n_keep})
        kept = {r.id for r in res[:n_keep]}
        survivors = [c for c in survivors if c.id in kept]
        m *= 2
    final = score_candidates(data, base, bases + survivors, library=library, config=cfg, model=model,
                             tokenizer=tokenizer, progress=progress)
    rounds.append({"rows": len(data), "candidates": len(final), "kept": len(final)})
    tail = [ScoreRow(c.id, c.ref, c.kind, None, False, {"prescore": pre[c.fingerprint]}, rows=0) for c in cut]
    never = [ScoreRow(c.id, c.ref, c.kind, None, False, {}, rows=0) for c in cands if c.id in exclude]
    info = {"shortlist": shortlist, "min_rows": min_rows, "prerank_rows": prerank_rows if pre else 0,
            "candidates": len(pool), "prescored": len(pre), "prerank_method": _prerank.METHOD if pre else None,
            "rounds": rounds, "row_evaluations": sum(r["rows"] * r["candidates"] for r in rounds),
            "prerank_seconds": round(t_pre, 3), "seconds": round(time.perf_counter() - t0, 3)}
    return rank_rows(final, hib) + eliminated + tail + never, info


__all__ = ["nested_subset", "prescores", "run"]
