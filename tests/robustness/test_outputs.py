"""Outputs never replace inputs or finished work: ``select --out`` and ``run --out`` are checked against
every input before any work, two writers racing on one output without ``--force`` never lose the
finished result (the second fails in one line), and ``--force`` over a file leaves nothing behind."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import pytest
from _robustness import assert_nothing_written, assert_user_error, tree_state, write_mc, make_lib

from warmstart._io import atomic_dir, atomic_write_text
from warmstart.errors import OutputExistsError


@pytest.fixture
def inputs(models, tmp_path):
    root = tmp_path / "inputs"
    for name in ("base", "ft_a", "ft_b", "lora_a"):
        shutil.copytree(models / name, root / name)
    write_mc(root / "train.jsonl", 12, 0)
    return root


def _select(cli, i, lib, out, *extra):
    return cli("select", "--target", i / "train.jsonl", "--base", i / "base", "--n", 4, "--library", lib,
               "--out", out, *extra)


@pytest.mark.parametrize("where,force", [("base/config.json", True), ("base/sel.yaml", False),
                                         ("train.jsonl", True), ("ft_a/sel.yaml", False), ("lib.db", True)])
def test_select_out_never_writes_into_or_over_an_input(cli, inputs, tmp_path, where, force):
    lib = make_lib(tmp_path, inputs / "ft_a")  # the catalog is written by design (WAL), so it lives outside
    before = tree_state(inputs)
    out = lib if where == "lib.db" else inputs / where
    r = _select(cli, inputs, lib, out, *(["--force"] if force else []))
    assert_user_error(r, "overlaps an input")
    assert tree_state(inputs) == before


@pytest.mark.parametrize("where", ["base/run", "ft_a/run", "train.jsonl", ".", "lib.db"])
def test_run_out_checked_against_every_input_before_the_first_stage(cli, inputs, tmp_path, where):
    lib = make_lib(tmp_path, inputs / "ft_a")
    before = tree_state(inputs)
    r = cli("run", "--target", inputs / "train.jsonl", "--base", inputs / "base", "--library", lib,
            "--out", lib if where == "lib.db" else inputs / where, "--steps", 1)
    assert_user_error(r)
    assert "overlaps an input" in r.err or "existing file" in r.err
    assert tree_state(inputs) == before  # not even run.json or a split stage


def test_run_out_naming_an_existing_file(cli, inputs, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = cli("run", "--target", inputs / "train.jsonl", "--base", inputs / "base", "--library",
            make_lib(tmp_path, inputs / "ft_a"), "--out", f, "--steps", 1)
    assert_user_error(r, "existing file")
    assert f.read_text() == "x"


def test_merge_force_over_an_existing_file_leaves_no_tmp(cli, models, tmp_path):
    out = tmp_path / "merged"
    out.write_text("an old file")
    r = cli("merge", models / "ft_a", models / "ft_b", "--out", out, "--force")
    assert r.code == 0, r.err
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


# -- two writers, one output ----------------------------------------------------------------------


def test_second_merge_finishing_later_does_not_replace_the_first(models, tmp_path, monkeypatch):
    """Writer 1 passes the early check, and while it writes, writer 2 runs a whole merge to the same
    --out. Writer 1 must then fail (no --force) and leave writer 2's finished output as it was."""
    import warmstart.merge.engine as engine
    from warmstart.merge import MergePlan, merge

    out = tmp_path / "merged"
    real_card = engine.write_card
    state = {}

    def card_then_rival(tmp, plan, result):
        real_card(tmp, plan, result)
        if not state:
            state["rival"] = True
            merge(MergePlan(models=[{"ref": str(models / "ft_a"), "weight": 0.8},
                                   {"ref": str(models / "ft_b"), "weight": 0.2}]), out)
            state["after_rival"] = tree_state(out)

    monkeypatch.setattr(engine, "write_card", card_then_rival)
    with pytest.raises(OutputExistsError, match="another writer finished first"):
        merge(MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")]), out)
    assert tree_state(out) == state["after_rival"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_second_select_out_does_not_replace_a_file_that_appeared(tmp_path):
    out = tmp_path / "sel.yaml"
    out.write_text("finished: true\n")
    with pytest.raises(OutputExistsError):
        atomic_write_text(out, "other: 1\n", force=False)
    assert out.read_text() == "finished: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sel.yaml"]
    atomic_write_text(out, "other: 1\n", force=True)
    assert out.read_text() == "other: 1\n"


def _writer(out, tag, barrier, q):
    try:
        with atomic_dir(out) as tmp:  # both pass the early check: neither output exists yet
            (tmp / "who").write_text(tag)
            (tmp / "big").write_bytes(tag.encode() * 100_000)
            barrier.wait(30)  # both have a finished temporary directory; now both rename
        q.put((tag, "ok"))
    except OutputExistsError as e:
        q.put((tag, e.one_line()))


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_racing_on_one_output_never_lose_a_finished_result(tmp_path, round_):
    out = tmp_path / "out"
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(out, tag, barrier, q)) for tag in ("A", "B")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    res = dict(q.get(timeout=5) for _ in procs)
    winners = [t for t, r in res.items() if r == "ok"]
    assert len(winners) == 1, res
    loser = ({"A", "B"} - set(winners)).pop()
    assert "another writer finished first" in res[loser]
    w = winners[0]
    assert (out / "who").read_text() == w and (out / "big").read_bytes() == w.encode() * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_writer_replaces_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert_nothing_written(tmp_path / "nothing")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
