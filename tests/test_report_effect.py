"""The report claims no speed-up when nothing was learned or the curves are within the eval's noise;
Δ carries its interval and the number of eval rows."""

from __future__ import annotations

import pytest

from warmstart.report import (
    Curve,
    build_report,
    compare_markdown,
    compare_rows,
    newcombe_interval,
    render_markdown,
    wilson_interval,
)


def curve(values, *, n_rows=50, metric="eval_exact_match", dt=2.0):
    pts = [{"step": 10 * i, "time_s": 10 * i * dt, "wall_s": 10 * i * dt, "train_loss": None, metric: v,
            "eval_loss": 2.0 - v} for i, v in enumerate(values)]
    steps = 10 * (len(values) - 1)
    return Curve(points=pts, meta={"max_steps": steps, "train_time_s": steps * dt, "eval_examples": n_rows})


@pytest.mark.parametrize("counts, published", [
    # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0000)),
])
def test_newcombe_interval_matches_published_values(counts, published):
    k1, n1, k2, n2 = counts
    lo, hi = newcombe_interval(k1 / n1, n1, k2 / n2, n2)
    assert (round(lo, 4), round(hi, 4)) == published


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (48, 80), (200, 200)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_nothing_learned_is_not_a_speedup():
    flat = curve([0.0, 0.0, 0.0])
    rep = build_report(curve([0.0, 0.0, 0.0]), flat)
    par = rep["parity"]
    assert par["status"] == "no_effect" and par["reason"] == "baseline_flat" and par["percent_steps"] is None
    md = render_markdown(rep)
    assert "already at step 0" not in md and "Steps to parity: 0" not in md
    assert "never improved on its step-0 exact_match" in md and "50 eval rows" in md


def test_curves_within_noise_claim_no_speedup_and_a_real_gap_does():
    base_vals, warm_vals = [0.30, 0.35, 0.40], [0.34, 0.38, 0.42]
    small = build_report(curve(warm_vals, n_rows=20), curve(base_vals, n_rows=20))
    assert small["parity"]["status"] == "no_effect" and small["parity"]["reason"] == "within_noise"
    assert "no measurable difference" in render_markdown(small)
    big = build_report(curve(warm_vals, n_rows=20000), curve(base_vals, n_rows=20000))
    # 0.38 at 10, 0.42 at 20
    assert big["parity"]["status"] == "reached" and big["parity"]["percent_steps"] == pytest.approx(100 * 15 / 20)


def test_headline_carries_rows_and_interval():
    rep = build_report(curve([0.2, 0.5, 0.7], n_rows=40), curve([0.2, 0.3, 0.4], n_rows=40))
    lo, hi = rep["effect"]["delta_ci95"]
    assert (lo, hi) == pytest.approx(newcombe_interval(0.7, 40, 0.4, 40))
    assert lo > 0  # 28/40 vs 16/40 is a real difference
    md = render_markdown(rep)
    assert f"**Δ final exact_match: +0.3000** (95% CI {lo:+.4f} to {hi:+.4f}, 40 eval rows" in md
    assert "(held-out eval split, 40 rows)" in md


def test_loss_headline_has_rows_but_no_binomial_interval():
    rep = build_report(curve([0.2, 0.5, 0.7]), curve([0.2, 0.3, 0.4]), metric="eval_loss")
    assert rep["effect"]["delta_ci95"] is None
    assert "50 eval rows; no interval: loss is not one 0/1 outcome per row" in render_markdown(rep)


def test_compare_shows_no_effect_and_leaves_it_out_of_the_mean():
    real = build_report(curve([0.2, 0.5, 0.7], n_rows=400), curve([0.2, 0.3, 0.4], n_rows=400), name="real")
    flat = build_report(curve([0.0, 0.0, 0.0]), curve([0.0, 0.0, 0.0]), name="flat")
    rows = compare_rows([real, flat])
    assert rows[-1]["parity_status"] == "1/2 reached"
    assert rows[-1]["parity_steps_pct"] == pytest.approx(real["parity"]["percent_steps"])
    assert ("| flat | exact_match | 0.0000 | 0.0000 | +0.0000 | 0.0000 | no effect | no effect |"
            in compare_markdown(rows))
