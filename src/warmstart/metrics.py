"""The one metric table: every target metric warmstart scores, searches or reports, with its facts.

``select --metric``, ``optimize --metric``, selection files, run configs, the report and the
benchmark read it, so "is higher better?" and "does it need multiple-choice rows?" have one
answer. A metric has three names: its CLI name (``mc-accuracy``), the key of its value in
:func:`warmstart.evaluate.evaluate`'s result (``mc_accuracy_sum``) and, in training curves,
that key with ``eval_`` in front (``eval_mc_accuracy``, the one the callbacks log).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Metric:
    name: str  # CLI / config name
    key: str  # its value's key in evaluate()'s result
    higher_is_better: bool
    needs_mc: bool  # needs multiple-choice rows (question/choices/answer)
    evaluate: str  # the evaluate() metric that computes it (mc_accuracy computes _sum and _norm)
    searchable: bool  # the merge-weight search (optimize) can minimise it (its cost: loss, or 1 − value)


TABLE: dict[str, Metric] = {m.name: m for m in (
    Metric("loss", "loss", False, False, "loss", True),
    Metric("accuracy", "token_accuracy", True, False, "token_accuracy", True),
    Metric("exact-match", "exact_match", True, False, "exact_match", False),
    Metric("mc-accuracy", "mc_accuracy_sum", True, True, "mc_accuracy", True),
    Metric("mc-accuracy-norm", "mc_accuracy_norm", True, True, "mc_accuracy", False),
)}


def get(name: str) -> Metric:
    """The metric called ``name`` (``mc_accuracy`` and ``mc-accuracy`` alike); ConfigError listing them if none."""
    m = TABLE.get(str(name).replace("_", "-"))
    if m is None:
        raise ConfigError(f"unknown metric {name!r}", hint=f"choose one of {', '.join(TABLE)}")
    return m


def searchable(name: str) -> Metric:
    """A metric the weight search can minimise: by CLI name, or by the evaluate() metric it requests."""
    m = TABLE.get(str(name)) or next((m for m in TABLE.values() if m.searchable and m.evaluate == name), None)
    if m is None or not m.searchable:
        names = [m.name for m in TABLE.values() if m.searchable]
        raise ConfigError(f"unknown metric {name!r}", hint=f"choose one of {', '.join(names)}")
    return m


def by_key(key: str) -> Metric | None:
    """The metric whose value is logged under ``key`` (``eval_loss``, ``mc_accuracy_norm``, ...), if any."""
    k = key.removeprefix("eval_")
    return next((m for m in TABLE.values() if k in (m.key, m.evaluate)), None)


def higher_is_better(key: str) -> bool:
    """For a curve key: from the table; keys it does not list are accuracies logged by other tools."""
    m = by_key(key)
    return True if m is None else m.higher_is_better


__all__ = ["TABLE", "Metric", "by_key", "get", "higher_is_better", "searchable"]
