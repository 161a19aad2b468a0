"""`warmstart library ...` from the command line, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_scan_list_show_remove(cli, models, tmp_path):
    db = tmp_path / "lib.db"
    r = cli("library", "scan", models, "--library", db)
    assert r.code == 0 and "10 added" in r.err
    r = cli("library", "scan", models, "--library", db)
    assert "0 added, 0 updated, 10 unchanged" in r.err
    r = cli("library", "list", "--library", db, "--kind", "lora", "--json")
    rows = r.json()
    assert r.code == 0 and len(rows) == 5 and all(x["kind"] == "lora" for x in rows)
    ck20 = next(x for x in rows if x["path"].endswith("checkpoint-20"))
    assert ck20["global_step"] == 20 and ck20["final_loss"] == 1.0 and ck20["task"] == "task_c"
    r = cli("library", "show", ck20["id"], "--library", db, "--json")
    assert r.json()["fingerprint"] == ck20["fingerprint"]
    r = cli("library", "list", "--library", db, "--compatible-with", models / "other_arch", "--json")
    assert [x["path"].split("/")[-1] for x in r.json()] == ["other_arch"]
    r = cli("library", "remove", ck20["id"], "--library", db)
    assert r.code == 0 and "removed" in r.err
    assert len(cli("library", "list", "--library", db, "--json").json()) == 9


def test_add_with_task_and_tags_via_env_library(cli, models, tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_LIBRARY", str(tmp_path / "env.db"))
    r = cli("library", "add", models / "ft_a", "--task", "fr", "--tag", "lr=1e-4", "--json")
    assert r.code == 0
    (row,) = r.json()
    assert row["status"] == "added" and row["task"] == "fr" and row["tags"] == {"lr": "1e-4"}
    assert (tmp_path / "env.db").exists()


def test_user_errors_are_one_line_without_traceback(cli, models, tmp_path):
    db, full = tmp_path / "lib.db", tmp_path / "full.db"
    assert cli("library", "add", models / "ft_a", "--library", full).code == 0
    for args, needle in [
        (("library", "add", tmp_path / "nope", "--library", db), "nope: no such file"),
        (("library", "show", "999", "--library", db), "library not found"),  # the failed add created none
        (("library", "add", models, "--library", db), "holds checkpoints in subdirectories"),
        (("library", "add", models / "ft_a", "--tag", "oops", "--library", db), "KEY=VALUE"),
        (("library", "list", "--library", tmp_path / "missing.db"), "library not found"),
        (("library", "show", "999", "--library", full), "no entry '999'"),
        (("library", "list", "--kind", "qlora", "--library", db), "--kind must be"),
    ]:
        r = cli(*args)
        assert r.code == 1, args
        assert needle in r.err, (args, r.err)
        assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    cmd = [sys.executable, "-m", "warmstart", "library", "add", str(tmp_path / "nope"), "--library",
           str(tmp_path / "l.db")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1 and "no such file" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([cmd[0], "-m", "warmstart", "--debug", *cmd[3:]], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_every_command_help_has_examples(cli):
    from warmstart.cli import app

    import typer.main

    group = typer.main.get_command(app)
    stack = [((), group)]
    seen = 0
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack.extend(((*path, n), c) for n, c in subs.items())
            continue
        r = cli(*path, "--help")
        assert r.code == 0, path
        assert "Example" in r.out, f"`warmstart {' '.join(path)} --help` has no example"
        seen += 1
    assert seen >= 5
