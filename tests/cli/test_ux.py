"""What a new user trips over (issue 15): references, fast failures, nothing written on failure,
Ctrl-C, thread count, output polish."""

from __future__ import annotations

import pytest

from warmstart.checkpoints import looks_like_path, resolve
from warmstart.errors import CheckpointError

# -- a mistyped local path is not a hub download -----------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything reaches for the network."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)
    real = huggingface_hub.snapshot_download

    def local_only(*a, **k):
        if not k.get("local_files_only"):
            boom()
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)


@pytest.mark.parametrize("ref,path", [("./x/model", True), ("../x", True), ("/abs/x", True), ("~/x", True),
                                      ("noslash", True), ("org/name", False), ("org/name@main", False)])
def test_looks_like_path(ref, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(ref) is path


def test_existing_first_component_makes_a_path(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fulls" / "plurals-full").mkdir(parents=True)
    assert looks_like_path("fulls/plurals-ful")
    with pytest.raises(CheckpointError) as e:
        resolve("fulls/plurals-ful")
    msg = e.value.one_line()
    assert "no such file or directory" in msg and "fulls/plurals-full" in msg  # the near miss is suggested
    assert "hub" not in msg


def test_unknown_hub_id_offline_gives_both_readings(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as e:
        resolve("nonexistent/model")
    assert e.value.one_line().startswith("no local directory nonexistent/model; as a hub id: not in the local cache")


def test_unknown_hub_id_without_network_fails_after_one_probe(tmp_path, monkeypatch):
    """Online but unreachable: one metadata probe (short timeout), then both readings; no download attempt."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    probes = []

    def unreachable(self, repo_id, revision=None, timeout=None, **k):
        probes.append(timeout)
        raise ConnectionError("Name or service not known")

    real = huggingface_hub.snapshot_download

    def local_only(*a, **k):
        assert k.get("local_files_only"), "a download was attempted"
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    with pytest.raises(CheckpointError, match="no local directory acme/nothing; as a hub id: not in the local "
                                              "cache and no network"):
        resolve("acme/nothing")
    assert len(probes) == 1 and probes[0] is not None and probes[0] <= 10


def test_cli_mistyped_path_is_one_line(cli, models, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fulls").mkdir()
    r = cli("merge", "fulls/plurals-ful", models / "ft_b", "--out", tmp_path / "m")
    assert r.code == 1 and r.err.count("\n") == 1 and "fulls/plurals-ful: no such file or directory" in r.err
    assert not (tmp_path / "m").exists()


# -- failures answer before torch loads, and write nothing -------------------------------------------

def _in_fresh_python(tmp_path, *args) -> dict:
    """Run the CLI in a new interpreter (this one has torch loaded) and report what it imported."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys\nfrom warmstart.cli import main\nsys.argv = ['warmstart', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules,"
            " 'transformers': 'transformers' in sys.modules}), file=sys.__stdout__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "err": p.stderr}


@pytest.mark.parametrize("command", ["finetune", "select", "run", "merge"])
def test_user_mistakes_are_reported_without_importing_torch(models, tmp_path, command):
    from warmstart.testing import write_jsonl

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "only a prompt"}])
    args = {"finetune": ["finetune", "--init", models / "base", "--train", bad, "--eval", bad, "--out", "o"],
            "select": ["select", "--target", tmp_path / "missing.jsonl", "--base", models / "base"],
            "run": ["run", "--target", bad, "--base", models / "base", "--out", "r"],
            "merge": ["merge", models / "ft_a", "ft_typo", "--out", "m"]}[command]
    r = _in_fresh_python(tmp_path, *args)
    assert r["rc"] == 1 and r["err"].startswith("error: ") and r["err"].count("\n") == 1, r["err"]
    assert not r["torch"] and not r["transformers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no warmstart.db, no o/ r/ m/


def test_failing_select_leaves_no_library(cli, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("select", "--target", "missing.jsonl", "--base", models / "base")
    assert r.code == 1 and "missing.jsonl: no such file" in r.err
    r = cli("select", "--target", models.parent / "nothing.jsonl", "--base", models / "base")
    assert not (tmp_path / "warmstart.db").exists()


def test_select_without_a_library_says_so_and_creates_none(cli, models, tmp_path, monkeypatch):
    from warmstart.testing import write_jsonl

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    r = cli("select", "--target", "t.jsonl", "--base", models / "base")
    assert r.code == 1 and "library not found" in r.err
    assert not (tmp_path / "warmstart.db").exists()


def test_failing_library_add_removes_the_library_it_created(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("library", "add", "no/such/dir")
    assert r.code == 1
    assert list(tmp_path.iterdir()) == []


def test_failing_library_scan_leaves_no_library(cli, models, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(models / "ft_a", tmp_path / "runs" / "broken")
    f = tmp_path / "runs" / "broken" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated: the only checkpoint fails
    r = cli("library", "scan", "runs")
    assert r.code == 1, r.err
    r = cli("library", "scan", "no-such-dir")
    assert r.code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_failing_library_add_keeps_an_existing_library(cli, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("library", "add", models / "ft_a").code == 0
    assert cli("library", "add", "no/such/dir").code == 1
    r = cli("library", "list", "--json")
    assert r.code == 0 and len(r.json()) == 1


# -- Ctrl-C -------------------------------------------------------------------------------------------

def test_sigint_during_training_prints_the_message_and_leaves_no_output(models, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from warmstart.testing import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(16)])
    # PYTHONFAULTHANDLER: if the child hangs, SIGABRT makes it print every thread's stack (shown on failure)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    p = subprocess.Popen([sys.executable, "-m", "warmstart", "finetune", "--init", str(models / "base"),
                          "--train", str(data), "--eval", str(data), "--out", "o", "--steps", "100000",
                          "--eval-every", "100000"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    chunks: list[str] = []  # stderr drained as it comes: a full pipe must not be what stops the child
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stderr.read(256), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while "/100000 [" not in "".join(chunks[-8:]):  # the progress bar: training steps are running
            assert p.poll() is None and time.monotonic() < deadline, "".join(chunks)[-3000:] or "no start"
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            p.wait(timeout=30)
            reader.join(timeout=10)
            pytest.fail("no exit 120 s after SIGINT; its stacks:\n" + "".join(chunks)[-6000:])
        reader.join(timeout=30)
    finally:
        p.kill()
    err = "".join(chunks)
    assert p.returncode == 130
    assert err.rstrip().endswith("interrupted; finished outputs are intact, re-run the same command to resume")
    assert "Traceback" not in err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["d.jsonl"]  # the unfinished output was removed


# -- threads ------------------------------------------------------------------------------------------

def test_thread_count_precedence(monkeypatch):
    from warmstart import threads
    from warmstart.errors import ConfigError

    monkeypatch.delenv("WARMSTART_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.chosen_threads() == (threads.available_cpus(), "default")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.chosen_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("WARMSTART_THREADS", "2")
    assert threads.chosen_threads() == (2, "WARMSTART_THREADS")
    assert threads.chosen_threads(1) == (1, "--threads")
    monkeypatch.setenv("WARMSTART_THREADS", "lots")
    with pytest.raises(ConfigError, match="WARMSTART_THREADS must be a positive integer"):
        threads.chosen_threads()


def test_configure_sets_torch_and_openmp(monkeypatch):
    import os

    import torch

    from warmstart import threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "x")
    monkeypatch.delenv("OMP_WAIT_POLICY")  # recorded, so restored after the test
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(k, "9")
    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["MKL_NUM_THREADS"] == "1" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)


def test_threads_flag_rejects_zero(cli, models, tmp_path):
    r = cli("finetune", "--init", models / "base", "--train", "x", "--eval", "x", "--out", tmp_path / "o",
            "--threads", "0")
    assert r.code == 2 and "--threads" in r.err


# -- output off a terminal ----------------------------------------------------------------------------

def test_long_messages_are_not_wrapped_off_a_terminal(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "x" * 150
    r = cli("select", "--target", f"{long}.jsonl", "--base", "b")
    assert r.err == f"error: {long}.jsonl: no such file\n"


# -- help and file modes ------------------------------------------------------------------------------

def test_help_shows_no_bool_metavar_and_derived_defaults(cli, monkeypatch):
    from warmstart.train import TrainConfig

    monkeypatch.setenv("COLUMNS", "200")
    r = cli("finetune", "--help")
    assert r.code == 0 and "<bool>" not in r.out
    d = TrainConfig()
    for text in (f"Optimizer steps. [default: {d.steps}]", f"[default: {d.lr}]", f"[default: {d.eval_every}]",
                 "[default: lora]", "[default: " + ",".join(d.lora_targets) + "]"):
        assert text in r.out, text


def test_outputs_respect_the_umask(tmp_path):
    """transformers writes safetensors 0600; an atomic output gets what open() would give (0644 at 022)."""
    import os

    from warmstart._io import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "o") as tmp:
            (tmp / "plain.txt").write_text("x")
            (tmp / "secretive.safetensors").write_text("x")
            os.chmod(tmp / "secretive.safetensors", 0o600)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert modes == {"plain.txt": 0o644, "secretive.safetensors": 0o644}


def test_merge_reports_progress_in_a_log(cli, models, tmp_path, monkeypatch):
    """Off a terminal rich draws no bar; a merge writes plain progress lines instead of staying silent."""
    from warmstart.cli import merge as merge_cli

    monkeypatch.setattr(merge_cli._merge_progress, "LOG_EVERY_S", 0.0)
    r = cli("merge", models / "ft_a", models / "ft_b", "--base", models / "base", "--method", "ties",
            "--out", tmp_path / "m")
    assert r.code == 0, r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("merging: ")]
    n = int(lines[-1].split("/")[1].split()[0])
    assert lines and n > 1 and lines[0].startswith(f"merging: 0/{n} tensors")
    assert not r.err.startswith("\n")


def test_finetune_card_records_absolute_data_paths(cli, models, tmp_path, monkeypatch):
    import json

    from warmstart.testing import write_jsonl

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(4)])
    r = cli("finetune", "--init", models / "base", "--train", "d.jsonl", "--eval", "./d.jsonl", "--out", "o",
            "--steps", 1, "--batch-size", 2)
    assert r.code == 0, r.err
    meta = json.loads((tmp_path / "o" / "warmstart.json").read_text())
    want = str((tmp_path / "d.jsonl").resolve())
    assert meta["train_data"]["path"] == want and meta["eval_data"]["path"] == want
    assert f"`{want}`" in (tmp_path / "o" / "README.md").read_text()


def test_finetune_padding_free_flag_reaches_the_config_and_the_curve(cli, models, tmp_path):
    """--no-padding-free trains on padded batches; the default flattens them; both say so in the outputs."""
    import json

    from warmstart.testing import write_jsonl

    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i} " * (i + 1), "completion": f"a{i}"} for i in range(4)])
    for flag, want in (([], True), (["--no-padding-free"], False)):
        out = tmp_path / f"o{want}"
        r = cli("finetune", "--init", models / "base", "--train", tmp_path / "d.jsonl", "--eval", tmp_path / "d.jsonl",
                "--out", out, "--steps", 1, "--batch-size", 2, *flag)
        assert r.code == 0, r.err
        meta = json.loads((out / "warmstart.json").read_text())
        assert meta["config"]["padding_free"] is want
        assert json.loads((out / "curve.json").read_text())["meta"]["padding_free"] is want
