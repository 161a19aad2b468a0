"""Library at scale: scan of a tree with many checkpoint dirs, rescan, and list/filter of 10,000 entries.

    python benchmarks/library_scale.py [--dirs 1000] [--entries 10000] [--workdir /tmp/ws-libscale]

Prints a table. The rescan must not re-hash any unchanged file (the digest
cache is keyed by path, size and mtime); the 10,000-entry queries must take
well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def build_tree(root: Path, n_dirs: int) -> Path:
    from warmstart import testing

    base = testing.make_base(root / "base")
    proto = testing.make_adapter(base, root / "proto", seed=0)
    tree = root / "runs"
    for i in range(n_dirs):
        run, step = divmod(i, 10)
        d = tree / f"run{run:03d}" / f"checkpoint-{(step + 1) * 100}"
        d.mkdir(parents=True)
        for f in proto.iterdir():
            shutil.copy(f, d / f.name)
        (d / "trainer_state.json").write_text(json.dumps(testing.trainer_state([(step + 1) * 100], [1.0 / (step + 1)])))
    return tree


def synthetic_rows(lib, n: int) -> None:
    """Insert n catalog rows directly (registration cost is measured by the scan rows)."""
    now = time.time()
    rows = [(f"/synthetic/run{i // 50}/checkpoint-{i % 50}", f"/synthetic/run{i // 50}/checkpoint-{i % 50}",
             "lora" if i % 3 else "full", f"base{i % 4}", "sig", f"fp{i}", f"task{i % 25}",
             json.dumps({"team": f"t{i % 7}"}), 1.0 / (1 + i % 50), i % 50, now) for i in range(n)]
    lib.db.execute("BEGIN")
    lib.db.executemany("INSERT INTO checkpoints (ref, path, kind, base_model, arch_signature, fingerprint, task, "
                       "tags, final_loss, global_step, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    lib.db.execute("COMMIT")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ws-libscale-"))
    os.environ["WARMSTART_CACHE_DIR"] = str(work / "cache")

    from warmstart.checkpoints import default_digest_cache
    from warmstart.library import Library

    tree = build_tree(work, args.dirs)
    rows = []
    with Library(work / "scan.db") as lib:
        cache = default_digest_cache()
        t, res = timed(lambda: lib.scan(tree))
        rows.append(("scan (first)", args.dirs, t, f"{len(res.added)} added, {cache.hashed_files} files hashed"))
        before = cache.hashed_files
        t, res = timed(lambda: lib.scan(tree))
        rows.append(("scan (again, unchanged)", args.dirs, t,
                     f"{len(res.unchanged)} unchanged, {cache.hashed_files - before} files hashed"))
    with Library(work / "big.db") as lib:
        synthetic_rows(lib, args.entries)
        for label, kw in [("list all", {}), ("list --task", {"task": "task3"}),
                          ("list --kind --base", {"kind": "lora", "base": "base1"}),
                          ("list --tag", {"tag": {"team": "t2"}})]:
            lib.list(**kw)  # warm the page cache
            t, res = timed(lambda kw=kw: lib.list(**kw))
            rows.append((label, lib.count(), t, f"{len(res)} rows"))

    print("| operation | entries | seconds | notes |\n|---|---:|---:|---|")
    for label, n, t, note in rows:
        print(f"| {label} | {n} | {t:.3f} | {note} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
