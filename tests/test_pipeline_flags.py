"""`warmstart run` settings: every flag reaches the config, --set overrides, --help defaults, the eval rows."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from warmstart.errors import ConfigError
from warmstart.library import Library
from warmstart.pipeline import RunConfig, RunDir, run
from warmstart.train import TrainConfig

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome")]


def _mc(path, n: int, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            c, a = rng.choice(CAPITALS)
            f.write(json.dumps({"question": f"capital of {c} ({i})?", "choices": [x for _, x in CAPITALS],
                                "answer": a}) + "\n")
    return path


@pytest.fixture
def setup(models, tmp_path):
    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        L.add(models / "lora_a")
        L.add(models / "lora_b")
    return _mc(tmp_path / "capitals.jsonl", 16), lib, models / "base"


def test_run_help_shows_defaults_that_match_the_configs():
    """(tests/test_config.py checks every flag's shown default against its dataclass field.)"""
    from typer.testing import CliRunner

    from warmstart.cli import app

    r = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for flag, shown in (("--steps", "40"), ("--scorer", "loss"), ("--select-n", "256"), ("--scheduler", "linear"),
                        ("--warmup-steps", "0"), ("--min-own-gain", "0.02"), ("--eval-max", "200")):
        assert re.search(re.escape(flag) + r" .*?\[default: " + re.escape(shown) + r"\]", text), flag
    assert "--set" in text and "SECTION.KEY=VALUE" in text


def test_with_overrides_reaches_every_section():
    cfg = RunConfig(select={"k": 3})
    new = cfg.with_overrides(["train.lr=2e-4", "train.lora_targets=[q_proj, v_proj]", "select.scorer=grad",
                              "select.n=null", "merge.method=ties", "merge.params.density=0.5",
                              "merge.lora_a_norm=null", "eval_max=null", "baseline=false"])
    assert new.train.lr == 2e-4 and new.train.lora_targets == ["q_proj", "v_proj"]
    assert new.select.to_dict() == {"k": 3, "scorer": "grad", "n": None}
    assert new.merge.to_dict() == {"method": "ties", "params": {"density": 0.5}, "lora_a_norm": None}
    assert new.eval_max is None and new.baseline is False
    assert cfg.select.to_dict() == {"k": 3} and cfg.merge.to_dict() == {}  # the original is untouched
    for bad, msg in (("steps=3", "no setting 'steps'"), ("train.bogus=1", "bogus"), ("select.sample=4", "sample"),
                     ("merge.nope=1", "nope"), ("train.steps.x=1", "single value"), ("noequals", "bad override"),
                     ("select.scorer=gradient", "scorer"), ("select.k=0", "select.k"),
                     ("select.weights=optimised", "unknown weights")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            cfg.with_overrides([bad])


def test_run_cli_flags_and_set_reach_the_run(setup, tmp_path, cli):
    """Select/merge/train flags and --set land in run.json and the stages; a capped --eval is reported."""
    target, lib, base = setup
    ev = _mc(tmp_path / "heldout.jsonl", 9, seed=1)
    out = tmp_path / "run"
    r = cli("run", "--target", target, "--eval", ev, "--library", lib, "--base", base, "--out", out,
            "--scorer", "grad", "--select-n", 6, "--k", 1, "--steps", 2, "--eval-every", 2, "--batch-size", 4,
            "--scheduler", "cosine", "--warmup-steps", 1, "--max-length", 64, "--eval-limit", 5,
            "--lora-mode", "cat", "--set", "train.weight_decay=0.01", "--set", "select.max_length=64",
            "--no-baseline")
    assert r.code == 0, r.err
    info = json.loads((out / "run.json").read_text())
    c = info["config"]
    assert c["select"] == {"scorer": "grad", "k": 1, "n": 6, "max_length": 64}
    assert c["merge"] == {"lora_mode": "cat"}
    assert (c["train"]["scheduler"], c["train"]["warmup_steps"], c["train"]["weight_decay"]) == ("cosine", 1, 0.01)
    assert info["eval_rows"] == {"used": 5, "given": 9, "limit": 5, "source": "file"}
    rd = RunDir(out)
    split, sel = rd.marker("split")["outputs"], rd.marker("select")["outputs"]
    assert (split["eval_rows"], split["eval_rows_given"]) == (5, 9)
    assert len((out / "split" / "eval.jsonl").read_text().splitlines()) == 5
    assert (sel["scorer"], sel["sample_rows"], sel["sample"], sel["candidates"]) == ("grad", 6, "n=6,seed=0", 3)
    recipe = rd.marker("merge")["outputs"]["recipe"]
    assert recipe.get("lora_mode", "cat") == "cat" and "rank" not in recipe  # not the svd default's rank
    warm = json.loads((out / "warm" / "warmstart.json").read_text())
    assert warm["eval_data"]["rows"] == 5 and warm["config"]["scheduler"] == "cosine"
    err = " ".join(r.err.split())
    assert "evaluating on 5 of the 9 eval rows given" in err and "eval rows: 5 used of 9 given (eval_limit 5)" in err
    assert "Selection cost:" in err and "3 candidates scored by grad on 6 target rows" in err
    md = (out / "report" / "report.md").read_text()
    assert "- eval rows: 5 used of 9 given (eval_limit 5)" in md
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["selection"]["wall_s"] == rd.marker("select")["wall_s"] == rep["overhead_s"]["select"]
    assert f"**Selection cost: {rep['selection']['wall_s']:.1f} s**" in md


def test_explicit_eval_file_is_used_whole(setup, tmp_path):
    """More rows than eval_max (the carving cap): all of them are scored, and the report says so."""
    target, lib, base = setup
    ev = _mc(tmp_path / "heldout.jsonl", 12, seed=2)
    cfg = RunConfig(train=TrainConfig(steps=1, eval_every=1, batch_size=4, max_length=64), select={"n": 4, "k": 1},
                    eval_max=5, baseline=False)
    run(target, lib, base, tmp_path / "run", cfg, eval=ev)
    rd = RunDir(tmp_path / "run")
    assert rd.marker("split")["outputs"]["eval_rows"] == 12 and rd.info()["eval_rows"]["used"] == 12
    assert json.loads((tmp_path / "run" / "warm" / "warmstart.json").read_text())["eval_data"]["rows"] == 12
    assert "- eval rows: 12 (all given)" in (tmp_path / "run" / "report" / "report.md").read_text()
    # carved from the target, eval_max still caps the held-out split
    run(target, lib, base, tmp_path / "carved", dataclasses.replace(cfg, eval_fraction=0.5))
    assert RunDir(tmp_path / "carved").marker("split")["outputs"]["eval_rows"] == 5


def test_run_cli_bad_setting_is_one_line_and_writes_nothing(setup, tmp_path, cli):
    target, lib, base = setup
    for args, msg in ((("--scorer", "gradient"), "select.scorer must be one of loss, grad"),
                      (("--set", "select.nope=1"), "unknown select option(s) nope"),
                      (("--set", "train.steps"), "bad override 'train.steps'"),
                      (("--select-n", -3), "select.n must be a positive integer"),
                      (("--scorer", "grad", "--metric", "mc-accuracy"), "select.scorer grad predicts the loss")):
        r = cli("run", "--target", target, "--library", lib, "--base", base, "--out", tmp_path / "run", *args)
        assert r.code == 1 and msg in " ".join(r.err.split()) and "Traceback" not in r.err, (args, r.err)
        assert not (tmp_path / "run").exists()


def test_readme_and_docs_run_recipes_use_real_flags():
    """Every `warmstart run` command in the README and docs/pipeline.md parses: its flags are run's own."""
    from pathlib import Path

    import typer

    from warmstart.cli import app

    cmd = typer.main.get_command(app).commands["run"]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    root = Path(__file__).resolve().parents[1]
    seen = 0
    for doc in ("README.md", "docs/pipeline.md"):
        text = (root / doc).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if re.match(r"\s*(accelerate launch .*-m )?warmstart run ", line.strip()):
                args = line.split("#")[0].split("warmstart run", 1)[1]  # not accelerate's own flags
                flags = set(re.findall(r"\s(--[a-z][a-z-]*)", args))
                assert flags <= known, (doc, sorted(flags - known))
                assert {"--target", "--base", "--out"} <= flags, (doc, line)
                seen += 1
    assert seen >= 4
    readme = (root / "README.md").read_text()
    assert "--scorer grad --select-n 64" in readme  # the benchmark's wall-clock recipe, as flags


def test_selection_sentence_in_baseline_steps():
    """The selection's time in baseline training steps: wall_s / (baseline time / baseline steps)."""
    from warmstart.report import selection_sentence

    s = {"wall_s": 14.0, "scorer": "grad", "sample": "n=64,seed=0", "sample_rows": 64, "candidates": 11, "cached": 0}
    rep = {"warm": {"train_time_s": 30.0}, "baseline": {"train_time_s": 56.0, "steps": 20},
           "overhead_s": {"merge": 0.2}}
    text = selection_sentence(s, rep)
    assert "**Selection cost: 14.0 s**" in text and "11 candidates scored by `grad` on 64 target rows" in text
    assert "(selection = 5.0 of its steps)" in text and "merge 0.2 s" in text  # 14 / (56 / 20) = 5.0


def test_run_skips_a_donor_that_never_learned(models, copy_of, tmp_path, cli):
    """The own-task gate in a run: the flat adapter is ranked, not merged, and the run says why."""
    a, b = copy_of(models / "lora_a"), copy_of(models / "lora_b")
    pts = [{"step": 0, "eval_loss": 2.0, "eval_mc_accuracy": 0.25},
           {"step": 40, "eval_loss": 1.9, "eval_mc_accuracy": 0.25}]
    (a / "curve.json").write_text(json.dumps({"points": pts}))
    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        ida, idb = L.add(a)[0].id, L.add(b)[0].id
    target = _mc(tmp_path / "t.jsonl", 16)
    args = ("run", "--target", target, "--library", lib, "--base", models / "base", "--k", 2, "--select-n", 6,
            "--steps", 1, "--eval-every", 1, "--batch-size", 4, "--max-length", 64, "--no-baseline")
    r = cli(*args, "--out", tmp_path / "gated")
    assert r.code == 0, r.err
    sel = RunDir(tmp_path / "gated").marker("select")["outputs"]
    assert [d["id"] for d in sel["donors"]] == [idb] and sel["excluded"] == [ida] and len(sel["ranking"]) == 3
    assert "select: not a donor: lora_a never learned its own task" in " ".join(r.err.split())
    r = cli(*args, "--no-own-gate", "--out", tmp_path / "free")
    assert r.code == 0, r.err
    assert {d["id"] for d in RunDir(tmp_path / "free").marker("select")["outputs"]["donors"]} == {ida, idb}
