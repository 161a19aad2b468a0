"""`warmstart compare` over finished and unfinished runs; a refused resume names what changed."""

from __future__ import annotations

import json

import pytest

from warmstart.errors import ConfigError
from warmstart.pipeline import MARKER, STAGES
from warmstart.report import Curve, build_report


def _curve(values, n_rows=400):
    pts = [{"step": 10 * i, "time_s": 20.0 * i, "wall_s": 20.0 * i, "train_loss": None, "eval_exact_match": v,
            "eval_loss": 2 - v} for i, v in enumerate(values)]
    return Curve(points=pts, meta={"max_steps": 10 * (len(values) - 1), "eval_examples": n_rows})


def _run_dir(root, name, stages_done, report=None):
    d = root / name
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"target": f"/data/{name}.jsonl", "config": {}}))
    for s in stages_done:
        (d / s).mkdir()
        (d / s / MARKER).write_text(json.dumps({"stage": s, "wall_s": 1.0, "outputs": {}}))
    if report is not None:
        (d / "report" / "report.json").write_text(json.dumps(report))
    return d


def test_compare_prints_finished_runs_and_one_line_per_skipped(cli, tmp_path):
    rep = build_report(_curve([0.2, 0.5, 0.7]), _curve([0.2, 0.3, 0.4]), name="capitals")
    done = _run_dir(tmp_path, "capitals", STAGES, report=rep)
    half = _run_dir(tmp_path, "plurals", ["split", "select"])
    no_report = _run_dir(tmp_path, "colors", [s for s in STAGES if s != "report"])
    stray = tmp_path / "notes"
    stray.mkdir()
    r = cli("compare", done, half, no_report, stray)
    assert r.code == 0
    assert "| capitals |" in r.out and "| mean |" in r.out and "plurals" not in r.out
    skipped = [ln for ln in r.err.splitlines() if ln.startswith("skipped")]
    assert skipped == [
        f"skipped {half}: unfinished run (stage merge not done); re-run the same `warmstart run` command "
        f"(--out {half}) to resume it",
        f"skipped {no_report}: no report yet; write it with `warmstart report {no_report}`",
        f"skipped {stray}: not a warmstart run directory (no run.json)"]


def test_compare_with_no_finished_run_is_an_error(cli, tmp_path):
    half = _run_dir(tmp_path, "plurals", ["split"])
    r = cli("compare", half)
    assert r.code == 1 and "error: none of the 1 run directories has a report" in r.err
    assert "Traceback" not in r.err


def test_refused_resume_says_which_setting_differed(models, tmp_path):
    from warmstart.pipeline import RunConfig, RunDir, _claim_run_dir, _Ctx
    from warmstart.train import TrainConfig

    target = tmp_path / "t.jsonl"
    target.write_text('{"prompt": "a", "completion": "b"}\n')

    def ctx(cfg):
        return _Ctx(RunDir(tmp_path / "run"), cfg, target, None, models / "base", tmp_path / "lib.db", print)

    _claim_run_dir(ctx(RunConfig(train=TrainConfig(steps=20))), "base", False)
    with pytest.raises(ConfigError) as e:
        _claim_run_dir(ctx(RunConfig(train=TrainConfig(steps=40), select={"k": 1})), "base", False)
    msg = e.value.message
    assert "different config" in msg
    assert "config.train.steps: 20 (this run) → 40 (now)" in msg and "config.select.k: null (this run) → 1 (now)" in msg
