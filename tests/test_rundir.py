"""The run-directory contract: markers round-trip, report reads a run through rundir only, the one
selection-file reader refuses broken files, and run directories written before rundir existed
(tests/fixtures/old_run) re-render and resume to the same report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from warmstart.errors import ConfigError, DataError
from warmstart.rundir import (
    MARKER,
    Curve,
    Marker,
    MergeOutputs,
    RunDir,
    SelectOutputs,
    SplitOutputs,
    TrainOutputs,
    read_selection,
    write_selection,
)

OLD = Path(__file__).parent / "fixtures" / "old_run"
OLD_ROOT = "/tmp/rundir_gen/out"  # where the fixture was written (its README)


# -- markers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, outputs, keys", [
    ("split", SplitOutputs(format="mc", train_rows=15, eval_rows=5, eval_rows_given=5, eval_limit=None,
                           eval_source="carved", train_fingerprint="a", eval_fingerprint="b"),
     ["format", "train_rows", "eval_rows", "eval_rows_given", "eval_limit", "eval_source", "train_fingerprint",
      "eval_fingerprint"]),
    ("merge", MergeOutputs(init="/base", recipe=None, note="no donors"), ["init", "recipe", "note"]),
    ("merge", MergeOutputs(init="model", recipe={"method": "linear"}, result={"weights": [1.0]}),
     ["init", "recipe", "result"]),
    ("warm", TrainOutputs(init="/m", kind="lora", train_time_s=1.5, final={"step": 4, "eval_loss": 2.0}),
     ["init", "kind", "train_time_s", "final"]),
])
def test_marker_round_trips_through_its_file(tmp_path, stage, outputs, keys):
    m = Marker.done(stage, 0.0, outputs)
    (tmp_path / stage).mkdir()
    m.write(tmp_path / stage)
    raw = json.loads((tmp_path / stage / MARKER).read_text())
    assert list(raw) == ["stage", "wall_s", "outputs", "finished"]
    assert list(raw["outputs"]) == keys  # the on-disk keys: None-valued optional ones are left out
    back = RunDir(tmp_path).read_marker(stage)
    assert back == m and back.to_dict() == raw


def test_old_marker_keeps_exactly_its_keys(tmp_path):
    """A marker of a run selected before `sample_rows` existed, plus a key this version does not know."""
    old = {"stage": "select", "wall_s": 2.5, "outputs": {"selection": "selection.yaml", "donors": [{"ref": "a"}],
                                                          "ranking": [{"id": 1}, {"id": 2}], "future": [1]},
           "finished": "2026-01-01T00:00:00Z"}
    (tmp_path / "select").mkdir()
    (tmp_path / "select" / MARKER).write_text(json.dumps(old))
    m = RunDir(tmp_path).read_marker("select")
    assert isinstance(m.outputs, SelectOutputs) and m.outputs.sample_rows is None and m.wall_s == 2.5
    assert m.to_dict() == old and list(m.to_dict()["outputs"]) == list(old["outputs"])


def test_torn_or_foreign_markers(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / MARKER).write_text('{"stage": "sp')  # torn: the stage is unfinished
    assert rd.read_marker("split") is None and not rd.done("split")
    (tmp_path / "split" / MARKER).write_text('["not", "a", "marker"]')
    with pytest.raises(DataError, match="not a stage marker") as e:
        rd.read_marker("split")
    assert e.value.path == str(tmp_path / "split" / MARKER)


# -- the selection file --------------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ("donors: [", "not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("base: b\n", "needs a 'donors' list"),
    ("donors: [{weight: 1}]\n", "without a 'ref'"),
    ("donors: [{ref: a, weight: heavy}]\n", "'weight' must be a finite number"),
    ("donors: [{ref: a}]\nmetric: vibes\n", "unknown metric 'vibes'"),
])
def test_selection_reader_refuses_a_broken_file_in_one_line(tmp_path, text, problem):
    p = tmp_path / "sel.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=problem) as e:
        read_selection(p)
    assert e.value.path == str(p) and "\n" not in e.value.message


def test_selection_file_higher_is_better_and_plan(tmp_path):
    """Recorded higher_is_better wins; without it the metric table decides (optimize's files)."""
    p = write_selection({"base": "b", "metric": "accuracy", "method": "task_arithmetic", "params": {"x": 1},
                         "donors": [{"ref": "m1", "weight": 0.25, "score": 0.5}, {"ref": "m2", "weight": 0.75}]},
                        tmp_path / "sel.json")
    sel = read_selection(p)
    assert sel.higher_is_better is True
    assert sel.plan_dict() == {"models": [{"ref": "m1", "weight": 0.25, "score": 0.5},
                                          {"ref": "m2", "weight": 0.75, "score": None}],
                               "method": "task_arithmetic", "base": "b", "higher_is_better": True,
                               "params": {"x": 1}}
    assert sel.plan_dict(method="linear")["method"] == "linear" and "params" not in sel.plan_dict(method="linear")
    p = write_selection({"metric": "accuracy", "higher_is_better": False, "donors": []}, tmp_path / "s.yaml")
    sel = read_selection(p)
    assert sel.higher_is_better is False and sel.donors == []
    with pytest.raises(ConfigError, match="non-empty 'donors'"):
        sel.plan_dict()


# -- old run directories -------------------------------------------------------------------------


def _old_run(tmp_path: Path) -> Path:
    """The fixture copied under ``tmp_path``, its paths moved there."""
    root = tmp_path / "old"
    shutil.copytree(OLD, root)
    for f in root.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".md", ".jsonl"):
            f.write_text(f.read_text().replace(OLD_ROOT, str(root)))
    return root


def _without_report_row(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if not line.startswith(("| report |", "| evaluation |")))


def _added_since(rep: dict, run) -> dict:
    """The report keys added after the old run was written (each run's evaluation cost), checked against
    the run's own curves and removed, so that the rest can be compared as it was."""
    from warmstart.report import Curve, eval_cost

    for side in ("warm", "baseline"):
        got = rep[side].pop("evaluation")
        assert got == eval_cost(Curve.from_file(run / side)) and got["points"] > 0
    return rep


def test_old_run_directory_rerenders_the_same_report(tmp_path):
    from warmstart.pipeline import render_report

    root = _old_run(tmp_path)
    run = root / "run"
    before = json.loads((run / "report" / "report.json").read_text())
    md_before = (run / "report" / "report.md").read_text()
    old_report_s = json.loads((run / "report" / MARKER).read_text())["wall_s"]
    render_report(run)
    after = json.loads((run / "report" / "report.json").read_text())
    # the only differences: the report stage's own time (its marker exists now) and where the run lies
    assert after["stages"].pop("report") == old_report_s
    assert _added_since(after, run) == before
    assert _without_report_row((run / "report" / "report.md").read_text()) == _without_report_row(md_before)
    rd = RunDir(run)  # the typed markers hold what the files hold
    assert rd.read_marker("split").outputs.to_dict() == rd.marker("split")["outputs"] == after["split"]
    assert rd.read_marker("merge").outputs.init_path(rd.stage("merge")) == run / "merge" / "model"


def test_old_run_directory_resumes_to_the_same_report(models, tmp_path):
    from warmstart.pipeline import RunConfig, run

    root = _old_run(tmp_path)
    out = root / "run"
    before = json.loads((out / "report" / "report.json").read_text())
    md_before = (out / "report" / "report.md").read_text()
    shutil.rmtree(out / "report")  # killed before its report
    shutil.copytree(models / "base", root / "zoo" / "base")  # run.json's base_path
    info = json.loads((out / "run.json").read_text())
    res = run(root / "capitals.jsonl", root / "lib.db", root / "zoo" / "base", out,
              RunConfig.from_dict(info["config"]))
    assert res.skipped == ["split", "select", "merge", "warm", "baseline"] and res.ran == ["report"]
    assert _added_since(json.loads((out / "report" / "report.json").read_text()), out) == before
    assert _without_report_row((out / "report" / "report.md").read_text()) == _without_report_row(md_before)


# -- a run written now, read back by report through rundir ---------------------------------------


def test_report_reads_a_fresh_run_through_rundir(models, tmp_path, monkeypatch):
    """The current pipeline's run directory: report_run's numbers are the ones in its markers and curves."""
    import random

    from warmstart.library import Library
    from warmstart.pipeline import RunConfig, run
    from warmstart.report import build_report
    from warmstart.train import TrainConfig

    rng, capitals = random.Random(0), [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid")]
    target = tmp_path / "capitals.jsonl"
    target.write_text("".join(json.dumps({"question": f"capital of {c}?", "choices": [x for _, x in capitals],
                                          "answer": a}) + "\n" for c, a in (rng.choice(capitals) for _ in range(16))))
    with Library(tmp_path / "lib.db") as lib:
        lib.add(models / "lora_a")
    cfg = RunConfig(train=TrainConfig(steps=2, eval_every=1, batch_size=4, lr=5e-3, max_length=64),
                    select={"n": 8, "k": 1}, eval_fraction=0.25)
    out = tmp_path / "run"
    monkeypatch.setenv("WARMSTART_FAIL_AT", "report")  # stop before the report: report_run renders it below
    with pytest.raises(RuntimeError, match="injected"):
        run(target, tmp_path / "lib.db", models / "base", out, cfg)
    from warmstart.report import report_run

    rd = RunDir(out)
    rep = report_run(out, out=tmp_path / "rendered")
    sel, mrg = rd.read_marker("select"), rd.read_marker("merge")
    assert read_selection(rd.selection_file()).donors == sel.outputs.donors == rep["donors"]
    assert rep["merge"] == mrg.outputs.recipe and rep["selection"]["candidates"] == len(sel.outputs.ranking) == 2
    assert rep["split"] == rd.marker("split")["outputs"] and rep["split"]["eval_rows"] == 4
    warm, base = Curve.from_file(out / "warm"), Curve.from_file(out / "baseline")
    assert [p["step"] for p in warm.points] == [0, 1, 2]
    expected = build_report(warm, base, overhead_s={"select": sel.wall_s, "merge": mrg.wall_s})
    assert rep["parity"] == expected["parity"] and rep["delta"] == expected["delta"]
    assert rep["stages"] == {s: rd.read_marker(s).wall_s for s in ("split", "select", "merge", "warm", "baseline")}
