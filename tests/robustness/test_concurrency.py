"""Several processes scanning overlapping trees, registering and caching scores on one library at
once: no lost rows, no duplicates, no "database is locked" (the registration-only case is in
tests/test_library.py)."""

from __future__ import annotations

import multiprocessing as mp
import shutil

from warmstart.library import Library

N_PROCS, N_DIRS, N_SCORES = 4, 24, 50


def _worker(db: str, roots: list[str], worker: int, q) -> None:
    try:
        with Library(db) as lib:
            for r in roots:  # every worker scans every tree (overlapping work), in its own order
                lib.scan(r)
            for i in range(N_SCORES):
                lib.put_score(f"ck{worker}", "ds", f"n={i}", "loss", float(i), {"worker": worker})
        q.put("ok")
    except Exception as e:  # report to the parent instead of dying silently
        q.put(repr(e))


def test_concurrent_scans_and_score_writes(models, tmp_path):
    roots = []
    for t in range(3):  # three "runs" of checkpoint-* dirs
        root = tmp_path / f"run{t}"
        for i in range(N_DIRS // 3):
            shutil.copytree(models / "lora_a", root / f"checkpoint-{(i + 1) * 10}")
        roots.append(str(root))
    db = str(tmp_path / "lib.db")
    Library(db).close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(db, roots[w % 3:] + roots[:w % 3], w, q)) for w in range(N_PROCS)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * N_PROCS
    with Library(db) as lib:
        assert lib.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        entries = lib.list()
        assert len(entries) == N_DIRS and len({e.ref for e in entries}) == N_DIRS  # no duplicates, none lost
        assert len(lib.scores()) == N_PROCS * N_SCORES  # every score write kept
