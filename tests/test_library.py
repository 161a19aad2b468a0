"""The SQLite catalog: registration, scan idempotence, queries, compatibility, cache, concurrency."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sqlite3
import time

import pytest

from warmstart.errors import LibraryError
from warmstart.library import SCHEMA_VERSION, Library


@pytest.fixture
def lib(tmp_path):
    with Library(tmp_path / "lib.db") as lib:
        yield lib


def test_add_records_base_task_metrics(lib, models):
    e, status = lib.add(models / "run_lora" / "checkpoint-20", tags={"lr": "2e-4"})
    assert status == "added"
    assert e.kind == "lora" and e.task == "task_c" and e.tags == {"lr": "2e-4"}
    assert e.base_model == str((models / "base").resolve())
    assert e.base_fingerprint  # the base is local, so its fingerprint is known
    assert e.global_step == 20 and e.final_loss == 1.0 and e.loss_history == [[10, 2.0], [20, 1.0]]
    assert e.lora["r"] == 4 and e.n_tensors == 8


def test_base_fingerprint_matches_base(lib, models):
    from warmstart.checkpoints import open_checkpoint

    e, _ = lib.add(models / "lora_a")
    assert e.base_fingerprint == open_checkpoint(models / "base").fingerprint()


def test_add_twice_is_unchanged_and_retag_updates(lib, models):
    lib.add(models / "ft_a")
    _, status = lib.add(models / "ft_a")
    assert status == "unchanged"
    e, status = lib.add(models / "ft_a", task="renamed")
    assert status == "updated" and e.task == "renamed"
    assert lib.count() == 1


def test_scan_registers_everything_and_is_idempotent(lib, models):
    res = lib.scan(models)
    names = sorted(e.path.split("/")[-1] for e in res.added)
    assert names == ["base", "base_sharded", "checkpoint-10", "checkpoint-20", "checkpoint-30",
                     "ft_a", "ft_b", "lora_a", "lora_b", "other_arch"]
    assert not res.failed
    run_entries = lib.list(run=str(models / "run_lora"))
    assert [e.global_step for e in run_entries] == [10, 20, 30]
    again = lib.scan(models)
    assert not again.added and not again.updated and len(again.unchanged) == 10
    assert lib.count() == 10


def test_scan_reports_broken_dirs_and_keeps_going(lib, models, tmp_path, copy_of):
    root = tmp_path / "tree"
    root.mkdir()
    copy_of(models / "ft_a", "tree/good")
    bad = copy_of(models / "ft_b", "tree/bad")
    (bad / "model.safetensors").write_bytes(b"\x00" * 3)
    res = lib.scan(root)
    assert len(res.added) == 1
    assert len(res.failed) == 1 and "bad/model.safetensors" in res.failed[0][1] and "truncated" in res.failed[0][1]


def test_filters_and_compatibility(lib, models):
    lib.scan(models)
    assert {e.task for e in lib.list(task="task_a")} == {"task_a"}
    assert len(lib.list(kind="lora")) == 5
    compat = lib.list(compatible_with=models / "base")
    names = {e.path.split("/")[-1] for e in compat}
    # same signature (full) or adapters on this base; other_arch excluded
    assert "other_arch" not in names
    assert {"base", "base_sharded", "ft_a", "ft_b", "lora_a", "lora_b", "checkpoint-10"} <= names
    assert {e.path.split("/")[-1] for e in lib.list(compatible_with=models / "other_arch")} == {"other_arch"}


def test_tag_filter(lib, models):
    lib.add(models / "ft_a", tags={"team": "nlp"})
    lib.add(models / "ft_b", tags={"team": "vision"})
    assert [e.path.split("/")[-1] for e in lib.list(tag={"team": "nlp"})] == ["ft_a"]


def test_vanished_files_are_reported_then_pruned(lib, models, copy_of):
    d = copy_of(models / "ft_a")
    lib.add(d)
    shutil.rmtree(d)
    (e,) = lib.list()
    assert e.missing
    assert [x.id for x in lib.prune_missing()] == [e.id]
    assert lib.count() == 0


def test_get_by_id_or_path_and_remove(lib, models):
    e, _ = lib.add(models / "lora_a")
    assert lib.get(e.id).ref == e.ref
    assert lib.get(str(models / "lora_a")).id == e.id
    lib.remove(e.id)
    with pytest.raises(LibraryError, match="no entry"):
        lib.get(e.id)


def test_score_cache_roundtrip(lib):
    assert lib.cached_score("fp", "ds", "n=8,seed=0", "loss") is None
    lib.put_score("fp", "ds", "n=8,seed=0", "loss", 1.25, {"n_tokens": 40})
    assert lib.cached_score("fp", "ds", "n=8,seed=0", "loss") == {"value": 1.25, "n_tokens": 40}
    assert lib.cached_score("fp", "ds", "n=8,seed=1", "loss") is None


# -- schema and damaged databases ------------------------------------------------


def test_migrations_recorded(lib):
    rows = lib.db.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert [tuple(r) for r in rows] == [(1, "m001_initial"), (2, "m002_provenance"), (3, "m003_prerank")]
    assert lib.schema_version == SCHEMA_VERSION


def test_newer_schema_refused(tmp_path):
    p = tmp_path / "lib.db"
    Library(p).close()
    db = sqlite3.connect(p)
    db.execute("INSERT INTO schema_migrations VALUES (99, 'm099_future', 0)")
    db.commit()
    db.close()
    with pytest.raises(LibraryError, match="schema version 99.*upgrade warmstart"):
        Library(p)


def test_corrupt_database(tmp_path):
    p = tmp_path / "lib.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LibraryError, match="lib.db.*corrupt"):
        Library(p)


def test_missing_library_when_not_creating(tmp_path):
    with pytest.raises(LibraryError, match="library not found"):
        Library(tmp_path / "none.db", create=False)


# -- concurrency: several processes, no lost rows, no "database is locked" --------


def _writer(db_path: str, paths: list[str], worker: int, n_scores: int, q) -> None:
    try:
        with Library(db_path) as lib:
            for p in paths:
                lib.add(p, tags={"w": str(worker)})
            for i in range(n_scores):
                lib.put_score(f"ck{worker}", "ds", f"n={i}", "loss", float(i))
        q.put("ok")
    except Exception as e:  # report to the parent instead of dying silently
        q.put(repr(e))


def test_concurrent_registration_and_scores(tmp_path, models, copy_of):
    dirs = [str(copy_of(models / "lora_a", f"a{i}")) for i in range(8)]
    db = str(tmp_path / "lib.db")
    Library(db).close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n_workers, n_scores = 4, 60
    procs = [ctx.Process(target=_writer, args=(db, dirs, w, n_scores, q)) for w in range(n_workers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * n_workers
    with Library(db) as lib:
        assert lib.count() == 8  # every process registered the same 8: no duplicates
        assert len(lib.scores()) == n_workers * n_scores  # 240 score writes, none lost


def test_locked_database_is_a_clear_error(tmp_path, models, monkeypatch):
    p = tmp_path / "lib.db"
    Library(p).close()
    holder = sqlite3.connect(p, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, forever
    monkeypatch.setenv("WARMSTART_DB_TIMEOUT", "0.3")
    try:
        with pytest.raises(LibraryError, match="locked by another process"):
            with Library(p) as lib:
                lib.add(models / "ft_a")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _register_forever(db_path: str, dirs: list[str]) -> None:
    with Library(db_path) as lib:
        while True:
            for d in dirs:
                lib.add(d, tags={"t": str(time.time())})  # every call is a real UPDATE


def test_killed_registration_leaves_catalog_consistent(tmp_path, models, copy_of):
    import os
    import signal

    dirs = [str(copy_of(models / "lora_a", f"a{i}")) for i in range(4)]
    db = str(tmp_path / "lib.db")
    Library(db).close()
    ctx = mp.get_context("spawn")
    for delay in (2.5, 3.0, 3.5):
        p = ctx.Process(target=_register_forever, args=(db, dirs))
        p.start()
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        with Library(db) as lib:
            assert lib.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert lib.count() <= 4
            assert all(e.fingerprint and e.arch_signature for e in lib.list())
    with Library(db) as lib:
        for d in dirs:
            lib.add(d)
        assert lib.count() == 4
