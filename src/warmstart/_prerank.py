"""A data-free summary of each LoRA adapter, stored in the catalog, and the cheap pre-score it gives.

Summary (computed once, when the adapter is catalogued): for every adapted module the top
``rank`` singular triplets of its update δW = s·B·A, kept as σⱼuⱼ (out) and vⱼ (in) in
int8 with a float32 scale per column — the per-module top singular directions that PEFT's
Arrow router keeps for routing (Ostapenko et al. 2024, https://arxiv.org/abs/2405.11157),
here with σ so that magnitudes count.
The SVD never forms δW: with thin QRs B = Q_B R_B and Aᵀ = Q_A R_A,
δW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ, so only an r×r matrix is decomposed.

Pre-score (at selection time): the gradient proxy's first-order change of the target loss,
⟨G, δW⟩ (see :mod:`warmstart._gradproxy`), with δW replaced by its summary:
Σⱼ σⱼ uⱼᵀ G vⱼ per module. One backward pass at the base gives G; each candidate then costs
``rank`` matrix-vector products per module, read from the catalog instead of the adapter files.
With ``rank`` equal to the adapter's rank the pre-score is the gradient proxy's exact delta.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .checkpoints import open_checkpoint
from .checkpoints.adapters import PEFT_LORA_KEY as _LORA_KEY
from .errors import IncompatibleError

# Singular triplets kept per module. Measured on SmolLM2 with 100 real-shaped adapters (docs/select.md):
# Spearman ρ with the loss scorer 0.636 at 1, 0.641 at 2, 0.643 with every triplet (the exact proxy);
# the loss scorer's best candidate was first by all three. 1 halves the catalog's share of 2.
PRERANK_RANK = 1
# "q8": σu and v stored as int8 with one float32 scale per column (per module and triplet). Half the
# bytes of float16 (1,000 SmolLM2 summaries: 123 MB instead of 237 MB), which is what a first selection
# reads from disk; against unrounded summaries the pre-scores moved by at most 2.7e-4 of their range,
# Spearman ρ 0.9999994 (benchmarks/prerank_q8.py), far inside the pre-rank's own noise (ρ 0.64 with loss).
METHOD = f"svd{PRERANK_RANK}q8"


def summarise(path, rank: int = PRERANK_RANK, *, quantise: bool = True) -> bytes | None:
    """The serialised summary of a plain LoRA adapter (safetensors bytes), or None for anything else
    (full checkpoints, DoRA, adapters with ``modules_to_save`` full tensors: they are scored without a
    pre-rank). ``quantise=False``: float32, unrounded (what the int8 form approximates; tests)."""
    import torch
    from safetensors.torch import save

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
    layout, sus, vs = [], [], []
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            return None
        a = reader.get(ab["A"], torch.float32).double()
        b = reader.get(ab["B"], torch.float32).double()
        su, v = top_directions(b, a, ck.lora.scaling(module), rank)
        layout.append([module, su.shape[0], v.shape[0], su.shape[1]])
        sus.append(su.reshape(-1))
        vs.append(v.reshape(-1))
    if not layout:
        return None
    # Two flat tensors and the layout in the header, not two tensors per module: reading 1,000 summaries
    # of 240 tensors each cost 2.6 s in safetensors' per-tensor overhead alone (measured).
    if not quantise:
        return save({"su": torch.cat(sus).float(), "v": torch.cat(vs).float()},
                    metadata={"method": f"svd{rank}f32", "layout": json.dumps(layout)})
    (qsu, ssu), (qv, sv) = _quantise(sus, [k for *_, k in layout]), _quantise(vs, [k for *_, k in layout])
    return save({"su": qsu, "su_scale": ssu, "v": qv, "v_scale": sv},
                metadata={"method": f"svd{rank}q8", "layout": json.dumps(layout)})


def _quantise(blocks: list, ks: list[int]):
    """Flat int8 values and one float32 scale per column of each (n×k, row-major) block: x ≈ q·scale."""
    import torch

    qs, scales = [], []
    for b, k in zip(blocks, ks):
        m = b.reshape(-1, k)
        scale = m.abs().amax(0).clamp_min(1e-30) / 127.0
        qs.append(torch.round(m / scale).to(torch.int8).reshape(-1))
        scales.append(scale.float())
    return torch.cat(qs), torch.cat(scales)


@functools.lru_cache(maxsize=16)
def _scale_index(layout_json: str, which: int):
    """For a flat σu (which=1) or v (which=2) of ``layout``: the scale index of every element."""
    import torch

    idx, off = [], 0
    for row in json.loads(layout_json):
        n, k = row[which], row[3]
        idx.append(torch.arange(k).repeat(n) + off)
        off += k
    return torch.cat(idx)


def top_directions(b, a, scaling: float, rank: int):
    """(σu: out×k, v: in×k) of the top k = min(rank, r) singular triplets of scaling·B·A."""
    import torch

    qb, rb = torch.linalg.qr(b)  # out×r, r×r
    qa, ra = torch.linalg.qr(a.T)  # in×r, r×r
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    return (qb @ u[:, :k]) * (scaling * s[:k]), qa @ vh[:k].T


def load(data: bytes) -> dict[str, tuple[Any, Any]]:
    """{module: (σu: out×k, v: in×k)} in float32 from :func:`summarise`'s bytes."""
    layout, su, v = load_flat(data)
    out, i, j = {}, 0, 0
    for module, n_out, n_in, k in layout:
        out[module] = (su[i:i + n_out * k].view(n_out, k), v[j:j + n_in * k].view(n_in, k))
        i, j = i + n_out * k, j + n_in * k
    return out


def load_flat(data: bytes):
    """(layout [[module, out, in, k], …], flat σu, flat v) in float32."""
    from safetensors.torch import load as st_load

    t = st_load(data)
    layout = _header(data)["layout"]
    if "su_scale" not in t:  # float16 (method "svdN", before q8) or float32 (quantise=False) summaries
        return layout, t["su"].float(), t["v"].float()
    key = json.dumps(layout)
    return (layout, t["su"].float() * t["su_scale"][_scale_index(key, 1)],
            t["v"].float() * t["v_scale"][_scale_index(key, 2)])


def _header(data: bytes) -> dict:
    """The metadata of a summary, from its header alone (safetensors' layout: an 8-byte
    little-endian header length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return {**meta, "layout": json.loads(meta.get("layout", "[]"))}


def modules_of(data: bytes) -> set[str]:
    """The base parameters (``<module>.weight``) a summary touches."""
    return {f"{m[0]}.weight" for m in _header(data)["layout"]}


def prescore(grads: dict, summary: dict, path=None) -> float:
    """Σ over modules and kept triplets of σⱼuⱼᵀ G vⱼ: the summary's first-order change of the loss."""
    return prescore_many(grads, [summary], [path])[0]


def prescore_many(grads: dict, summaries: list, paths: list | None = None) -> list[float]:
    """:func:`prescore` of many summaries (dicts from :func:`load`, or :func:`summarise`'s bytes).
    Summaries with the same layout (the usual case: one adapter recipe) are stacked, so each module
    costs one G·[v₁ … v_C] product for all of them instead of one per candidate."""
    import torch

    total = [0.0] * len(summaries)
    groups: dict[str, list[int]] = {}
    flats = []
    for i, s in enumerate(summaries):
        layout, su, v = load_flat(s) if isinstance(s, (bytes, bytearray)) else _flatten(s)
        flats.append((su, v))
        groups.setdefault(json.dumps(layout), []).append(i)
    for key, idx in groups.items():
        su = torch.stack([flats[i][0] for i in idx])  # C × Σ out·k
        v = torch.stack([flats[i][1] for i in idx])  # C × Σ in·k
        acc = torch.zeros(len(idx), dtype=torch.float64)
        p = q = 0
        for module, n_out, n_in, k in json.loads(key):
            g = grads.get(f"{module}.weight")
            if g is None:
                where = paths[idx[0]] if paths else None
                raise IncompatibleError(f"adapter changes {module!r}, which the base model does not have", path=where)
            if g.shape != (n_out, n_in):
                g = g.T  # embedding LoRA / Conv1D store the transpose (as in _gradproxy.lora_dot)
            sm = su[:, p:p + n_out * k].reshape(len(idx), n_out, k).to(g.device)
            vm = v[:, q:q + n_in * k].reshape(len(idx), n_in, k).to(g.device)
            c = len(idx)  # one GEMM (out×in)·(in×C·k); a batched matmul over C broadcasts G and is 10x slower
            gv = (g @ vm.permute(1, 0, 2).reshape(n_in, c * k)).reshape(n_out, c, k)
            acc += (gv * sm.permute(1, 0, 2)).sum((0, 2)).double().cpu()
            p, q = p + n_out * k, q + n_in * k
        for i, x in zip(idx, acc.tolist()):
            total[i] = x
    return total


def _flatten(summary: dict):
    """A :func:`load` dict back to (layout, flat σu, flat v)."""
    import torch

    layout = [[m, su.shape[0], v.shape[0], su.shape[1]] for m, (su, v) in summary.items()]
    return (layout, torch.cat([su.float().reshape(-1) for su, _ in summary.values()]),
            torch.cat([v.float().reshape(-1) for _, v in summary.values()]))


__all__ = ["METHOD", "PRERANK_RANK", "load", "load_flat", "modules_of", "prescore", "prescore_many", "summarise",
           "top_directions"]
