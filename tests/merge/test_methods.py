"""Every merge method against an independent formula written here (dense, sort-based, stacked)."""

from __future__ import annotations

import math

import pytest
import torch

from warmstart.errors import ConfigError, IncompatibleError
from warmstart.merge import REGISTRY, compute_weights, merge_state_dicts, merge_tensors

ATOL = 1e-6


@pytest.fixture
def trio():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=g)
    donors = [base + 0.1 * torch.randn(40, 30, generator=g) for _ in range(3)]
    return base, donors


def _topk_mask_by_sort(delta, density):
    # the textbook definition: sort all magnitudes, keep the k largest
    k = int(density * delta.numel())
    idx = torch.argsort(delta.abs().view(-1), descending=True)[:k]
    mask = torch.zeros(delta.numel())
    mask[idx] = 1
    return mask.view_as(delta)


def test_linear_is_weighted_mean(trio):
    base, donors = trio
    w = [0.2, 0.3, 0.5]
    got = merge_tensors("linear", donors, None, w)
    want = (torch.stack(donors) * torch.tensor(w).view(3, 1, 1)).sum(0) / sum(w)
    assert torch.allclose(got, want, atol=ATOL)
    # normalize=False keeps the raw weighted sum; base is ignored unless passed as a donor
    raw = merge_tensors("linear", donors, base, [1.0, 1.0, 1.0], normalize=False)
    assert torch.allclose(raw, sum(donors), atol=1e-5)


def test_linear_does_not_modify_inputs(trio):
    base, donors = trio
    before = [d.clone() for d in donors]
    merge_tensors("linear", donors, None, [0.5, 0.25, 0.25])
    merge_tensors("ties", donors, base, [0.5, 0.25, 0.25], density=0.3)
    assert all(torch.equal(a, b) for a, b in zip(before, donors))


def test_task_arithmetic(trio):
    base, donors = trio
    w = [1.0, 0.5, -0.25]
    got = merge_tensors("task_arithmetic", donors, base, w, **{"lambda": 0.7})
    want = base + 0.7 * sum(wi * (d - base) for wi, d in zip(w, donors))
    assert torch.allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_paper_formula(trio, density):
    base, donors = trio
    w = [0.5, 0.3, 0.2]
    got = merge_tensors("ties", donors, base, w, density=density)
    deltas = torch.stack([(d - base) * _topk_mask_by_sort(d - base, density) for d in donors])
    wd = deltas * torch.tensor(w).view(3, 1, 1)
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = (wd.sign() == sign).float()
    num = (wd * agree).sum(0)
    den = (torch.tensor(w).view(3, 1, 1) * agree).sum(0)
    den[den == 0] = 1
    assert torch.allclose(got, base + num / den, atol=ATOL)


def test_topk_keeps_exactly_k_with_ties():
    from warmstart.merge.methods import _magnitude_keep

    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, 2.0, -1.0, 0.0, 1.0])  # many equal magnitudes
    keep = _magnitude_keep(delta, 0.5)
    assert int(keep.sum()) == 4 and bool(keep[4])
    assert set(delta[keep].abs().tolist()) <= {1.0, 2.0}


def test_breadcrumbs_drops_top_and_bottom(trio):
    base, donors = trio
    w = [0.4, 0.4, 0.2]
    density, gamma = 0.6, 0.1
    got = merge_tensors("breadcrumbs", donors, base, w, density=density, gamma=gamma)
    n = base.numel()
    n_top, n_bot = int(n * gamma), n - int(n * density) - int(n * gamma)
    out = base.clone()
    for wi, d in zip(w, donors):
        delta = (d - base).view(-1)
        order = torch.argsort(delta.abs())
        mask = torch.zeros(n)
        mask[order[n_bot:n - n_top]] = 1
        out += wi * (delta * mask).view_as(base)
    assert torch.allclose(got, out, atol=ATOL)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_mask_statistics(method):
    base = torch.zeros(200, 500)
    donor = torch.ones(200, 500)
    got = merge_tensors(method, [donor], base, [1.0], density=0.3, seed=7)
    kept = got != 0
    frac = kept.float().mean().item()
    sd = math.sqrt(0.3 * 0.7 / base.numel())
    assert abs(frac - 0.3) < 5 * sd  # Bernoulli(0.3) keep rate
    assert torch.allclose(got[kept], torch.full_like(got[kept], 1 / 0.3))  # survivors rescaled by 1/p
    again = merge_tensors(method, [donor], base, [1.0], density=0.3, seed=7)
    assert torch.equal(got, again)  # the seed fixes the mask
    other = merge_tensors(method, [donor], base, [1.0], density=0.3, seed=8)
    assert not torch.equal(got, other)


def test_dare_is_unbiased():
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(400, 400)
    donor = torch.randn(400, 400, generator=g)
    got = merge_tensors("dare_linear", [donor], base, [1.0], density=0.5, seed=3)
    # E[δ̃] = δ: the sum over many entries agrees to a few standard deviations
    sd = math.sqrt((donor ** 2).sum().item())  # var of Σ (2·b−1)·δ with b ~ Bernoulli(0.5)
    assert abs((got - donor).sum().item()) < 5 * sd


def test_slerp_formula(trio):
    base, donors = trio
    v0, v1 = base, donors[0]
    t = 0.3
    a, b = v0.double().view(-1), v1.double().view(-1)
    omega = torch.acos((a / a.norm()) @ (b / b.norm()))
    want = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    got = merge_tensors("slerp", [v1], v0, [1.0], t=t)
    assert torch.allclose(got.double().view(-1), want, atol=ATOL)
    assert torch.allclose(merge_tensors("slerp", [v1], v0, [1.0], t=0.0), v0, atol=ATOL)
    # nearly parallel vectors fall back to lerp
    near = merge_tensors("slerp", [v0 * 1.0001], v0, [1.0], t=0.5)
    assert torch.allclose(near, v0 * 1.00005, atol=ATOL)


def test_model_stock_formula(trio):
    base, donors = trio
    d = [(x - base).view(-1) for x in donors]
    cos = [torch.dot(d[i], d[j]) / (d[i].norm() * d[j].norm()) for i in range(3) for j in range(i + 1, 3)]
    c = sum(cos) / len(cos)
    t = 3 * c / (1 + 2 * c)
    want = t * sum(donors) / 3 + (1 - t) * base
    got = merge_tensors("model_stock", donors, base, [1 / 3] * 3)
    assert torch.allclose(got, want, atol=ATOL)


def test_registry_has_paper_urls():
    for m in REGISTRY.values():
        assert m.url.startswith("https://"), m.name


@pytest.mark.parametrize("bad,msg", [
    (dict(method="ties", base=None), "needs a base"),
    (dict(method="ties", density=-0.1), "density"),
    (dict(method="ties", densty=0.5), "no parameter"),
    (dict(method="nope"), "unknown merge method"),
    (dict(method="slerp", n=3), "slerp"),
])
def test_bad_parameters_raise_config_error(trio, bad, msg):
    base, donors = trio
    bad = dict(bad)
    method = bad.pop("method")
    n = bad.pop("n", 2)
    b = bad.pop("base", base)
    with pytest.raises(ConfigError, match=msg):
        merge_tensors(method, donors[:n], b, [0.5] * n, **bad)


def test_state_dicts_and_missing_policy(trio):
    base, donors = trio
    sds = [{"w": d, "step": torch.tensor(3)} for d in donors[:2]]
    bsd = {"w": base, "step": torch.tensor(3)}
    out = merge_state_dicts("task_arithmetic", sds, bsd, [1.0, 1.0])
    assert torch.allclose(out["w"], donors[0] + donors[1] - base, atol=ATOL)
    assert out["step"].item() == 3
    sds[1] = {"step": torch.tensor(3)}
    with pytest.raises(IncompatibleError, match="missing"):
        merge_state_dicts("linear", sds, bsd, [0.5, 0.5])
    out = merge_state_dicts("linear", sds, bsd, [0.5, 0.5], missing="reference")
    assert torch.allclose(out["w"], donors[0], atol=ATOL)  # merged over the model that has it


# ----------------------------------------------------------------------------
# Weights


def test_weight_schemes():
    assert compute_weights("uniform", n=4) == [0.25] * 4
    assert compute_weights("given", n=2, given=[0.3, 0.7]) == [0.3, 0.7]
    w = compute_weights("score", n=3, scores=[1.0, 2.0, 1.0], higher_is_better=True)
    assert w == pytest.approx([0.25, 0.5, 0.25])
    w = compute_weights("score", n=2, losses=[1.0, 3.0])  # inverse loss
    assert w == pytest.approx([0.75, 0.25])
    w = compute_weights("softmax", n=2, scores=[0.0, math.log(3)], higher_is_better=True)
    assert w == pytest.approx([0.25, 0.75])


def test_mwa_formula():
    losses = [2.0, 1.0, 0.5]
    assert compute_weights("mwa:loss", n=3, losses=losses, penalty=0) == pytest.approx([1 / 3] * 3)
    p = 2.0
    raw = [(1 / l) ** p for l in losses]
    assert compute_weights("mwa:loss", n=3, losses=losses, penalty=p) == pytest.approx([r / sum(raw) for r in raw])
    steps = [10, 20, 30]
    raw = [s ** 1.5 for s in steps]
    assert compute_weights("mwa:steps", n=3, steps=steps, penalty=1.5) == pytest.approx([r / sum(raw) for r in raw])
    # larger p concentrates on the best; huge p does not overflow
    w_big = compute_weights("mwa:loss", n=3, losses=losses, penalty=500)
    assert w_big[2] == pytest.approx(1.0) and sum(w_big) == pytest.approx(1.0)
    assert compute_weights("mwa:loss", n=3, losses=losses, penalty=4)[2] > compute_weights(
        "mwa:loss", n=3, losses=losses, penalty=1)[2]


@pytest.mark.parametrize("kw,msg", [
    (dict(scheme="given", given=[0.5, -0.5]), "sum to zero"),
    (dict(scheme="given", given=[1.0]), "1 given weights for 2"),
    (dict(scheme="mwa:loss", losses=[1.0, None]), "missing"),
    (dict(scheme="mwa:loss", losses=[1.0, 2.0], penalty=-1), "penalty"),
    (dict(scheme="mwa:steps", steps=[0, 10]), "positive"),
    (dict(scheme="bogus"), "unknown weighting"),
])
def test_weight_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        compute_weights(n=2, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_smallest_equals_sort(dtype):
    from warmstart.merge.methods import kth_smallest

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300_000, generator=g).abs().to(dtype).float()  # bf16: many exact ties
    s = x.sort().values
    for k in [1, 2, 1000, 150_000, 299_999, 300_000]:
        assert kth_smallest(x, k) == s[k - 1], k
