"""The methods of merge/methods_more.py against independent formulas written here (float64, loops, numpy).

Bitwise agreement with mergekit 0.1.5 is checked by benchmarks/mergekit_methods_compare.py (it needs
mergekit, which is not a dependency); these tests check the math itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from warmstart.errors import ConfigError
from warmstart.merge import REGISTRY, MergePlan, merge, merge_tensors

NEW = ["nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "sce", "ram", "ramplus_tl", "della",
       "della_linear"]


@pytest.fixture
def trio():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 10, generator=g)
    sparse = [torch.rand(12, 10, generator=g) < 0.5 for _ in range(3)]  # task vectors that overlap in part
    donors = [base + 0.1 * torch.randn(12, 10, generator=g) * m for m in sparse]
    return base, donors


def _slerp64(t, a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    th = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_registered_with_urls():
    for name in NEW:
        assert name in REGISTRY and REGISTRY[name].url.startswith("https://")


def test_nuslerp_flattened_and_row_wise(trio):
    base, (a, b, _) = trio
    got = merge_tensors("nuslerp", [a, b], None, [1.0, 3.0])  # t = 3/4
    assert torch.allclose(got.double().reshape(-1), _slerp64(0.75, a, b), atol=1e-5)
    got = merge_tensors("nuslerp", [a, b], base, [1.0, 1.0])  # between task vectors, then + θ₀
    want = base.double().reshape(-1) + _slerp64(0.5, a - base, b - base)
    assert torch.allclose(got.double().reshape(-1), want, atol=1e-5)
    rows = merge_tensors("nuslerp", [a, b], None, [2.0, 1.0], nuslerp_flatten=False)
    for i in range(a.shape[0]):
        assert torch.allclose(rows[i].double(), _slerp64(1 / 3, a[i], b[i]), atol=1e-5)
    cols = merge_tensors("nuslerp", [a, b], None, [2.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(a.shape[1]):
        assert torch.allclose(cols[:, j].double(), _slerp64(1 / 3, a[:, j], b[:, j]), atol=1e-5)


def test_nuslerp_colinear_falls_back_to_lerp():
    a = torch.arange(1.0, 7.0)
    got = merge_tensors("nuslerp", [a, 2 * a], None, [1.0, 1.0])
    assert torch.allclose(got, 1.5 * a)


def _multislerp64(xs, w):
    # the algorithm as described in the blog post, in float64 numpy
    x = np.stack([t.double().numpy().reshape(-1) for t in xs])
    w = np.asarray(w, dtype=float) / sum(w)
    n = np.linalg.norm(x, axis=1)
    u = x / n[:, None]
    m = (w[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    tan = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
    tn = np.linalg.norm(tan)
    return (m * np.cos(tn) + tan * np.sin(tn) / tn) * (w @ n)


def test_multislerp(trio):
    base, donors = trio
    got = merge_tensors("multislerp", donors, base, [0.2, 0.3, 0.5])
    want = base.double().numpy().reshape(-1) + _multislerp64([d - base for d in donors], [0.2, 0.3, 0.5])
    assert np.allclose(got.double().numpy().reshape(-1), want, atol=1e-5)
    # two equal-norm points, equal weights: the geodesic midpoint, i.e. slerp at 1/2
    a, b = donors[0], donors[1] * donors[0].norm() / donors[1].norm()
    assert torch.allclose(merge_tensors("multislerp", [a, b], None, [1, 1]).double().reshape(-1),
                          _slerp64(0.5, a, b), atol=1e-5)


def test_karcher_mean_is_stationary(trio):
    base, donors = trio
    got = merge_tensors("karcher", donors, None, max_iter=50, tol=1e-9).double().reshape(-1)
    units = [d.double().reshape(-1) / d.double().norm() for d in donors]
    m = got / got.norm()
    # first-order optimality of the Fréchet mean: the log maps at m sum to zero
    logs = [(u - (u @ m) * m) * (math.acos(min(1.0, float(u @ m))) / max(1e-12, (u - (u @ m) * m).norm()))
            for u in units]
    assert float(sum(logs).norm()) < 1e-5
    assert math.isclose(float(got.norm()), float(sum(d.double().norm() for d in donors) / 3), rel_tol=1e-5)
    # a base is one more point (mergekit), not an origin
    with_base = merge_tensors("karcher", donors, base)
    assert torch.equal(with_base, merge_tensors("karcher", donors + [base], None))


def test_nearswap(trio):
    base, (a, *_) = trio
    t = 0.05
    got = merge_tensors("nearswap", [a], base, t=t)
    d = (a - base).abs()
    want = torch.where(d <= t, a, base + (t / d) * (a - base))  # near: take the model; far: step t toward it
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ConfigError, match="needs the parameter t"):
        merge_tensors("nearswap", [a], base)


def test_arcee_fusion(trio):
    base, (a, *_) = trio
    got = merge_tensors("arcee_fusion", [a], base)
    P, Q = torch.softmax(a.double(), -1).numpy() + 1e-8, torch.softmax(base.double(), -1).numpy() + 1e-8
    kl = (P * np.log(P / Q)).sum(-1, keepdims=True)
    s = np.abs((a - base).double().numpy()) * kl
    q1, med, q3 = np.quantile(s, [0.25, 0.5, 0.75], method="lower")
    keep = s >= med + 1.5 * (q3 - q1)
    assert 0 < keep.sum() < keep.size
    want = np.where(keep, a.numpy(), base.numpy())
    assert np.allclose(got.numpy(), want, atol=1e-6)


def _sce64(deltas, topk):
    d = np.stack([x.double().numpy().reshape(-1) for x in deltas])
    if topk < 1:
        var = d.var(0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(d.shape[1], bool)
        keep[np.argsort(-var)[:k]] = True
        d = d * keep
    w = (d**2).mean(1)
    w = w / w.sum()
    out = np.zeros(d.shape[1])
    for j in range(d.shape[1]):
        elected = 1.0 if d[:, j].sum() >= 0 else -1.0
        agree = np.sign(d[:, j]) == elected
        den = max((w * agree).sum(), 1e-6)
        out[j] = (w * agree * d[:, j]).sum() / den
    return out


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce(trio, topk):
    base, donors = trio
    got = merge_tensors("sce", donors, base, select_topk=topk)
    want = base.double().numpy().reshape(-1) + _sce64([d - base for d in donors], topk)
    assert np.allclose(got.double().numpy().reshape(-1), want, atol=1e-6)


def _ram64(deltas, eps, r=None, alpha=None):
    d = np.stack([x.double().numpy().reshape(-1) for x in deltas])
    nz = np.abs(d) > eps
    cnt = nz.sum(0)
    lam = np.ones(len(d))
    if r is not None:
        rho = (nz & (cnt > 1)).sum(1) / np.maximum((nz & (cnt == 1)).sum(1), eps)
        lam = 1 + r * np.clip(rho, 0, alpha)
    out = np.zeros(d.shape[1])
    for j in range(d.shape[1]):
        who = np.nonzero(nz[:, j])[0]
        if len(who) == 1:
            out[j] = lam[who[0]] * d[who[0], j]  # only one model changed it: keep its change
        elif len(who) > 1:
            out[j] = d[who, j].mean()  # several did: average over those that did
    return out


@pytest.mark.parametrize("method,kw", [("ram", {"epsilon": 0.02}), ("ramplus_tl", {"epsilon": 0.02}),
                                       ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 2.0})])
def test_ram(trio, method, kw):
    base, donors = trio
    got = merge_tensors(method, donors, base, **kw)
    extra = {"r": kw.get("r", 0.1), "alpha": kw.get("alpha", 0.2)} if method == "ramplus_tl" else {}
    want = base.double().numpy().reshape(-1) + _ram64([d - base for d in donors], kw["epsilon"], **extra)
    assert np.allclose(got.double().numpy().reshape(-1), want, atol=1e-6)


def test_della_density_one_is_ties(trio):
    base, donors = trio
    w = [0.5, 0.3, 0.2]
    assert torch.allclose(merge_tensors("della", donors, base, w), merge_tensors("ties", donors, base, w),
                          atol=1e-6)
    assert torch.allclose(merge_tensors("della_linear", donors, base, w),
                          merge_tensors("task_arithmetic", donors, base, w), atol=1e-6)


def test_della_keep_probability_follows_rank():
    # one model, weight 1, no rescale: each entry survives with p = density − ε + 2ε·(rank−1)/(n−1) in its row
    from warmstart.merge.methods_more import della_magprune

    delta = torch.arange(1.0, 11.0).repeat(4000, 1)  # every row ranks 1..10
    out = della_magprune(delta, 0.5, 0.2, torch.Generator().manual_seed(0), rescale=False)
    rate = (out != 0).double().mean(0)
    want = 0.3 + 0.4 * torch.arange(10, dtype=torch.float64) / 9
    assert torch.allclose(rate, want, atol=0.03)
    resc = della_magprune(delta[:3], 0.5, 0.2, torch.Generator().manual_seed(0), rescale=True)
    assert math.isclose(float(resc.abs().sum()), float(delta[:3].sum()), rel_tol=1e-6)  # L1 kept (mergekit)


def test_della_seeded_and_checked(trio):
    base, donors = trio
    kw = {"density": 0.5, "epsilon": 0.1}
    a = merge_tensors("della", donors, base, [1, 1, 1], seed=3, **kw)
    assert torch.equal(a, merge_tensors("della", donors, base, [1, 1, 1], seed=3, **kw))
    assert not torch.equal(a, merge_tensors("della", donors, base, [1, 1, 1], seed=4, **kw))
    with pytest.raises(ConfigError, match="epsilon"):
        merge_tensors("della", donors, base, [1, 1, 1], density=0.5, epsilon=0.6)


@pytest.mark.parametrize("method,params,n", [("nuslerp", {}, 2), ("sce", {"select_topk": 0.5}, 2),
                                             ("della", {"density": 0.5}, 2), ("karcher", {}, 2)])
def test_streaming_engine_runs_new_methods(models, tmp_path, method, params, n):
    """The on-disk engine gives the in-memory result for every tensor (same seeds per tensor)."""
    from safetensors.torch import load_file

    from warmstart.merge.methods import tensor_seed

    refs = [models / "ft_a", models / "ft_b"][:n]
    plan = MergePlan(models=[{"ref": str(r), "weight": w} for r, w in zip(refs, [0.4, 0.6])], method=method,
                     base=str(models / "base"), params=params)
    merge(plan, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    sds = [load_file(r / "model.safetensors") for r in refs]
    base = load_file(models / "base" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    seed = {"seed": tensor_seed(0, name)} if "seed" in REGISTRY[method].defaults else {}
    want = merge_tensors(method, [sd[name] for sd in sds], base[name], [0.4, 0.6], **params, **seed)
    assert torch.equal(out[name], want)


@pytest.mark.parametrize("name", NEW)
def test_result_dtype_table(trio, name):
    """RESULT_DTYPE says which kernels return another dtype than their bf16 inputs (mergekit writes it as is)."""
    from warmstart.merge.methods import validate
    from warmstart.merge.methods_more import RESULT_DTYPE

    base, donors = trio
    n = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}.get(name, 3)
    m = REGISTRY[name]
    kw = validate(m, n, True, {"t": 0.05} if name == "nearswap" else {})
    out = m.fn([d.bfloat16() for d in donors[:n]], base.bfloat16(), [0.5] * n, **kw)
    assert out.dtype == RESULT_DTYPE.get(name, lambda d: d)(torch.bfloat16)
