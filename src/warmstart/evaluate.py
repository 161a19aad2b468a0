"""Teacher-forced evaluation: loss, token accuracy, exact match, multiple-choice accuracy.

No generation: every metric comes from one forward pass per batch of
(prompt + target) rows, reading the log-probabilities of the target tokens.

Multiple choice is scored the way lm-eval scores ARC and HellaSwag ("rank
classification", https://arxiv.org/abs/2110.08207 §3): each option's text is a
completion of the prompt; the option with the highest summed log-likelihood
wins (``mc_accuracy_sum``), or the highest log-likelihood per byte of option
text (``mc_accuracy_norm``, lm-eval's ``acc_norm``). Small models get signal
from this long before they learn to emit a letter. ``mc_mode="letter"``
instead renders lettered options and compares only the valid letters' log-
likelihoods (never an argmax over the whole vocabulary).

Works on any causal LM the caller has set up: a plain model, a PeftModel, or a
model with several adapters loaded where one (or a weighted mix made with
``add_weighted_adapter``) is active — the model is called as-is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._packed import score_packed
from ._precision import compute, exact_tokens, resolve
from .data import IGNORE_INDEX, TargetData, collate, encode_pair, pad_id_of, tokenize
from .errors import ConfigError

METRICS = ("loss", "token_accuracy", "exact_match", "mc_accuracy")
MC_MODES = ("rank", "letter")


@dataclass
class RowScore:
    """Target-token statistics of one tokenized row."""

    logprob: float  # summed log-likelihood of the target tokens
    n_tokens: int
    n_correct: int  # target tokens whose argmax prediction is right


# ----------------------------------------------------------------------------
# The core: score tokenized rows in length-sorted batches


def score_rows(model, rows: list[dict], *, pad_id: int, batch_size: int = 16,
               progress: Callable[[int], None] | None = None, compute_dtype: str | None = None) -> list[RowScore]:
    """One forward per batch; rows are sorted by length so batches carry little padding
    (lm-eval's habit), and results come back in the input order. ``compute_dtype``: see
    :func:`warmstart._precision.compute` (None: the model as it is, float32 logits)."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    out: list[RowScore | None] = [None] * len(rows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), compute(model, _resolve(model, compute_dtype)):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                for i, s in zip(idx, _score_batch(model, [rows[i] for i in idx], pad_id, device)):
                    out[i] = s
                if progress:
                    progress(len(idx))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def target_logits(model, input_ids, attention_mask, labels):
    """Logits at the positions that predict a target token, with the labels and mask there.

    ``labels`` are already shifted (label p is predicted at position p). The LM
    head over every position is a large share of a small model's forward
    (SmolLM2-135M: 49k × 576 of ~135M parameters) and most positions are
    prompt; transformers' ``logits_to_keep`` with a tensor of positions skips
    the rest. Models without that argument get the full logits.
    """
    mask = labels != IGNORE_INDEX
    keep = mask.any(0).nonzero().squeeze(-1)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        if logits.shape[1] == len(keep):
            return logits, labels[:, keep], mask[:, keep]
    except TypeError:
        pass
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return logits, labels, mask


def _score_batch(model, batch: list[dict], pad_id: int, device) -> list[RowScore]:
    import torch

    t = collate(batch, pad_id)
    labels = t["labels"][:, 1:].to(device)  # token t is predicted at position t-1
    exact_tokens(model, labels[labels != IGNORE_INDEX])  # their logits in float32 (a bf16 head: _precision)
    logits, labels, mask = target_logits(model, t["input_ids"].to(device), t["attention_mask"].to(device), labels)
    # log_softmax only at target positions: (n_targets, vocab) instead of (batch, len, vocab)
    sel = logits[mask].float().log_softmax(-1)
    tgt = labels[mask]
    lp = sel.gather(-1, tgt[:, None]).squeeze(-1)
    hit = (sel.argmax(-1) == tgt).long()
    row_of = mask.nonzero()[:, 0]
    n = mask.sum(1)
    lp_sum = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row_of, lp.double())
    hits = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(0, row_of, hit)
    return [RowScore(float(a), int(b), int(c)) for a, b, c in zip(lp_sum.tolist(), n.tolist(), hits.tolist())]


# ----------------------------------------------------------------------------
# Reusable pieces


def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int = 512, compute_dtype: str | None = None) -> list[RowScore]:
    """Summed log-likelihood (and token counts) of each completion given its prompt."""
    rows = [encode_pair(tokenizer, p, c, max_length=max_length) for p, c in pairs]
    return score_rows(model, rows, pad_id=pad_id_of(tokenizer), batch_size=batch_size, compute_dtype=compute_dtype)


def _resolve(model, compute_dtype: str | None) -> str | None:
    """``auto`` decided on the model's device (bfloat16 where it is fast)."""
    if compute_dtype != "auto":
        return compute_dtype

    return resolve("auto", str(next(model.parameters()).device))


def option_loglikelihoods(model, tokenizer, data: TargetData, *, batch_size: int = 16,
                          max_length: int = 512, compute_dtype: str | None = None) -> list[list[float]]:
    """Per example, the summed log-likelihood of each option (multiple-choice data).

    All options of all questions go into one batched pass.
    """
    _need_mc(data)
    scores = mc_option_scores(model, tokenizer, data, batch_size=batch_size, max_length=max_length,
                              compute_dtype=compute_dtype)
    out, k = [], 0
    for ex in data.examples:
        out.append([s.logprob for s in scores[k:k + len(ex.options)]])
        k += len(ex.options)
    return out


def mc_option_scores(model, tokenizer, data: TargetData, *, batch_size: int = 16, max_length: int = 512,
                     progress: Callable[[int], None] | None = None, shared_prompt: bool = True,
                     compute_dtype: str | None = None) -> list[RowScore]:
    """A RowScore per option of every question, flat in question order.

    ``shared_prompt`` (the default) scores each question's prompt once, with its
    options packed after it (:mod:`warmstart._packed`); ``False`` scores one
    (prompt + option) row per option, the reference the packed path is tested against.
    """
    rows = [encode_pair(tokenizer, ex.prompt, o, max_length=max_length) for ex in data.examples for o in ex.options]
    pad, cd = pad_id_of(tokenizer), _resolve(model, compute_dtype)
    if not shared_prompt:
        return score_rows(model, rows, pad_id=pad, batch_size=batch_size, progress=progress, compute_dtype=cd)

    groups, k = [], 0
    for ex in data.examples:
        groups.append(rows[k:k + len(ex.options)])
        k += len(ex.options)
    return score_packed(model, groups, pad_id=pad, batch_size=batch_size, progress=progress, compute_dtype=cd,
                        result=RowScore, fallback=lambda rs: score_rows(model, rs, pad_id=pad, batch_size=batch_size,
                                                       compute_dtype=cd))


def _need_mc(data: TargetData) -> None:
    if data.format != "mc":
        raise ConfigError(f"multiple-choice accuracy needs question/choices/answer rows; "
                          f"{data.path} is {data.format!r}", hint="use the loss or accuracy metric")


# ----------------------------------------------------------------------------
# evaluate()


def evaluate(model, tokenizer, data: TargetData, *, metrics: Sequence[str] = METRICS, batch_size: int = 16,
             max_length: int = 512, mc_mode: str = "rank", length_normalize: bool = False,
             progress: Callable[[int], None] | None = None, shared_prompt: bool = True,
             compute_dtype: str | None = None) -> dict[str, float]:
    """Teacher-forced metrics on ``data``.

    Returns ``loss`` (token-weighted mean NLL of target tokens), ``token_accuracy``,
    ``exact_match`` (all target tokens argmax-correct), and for multiple-choice data
    ``mc_accuracy_sum``, ``mc_accuracy_norm`` and ``mc_accuracy`` (the normalised one
    when ``length_normalize``). ``mc_accuracy`` is skipped silently for non-MC data
    when it is only one of several metrics asked for. Also ``n_examples``, ``n_tokens``.
    ``shared_prompt``: score a question's prompt once for all its options (see
    :func:`mc_option_scores`; equal to per-option rows up to float rounding), and
    (prompt, completion) rows packed without padding, the prefix they share once per
    batch (:mod:`warmstart._packed`); ``False``: length-sorted padded batches.
    ``compute_dtype``: ``None`` runs the model as it is; ``"bfloat16"`` autocasts its
    matmuls (logits and sums stay float32/float64); ``"auto"`` is bfloat16 where the
    device runs it fast (:mod:`warmstart._precision`), else float32.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}", hint=f"choose from {', '.join(METRICS)}")
    if mc_mode not in MC_MODES:
        raise ConfigError(f"unknown mc mode {mc_mode!r}", hint="choose rank or letter")
    want_mc = "mc_accuracy" in metrics and (data.format == "mc" or list(metrics) == ["mc_accuracy"])
    if want_mc:
        _need_mc(data)
        if mc_mode == "letter" and data.mc_style != "letter":
            data = data.with_mc_style("letter", data.mc_template if data.mc_style == "letter" else None)
        return _evaluate_mc(model, tokenizer, data, metrics, batch_size, max_length, length_normalize, progress,
                            shared_prompt, compute_dtype)
    rows = tokenize(data, tokenizer, max_length=max_length)
    pad, cd = pad_id_of(tokenizer), _resolve(model, compute_dtype)
    if shared_prompt:  # each row a group of one: no padding, the shared instruction prefix once per batch
        scores = score_packed(model, [[r] for r in rows], pad_id=pad, batch_size=batch_size, progress=progress,
                              compute_dtype=cd, result=RowScore,
                              fallback=lambda rs: score_rows(model, rs, pad_id=pad, batch_size=batch_size,
                                                             compute_dtype=cd))
    else:
        scores = score_rows(model, rows, pad_id=pad, batch_size=batch_size, progress=progress, compute_dtype=cd)
    return _token_metrics(scores, metrics)


def _token_metrics(scores: list[RowScore], metrics: Sequence[str]) -> dict[str, float]:
    n_tok = sum(s.n_tokens for s in scores)
    out: dict[str, float] = {"n_examples": len(scores), "n_tokens": n_tok}
    if "loss" in metrics:
        out["loss"] = -sum(s.logprob for s in scores) / max(n_tok, 1)
    if "token_accuracy" in metrics:
        out["token_accuracy"] = sum(s.n_correct for s in scores) / max(n_tok, 1)
    if "exact_match" in metrics:
        out["exact_match"] = sum(s.n_correct == s.n_tokens > 0 for s in scores) / max(len(scores), 1)
    return out


def _evaluate_mc(model, tokenizer, data, metrics, batch_size, max_length, length_normalize, progress,
                 shared_prompt=True, compute_dtype=None):
    """One pass scores every option; the correct option's row also gives the token metrics."""
    scores = mc_option_scores(model, tokenizer, data, batch_size=batch_size, max_length=max_length,
                              progress=progress, shared_prompt=shared_prompt, compute_dtype=compute_dtype)
    correct_rows, hit_sum, hit_norm, k = [], 0, 0, 0
    for ex in data.examples:
        opts = scores[k:k + len(ex.options)]
        k += len(ex.options)
        correct_rows.append(opts[ex.answer])
        lls = [s.logprob for s in opts]
        # acc_norm divides by the option's length in bytes, as lm-eval does (not tokens:
        # token counts differ between tokenizers, bytes do not).
        norm = [ll / max(len(o.encode()), 1) for ll, o in zip(lls, ex.options)]
        hit_sum += _argmax(lls) == ex.answer
        hit_norm += _argmax(norm) == ex.answer
    out = _token_metrics(correct_rows, metrics)
    n = max(len(data.examples), 1)
    out["mc_accuracy_sum"] = hit_sum / n
    out["mc_accuracy_norm"] = hit_norm / n
    out["mc_accuracy"] = out["mc_accuracy_norm" if length_normalize else "mc_accuracy_sum"]
    return out


def _argmax(xs: list[float]) -> int:
    """First index of the maximum: a tie goes to the earlier option, deterministically."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def n_rows(data: TargetData, metric: str, mc_mode: str = "rank") -> int:
    """How many rows evaluate() will score (for progress bars)."""
    if metric == "mc_accuracy" and data.format == "mc":
        return sum(len(ex.options) for ex in data.examples)
    return len(data.examples)


__all__ = ["METRICS", "RowScore", "evaluate", "loglikelihoods", "mc_option_scores", "n_rows", "option_loglikelihoods",
           "score_rows"]
