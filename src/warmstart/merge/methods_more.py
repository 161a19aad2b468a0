"""More per-tensor merge methods, registered in :data:`.methods.REGISTRY` (same signature).

nuslerp, multislerp, karcher, nearswap, arcee_fusion, sce, ram, ramplus_tl,
della, della_linear. The math follows mergekit 0.1.5 operation by operation
(same torch calls, same order, same eps), so on the same fp32 inputs the
results are bitwise equal to mergekit's on CPU (tests/merge/test_methods_more.py
checks each against an independent formula; the harness against mergekit).
Where mergekit draws random numbers from torch's global generator (della's
masks, arcee_fusion's quantile sample of tensors over 1M entries) we draw
from a generator seeded per tensor (``seed``), as DARE does here: the same
distribution and a reproducible, thread-order-free result, but not
mergekit's exact draws (those depend on its execution order).

Methods that never need the donor tensors afterwards still do not work in
place (``mutates=False``): they stack their inputs as mergekit does, which is
what makes the summation order — and so the bits — the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .methods import REGISTRY, register

# ----------------------------------------------------------------------------
# Spherical methods


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
             flatten: bool = False) -> torch.Tensor:
    """SLERP of v0→v1 per row (dim) or over the flattened tensor; colinear rows fall back to lerp."""
    out_shape = v0.shape

    def _normalize(x, eps=1e-7):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))  # finite on the branch not taken
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@register("nuslerp", "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
          needs_base=False, min_models=2, max_models=2)
def nuslerp(tensors, base, weights, *, nuslerp_flatten=True, nuslerp_row_wise=False):
    """SLERP between two models at t = w₂/(w₁+w₂); with a base, between their task vectors (then + θ₀)."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is not None:
        return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=nuslerp_flatten)
    return _nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=nuslerp_flatten)


@register("multislerp", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", needs_base=False)
def multislerp(tensors, base, weights, *, normalize_weights=True, eps=1e-8):
    """Barycentric SLERP: tangent-space mean of the unit vectors at their weighted mean, mapped back, × mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ConfigError("multislerp: the weighted sum of the unit task vectors is zero "
                              "(antipodal inputs with balancing weights)", hint="change the weights")
        res = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])  # mergekit's fallback: lerp
        return res + base if base is not None else res
    mean = mean / mean_norm
    tangent = unit - (unit * mean).sum(-1, keepdim=True) * mean
    tangent_result = (tangent * w.view(-1, 1)).sum(0)
    tn = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tn) + tangent_result * (torch.sin(tn) / tn)  # exponential map
    result = (result * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return result + base if base is not None else result


def _vnorm(x: torch.Tensor, dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(dtype))


def karcher_mean(tensors, alphas, max_iter=10, tol=1e-5):
    """Weighted Karcher (Fréchet) mean on the unit sphere by Riemannian gradient steps, × Σ αᵢ‖θᵢ‖."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [_vnorm(t, dtype) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    alph = [alphas[i] / a_sum for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for a, u in zip(alph, us):
        mean += a * u
    mn = _vnorm(mean, dtype)
    mean = us[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alph, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)  # log map of u at mean, weighted
        tn = _vnorm(tangent, dtype)
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)  # exp map
        un = _vnorm(mean, dtype)
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


@register("karcher", "https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean", needs_base=False, uses_weights=False)
def karcher(tensors, base, weights, *, max_iter=10, tol=1e-5):
    """Uniform Karcher mean of all inputs; a base model is one more point (as mergekit), not an origin.

    The base comes last: mergekit appends an unlisted base_model after the models, and the order of the
    points is the order of the sums.
    """
    pts = list(tensors) + ([base] if base is not None else [])
    if len(pts) == 1:
        return pts[0]
    return karcher_mean(pts, [1.0 / len(pts)] * len(pts), max_iter=int(max_iter), tol=float(tol))


# ----------------------------------------------------------------------------
# Base + one model


@register("nearswap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", needs_base=True, min_models=1,
          max_models=1, uses_weights=False)
def nearswap(tensors, base, weights, *, t=None):
    """Take the model's value where it is within t of the base: w = clamp(t/|θ₀−θ₁|, 0, 1), w·θ₁ + (1−w)·θ₀."""
    if t is None:
        raise ConfigError("nearswap needs the parameter t (the distance under which the model's value is taken)")
    a, b = base, tensors[0]
    weight = (float(t) / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


_FUSION_SAMPLE = 1_000_000


def _approx_quantiles(x: torch.Tensor, q: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() > _FUSION_SAMPLE:  # as mergekit: quantiles of a sample with replacement
        flat = flat[torch.randint(flat.numel(), (_FUSION_SAMPLE,), device=flat.device, generator=gen)]
    srt, _ = torch.sort(flat)
    return srt[(q.to(srt.device) * (srt.numel() - 1)).long()]


@register("arcee_fusion", "https://arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
          needs_base=True, task_vectors=True, min_models=1, max_models=1, uses_weights=False,
          result_dtype="float32")
def arcee_fusion(tensors, base, weights, *, seed=0):
    """θ₀ + (θ₁−θ₀)·[s ≥ median(s) + 1.5·IQR(s)], s = |θ₁−θ₀|·KL(softmax θ₁ ‖ softmax θ₀) per row."""
    params = tensors[0]
    eps = 1e-8
    p = F.softmax(params, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    importance = (params - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    gen = torch.Generator(device=base.device).manual_seed(int(seed))
    q1, median, q3 = _approx_quantiles(importance, torch.tensor([0.25, 0.5, 0.75]), gen)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (params - base) * mask


# ----------------------------------------------------------------------------
# Task-vector methods


def sign_consensus(delta: torch.Tensor, mask_dtype=None) -> torch.Tensor:
    """TIES sign election over dim 0: entries whose sign equals that of the summed mass (a zero sum is +)."""
    sign = delta.sign().to(mask_dtype or delta.dtype)
    majority = (delta.sum(dim=0) >= 0).to(mask_dtype or delta.dtype) * 2 - 1
    return sign == majority


@register("sce", "https://arxiv.org/abs/2408.07990", needs_base=True, task_vectors=True, uses_weights=False)
def sce(tensors, base, weights, *, select_topk=1.0):
    """Select (top-k variance entries), Calculate (weights ∝ mean δᵢ²), Erase (minority signs), then merge."""
    tv = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        tv = tv * _sce_mask(tv, float(select_topk), base.dtype).unsqueeze(0)
    erase = sign_consensus(tv, base.dtype)
    w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    wsum = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(wsum) < 1e-6 else w / wsum
    while w.dim() < tv.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    return base + (tv * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)


def _sce_mask(tv: torch.Tensor, density: float, dtype) -> torch.Tensor:
    """Keep the ⌊density·nnz⌋ entries whose task vectors vary most across models."""
    if density <= 0:
        return torch.zeros_like(tv[0], dtype=dtype)
    var = torch.var(tv, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=dtype)
    if k > 0:
        _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
        mask.view(-1)[idx] = 1
    return mask


def _ram(tensors, base, epsilon, r=None, alpha=None):
    """RAM: entries only one model changed (|δ| > ε) keep that δ; shared ones are averaged over the changers.

    RAM+ (tensor-local) scales the unique part of model i by 1 + r·clamp(shared_i/unique_i, 0, α).
    """
    tv = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    nz = tv.abs() > epsilon
    counts = nz.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nz
    if r is None:
        uniq = tvz * unique
    else:
        rho = (nz & overlap).sum(dim=1) / (nz & unique).sum(dim=1).clamp(min=epsilon)
        uniq = tvz * unique * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (uniq + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register("ram", "https://arxiv.org/abs/2601.13572", needs_base=True, task_vectors=True, uses_weights=False)
def ram(tensors, base, weights, *, epsilon=1e-5):
    """Reinforced Agent Merging: unique task-vector entries kept whole, overlapping ones averaged."""
    return _ram(tensors, base, float(epsilon))


@register("ramplus_tl", "https://arxiv.org/abs/2601.13572", needs_base=True, task_vectors=True, uses_weights=False,
          result_dtype="float32")
def ramplus_tl(tensors, base, weights, *, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM+ (tensor-local): RAM with each model's unique entries boosted by its shared/unique ratio."""
    return _ram(tensors, base, float(epsilon), float(r), float(alpha))


# ----------------------------------------------------------------------------
# DELLA: magnitude-ranked drop probabilities (MAGPRUNE), then TIES-style or linear merging


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, gen: torch.Generator,
                   rescale: bool) -> torch.Tensor:
    """Drop entries with probability falling linearly with their magnitude rank in the row.

    Keep probability p = density − ε + 2ε·(rank−1)/(n−1) per row (the smallest
    |δ| of a row kept with density − ε, the largest with density + ε). With
    ``rescale`` the survivors are scaled to the tensor's original L1 norm —
    mergekit's choice; the paper divides each survivor by its own p.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"della: epsilon {epsilon} must keep density ± epsilon in (0, 1) (density {density})")
    shape = delta.shape
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(x.abs(), dim=1, descending=False).argsort(dim=1).to(x.dtype) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs.nan_to_num(density), generator=gen).to(x.dtype)  # a 1-column row: p = density
    masked = x * mask
    if rescale:
        before, after = x.abs().sum(), masked.abs().sum()
        if not (before < 1e-7 or after < 1e-7):
            masked = masked * (before / after)
    return masked.reshape(shape)


def _della(tensors, base, weights, *, consensus, density, epsilon, normalize, rescale, seed, lam):
    """DELLA: MAGPRUNE each δᵢ, weight, then TIES sign election (della) or a plain sum (della_linear)."""
    n = len(tensors)
    dens = density if isinstance(density, (list, tuple)) else [density] * n
    eps = epsilon if isinstance(epsilon, (list, tuple)) else [epsilon] * n
    gen = torch.Generator(device=base.device).manual_seed(int(seed))
    deltas = base.new_empty((n, *base.shape))
    for i, t in enumerate(tensors):
        deltas[i] = della_magprune(t - base, float(dens[i]), float(eps[i]), gen, bool(rescale))
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas, base.dtype)
        mixed, divisor = (deltas * mask).sum(dim=0), (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


_DELLA = "https://arxiv.org/abs/2406.11617"


@register("della", _DELLA, needs_base=True, task_vectors=True)
def della(tensors, base, weights, *, density=1.0, epsilon=0.15, normalize=True, rescale=True, lambda_=1.0, seed=0):
    """DELLA: MAGPRUNE each δᵢ (drop probability falling with magnitude rank), weight, TIES sign election."""
    return _della(tensors, base, weights, consensus=True, density=density, epsilon=epsilon, normalize=normalize,
                  rescale=rescale, seed=seed, lam=lambda_)


@register("della_linear", _DELLA, needs_base=True, task_vectors=True)
def della_linear(tensors, base, weights, *, density=1.0, epsilon=0.15, normalize=False, rescale=True, lambda_=1.0,
                 seed=0):
    """DELLA without sign election: MAGPRUNE each δᵢ, weight, sum."""
    return _della(tensors, base, weights, consensus=False, density=density, epsilon=epsilon, normalize=normalize,
                  rescale=rescale, seed=seed, lam=lambda_)


# The dtype a kernel returns for 16-bit inputs, where it is not the inputs' own: mergekit 0.1.5 writes a kernel's
# result as it is when the config has no out_dtype, so a mergekit-parity engine needs it before the first tensor
# (the shard layout is fixed up front). Checked against the kernels in tests/merge/test_methods_more.py.
# arcee_fusion: its mask is .float(); ramplus_tl: rho = int counts / float clamp → float32. Read from the
# registry (Method.result_dtype), the one place it is declared.
RESULT_DTYPE = {name: (lambda d, _r=getattr(torch, m.result_dtype): torch.promote_types(d, _r))
                for name, m in REGISTRY.items() if m.result_dtype}

__all__ = ["RESULT_DTYPE", "della_magprune", "karcher_mean", "sign_consensus"]
