"""A data-free summary of each LoRA adapter, stored in the catalog, and the cheap pre-score it gives.

Summary (computed once, when the adapter is catalogued): for every adapted module the top
``rank`` singular triplets of its update δW = s·B·A, kept as σⱼuⱼ (out) and vⱼ (in) in
float16 — the per-module top singular directions that PEFT's Arrow router keeps for routing
(Ostapenko et al. 2024, https://arxiv.org/abs/2405.11157), here with σ so that magnitudes count.
The SVD never forms δW: with thin QRs B = Q_B R_B and Aᵀ = Q_A R_A,
δW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ, so only an r×r matrix is decomposed.

Pre-score (at selection time): the gradient proxy's first-order change of the target loss,
⟨G, δW⟩ (see :mod:`warmstart._gradproxy`), with δW replaced by its summary:
Σⱼ σⱼ uⱼᵀ G vⱼ per module. One backward pass at the base gives G; each candidate then costs
``rank`` matrix-vector products per module, read from the catalog instead of the adapter files.
With ``rank`` equal to the adapter's rank the pre-score is the gradient proxy's exact delta.
"""

from __future__ import annotations

from typing import Any

from .checkpoints import open_checkpoint
from .errors import IncompatibleError

# Singular triplets kept per module. Measured on SmolLM2 with 100 real-shaped adapters (docs/select.md):
# Spearman ρ with the loss scorer 0.636 at 1, 0.641 at 2, 0.643 with every triplet (the exact proxy);
# the loss scorer's best candidate was first by all three. 1 halves the catalog's share of 2.
PRERANK_RANK = 1
METHOD = f"svd{PRERANK_RANK}"


def summarise(path, rank: int = PRERANK_RANK) -> bytes | None:
    """The serialised summary of a plain LoRA adapter (safetensors bytes), or None for anything else
    (full checkpoints, DoRA, adapters with ``modules_to_save`` full tensors: they are scored without a
    pre-rank)."""
    import torch
    from safetensors.torch import save

    from ._gradproxy import _LORA_KEY

    ck = open_checkpoint(path)
    if ck.kind != "lora" or ck.lora is None:
        return None
    reader = ck.weights()
    factors: dict[str, dict[str, str]] = {}
    for key in reader.keys():
        m = _LORA_KEY.match(key)
        if m is None or "lora_magnitude_vector" in key:
            return None
        factors.setdefault(m["module"], {})[m["ab"]] = key
    out: dict[str, Any] = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            return None
        a = reader.get(ab["A"], torch.float32).double()
        b = reader.get(ab["B"], torch.float32).double()
        su, v = top_directions(b, a, ck.lora.scaling(module), rank)
        out[f"{module}.su"] = su.to(torch.float16).contiguous()
        out[f"{module}.v"] = v.to(torch.float16).contiguous()
    return save(out, metadata={"method": f"svd{rank}"}) if out else None


def top_directions(b, a, scaling: float, rank: int):
    """(σu: out×k, v: in×k) of the top k = min(rank, r) singular triplets of scaling·B·A."""
    import torch

    qb, rb = torch.linalg.qr(b)  # out×r, r×r
    qa, ra = torch.linalg.qr(a.T)  # in×r, r×r
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    return (qb @ u[:, :k]) * (scaling * s[:k]), qa @ vh[:k].T


def load(data: bytes) -> dict[str, tuple[Any, Any]]:
    """{module: (σu, v)} in float32 from :func:`summarise`'s bytes."""
    from safetensors.torch import load as st_load

    t = st_load(data)
    mods = {k.rsplit(".", 1)[0] for k in t}
    return {m: (t[f"{m}.su"].float(), t[f"{m}.v"].float()) for m in mods}


def modules_of(data: bytes) -> set[str]:
    """The base parameters (``<module>.weight``) a summary touches, from its header alone.
    safetensors' layout: an 8-byte little-endian header length, then the JSON header."""
    import json

    n = int.from_bytes(data[:8], "little")
    return {f"{k.rsplit('.', 1)[0]}.weight" for k in json.loads(data[8:8 + n]) if k != "__metadata__"}


def prescore(grads: dict, summary: dict, path=None) -> float:
    """Σ over modules and kept triplets of σⱼuⱼᵀ G vⱼ: the summary's first-order change of the loss."""
    return prescore_many(grads, [summary], [path])[0]


def prescore_many(grads: dict, summaries: list[dict], paths: list | None = None) -> list[float]:
    """:func:`prescore` of many summaries, one matrix product per module for all of them: G·[v…]
    instead of a matrix-vector product per candidate (the per-call overhead dominated at 1,000)."""
    import torch

    by_module: dict[str, list] = {}
    for i, s in enumerate(summaries):
        for module, (su, v) in s.items():
            by_module.setdefault(module, []).append((i, su, v))
    total = torch.zeros(len(summaries), dtype=torch.float64)
    for module, items in by_module.items():
        g = grads.get(f"{module}.weight")
        if g is None:
            where = paths[items[0][0]] if paths else None
            raise IncompatibleError(f"adapter changes {module!r}, which the base model does not have", path=where)
        if g.shape != (items[0][1].shape[0], items[0][2].shape[0]):
            g = g.T  # embedding LoRA / Conv1D store the transpose (as in _gradproxy.lora_dot)
        su = torch.cat([x[1] for x in items], 1).to(g.device)
        v = torch.cat([x[2] for x in items], 1).to(g.device)
        owner = torch.tensor([i for i, s_, _ in items for _ in range(s_.shape[1])])
        total.index_add_(0, owner, ((g @ v) * su).sum(0).double().cpu())
    return total.tolist()


__all__ = ["METHOD", "PRERANK_RANK", "load", "modules_of", "prescore", "prescore_many", "summarise", "top_directions"]
