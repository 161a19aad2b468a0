"""Per-tensor merge math: one small function per method, registered under its name.

Every method has the same signature (mergekit's habit: the signature is the
schema)::

    fn(tensors: list[Tensor], base: Tensor | None, weights: list[float], **params) -> Tensor

``tensors`` are the donors (fp32, same shape), ``base`` is θ₀ (required by the
task-vector methods), ``weights`` one float per donor. Methods marked
``mutates`` work in place in the donor tensors: fresh memory costs more than
the arithmetic here (first-touch page faults are ~15× an fp32 add), so the
streaming engine hands them buffers it owns; :func:`merge_tensors` copies first. Parameter names and
defaults follow mergekit 0.1.5 (``density``, ``gamma``, ``lambda``,
``normalize``, ``t``, ``rescale``, ``filter_wise``); where we differ, the
function says so and docs/merge.md lists it.

TIES, DARE and breadcrumbs are one parametrised family (``_task_family``):
sparsify each task vector δᵢ = θᵢ − θ₀, optionally elect a sign, then combine.
"""

from __future__ import annotations

import inspect
import keyword
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, IncompatibleError


@dataclass(frozen=True)
class Method:
    """A registered method: its function, its parameters (read from the function's signature) and the
    facts callers test instead of its name."""

    name: str
    fn: Callable  # (tensors, base, weights, **params) with params named as in plans ("lambda", not "lambda_")
    url: str  # the paper (or definition) the math follows
    needs_base: bool
    defaults: dict = field(default_factory=dict)  # parameter → default: the keyword-only arguments of the function
    min_models: int = 1
    max_models: int | None = None
    uses_weights: bool = True
    doc: str = ""
    mutates: bool = False  # overwrites the donor tensors it is given (the engine owns its buffers)
    result_dtype: str | None = None  # mergekit's output dtype when it is not the inputs' (e.g. float32)
    base_is_input: bool = False  # no θ₀: a base takes part only as one more donor (include_base), never as origin
    task_vectors: bool = False  # works on task vectors δᵢ = θᵢ − θ₀
    factor_space: bool = False  # exact on LoRA factors (ΔW = Σ cᵢ·sᵢ·BᵢAᵢ): the cat/svd/factors modes apply
    weighted_average: bool = False  # Σ wᵢθᵢ / Σ wᵢ: the same model for any scale of w, undefined when Σ w = 0
    points: int | None = None  # exactly this many tensors in all, the base included (slerp: 2)
    mergekit_requires: tuple[str, ...] = ()  # parameters mergekit requires that we default (a note says so)
    impl: Callable | None = field(default=None, repr=False, compare=False)  # the function as written (its schema)

    @property
    def seeded(self) -> bool:
        """Draws random numbers: the seed is made per tensor (:func:`tensor_seed`)."""
        return "seed" in self.defaults

    @property
    def sparsifies(self) -> bool:
        """Keeps a ``density`` fraction of each task vector (the weight search can search it)."""
        return "density" in self.defaults


REGISTRY: dict[str, Method] = {}
_METHOD_ARGS = ["tensors", "base", "weights"]


def _schema(fn: Callable) -> tuple[dict, dict]:
    """A method function's parameters and defaults, from its signature (mergekit's easy_define habit):
    ``fn(tensors, base, weights, *, p=default, ...)``. A trailing underscore frees a Python keyword
    (``lambda_`` is the parameter ``lambda``). Returns (defaults, plan name → Python name)."""
    sig = inspect.signature(fn)
    pos = [p.name for p in sig.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    kw = [p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]
    if pos != _METHOD_ARGS or any(p.default is p.empty for p in kw):
        raise TypeError(f"{fn.__name__}: a method is fn(tensors, base, weights, *, param=default, ...)")
    names = {p.name.rstrip("_") if keyword.iskeyword(p.name.rstrip("_")) else p.name: p.name for p in kw}
    return {k: sig.parameters[v].default for k, v in names.items()}, names


def register(name: str, url: str, *, needs_base: bool, min_models: int = 1, max_models: int | None = None,
             uses_weights: bool = True, mutates: bool = False, result_dtype: str | None = None, **facts):
    """Register ``fn`` under ``name``; its keyword-only arguments are the method's parameters."""

    def deco(fn):
        defaults, py = _schema(fn)
        renamed = {k: v for k, v in py.items() if k != v}
        f = fn if not renamed else (lambda tensors, base, weights, **kw: fn(
            tensors, base, weights, **{renamed.get(k, k): v for k, v in kw.items()}))
        REGISTRY[name] = Method(name, f, url, needs_base, defaults, min_models, max_models, uses_weights,
                                (fn.__doc__ or "").strip().splitlines()[0], mutates, result_dtype, impl=fn, **facts)
        return fn

    return deco


def get_method(name: str) -> Method:
    m = REGISTRY.get(name)
    if m is None:
        raise ConfigError(f"unknown merge method {name!r}", hint="choose one of " + ", ".join(sorted(REGISTRY)))
    return m


# ----------------------------------------------------------------------------
# Averages


@register("linear", "https://arxiv.org/abs/2203.05482", needs_base=False, mutates=True, base_is_input=True,
          factor_space=True, weighted_average=True)
def linear(tensors, base, weights, *, normalize=True):
    """Weighted average Σ wᵢθᵢ (/ Σ wᵢ when normalize); the base takes part only if passed as a donor.

    Exactly mergekit 0.1.5's arithmetic, so results are bit-identical: accumulate wᵢθᵢ in float32
    (float64 for float64 inputs) in input order, divide by the float32 Σwᵢ at the end (not pre-scaled
    weights: that differs by an ulp in ~40 % of entries when Σw ≠ 1), cast back to the inputs' dtype.
    """
    first = tensors[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=torch.float64).to(acc)  # Python floats → the accumulator's dtype, as mergekit
    out = first.mul_(w[0]) if first.dtype == acc else first.to(acc).mul_(w[0])  # 0 + t·w, in place when we can
    for t, wi in zip(tensors[1:], w[1:]):
        out.addcmul_(t, wi)
    if normalize:
        out.div_(w.sum())
    return out.to(first.dtype)


@register("task_arithmetic", "https://arxiv.org/abs/2212.04089", needs_base=True, mutates=True, task_vectors=True,
          factor_space=True)
def task_arithmetic(tensors, base, weights, *, lambda_=1.0, normalize=False):
    """θ₀ + λ·Σ wᵢδᵢ (divided by Σ wᵢ when normalize)."""
    return _task_family(tensors, base, weights, sparsify=None, consensus=None, lam=lambda_, normalize=normalize)


# ----------------------------------------------------------------------------
# The TIES / DARE / breadcrumbs family


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, exactly, without sorting it.

    mergekit argsorts whole tensors (O(n log n), most of its TIES time) and even
    torch's ``kthvalue`` costs ~100 ns/element on CPU. Here a random sample of
    2¹⁶ values brackets the answer (±6σ of the sample quantile), one pass
    counts what lies below the bracket and gathers the few percent inside it,
    and ``kthvalue`` runs on that small set only. If the bracket missed (odds
    ~1e-9) the full ``kthvalue`` answers. Same result as a full sort, always.
    """
    n = x.numel()
    if n <= 1 << 17:
        return x.kthvalue(k).values
    s = 1 << 16
    gen = torch.Generator(device=x.device).manual_seed(n ^ k)
    sample = x[torch.randint(n, (s,), generator=gen, device=x.device)]
    pos, spread = (k / n) * s, 6 * (s * (k / n) * (1 - k / n)) ** 0.5 + 2
    i_lo, i_hi = int(pos - spread), int(pos + spread)
    lo = sample.kthvalue(i_lo + 1).values if i_lo >= 0 else None  # two selections on the sample, no sort
    hi = sample.kthvalue(i_hi + 1).values if i_hi < s else None
    if lo is None:
        below, inside = 0, x <= hi
    else:
        inside = x >= lo
        below = n - int(torch.count_nonzero(inside))
        if hi is not None:
            inside &= x <= hi
    cand = x[inside]
    rank = k - below
    if 1 <= rank <= cand.numel():
        return cand.kthvalue(rank).values
    return x.kthvalue(k).values


def _magnitude_keep(delta: torch.Tensor, density: float, tie_break: str = "position") -> torch.Tensor | None:
    """Mask of the top ``density`` fraction of |δ|, found by selection (:func:`kth_smallest`), not sorting.

    Everything strictly above the (n−k)-th smallest magnitude is kept; ties at
    the threshold (common in bf16) are broken by position so exactly k survive.
    """
    n = delta.numel()
    if density >= 1:
        return None
    k = max(1, int(density * n)) if density > 0 else 0  # as mergekit: any positive density keeps one entry
    if k >= n:
        return None
    mag = delta.abs().reshape(-1)
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool).view_as(delta)
    thr = kth_smallest(mag, n - k)
    keep = mag > thr
    deficit = k - int(torch.count_nonzero(keep))
    if deficit > 0:
        if tie_break == "mergekit" and int(torch.count_nonzero(mag == thr)) > deficit:
            # Ties at the threshold: "the k largest" is ambiguous. mergekit keeps its (unstable) argsort's
            # pick; to be bit-identical these tensors pay for that sort (bf16 inputs: most tensors).
            keep = torch.zeros_like(mag, dtype=torch.bool)
            keep[torch.argsort(mag.float(), descending=True)[:k]] = True
        else:
            keep[(mag == thr).nonzero().view(-1)[:deficit]] = True  # the first by position
    return keep.view_as(delta)


def _outlier_keep(delta: torch.Tensor, density: float, gamma: float,
                  tie_break: str = "position") -> torch.Tensor | None:
    """Breadcrumbs: drop the largest ``gamma`` fraction and the smallest, keeping ``density``.

    Same counts as mergekit 0.1.5 (n_top = ⌊γn⌋, n_bottom = n − ⌊density·n⌋ − n_top, the
    outlier cut shrinks when both do not fit), with two selections instead of a full sort.
    """
    n = delta.numel()
    if density >= 1:
        return None
    target, n_top = int(n * density), int(n * gamma)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_bot, n_top = 0, n - target
    mag = delta.abs().reshape(-1)
    keep = torch.ones_like(mag, dtype=torch.bool)
    lo = kth_smallest(mag, n_bot) if n_bot > 0 else None
    hi = kth_smallest(mag, n - n_top) if n_top > 0 else None
    if lo is not None:
        keep &= mag > lo
    if hi is not None:
        keep &= mag <= hi
    ambiguous = any(c is not None and int(torch.count_nonzero(mag == c)) > 1 for c in (lo, hi))
    if tie_break == "mergekit" and ambiguous:  # equal magnitudes at a cut: which survive is mergekit's sort's pick
        keep = torch.zeros_like(mag, dtype=torch.bool)
        keep[torch.sort(mag.float(), descending=False).indices[n_bot:n_bot + target]] = True
    return keep.view_as(delta)


def _bernoulli_keep(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor | None:
    """DARE: keep each entry with probability ``density`` (seeded generator, reproducible)."""
    if density >= 1:
        return None
    return torch.rand(delta.shape, generator=gen, device=delta.device) < density


def _task_family(tensors, base, weights, *, sparsify, consensus, density=1.0, gamma=0.01, normalize=False,
                 rescale=None, seed=0, tie_break="position", lam=1.0):
    """Generalised task arithmetic: sparsify δᵢ, optional sign election, (disjoint) weighted sum."""
    densities = density if isinstance(density, (list, tuple)) else [density] * len(tensors)
    gammas = gamma if isinstance(gamma, (list, tuple)) else [gamma] * len(tensors)
    gen = torch.Generator(device=base.device).manual_seed(int(seed)) if sparsify == "random" else None
    rescale = (sparsify == "random") if rescale is None else rescale
    # mergekit builds the weights as a tensor of the inputs' dtype: in bf16, 0.6 is 0.6015625
    weights = torch.tensor(weights, dtype=torch.float64).to(base.dtype).tolist()
    wd = []
    for t, w, d, g in zip(tensors, weights, densities, gammas):
        delta = t.sub_(base)
        if tie_break not in ("position", "mergekit"):
            raise ConfigError(f"tie_break must be position or mergekit, got {tie_break!r}")
        keep = (_magnitude_keep(delta, d, tie_break) if sparsify == "magnitude" else
                _outlier_keep(delta, d, g, tie_break) if sparsify == "outliers" else
                _bernoulli_keep(delta, d, gen) if sparsify == "random" else None)
        if keep is not None:
            delta.mul_(keep)
            if sparsify == "random" and rescale and d > 0:
                # DARE (paper): survivors × 1/p so E[δ̃] = δ. mergekit 0.1.5 instead rescales to the
                # same L1 norm, which is 1/p only in expectation (docs/merge.md).
                delta.div_(d)
        wd.append(delta.mul_(w))
    mixed, divisor = _combine(wd, weights, consensus)
    if normalize:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def _sum_into(ts: list[torch.Tensor]) -> torch.Tensor:
    """Σ ts as mergekit's ``stack(...).sum(0)``: 16-bit inputs accumulate in float32 and round once
    (adding in place in bf16 would round after every term); float32 adds in place, in order."""
    if ts[0].dtype in (torch.float16, torch.bfloat16) and len(ts) > 2:
        acc = ts[0].float()
        for d in ts[1:]:
            acc.add_(d)
        return ts[0].copy_(acc)
    out = ts[0]
    for d in ts[1:]:
        out.add_(d)
    return out


def _combine(wd: list[torch.Tensor], weights, consensus):
    """Σ wᵢδ̃ᵢ and its normaliser; with ``consensus='sum'``, only entries agreeing with the elected sign.

    Works in place in the (owned) weighted deltas with a few scratch buffers: fresh allocations
    cost more than the arithmetic (see module docstring). Same values as mergekit 0.1.5's
    ``get_mask`` / sums, bit for bit.
    """
    dt = wd[0].dtype
    if consensus is None:
        total = float(torch.tensor(weights, dtype=dt).sum())
        return _sum_into(wd), (total if abs(total) >= 1e-8 else 1.0)
    sign = _sum_into([wd[0].clone()] + wd[1:]) if len(wd) > 1 else wd[0].clone()
    sign = torch.where(sign >= 0, 1.0, -1.0).to(dt)  # the sign of the summed mass; a zero sum counts as +
    scratch = torch.empty_like(sign)
    wide = dt in (torch.float16, torch.bfloat16) and len(wd) > 2  # as _sum_into: accumulate in float32
    divisor = torch.zeros_like(sign, dtype=torch.float32 if wide else dt)
    for d, w in zip(wd, weights):
        agree = torch.mul(d, sign, out=scratch) > 0  # same sign as elected (zeros never agree)
        d.mul_(agree)
        divisor.add_(agree, alpha=w)
    divisor = divisor.to(dt)
    mixed = _sum_into(wd)
    divisor[divisor == 0] = 1
    return mixed, divisor


_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_CRUMBS = "https://arxiv.org/abs/2312.06795"
_FAMILY = {"needs_base": True, "mutates": True, "task_vectors": True}


@register("ties", _TIES, **_FAMILY)
def ties(tensors, base, weights, *, density=1.0, normalize=True, lambda_=1.0, tie_break="position"):
    """TIES: keep the top-density |δᵢ|, elect a sign per entry, sum the agreeing δᵢ."""
    return _task_family(tensors, base, weights, sparsify="magnitude", consensus="sum", density=density,
                        normalize=normalize, lam=lambda_, tie_break=tie_break)


@register("dare_ties", _DARE, **_FAMILY)
def dare_ties(tensors, base, weights, *, density=1.0, normalize=False, lambda_=1.0, rescale=True, seed=0):
    """DARE + TIES: keep each δᵢ entry with probability density (rescaled by 1/density), elect signs."""
    return _task_family(tensors, base, weights, sparsify="random", consensus="sum", density=density,
                        normalize=normalize, lam=lambda_, rescale=rescale, seed=seed)


@register("dare_linear", _DARE, **_FAMILY)
def dare_linear(tensors, base, weights, *, density=1.0, normalize=False, lambda_=1.0, rescale=True, seed=0):
    """DARE: keep each δᵢ entry with probability density (rescaled by 1/density), then sum."""
    return _task_family(tensors, base, weights, sparsify="random", consensus=None, density=density,
                        normalize=normalize, lam=lambda_, rescale=rescale, seed=seed)


@register("breadcrumbs", _CRUMBS, **_FAMILY)
def breadcrumbs(tensors, base, weights, *, density=1.0, gamma=0.01, normalize=False, lambda_=1.0,
                tie_break="position"):
    """Model Breadcrumbs: drop the largest gamma and the smallest entries of each δᵢ, keeping density, sum."""
    return _task_family(tensors, base, weights, sparsify="outliers", consensus=None, density=density, gamma=gamma,
                        normalize=normalize, lam=lambda_, tie_break=tie_break)


@register("breadcrumbs_ties", _CRUMBS, **_FAMILY)
def breadcrumbs_ties(tensors, base, weights, *, density=1.0, gamma=0.01, normalize=False, lambda_=1.0,
                     tie_break="position"):
    """Model Breadcrumbs with TIES sign election."""
    return _task_family(tensors, base, weights, sparsify="outliers", consensus="sum", density=density, gamma=gamma,
                        normalize=normalize, lam=lambda_, tie_break=tie_break)


# ----------------------------------------------------------------------------
# Geometric methods


@register("slerp", "https://dl.acm.org/doi/10.1145/325165.325242", needs_base=False, min_models=1, max_models=2,
          uses_weights=False, points=2, mergekit_requires=("t",))
def slerp(tensors, base, weights, *, t=0.5):
    """Spherical interpolation from v0 (the base, or the first model) to v1, over the whole flattened tensor.

    mergekit 0.1.5's arithmetic step for step (bit-identical): float32 (float64 for float64
    inputs) norms and dot product of the normalised vectors in 1M-element chunks, lerp when
    nearly colinear, the result rounded to the inputs' dtype.
    """
    if base is not None and len(tensors) == 1:
        v0, v1 = base, tensors[0]
    elif len(tensors) == 2 and base is None:
        v0, v1 = tensors
    else:
        raise ConfigError("slerp merges exactly two models: a base and one model, or two models without a base")
    dt = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=torch.float64).to(dt).reshape(-1, 1)
    n, ch = a.shape[1], _SLERP_CHUNK
    if not n:
        return v0.clone()
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, i:i + ch].to(dt), dim=1, keepdim=True)
                                               for i in range(0, n, ch)]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, i:i + ch].to(dt), dim=1, keepdim=True)
                                               for i in range(0, n, ch)]), dim=0)
    eps = _SLERP_EPS
    na, nb = torch.where(na > eps, na, 1), torch.where(nb > eps, nb, 1)
    dot = torch.stack([((a[:, i:i + ch].to(dt) / na) * (b[:, i:i + ch].to(dt) / nb)).sum(dim=1, keepdim=True)
                       for i in range(0, n, ch)]).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for i in range(0, n, ch):
        out[:, i:i + ch] = ca * a[:, i:i + ch].to(dt) + cb * b[:, i:i + ch].to(dt)
    return out.reshape(v0.shape)


_SLERP_CHUNK = 1 << 20  # mergekit's _CHUNK_ELEMENTS (its chunking sets the rounding of the norms)
_SLERP_DOT_THRESHOLD, _SLERP_EPS = 0.9995, 1e-8  # mergekit's constants (not parameters there either)


@register("model_stock", "https://arxiv.org/abs/2403.19522", needs_base=True, min_models=2, uses_weights=False,
          task_vectors=True)
def model_stock(tensors, base, weights, *, filter_wise=False):
    """θ₀ + t·(mean(θᵢ) − θ₀) with t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of δᵢ."""
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
    else:
        w0 = base.reshape(-1)
    offsets = [t.reshape(w0.shape) - w0 for t in tensors]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norm = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cos.append(((a * b).sum(dim=-1) / norm).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6  # as mergekit 0.1.5: no finite estimate there, keep the base
    ratio = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(den), den))
    avg = sum(t.reshape(w0.shape) for t in tensors) / n
    return (ratio * avg + (1 - ratio) * w0).reshape(shape)


@register("passthrough", "https://github.com/arcee-ai/mergekit", needs_base=False, max_models=1, uses_weights=False)
def passthrough(tensors, base, weights, *, scale=None):
    """The one input as it is (times ``scale`` if given): mergekit's copy / frankenmerge method."""
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    return tensors[0] if s is None else tensors[0] * s


# ----------------------------------------------------------------------------
# In-memory API (the weight optimizer calls these in a loop)


def validate(method: Method, n_models: int, has_base: bool, params: dict) -> dict:
    """Check counts and parameter names against the method; return params with defaults filled in."""
    if method.needs_base and not has_base:
        raise ConfigError(f"method {method.name!r} needs a base model", hint="pass --base")
    if n_models < method.min_models or (method.max_models and n_models > method.max_models):
        want = (f"{method.min_models}" if method.max_models == method.min_models else
                f"{method.min_models}..{method.max_models or 'any'}")
        raise ConfigError(f"method {method.name!r} takes {want} model(s) besides the base, got {n_models}")
    unknown = set(params) - set(method.defaults)
    if unknown:
        raise ConfigError(f"method {method.name!r} has no parameter(s) {sorted(unknown)}",
                          hint="known: " + ", ".join(sorted(method.defaults)))
    dens = params.get("density", 1.0)
    for d in (dens if isinstance(dens, (list, tuple)) else [dens]):
        if not 0 <= float(d) <= 1:
            raise ConfigError(f"density must be in [0, 1], got {d}")
    return {**method.defaults, **params}


def merge_tensors(method: str, tensors: list, base=None, weights: list[float] | None = None, *,
                  compute_dtype=torch.float32, out_dtype=None, **params):
    """Merge one tensor: donors ``tensors`` (+ optional ``base``) → result in ``out_dtype`` (default: input dtype)."""
    m = get_method(method)
    weights = list(weights) if weights is not None else [1.0 / len(tensors)] * len(tensors)
    if len(weights) != len(tensors):
        raise ConfigError(f"{len(weights)} weights for {len(tensors)} models")
    params = validate(m, len(tensors), base is not None, params)
    ref = base if base is not None else tensors[0]
    out_dtype = out_dtype or ref.dtype
    ts = [t.to(compute_dtype) for t in tensors]
    if m.mutates:  # never modify the caller's tensors
        ts = [x.clone() if x is t else x for x, t in zip(ts, tensors)]
    b = base.to(compute_dtype) if base is not None else None
    return m.fn(ts, b, weights, **params).to(out_dtype)


def merge_state_dicts(method: str, state_dicts: list[dict], base: dict | None = None, weights=None, *,
                      missing: str = "error", **params) -> dict:
    """Merge whole state dicts key by key; non-float tensors are copied from the reference (base or first).

    ``missing='error'`` refuses keys absent from some input; ``'reference'`` merges each key over
    the inputs that have it (keys absent from the reference are dropped).
    """
    ref = base if base is not None else state_dicts[0]
    out = {}
    for key, rt in ref.items():
        have = [i for i, sd in enumerate(state_dicts) if key in sd]
        if len(have) < len(state_dicts) and missing == "error":
            raise IncompatibleError(f"tensor {key!r} is missing from model(s) "
                                    f"{[i for i in range(len(state_dicts)) if i not in have]}",
                                    hint="pass missing='reference' to merge over the models that have it")
        if not rt.is_floating_point() or not have:
            out[key] = rt.clone()
            continue
        w = [weights[i] for i in have] if weights is not None else None
        seed_params = dict(params)
        if get_method(method).seeded:  # per tensor, as the streaming engine: the same bits in memory and on disk
            seed_params["seed"] = tensor_seed(int(params.get("seed", 0)), key)
        out[key] = merge_tensors(method, [state_dicts[i][key] for i in have],
                                 base[key] if base is not None else None, w, **seed_params)
    extra = {k for sd in state_dicts for k in sd} - set(ref)
    if extra and missing == "error":
        raise IncompatibleError(f"{len(extra)} tensor(s) not in the reference model, e.g. {sorted(extra)[0]!r}",
                                hint="pass missing='reference' to follow the reference's tensor list")
    return out


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: DARE masks depend on (seed, tensor name) only, not on thread order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


__all__ = ["Method", "REGISTRY", "get_method", "merge_state_dicts", "merge_tensors", "register", "tensor_seed",
           "validate"]
