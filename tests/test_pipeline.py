"""The whole run on the tiny model: completes, resumes after an injected failure, report numbers."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from warmstart.errors import ConfigError
from warmstart.library import Library
from warmstart.pipeline import RunConfig, RunDir, run
from warmstart.report import Curve, build_report
from warmstart.train import TrainConfig

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome")]


@pytest.fixture
def setup(models, tmp_path, monkeypatch):
    import importlib.util

    import warmstart.merge as wm

    if importlib.util.find_spec("warmstart.merge.lora") is None:  # until LoRA merging lands: first donor
        from warmstart.merge.plan import MergePlan

        class _Res:
            def to_dict(self):
                return {"method": "stub"}

        def fake_merge(plan, out, force=False):
            shutil.copytree(plan.models[0].ref, out)
            return _Res()

        monkeypatch.setattr(wm, "merge", fake_merge, raising=False)
        monkeypatch.setattr(wm, "MergePlan", MergePlan, raising=False)
    rng = random.Random(0)
    target = tmp_path / "capitals.jsonl"
    with open(target, "w") as f:
        for _ in range(20):
            c, a = rng.choice(CAPITALS)
            f.write(json.dumps({"question": f"capital of {c}?", "choices": [x for _, x in CAPITALS],
                                "answer": a}) + "\n")
    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        L.add(models / "lora_a")
        L.add(models / "lora_b")
    cfg = RunConfig(train=TrainConfig(steps=4, eval_every=2, batch_size=4, lr=5e-3, max_length=64),
                    select={"n": 8, "k": 1}, eval_fraction=0.25)
    return target, lib, models / "base", cfg


def test_run_resumes_after_failure_and_reports(setup, tmp_path, monkeypatch):
    target, lib, base, cfg = setup
    out = tmp_path / "run"
    monkeypatch.setenv("WARMSTART_FAIL_AT", "merge")
    with pytest.raises(RuntimeError, match="injected failure"):
        run(target, lib, base, out, cfg)
    rd = RunDir(out)
    assert rd.done("split") and rd.done("select") and not rd.done("merge")
    assert not (out / "merge").exists()  # the failed stage left nothing half-written
    select_marker = (out / "select" / "stage.done.json").read_text()

    monkeypatch.delenv("WARMSTART_FAIL_AT")
    res = run(target, lib, base, out, cfg)
    assert res.skipped == ["split", "select"]
    assert res.ran == ["merge", "warm", "baseline", "report"]
    assert (out / "select" / "stage.done.json").read_text() == select_marker  # not redone

    # eval split is disjoint from the train split and the same size as asked
    split = rd.marker("split")["outputs"]
    assert split["eval_rows"] == 5 and split["train_rows"] == 15
    # the report's numbers are the ones computed from the logged curves
    warm, baseline = Curve.from_file(out / "warm"), Curve.from_file(out / "baseline")
    overhead = {"select": rd.marker("select")["wall_s"], "merge": rd.marker("merge")["wall_s"]}
    expected = build_report(warm, baseline, overhead_s=overhead)["parity"]  # compute_parity + the noise check
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["parity"] == json.loads(json.dumps(expected))
    assert rep["effect"]["eval_rows"] == 5
    assert rep["metric"] == "eval_mc_accuracy"
    assert rep["delta"] == pytest.approx(warm.final("eval_mc_accuracy") - baseline.final("eval_mc_accuracy"))
    assert rep["warm"]["zero_shot"] == warm.points[0]["eval_mc_accuracy"]
    assert len(rep["donors"]) == 1 and set(rep["stages"]) >= {"split", "select", "merge", "warm", "baseline"}
    for f in ("report.md", "curves_step.png", "curves_wall.png"):
        assert (out / "report" / f).stat().st_size > 0
    # same budget, lr and seed for both runs
    wmeta = json.loads((out / "warm" / "warmstart.json").read_text())
    bmeta = json.loads((out / "baseline" / "warmstart.json").read_text())
    assert wmeta["config"] == bmeta["config"]
    assert wmeta["eval_data"]["fingerprint"] == bmeta["eval_data"]["fingerprint"]

    # the CLI re-renders the report and tabulates runs
    from typer.testing import CliRunner

    from warmstart.cli import app

    r = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["parity"] == rep["parity"]
    r = CliRunner().invoke(app, ["compare", str(out), str(out)])
    assert r.exit_code == 0 and "| capitals |" in r.stdout and "| mean |" in r.stdout
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert isinstance(r.exception, ConfigError) and "not a warmstart run directory" in str(r.exception)

    # a third run has nothing left to do; a different config is refused
    again = run(target, lib, base, out, cfg)
    assert again.ran == [] and len(again.skipped) == 6
    other = RunConfig(train=TrainConfig(steps=5, eval_every=2, batch_size=4), select={"n": 8, "k": 1})
    with pytest.raises(ConfigError, match="different config"):
        run(target, lib, base, out, other)
    with open(target, "a") as f:  # the same path with other content is another target
        f.write(json.dumps({"question": "capital of Peru?", "choices": ["Lima", "Rome"], "answer": 0}) + "\n")
    with pytest.raises(ConfigError, match="target_sha256"):
        run(target, lib, base, out, cfg)


def test_unfinished_training_stage_is_redone(setup, tmp_path, monkeypatch):
    """A training stage that finished its output but not its marker counts as unfinished."""
    target, lib, base, cfg = setup
    out = tmp_path / "run"
    cfg.baseline = False
    monkeypatch.setenv("WARMSTART_FAIL_AT", "warm")
    with pytest.raises(RuntimeError):
        run(target, lib, base, out, cfg)
    assert (out / "warm" / "curve.json").is_file() and not RunDir(out).done("warm")
    monkeypatch.delenv("WARMSTART_FAIL_AT")
    # resume through the CLI, with the settings from YAML
    from typer.testing import CliRunner

    from warmstart.cli import app

    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    r = CliRunner().invoke(app, ["run", "--target", str(target), "--library", str(lib), "--base", str(base),
                                 "--out", str(out), "--config", str(tmp_path / "run.yaml"), "--no-baseline",
                                 "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ran"] == ["warm", "report"] and res["skipped"] == ["split", "select", "merge"]
    rep = res["report"]
    assert "parity" not in rep and rep["warm"]["final"] is not None


def test_run_config_yaml_and_errors(tmp_path):
    cfg = RunConfig(train=TrainConfig(steps=3), select={"k": 3}, merge={"method": "ties"})
    p = tmp_path / "run.yaml"
    p.write_text(cfg.to_yaml())
    back = RunConfig.from_yaml(p)
    assert back.to_dict() == cfg.to_dict()
    p.write_text("train: {steps: 0}\neval_fraction: 2\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        RunConfig.from_yaml(p)
    p.write_text("train: {steps: 0}\neval_fraction: 2\n")
    with pytest.raises(ConfigError) as e:
        RunConfig.from_yaml(p)
    assert "steps" in str(e.value) and "eval_fraction" in str(e.value)


@pytest.mark.slow
def test_run_under_accelerate_launch_two_cpu_processes(setup, tmp_path):
    """Every process calls run(): both train (DDP) and score half the candidates; one set of files, one answer."""
    import subprocess
    import sys

    target, lib, base, _ = setup
    out = tmp_path / "ddp-run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "warmstart",
           "run", "--target", str(target), "--library", str(lib), "--base", str(base), "--out", str(out),
           "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--k", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)  # one JSON document: only the main process answers
    assert res["ran"] == ["split", "select", "merge", "warm", "baseline", "report"]
    for stage in ("warm", "baseline"):
        assert [p["step"] for p in Curve.from_file(out / stage).points] == [0, 2, 4]
    sel = RunDir(out).marker("select")["outputs"]
    assert len(sel["donors"]) == 1 and len(sel["ranking"]) == 3  # base + both adapters, scored across ranks
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
