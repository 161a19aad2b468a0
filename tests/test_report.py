"""Parity and the report, computed from hand-made curves (no model involved)."""

from __future__ import annotations

import json

import pytest

from warmstart.report import Curve, build_report, compare_markdown, compare_rows, compute_parity, crossing, write_report


def curve(values, *, steps=None, dt=2.0, metric="eval_accuracy", losses=None, max_steps=None):
    steps = steps or [10 * i for i in range(len(values))]
    pts = []
    for i, (s, v) in enumerate(zip(steps, values)):
        p = {"step": s, "time_s": s * dt, "wall_s": s * dt + i, "train_loss": None if s == 0 else 1.0, metric: v}
        p["eval_loss"] = losses[i] if losses else 2.0 - v
        pts.append(p)
    return Curve(points=pts, meta={"max_steps": max_steps or steps[-1], "train_time_s": steps[-1] * dt})


BASELINE = curve([0.25, 0.30, 0.40, 0.50, 0.60])  # final 0.60 at step 40, 80 s of training


def test_parity_interpolates_between_evaluations():
    warm = curve([0.40, 0.50, 0.70, 0.75, 0.80])
    par = compute_parity(warm, BASELINE, overhead_s={"select": 5.0, "merge": 3.0})
    # 0.60 lies halfway between 0.50 (step 10) and 0.70 (step 20): step 15, i.e. 15/40 of the baseline
    assert par.status == "reached"
    assert par.step == pytest.approx(15.0)
    assert par.percent_steps == pytest.approx(100 * 15 / 40)
    assert par.train_time_s == pytest.approx(30.0)  # time interpolated the same way (2 s per step)
    assert par.wall_s == pytest.approx(30.0 + 5.0 + 3.0)
    assert par.percent_wall == pytest.approx(100 * 38.0 / 80.0)
    assert par.target == pytest.approx(0.60)


def test_parity_uneven_interpolation():
    warm = curve([0.10, 0.52, 0.62], steps=[0, 8, 24])
    par = compute_parity(warm, BASELINE)
    expected = 8 + (0.60 - 0.52) / (0.62 - 0.52) * (24 - 8)  # = 20.8
    assert par.step == pytest.approx(expected)
    assert par.percent_steps == pytest.approx(100 * expected / 40)
    assert par.overhead_s == {} and par.wall_s == pytest.approx(expected * 2.0)


def test_parity_never():
    warm = curve([0.40, 0.45, 0.50, 0.55, 0.59])
    par = compute_parity(warm, BASELINE, overhead_s={"select": 1.0})
    assert par.status == "never"
    assert par.step is None and par.percent_steps is None and par.wall_s is None


def test_parity_already_at_step_zero():
    warm = curve([0.65, 0.60, 0.70, 0.72, 0.74])
    par = compute_parity(warm, BASELINE, overhead_s={"select": 4.0, "merge": 4.0})
    assert par.status == "at_start"
    assert par.step == 0 and par.percent_steps == 0
    assert par.wall_s == pytest.approx(8.0)  # only the overhead
    assert par.percent_wall == pytest.approx(100 * 8.0 / 80.0)


def test_first_evaluation_after_step_zero_is_not_at_start():
    warm = curve([0.70, 0.80], steps=[10, 20])
    par = compute_parity(warm, BASELINE)
    assert par.status == "reached" and par.step == 10  # no extrapolation before the first evaluation


def test_parity_exactly_equal_counts_as_reached():
    warm = curve([0.30, 0.60, 0.61])
    par = compute_parity(warm, BASELINE)
    assert par.status == "reached" and par.step == pytest.approx(10.0)


def test_loss_is_lower_is_better():
    assert crossing([(0, 0, 3.0), (10, 5, 2.0), (20, 10, 1.0)], 1.5, higher_is_better=False) == pytest.approx((15, 7.5))
    assert crossing([(0, 0, 3.0), (10, 5, 2.0)], 1.5, higher_is_better=False) is None


def test_report_files_and_numbers(tmp_path):
    warm = curve([0.40, 0.50, 0.70, 0.75, 0.80])
    rep = build_report(warm, BASELINE, overhead_s={"select": 5.0, "merge": 3.0}, target="t.jsonl",
                       donors=[{"id": 3, "ref": "/x/lora_a", "kind": "lora", "score": 1.2, "weight": 0.5}],
                       merge={"method": "linear"}, stages={"select": 5.0, "merge": 3.0})
    assert rep["delta"] == pytest.approx(0.80 - 0.60)
    assert rep["warm"]["zero_shot"] == pytest.approx(0.40)
    assert rep["baseline"]["zero_shot"] == pytest.approx(0.25)
    files = write_report(rep, warm, BASELINE, tmp_path)
    assert {f.name for f in files} == {"report.json", "report.md", "curves_step.png", "curves_wall.png"}
    for f in files:
        assert f.stat().st_size > 0
    assert (tmp_path / "curves_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["parity"]["step"] == pytest.approx(15.0)
    md = (tmp_path / "report.md").read_text()
    assert "15.0 of 40 (38%)" in md and "/x/lora_a" in md and "+0.2000" in md


def test_curve_roundtrip(tmp_path):
    c = curve([0.1, 0.2])
    c.write(tmp_path)
    assert Curve.from_file(tmp_path).points == c.points
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["step", "time_s"] and len(lines) == 3


def test_compare_mean_row():
    r1 = build_report(curve([0.40, 0.50, 0.70, 0.75, 0.80]), BASELINE, name="a")
    r2 = build_report(curve([0.40, 0.45, 0.50, 0.55, 0.59]), BASELINE, name="b")
    rows = compare_rows([r1, r2])
    assert [r["target"] for r in rows] == ["a", "b", "mean"]
    assert rows[-1]["delta"] == pytest.approx(((0.80 - 0.60) + (0.59 - 0.60)) / 2)
    assert rows[-1]["parity_steps_pct"] == pytest.approx(100 * 15 / 40)  # only the run that reached it
    assert rows[-1]["parity_status"] == "1/2 reached"
    md = compare_markdown(rows)
    assert "never" in md and "| mean |" in md


def test_eval_cost_in_the_report():
    """Σ evaluation_s over the points and its share of training + evaluation; with eval_async, the wait."""
    sync = curve([0.25, 0.30, 0.40])  # 40 s of training
    for p, s in zip(sync.points, (3.0, 4.0, 5.0)):
        p["evaluation_s"] = s
    asyn = curve([0.30, 0.35, 0.45])
    for p in asyn.points:
        p["evaluation_s"] = 4.0
    asyn.meta.update(eval_async=True, eval_wait_s=2.0)
    rep = build_report(asyn, sync)
    assert rep["baseline"]["evaluation"] == {"points": 3, "seconds": 12.0, "async": False,
                                             "share": pytest.approx(12.0 / (40.0 + 12.0))}
    assert rep["warm"]["evaluation"]["share"] == pytest.approx(2.0 / (40.0 + 2.0))
    from warmstart.report import render_markdown

    md = render_markdown(rep)
    assert ("| evaluation | 12.0 s at 3 points, 23% of the run | "
            "12.0 s on a second thread, 2.0 s waited, 5% of the run |") in md
