"""SIGKILL at chosen points of merge, transfer and a whole `warmstart run`: afterwards no output
is half-written, leftovers are cleaned by the next run, and re-running gives the same result as an
uninterrupted run.

The killed process is the real CLI in a fresh interpreter. To make the kill land at a known point
(tiny models merge in milliseconds) a small driver blocks inside one named function — after the
temporary directory exists and part of the output is written — and reports its pid; the test then
sends SIGKILL. Nothing in warmstart itself is changed for the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _robustness import write_mc
from safetensors.torch import load_file

from warmstart._io import TMP_MARK
from warmstart.checkpoints import open_checkpoint

DRIVER = r'''
import functools, importlib, os, sys, time
spec, n = os.environ["ROBUST_BLOCK"].rsplit("#", 1)
mod_name, attr = spec.split(":")
owner = importlib.import_module(mod_name)
*path, name = attr.split(".")
for p in path:
    owner = getattr(owner, p)
orig, calls = getattr(owner, name), [0]
@functools.wraps(orig)  # keeps the signature: run validates its select options against select()'s
def blocked(*a, **k):
    calls[0] += 1
    if calls[0] == int(n):
        with open(os.environ["ROBUST_FLAG"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    return orig(*a, **k)
setattr(owner, name, blocked)
sys.argv = ["warmstart", *sys.argv[1:]]
from warmstart.cli import main
main()
'''


def kill_at(tmp_path: Path, block: str, *argv, timeout: float = 120) -> subprocess.CompletedProcess | None:
    """Run ``warmstart *argv`` in a new process, SIGKILL it when it reaches ``block`` ('mod:func#n').

    Returns None when the kill happened, or the finished process if it never reached the point."""
    driver, flag = tmp_path / "driver.py", tmp_path / f"flag-{time.monotonic_ns()}"
    driver.write_text(DRIVER)
    # the caller's PYTHONPATH too: a checkout other than the installed one tests its own package
    path = os.pathsep.join(x for x in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "ROBUST_BLOCK": block, "ROBUST_FLAG": str(flag), "PYTHONPATH": path}
    p = subprocess.Popen([sys.executable, str(driver), *map(str, argv)], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not flag.exists() or not flag.read_text():
        if p.poll() is not None:
            out, err = p.communicate()
            return subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if time.monotonic() > deadline:
            p.kill()
            raise TimeoutError(f"never reached {block}")
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    return None


def assert_killed(tmp_path: Path, block: str, *argv) -> None:
    res = kill_at(tmp_path, block, *argv)
    assert res is None, f"finished (rc {res.returncode}) before reaching {block}: {res.stderr.decode()[-2000:]}"


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{TMP_MARK}*"))


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_model(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert open_checkpoint(a).fingerprint() == open_checkpoint(b).fingerprint()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


# -- merge --------------------------------------------------------------------------------------------
def merge_argv(models, out):
    return ["merge", models / "ft_a", models / "ft_b", "--method", "ties", "--base", models / "base",
            "--density", "0.5", "--shard-size", "8KB", "--out", out]


@pytest.fixture(scope="module")
def merged_ref(models, tmp_path_factory):
    from warmstart.merge import MergePlan, merge

    out = tmp_path_factory.mktemp("ref") / "merged"
    plan = MergePlan.from_dict({"models": [{"ref": str(models / "ft_a")}, {"ref": str(models / "ft_b")}],
                                "method": "ties", "base": str(models / "base"), "params": {"density": 0.5},
                                "shard_size": "8KB"})
    merge(plan, out)
    assert len(list(out.glob("*.safetensors"))) > 5  # many shards: the kill lands between shard files
    return out


MERGE_POINTS = {
    "mid-tensors": "warmstart.merge.engine:_merge_item#10",
    "before-tensors": "warmstart.merge.engine:_stream#1",
    "writing-card": "warmstart.merge.engine:write_card#1",
}


@pytest.mark.parametrize("point", [
    "mid-tensors",
    pytest.param("before-tensors", marks=pytest.mark.slow),
    pytest.param("writing-card", marks=pytest.mark.slow),
])
def test_merge_killed_leaves_nothing_and_rerun_matches(cli, models, merged_ref, tmp_path, point):
    out = tmp_path / "merged"
    assert_killed(tmp_path, MERGE_POINTS[point], *merge_argv(models, out))
    assert not out.exists()  # never a half-written model where a finished one is expected
    stale = leftovers(tmp_path)
    assert stale and all(s.startswith("merged" + TMP_MARK) for s in stale)  # the killed run's temp dir
    if point == "mid-tensors":  # it really died mid-write: some shards there, not all
        written = list((tmp_path / stale[0]).glob("*.safetensors"))
        assert 0 < len(written) < len(list(merged_ref.glob("*.safetensors")))
    r = cli(*merge_argv(models, out))
    assert r.code == 0, r.err
    assert leftovers(tmp_path) == []  # cleaned by the next run
    assert_same_model(out, merged_ref)


def test_merge_force_killed_keeps_the_old_output(cli, models, merged_ref, tmp_path):
    """--force over a finished output, killed mid-write: the old output is still complete."""
    out = tmp_path / "merged"
    r = cli("merge", models / "ft_a", models / "ft_b", "--out", out)  # linear: a different model
    assert r.code == 0, r.err
    before = tensors(out)
    assert_killed(tmp_path, MERGE_POINTS["mid-tensors"], *merge_argv(models, out), "--force")
    after = tensors(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    r = cli(*merge_argv(models, out), "--force")
    assert r.code == 0, r.err
    assert leftovers(tmp_path) == []
    assert_same_model(out, merged_ref)


@pytest.mark.slow
def test_merge_killed_at_random_times(cli, models, merged_ref, tmp_path):
    """Plain `python -m warmstart merge`, SIGKILL after a random delay: the output is absent or complete."""
    import random

    rng = random.Random(0)
    out = tmp_path / "merged"
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "-m", "warmstart", *map(str, merge_argv(models, out)), "--force"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            assert_same_model(out, merged_ref)
    r = cli(*merge_argv(models, out), "--force")
    assert r.code == 0 and leftovers(tmp_path) == []
    assert_same_model(out, merged_ref)


# -- transfer -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_transfer_killed_mid_write_then_rerun_matches(cli, models, tmp_path):
    argv = ["transfer", "--base-old", models / "base", "--finetuned", models / "ft_a", "--base-new",
            models / "ft_b", "--shard-size", "8KB", "--alpha", "0.5,1.0"]
    ref = tmp_path / "ref"
    assert cli(*argv, "--out", ref).code == 0
    out = tmp_path / "moved"
    assert_killed(tmp_path, "warmstart.checkpoints.streaming:ShardWriter.put#30", *argv, "--out", out)
    assert not out.exists() and leftovers(tmp_path)
    r = cli(*argv, "--out", out)
    assert r.code == 0, r.err
    assert leftovers(tmp_path) == []
    for a in ("alpha-0.5", "alpha-1"):
        sub = [p.name for p in ref.iterdir()]
        name = next(s for s in sub if s.startswith(a))
        assert_same_model(out / name, ref / name)


# -- the whole pipeline ---------------------------------------------------------------------------------
RUN_CFG = {"train": {"steps": 4, "eval_every": 2, "batch_size": 4, "lr": 5e-3, "max_length": 64},
           "select": {"n": 8, "k": 1}, "eval_fraction": 0.25}


@pytest.fixture(scope="module")
def run_setup(models, tmp_path_factory):
    import yaml

    from warmstart.library import Library

    d = tmp_path_factory.mktemp("runsetup")
    target = write_mc(d / "capitals.jsonl", 20, 0)
    lib = d / "lib.db"
    with Library(lib) as L:
        L.add(models / "lora_a")
        L.add(models / "lora_b")
    (d / "run.yaml").write_text(yaml.safe_dump(RUN_CFG))
    argv = ["run", "--target", target, "--library", lib, "--base", models / "base", "--config", d / "run.yaml"]
    return argv


@pytest.fixture(scope="module")
def run_ref(run_setup, tmp_path_factory):
    from warmstart.pipeline import RunConfig, run

    a = {k: v for k, v in zip(run_setup[1::2], run_setup[2::2])}
    out = tmp_path_factory.mktemp("runref") / "run"
    run(a["--target"], a["--library"], a["--base"], out, RunConfig.from_yaml(a["--config"]))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_model(a / "merge" / "model", b / "merge" / "model")
    for stage in ("warm", "baseline"):
        ca, cb = (json.loads((d / stage / "curve.json").read_text()) for d in (a, b))
        # timings (time_s, wall_s, evaluation_s) differ between runs; everything else must not
        pa = [{k: v for k, v in p.items() if not k.endswith("_s")} for p in ca["points"]]
        pb = [{k: v for k, v in p.items() if not k.endswith("_s")} for p in cb["points"]]
        assert len(pa) == len(pb)
        for x, y in zip(pa, pb):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], float):
                    assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (stage, k)
                else:
                    assert x[k] == y[k], (stage, k)
    ra, rb = (json.loads((d / "report" / "report.json").read_text()) for d in (a, b))
    assert ra["warm"]["final"] == pytest.approx(rb["warm"]["final"])
    assert ra["baseline"]["final"] == pytest.approx(rb["baseline"]["final"])


RUN_POINTS = {  # stage in progress when killed: where in it
    "warm-mid-training": ("warm", "transformers:Trainer.training_step#2"),
    "warm-saving": ("warm", "warmstart.train:_save#1"),
    "merge-before-marker": ("merge", "warmstart.pipeline:_write_marker#3"),
    "select-scoring": ("select", "warmstart.select:select#1"),
}


@pytest.mark.slow  # ~80 s: a reference run plus a killed and a resumed run on the tiny model
@pytest.mark.parametrize("point", [
    "warm-mid-training",
    pytest.param("warm-saving", marks=pytest.mark.slow),
    pytest.param("merge-before-marker", marks=pytest.mark.slow),
    pytest.param("select-scoring", marks=pytest.mark.slow),
])
def test_run_killed_resumes_to_the_same_result(cli, run_setup, run_ref, tmp_path, point):
    from warmstart.pipeline import STAGES, RunDir

    stage, block = RUN_POINTS[point]
    out = tmp_path / "run"
    assert_killed(tmp_path, block, *run_setup, "--out", out)
    rd = RunDir(out)
    assert not rd.done(stage)
    assert not any(rd.done(s) for s in STAGES[STAGES.index(stage):])
    assert not out.joinpath(stage).exists()  # a stage's directory appears only complete (atomic rename)
    if stage != "select":  # select scores before it opens its output; the others died inside theirs
        assert leftovers(out)  # ... and the killed attempt's temporary sibling is what remains
    r = cli(*run_setup, "--out", out)
    assert r.code == 0, r.err
    assert leftovers(out) == [] and leftovers(tmp_path) == []
    assert_same_run(out, run_ref)
