"""Scoring with the prompt computed once per question (multiple choice), and without padding.

Rank classification scores every option as a completion of the same prompt,
and the prompt is usually most of the tokens (an ARC question with four short
answers: ~85 %). Here one row holds a batch of questions: the prefix their
prompts share (a task's instruction, once questions are sorted by prompt)
once, then per question the rest of its prompt and all its options. A tree
attention mask lets a token see the shared prefix, its own question's prompt
and its own option's earlier tokens only, and positions restart so each token
sits where it sits in its own row. Every option token then sees exactly the
context it sees in its own (prompt + option) row, so the log-likelihoods are
those of the per-option path up to float rounding (tests/test_evaluate.py
checks it). The first token of every option is predicted at the prompt's last
position, shared by all options. One row per batch: no padding at all.

(prompt, completion) rows scored for their loss are groups of one: the same
row layout removes the padding of length-sorted batches and computes the
instruction prefix the rows share once per batch (``evaluate`` does this).

Hand-written because neither transformers nor lm-eval ship it: transformers
accepts a prepared 4-D mask (``masking_utils`` returns it as-is) and explicit
``position_ids``, which is all this needs. Questions this cannot pack exactly
(a prompt cut differently per option by ``max_length``, an empty prompt) and
attention kernels that take no arbitrary mask go through the per-option path.
"""

from __future__ import annotations

from collections.abc import Callable

from ._precision import compute, exact_tokens
from .data import IGNORE_INDEX

_MASKABLE = ("sdpa", "eager")


def _prompt_len(row: dict) -> int:
    n = 0
    for lab in row["labels"]:
        if lab != IGNORE_INDEX:
            break
        n += 1
    return n


def pack(group: list[dict]) -> dict | None:
    """A question's prompt and option tokens, or None when sharing the prompt would change a score."""
    p = _prompt_len(group[0])
    prompt = group[0]["input_ids"][:p]
    if p == 0 or any(_prompt_len(r) != p or r["input_ids"][:p] != prompt for r in group):
        return None
    if any(r["labels"][p:] != r["input_ids"][p:] for r in group):  # every token after the prompt must be a target
        return None
    return {"prompt": prompt, "options": [r["input_ids"][p:] for r in group]}


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def build_row(items: list[dict]) -> dict:
    """One row for several questions: their common prompt prefix once, then per question the rest
    of its prompt and its options.

    Every token carries (question, option): question -1 is the shared prefix, option 0 a
    question's own prompt. Positions restart so each token sits where it sits in its own
    (prompt + option) row. ``targets``: per question, per option, (predicting index, token).
    """
    lcp = _common_prefix([it["prompt"] for it in items])
    ids, pos = list(items[0]["prompt"][:lcp]), list(range(lcp))
    q, o, targets = [-1] * lcp, [0] * lcp, []
    for qi, it in enumerate(items):
        rest = it["prompt"][lcp:]
        plen = len(it["prompt"])
        ids += rest
        pos += range(lcp, plen)
        q += [qi] * len(rest)
        o += [0] * len(rest)
        last = len(ids) - 1  # the prompt's last token (in the shared prefix when rest is empty)
        per = []
        for j, c in enumerate(it["options"], start=1):
            start = len(ids)
            per.append([(last if t == 0 else start + t - 1, tok) for t, tok in enumerate(c)])
            ids += c
            pos += range(plen, plen + len(c))
            q += [qi] * len(c)
            o += [j] * len(c)
        targets.append(per)
    return {"input_ids": ids, "position_ids": pos, "question": q, "option": o, "targets": targets}


def tree_mask(question, option, dtype):
    """Additive (1, 1, W, W) mask: causal; the shared prefix is seen by all, a question's prompt
    by its own tokens, an option by itself only."""
    import torch

    w = question.shape[-1]
    qq, qk = question[:, None], question[None, :]
    oq, ok = option[:, None], option[None, :]
    causal = torch.ones(w, w, dtype=torch.bool, device=question.device).tril()
    allowed = causal & ((qk == -1) | ((qq == qk) & ((ok == 0) | (ok == oq))))
    mask = torch.zeros((w, w), dtype=dtype, device=question.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def score_packed(model, groups: list[list[dict]], *, pad_id: int, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None, fallback: Callable | None = None,
                 compute_dtype: str | None = None, result: Callable) -> list:
    """Scores of every row of every group, flat in input order: ``result(logprob, n_tokens, n_correct)``
    for packed rows (evaluate passes its RowScore; this module stays below it), ``fallback``'s for the rest.

    Questions are sorted by prompt tokens and cut into rows of about ``batch_size``
    options (the per-option path's unit), one row per forward.
    """
    import torch

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    packed = [pack(g) if impl in _MASKABLE else None for g in groups]
    offsets, k = [], 0
    for g in groups:
        offsets.append(k)
        k += len(g)
    out: list = [None] * k
    rest = [(gi, i) for gi, pk in enumerate(packed) if pk is None for i in range(len(groups[gi]))]
    if rest:  # rows that cannot be packed exactly: the per-option path
        for (gi, i), s in zip(rest, fallback([groups[gi][i] for gi, i in rest])):
            out[offsets[gi] + i] = s
        if progress:
            progress(len(rest))
    # sorted by prompt tokens: questions that share an instruction prefix land in the same row
    order = sorted((gi for gi, pk in enumerate(packed) if pk is not None), key=lambda gi: packed[gi]["prompt"])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), compute(model, compute_dtype):
            for batch in _batches(order, groups, batch_size):
                scores = _score_batch(model, [packed[gi] for gi in batch], pad_id, device)
                for gi, per in zip(batch, scores):
                    for i, (lp, n, hit) in enumerate(per):
                        out[offsets[gi] + i] = result(lp, n, hit)
                if progress:
                    progress(sum(len(groups[gi]) for gi in batch))
    finally:
        model.train(was_training)
    return out


def _batches(order: list[int], groups, batch_size: int):
    batch, n = [], 0
    for gi in order:
        batch.append(gi)
        n += len(groups[gi])
        if n >= batch_size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _score_batch(model, items: list[dict], pad_id: int, device) -> list[list[tuple[float, int, int]]]:
    """One forward of one row (no padding) holding every question of the batch."""
    import torch

    row = build_row(items)

    def t(key):
        return torch.tensor([row[key]], dtype=torch.long, device=device)

    dtype = model.get_input_embeddings().weight.dtype
    if torch.is_autocast_enabled(device.type):  # the attention then runs in the autocast dtype
        dtype = torch.get_autocast_dtype(device.type)
    # (predicting position, target token, option number within the row)
    flat = [(p, tok, k) for k, (p, tok) in _numbered(row["targets"])]
    n_opts = sum(len(per) for per in row["targets"])
    pp, tg, ob = (torch.tensor(x, dtype=torch.long, device=device) for x in zip(*flat)) if flat else (
        torch.zeros(0, dtype=torch.long, device=device),) * 3
    keep = torch.unique(pp)  # sorted: the LM head runs only where a target is predicted
    mask = tree_mask(t("question")[0], t("option")[0], dtype)
    exact_tokens(model, tg)  # the targets' logits in float32 (a bf16 head: _precision)
    kw = {"input_ids": t("input_ids"), "attention_mask": mask, "position_ids": t("position_ids")}
    try:
        logits = model(**kw, logits_to_keep=keep).logits[0]
    except TypeError:  # a model without logits_to_keep: every position's logits
        logits = model(**kw).logits[0]
    col = torch.searchsorted(keep, pp) if logits.shape[0] == len(keep) else pp
    sel = logits[col].float().log_softmax(-1)
    lp = sel.gather(-1, tg[:, None]).squeeze(-1).double()
    hit = (sel.argmax(-1) == tg).long()
    lp_sum = torch.zeros(n_opts, dtype=torch.float64, device=device).index_add_(0, ob, lp).tolist()
    hits = torch.zeros(n_opts, dtype=torch.long, device=device).index_add_(0, ob, hit).tolist()
    cnt = torch.zeros(n_opts, dtype=torch.long, device=device).index_add_(0, ob, torch.ones_like(hit)).tolist()
    res, k = [], 0
    for per in row["targets"]:
        res.append([(lp_sum[k + j], cnt[k + j], hits[k + j]) for j in range(len(per))])
        k += len(per)
    return res


def _numbered(targets):
    """((option number in the row, (position, token)) for every target token."""
    k = 0
    for per in targets:
        for opt in per:
            for pt in opt:
                yield k, pt
            k += 1
