"""The report's plots, inspected as matplotlib figures: titles, labels, axes, visibility, overhead band."""

from __future__ import annotations

import pytest

from warmstart.report import Curve, build_report, make_figures, plot_title


def _curve(values, steps=(0, 1, 2, 3), dt=2.0):
    pts = [{"step": s, "time_s": s * dt, "wall_s": s * dt, "train_loss": None, "eval_exact_match": v,
            "eval_loss": 2.0 - v} for s, v in zip(steps, values)]
    return Curve(points=pts, meta={"max_steps": steps[-1], "train_time_s": steps[-1] * dt, "eval_examples": 30})


@pytest.fixture
def figs():
    import matplotlib.pyplot as plt

    same = [0.0, 0.0, 0.1, 0.1]  # the curves coincide: the baseline must stay visible
    out = dict(make_figures(_curve(same), _curve(same), "eval_exact_match", overhead_s=5.0,
                            title="warm start vs baseline: capitals.jsonl (run runs/cap)"))
    for f in out.values():
        f.canvas.draw()
    yield out
    for f in out.values():
        plt.close(f)


def _line(ax, label):
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def test_titles_name_target_and_run(figs):
    assert set(figs) == {"curves_step.png", "curves_wall.png"}
    for f in figs.values():
        assert f._suptitle.get_text().startswith("warm start vs baseline: capitals.jsonl (run runs/cap)")
    rep = {"target": "/data/capitals.jsonl", "run_dir": "/runs/cap"}
    assert plot_title(rep) == "warm start vs baseline: capitals.jsonl (run /runs/cap)"


def test_step_ticks_are_integers_and_labels_read_well(figs):
    metric_ax, loss_ax = figs["curves_step.png"].axes
    for ax in (metric_ax, loss_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert loss_ax.get_ylabel() == "eval loss" and metric_ax.get_ylabel() == "exact match"


def test_accuracy_axis_never_below_zero(figs):
    for f in figs.values():
        lo, hi = f.axes[0].get_ylim()
        assert lo == 0.0 and 0.1 < hi <= 1.0


def test_coinciding_baseline_is_drawn_distinct_and_on_top(figs):
    ax = figs["curves_step.png"].axes[0]
    warm, base = _line(ax, "warm start"), _line(ax, "baseline")
    assert list(warm.get_ydata()) == list(base.get_ydata())
    assert base.get_linestyle() == "--" and warm.get_linestyle() == "-"
    assert base.get_marker() != warm.get_marker() and base.get_markerfacecolor() == "none"
    assert base.get_zorder() > warm.get_zorder()


def test_wall_clock_plot_shows_the_selection_overhead(figs):
    ax = figs["curves_wall.png"].axes[0]
    band = next(p for p in ax.patches if p.get_label() == "selection + merge")
    if hasattr(band, "get_width"):  # a Rectangle (matplotlib >= 3.9), else a Polygon
        xs = [band.get_x(), band.get_x() + band.get_width()]
    else:
        xs = [v[0] for v in band.get_xy()]
    assert min(xs) == pytest.approx(0.0) and max(xs) == pytest.approx(5.0)
    assert _line(ax, "warm start").get_xdata()[0] == pytest.approx(5.0)  # starts after select + merge
    assert _line(ax, "baseline").get_xdata()[0] == pytest.approx(0.0)
    assert "selection + merge" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_no_band_without_overhead():
    import matplotlib.pyplot as plt

    f = dict(make_figures(_curve([0.1, 0.2, 0.3, 0.4]), None, "eval_exact_match"))["curves_wall.png"]
    assert not [p for p in f.axes[0].patches if p.get_label() == "selection + merge"]
    plt.close("all")


def test_write_report_uses_the_title(tmp_path):
    from warmstart.report import write_report

    c = _curve([0.1, 0.2, 0.3, 0.4])
    rep = build_report(c, c, target="/d/plurals.jsonl", run_dir="/r/pl")
    write_report(rep, c, c, tmp_path)
    assert (tmp_path / "curves_wall.png").read_bytes()[:4] == b"\x89PNG"
