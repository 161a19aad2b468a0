"""Multiple-choice scoring with the prompt computed once per question.

Rank classification scores every option as a completion of the same prompt,
and the prompt is usually most of the tokens (an ARC question with four short
answers: ~85 %). Here one row holds the prompt followed by all its options,
and a block attention mask lets each option's tokens see the prompt and their
own earlier tokens only; each option's positions restart where the prompt
ends. Every option token then sees exactly the context it sees in its own
(prompt + option) row, so the log-likelihoods are those of the per-option path
up to float rounding (tests/test_evaluate.py checks it). The first token of
every option is predicted at the prompt's last position, shared by all options.

Hand-written because neither transformers nor lm-eval ship it: transformers
accepts a prepared 4-D mask (``masking_utils`` returns it as-is) and explicit
``position_ids``, which is all this needs. Questions this cannot pack exactly
(a prompt cut differently per option by ``max_length``, an empty prompt) and
attention kernels that take no arbitrary mask go through the per-option path.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """One packed row for a question's option rows, or None when packing would change a score."""
    p = _prompt_len(group[0])
    prompt = group[0]["input_ids"][:p]
    if p == 0 or any(_prompt_len(r) != p or r["input_ids"][:p] != prompt for r in group):
        return None
    ids, pos, seg, targets = list(prompt), list(range(p)), [0] * p, []
    for j, r in enumerate(group, start=1):
        c = r["input_ids"][p:]
        start = len(ids)
        # token t of the option is predicted at the position before it: the prompt's last for t = 0
        targets.append([(p - 1 if t == 0 else start + t - 1, tok) for t, tok in enumerate(c)])
        ids += c
        pos += range(p, p + len(c))
        seg += [j] * len(c)
    return {"input_ids": ids, "position_ids": pos, "segment": seg, "targets": targets}


def block_mask(segment, dtype):
    """Additive (B, 1, W, W) mask: causal, and an option attends to the prompt (segment 0) and itself.

    Padding is segment -1: no real token attends to it; a pad query attends to itself only
    (a row with no allowed key would be undefined in the softmax).
    """
    import torch

    w = segment.shape[1]
    sq, sk = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(w, w, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & ((sq == sk) | (sk == 0)) & (sk != -1)
    allowed |= torch.eye(w, dtype=torch.bool, device=segment.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def score_packed(model, groups: list[list[dict]], *, pad_id: int, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None, fallback: Callable | None = None,
                 compute_dtype: str | None = None) -> list:
    """RowScores of every row of every group, flat in input order.

    Packed rows are sorted by length and batched so that a batch holds about
    ``batch_size`` options (the per-option path's unit), which keeps padding small.
    """
    import torch

    from ._precision import compute
    from .evaluate import RowScore

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
    order = sorted((gi for gi, pk in enumerate(packed) if pk is not None),
                   key=lambda gi: -len(packed[gi]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), compute(model, compute_dtype):
            for batch in _batches(order, groups, batch_size):
                scores = _score_batch(model, [packed[gi] for gi in batch], pad_id, device)
                for gi, per in zip(batch, scores):
                    for i, (lp, n, hit) in enumerate(per):
                        out[offsets[gi] + i] = RowScore(lp, n, hit)
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
    import torch

    w = max(len(it["input_ids"]) for it in items)

    def padded(key, fill):
        return torch.tensor([it[key] + [fill] * (w - len(it[key])) for it in items], dtype=torch.long, device=device)

    ids, pos, seg = padded("input_ids", pad_id), padded("position_ids", 0), padded("segment", -1)
    dtype = model.get_input_embeddings().weight.dtype
    if torch.is_autocast_enabled(device.type):  # the attention then runs in the autocast dtype
        dtype = torch.get_autocast_dtype(device.type)
    # (batch row, predicting position, target token, option number within the batch)
    flat = [(b, p, t, o) for b, it in enumerate(items)
            for o, opt in enumerate(it["targets"]) for p, t in opt]
    n_opts = [len(it["targets"]) for it in items]
    first = [sum(n_opts[:b]) for b in range(len(items))]
    rb, pp, tg, ob = (torch.tensor(x, dtype=torch.long, device=device) for x in zip(*flat)) if flat else (
        torch.zeros(0, dtype=torch.long, device=device),) * 4
    ob = ob + torch.tensor(first, dtype=torch.long, device=device)[rb]
    keep = torch.unique(pp)  # sorted: the LM head runs only where a target is predicted
    mask = block_mask(seg, dtype)
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: every position's logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    col = torch.searchsorted(keep, pp) if logits.shape[1] == len(keep) else pp
    sel = logits[rb, col].float().log_softmax(-1)
    lp = sel.gather(-1, tg[:, None]).squeeze(-1).double()
    hit = (sel.argmax(-1) == tg).long()
    total = sum(n_opts)
    lp_sum = torch.zeros(total, dtype=torch.float64, device=device).index_add_(0, ob, lp)
    hits = torch.zeros(total, dtype=torch.long, device=device).index_add_(0, ob, hit)
    cnt = torch.zeros(total, dtype=torch.long, device=device).index_add_(0, ob, torch.ones_like(hit))
    res, lp_l, n_l, h_l = [], lp_sum.tolist(), cnt.tolist(), hits.tolist()
    for b in range(len(items)):
        res.append([(lp_l[o], n_l[o], h_l[o]) for o in range(first[b], first[b] + n_opts[b])])
    return res
