"""The checkpoint library: a SQLite catalog of checkpoints and cached scores.

One file (``./warmstart.db`` by default, ``$WARMSTART_LIBRARY`` or
``--library`` to move it), WAL mode so that several processes can register
and cache scores at once. Schema changes are ordered migration functions
recorded in ``schema_migrations`` and applied when the library opens; a
database written by a newer warmstart is refused rather than damaged.

Heavy work (reading headers, hashing weights) happens outside transactions;
each write is one short ``BEGIN IMMEDIATE`` transaction, so a killed process
leaves the catalog consistent.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._prerank import METHOD, summarise
from .checkpoints import Checkpoint, TrainingMetrics, discover, open_checkpoint, resolve, signature_hash
from .errors import CheckpointError, LibraryError, WarmstartError

DEFAULT_NAME = "warmstart.db"


def default_library_path() -> Path:
    return Path(os.environ.get("WARMSTART_LIBRARY") or Path.cwd() / DEFAULT_NAME)


# ----------------------------------------------------------------------------
# Migrations: append only, never edit one that has shipped


def _script(db: sqlite3.Connection, sql: str) -> None:
    # Not executescript(): it COMMITs first, which would break the migration's transaction.
    for stmt in sql.split(";\n"):
        if stmt.strip():
            db.execute(stmt)


def m001_initial(db: sqlite3.Connection) -> None:
    _script(db, """
    CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ref TEXT NOT NULL UNIQUE,          -- absolute path, or hub id[@revision]
        path TEXT NOT NULL,                -- local directory it resolved to
        kind TEXT NOT NULL CHECK (kind IN ('full', 'lora')),
        base_model TEXT,
        base_fingerprint TEXT,
        arch_signature TEXT NOT NULL,      -- hash of tensor names + shapes
        fingerprint TEXT NOT NULL,         -- hash of the weights' content
        task TEXT,
        tags TEXT NOT NULL DEFAULT '{}',   -- JSON object
        run TEXT,                          -- training-run directory, for checkpoint-* entries
        global_step INTEGER,
        final_loss REAL,
        loss_history TEXT NOT NULL DEFAULT '[]',
        eval_metrics TEXT NOT NULL DEFAULT '{}',
        lora TEXT,                         -- JSON: r, alpha, use_rslora, target_modules, patterns
        n_tensors INTEGER,
        n_params INTEGER,
        size_bytes INTEGER,
        created_at REAL NOT NULL
    );
    CREATE INDEX idx_ck_base ON checkpoints(base_model);
    CREATE INDEX idx_ck_task ON checkpoints(task);
    CREATE INDEX idx_ck_sig ON checkpoints(arch_signature);
    CREATE INDEX idx_ck_fp ON checkpoints(fingerprint);
    CREATE TABLE signatures (hash TEXT PRIMARY KEY, tensors TEXT NOT NULL);
    CREATE TABLE scores (
        checkpoint_fp TEXT NOT NULL,
        dataset_fp TEXT NOT NULL,
        sample TEXT NOT NULL,              -- e.g. "n=256,seed=0"
        metric TEXT NOT NULL,
        value REAL NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        PRIMARY KEY (checkpoint_fp, dataset_fp, sample, metric)
    );
    """)


def m002_provenance(db: sqlite3.Connection) -> None:
    """What an entry was made from. ``derived`` entries (merges, transfers, the stages of a
    ``warmstart run``) are excluded from donor candidates by default; existing rows are
    classified from their files now, so an old catalog stops offering its merges as donors."""
    _script(db, """
    ALTER TABLE checkpoints ADD COLUMN derived INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE checkpoints ADD COLUMN provenance TEXT NOT NULL DEFAULT '{}';
    CREATE INDEX idx_ck_derived ON checkpoints(derived)
    """)
    for row_id, path in db.execute("SELECT id, path FROM checkpoints").fetchall():
        prov = provenance_of(Path(path))
        if prov:
            db.execute("UPDATE checkpoints SET derived=?, provenance=? WHERE id=?",
                       (int(prov["derived"]), json.dumps(prov, sort_keys=True), row_id))


def m003_prerank(db: sqlite3.Connection) -> None:
    """Data-free summaries of adapters for selection's pre-rank (:mod:`warmstart._prerank`), keyed by
    weights fingerprint and method. New and changed adapters get theirs when added; adapters catalogued
    before get theirs when a selection first needs them (select computes and stores a missing one)."""
    _script(db, """
    CREATE TABLE preranks (
        fingerprint TEXT NOT NULL,
        method TEXT NOT NULL,              -- e.g. "svd2": top-2 singular triplets per module
        data BLOB NOT NULL,                -- safetensors bytes
        created_at REAL NOT NULL,
        PRIMARY KEY (fingerprint, method)
    )
    """)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_initial, m002_provenance, m003_prerank]
SCHEMA_VERSION = len(MIGRATIONS)


# ----------------------------------------------------------------------------
# Entries


@dataclass
class Entry:
    id: int
    ref: str
    path: str
    kind: str
    base_model: str | None
    base_fingerprint: str | None
    arch_signature: str
    fingerprint: str
    task: str | None
    tags: dict[str, str]
    run: str | None
    global_step: int | None
    final_loss: float | None
    loss_history: list
    eval_metrics: dict
    lora: dict | None
    n_tensors: int | None
    n_params: int | None
    size_bytes: int | None
    created_at: float
    derived: bool = False  # made by warmstart from other checkpoints (merge, transfer, a run's stages)
    provenance: dict = field(default_factory=dict)  # made_by, from (input refs), run_dir/stage
    missing: bool = field(default=False)  # files vanished since registration

    @classmethod
    def from_row(cls, row: sqlite3.Row, db: str | Path | None = None, *, lenient: bool = False) -> Entry:
        """``lenient``: a field that is not valid JSON (a row edited by hand or by another tool) becomes
        its default and the fingerprint is blanked, so that `add` rewrites the whole row."""
        d = dict(row)
        for k, default in (("tags", {}), ("loss_history", []), ("eval_metrics", {}), ("lora", None),
                           ("provenance", {})):
            try:
                d[k] = json.loads(d[k]) if d.get(k) else default
            except (ValueError, TypeError, RecursionError):
                if not lenient:
                    raise LibraryError(f"catalog entry #{d.get('id')} has a {k} field that is not valid JSON",
                                       path=db, hint=f"re-register it with `warmstart library add {d.get('path')}`, "
                                       "which rewrites the row") from None
                d[k], d["fingerprint"] = default, ""
        d["derived"] = bool(d.get("derived"))
        d["missing"] = not Path(d["path"]).exists()
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScanResult:
    added: list[Entry] = field(default_factory=list)
    updated: list[Entry] = field(default_factory=list)
    unchanged: list[Entry] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)


# ----------------------------------------------------------------------------
# The library


class Library:
    """The catalog. Open with ``Library(path)``; safe to use from several processes."""

    def __init__(self, path: str | Path | None = None, *, create: bool = True):
        self.path = Path(path) if path else default_library_path()
        # How long to wait for another process's write lock before giving up with a clear error.
        self.timeout = float(os.environ.get("WARMSTART_DB_TIMEOUT", "60"))
        if not create and not self.path.exists():
            raise LibraryError("library not found", path=self.path,
                               hint="register checkpoints with `warmstart library add` or `scan` first")
        if self.path.is_dir():
            raise LibraryError("library path is a directory, expected a database file", path=self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                      check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise LibraryError(f"database is locked by another process (waited {self.timeout:g}s)",
                                   path=self.path, hint="retry when the other warmstart process finishes") from None
            raise LibraryError(f"cannot open library ({e})", path=self.path) from None
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"not a warmstart library or corrupt database ({e})", path=self.path) from None

    # -- schema ----------------------------------------------------------
    def _migrate(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                       "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
            done = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
            newest = max(done, default=0)
            if newest > SCHEMA_VERSION:
                raise LibraryError(f"library has schema version {newest}, this warmstart knows up to "
                                   f"{SCHEMA_VERSION}", path=self.path, hint="upgrade warmstart")
            for version, fn in enumerate(MIGRATIONS, start=1):
                if version not in done:
                    fn(db)
                    db.execute("INSERT INTO schema_migrations VALUES (?,?,?)", (version, fn.__name__, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        """One statement in its own immediate transaction, retried while another writer holds the lock."""
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    cur = self.db.execute(sql, tuple(params))
                    self.db.execute("COMMIT")
                    return cur
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise LibraryError(f"database write failed ({e})", path=self.path) from None
                time.sleep(0.05 * (1 + attempt % 10))
        raise LibraryError(f"database is locked by another process (waited {self.timeout:g}s)", path=self.path,
                           hint="retry when the other warmstart process finishes")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- registering -----------------------------------------------------
    def add(self, ref: str | Path, *, task: str | None = None, tags: dict[str, str] | None = None,
            base: str | None = None, allow_pickle: bool = False, run: str | None = None) -> tuple[Entry, str]:
        """Register one checkpoint. Returns the entry and 'added', 'updated' or 'unchanged'."""
        ck = open_checkpoint(ref, allow_pickle=allow_pickle)
        existing = self._get_by_ref(ck.ref, lenient=True)
        fp = ck.fingerprint()
        prov = provenance_of(ck.path, ck.meta)
        if existing and existing.fingerprint == fp and task is None and not tags and base is None \
                and existing.provenance == prov and existing.global_step == _metrics(ck).global_step:
            return existing, "unchanged"
        sig = ck.signature()  # names + shapes from the headers; hashed once here, stored once per architecture
        row = self._row_for(ck, fp, sig, task=task, tags=tags, base=base, run=run, existing=existing)
        row.update(derived=int(prov.get("derived", False)), provenance=json.dumps(prov, sort_keys=True))
        self._write("INSERT OR IGNORE INTO signatures VALUES (?,?)", (row["arch_signature"], json.dumps(sig)))
        cols = [c for c in row if c != "created_at"] if existing else list(row)
        if existing:
            if existing.fingerprint == fp and all(_same(getattr(existing, c), row[c]) for c in cols):
                return existing, "unchanged"
            self._write(f"UPDATE checkpoints SET {', '.join(f'{c}=?' for c in cols)} WHERE id=?",
                        [row[c] for c in cols] + [existing.id])
            self.ensure_prerank(fp, ck.path, kind=ck.kind)
            return self._get_by_ref(ck.ref), "updated"
        self._write(f"INSERT INTO checkpoints ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                    f"ON CONFLICT(ref) DO NOTHING", [row[c] for c in cols])
        self.ensure_prerank(fp, ck.path, kind=ck.kind)
        return self._get_by_ref(ck.ref), "added"

    def _row_for(self, ck: Checkpoint, fp: str, sig: dict, *, task, tags, base, run,
                 existing: Entry | None) -> dict:
        m = _metrics(ck)
        reader = ck.weights()
        base_model = base or ck.base_model or (existing.base_model if existing else None)
        merged_tags = dict(existing.tags if existing else {})
        merged_tags.update(ck.meta.get("tags") or {})
        merged_tags.update(tags or {})
        return {
            "ref": ck.ref, "path": str(ck.path), "kind": ck.kind,
            "base_model": base_model,
            "base_fingerprint": _base_fingerprint(base_model) if base_model else None,
            "arch_signature": signature_hash(sig), "fingerprint": fp,
            "task": task or ck.task or (existing.task if existing else None) or _task_from_meta(ck),
            "tags": json.dumps(merged_tags, sort_keys=True),
            "run": run or (existing.run if existing else None),
            "global_step": m.global_step,
            "final_loss": m.final_loss,
            "loss_history": json.dumps(m.loss_history),
            "eval_metrics": json.dumps(m.eval_metrics),
            "lora": json.dumps(ck.lora.to_dict()) if ck.lora else None,
            "n_tensors": len(reader),
            "n_params": sum(x.numel for x in reader.meta.values()),
            "size_bytes": sum(f.stat().st_size for f in ck.weight_files),
            "created_at": time.time(),
        }

    def scan(self, root: str | Path, *, task: str | None = None, tags: dict[str, str] | None = None,
             base: str | None = None, allow_pickle: bool = False,
             progress: Callable[[int, int, str], None] | None = None) -> ScanResult:
        """Register every checkpoint under ``root``. Idempotent: a second scan adds nothing.

        A directory that fails to open is reported in ``failed`` with its reason;
        the others are still registered.
        """
        dirs = discover(root)
        res = ScanResult()
        for i, d in enumerate(dirs):
            if progress:
                progress(i, len(dirs), str(d))
            run = str(d.parent) if d.name.startswith("checkpoint-") else None
            try:
                entry, status = self.add(d, task=task, tags=tags, base=base, allow_pickle=allow_pickle, run=run)
            except WarmstartError as e:
                res.failed.append((str(d), e.one_line()))
                continue
            getattr(res, status).append(entry)
        if progress:
            progress(len(dirs), len(dirs), "")
        return res

    def remove(self, entry_id: int) -> Entry:
        e = self.get(entry_id)
        self._write("DELETE FROM checkpoints WHERE id=?", (entry_id,))
        return e

    def prune_missing(self) -> list[Entry]:
        """Remove entries whose files are gone; returns what was removed."""
        gone = [e for e in self.list() if e.missing]
        for e in gone:
            self._write("DELETE FROM checkpoints WHERE id=?", (e.id,))
        return gone

    # -- queries ---------------------------------------------------------
    def _get_by_ref(self, ref: str, *, lenient: bool = False) -> Entry | None:
        row = self.db.execute("SELECT * FROM checkpoints WHERE ref=?", (ref,)).fetchone()
        return Entry.from_row(row, self.path, lenient=lenient) if row else None

    def get(self, entry_id: int | str) -> Entry:
        """By numeric id, or by reference (path or hub id)."""
        row = None
        if isinstance(entry_id, int) or str(entry_id).isdigit():
            row = self.db.execute("SELECT * FROM checkpoints WHERE id=?", (int(entry_id),)).fetchone()
        if row is None:
            ref = str(entry_id)
            p = Path(ref).expanduser()
            row = self.db.execute("SELECT * FROM checkpoints WHERE ref=? OR path=?",
                                  (str(p.resolve()) if p.exists() else ref, ref)).fetchone()
        if row is None:
            raise LibraryError(f"no entry {entry_id!r}", path=self.path, hint="see `warmstart library list`")
        return Entry.from_row(row, self.path)

    def list(self, *, base: str | None = None, task: str | None = None, kind: str | None = None,
             tag: dict[str, str] | None = None, compatible_with: str | Path | None = None,
             run: str | None = None, derived: bool | None = None) -> list[Entry]:
        """Entries matching every filter given; ``derived=False`` leaves out merges, transfers and
        the stages of warmstart runs (see :func:`provenance_of`)."""
        where, params = [], []
        if derived is not None:
            where.append("derived=?")
            params.append(int(derived))
        if base:
            where.append("(base_model=? OR base_model=?)")
            params += [base, _abs_or_same(base)]
        if task:
            where.append("task=?")
            params.append(task)
        if kind:
            where.append("kind=?")
            params.append(kind)
        if run:
            where.append("run=?")
            params.append(_abs_or_same(run))
        for k, v in (tag or {}).items():
            where.append("json_extract(tags, ?)=?")
            params += [f'$."{k}"', v]
        if compatible_with is not None:
            clause, cparams = self._compatible_clause(compatible_with)
            where.append(clause)
            params += cparams
        sql = "SELECT * FROM checkpoints" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [Entry.from_row(r, self.path) for r in self.db.execute(sql, params)]

    def _compatible_clause(self, base_ref: str | Path) -> tuple[str, list]:
        """Full models with the base's architecture signature; adapters whose base is this base."""
        base_ck = open_checkpoint(base_ref)
        if base_ck.kind != "full":
            raise CheckpointError("--compatible-with needs a full base model, got a LoRA adapter", path=base_ck.path)
        sig = base_ck.signature_hash()
        fp = base_ck.fingerprint()
        names = {str(base_ck.path), base_ck.ref} | (set() if isinstance(base_ref, Checkpoint) else {str(base_ref)})
        ph = ",".join("?" * len(names))
        return (f"((kind='full' AND arch_signature=?) OR "
                f"(kind='lora' AND (base_fingerprint=? OR base_model IN ({ph}))))", [sig, fp, *names])

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]

    def signature(self, sig_hash: str) -> dict[str, list[int]]:
        row = self.db.execute("SELECT tensors FROM signatures WHERE hash=?", (sig_hash,)).fetchone()
        return dict(json.loads(row[0])) if row else {}

    # -- score cache (filled by the selection stage) ----------------------
    def cached_score(self, checkpoint_fp: str, dataset_fp: str, sample: str, metric: str) -> dict | None:
        row = self.db.execute("SELECT value, extra FROM scores WHERE checkpoint_fp=? AND dataset_fp=? "
                              "AND sample=? AND metric=?", (checkpoint_fp, dataset_fp, sample, metric)).fetchone()
        if row is None:
            return None
        return {"value": row[0], **json.loads(row[1])}

    def put_score(self, checkpoint_fp: str, dataset_fp: str, sample: str, metric: str, value: float,
                  extra: dict | None = None) -> None:
        self._write("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?)",
                    (checkpoint_fp, dataset_fp, sample, metric, float(value), json.dumps(extra or {}), time.time()))

    # -- pre-rank summaries (selection at scale) --------------------------
    def prerank(self, fingerprint: str, method: str | None = None) -> bytes | None:
        r = self.db.execute("SELECT data FROM preranks WHERE fingerprint=? AND method=?",
                            (fingerprint, method or METHOD)).fetchone()
        return bytes(r[0]) if r else None

    def prerank_header(self, fingerprint: str, method: str | None = None) -> bytes | None:
        """The first bytes of a stored summary, through its safetensors header (enough for
        :func:`warmstart._prerank.modules_of`), without reading the tensors: SQLite's incremental
        blob I/O reads only the pages asked for. Selection at 1,000 candidates read every summary
        twice before (once for the modules, once to score): 500 MB instead of 250 MB."""
        r = self.db.execute("SELECT rowid FROM preranks WHERE fingerprint=? AND method=?",
                            (fingerprint, method or METHOD)).fetchone()
        if r is None:
            return None
        with self.db.blobopen("preranks", "data", r[0], readonly=True) as blob:
            head = blob.read(8)
            return head + blob.read(int.from_bytes(head, "little"))

    def put_prerank(self, fingerprint: str, data: bytes, method: str | None = None) -> None:
        self._write("INSERT OR REPLACE INTO preranks VALUES (?,?,?,?)",
                    (fingerprint, method or METHOD, sqlite3.Binary(data), time.time()))

    def ensure_prerank(self, fingerprint: str, path: str | Path, *, kind: str = "lora") -> bytes | None:
        """The stored summary of an adapter, computed and stored first if missing (None: not a plain LoRA).
        Computing it reads the factors once and decomposes r×r matrices: milliseconds per adapter."""
        if kind != "lora":
            return None
        data = self.prerank(fingerprint)
        if data is None:
            try:
                data = summarise(path)
            except WarmstartError:  # e.g. NaN factors: scoring the candidate reports it, with its path
                return None
            if data is not None:
                self.put_prerank(fingerprint, data)
        return data

    def scores(self, dataset_fp: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM scores", []
        if dataset_fp:
            sql, params = sql + " WHERE dataset_fp=?", [dataset_fp]
        return [dict(r) for r in self.db.execute(sql, params)]


# ----------------------------------------------------------------------------
# warmstart's own metadata: training numbers and provenance from warmstart.json

RUN_STAGES = ("merge", "warm", "baseline")  # stage directories of `warmstart run` that hold checkpoints
_SPLIT_NAMES = {"train", "training", "validation", "valid", "val", "dev", "test", "eval", "data"}


def task_name_from_path(path: str | Path | None) -> str | None:
    """A task name from a data file: its stem, or its folder's name for split files
    (``capitals/train.jsonl`` is task ``capitals``, not ``train``)."""
    if not path:
        return None
    p = Path(path)
    name = p.stem if p.suffix else p.name
    if name.lower() in _SPLIT_NAMES and p.parent.name:
        return p.parent.name
    return name or None


def _metrics(ck: Checkpoint):
    """trainer_state.json when there is one, else a ``warmstart finetune`` output's own record
    (its ``final`` curve point and curve.json): finetune removes the Trainer's state files."""
    if ck.metrics is not None:
        return ck.metrics
    meta = ck.meta
    final = meta.get("final") if meta.get("kind") == "finetune" else None
    if not isinstance(final, dict):
        return TrainingMetrics()
    history = []
    try:
        points = json.loads((ck.path / "curve.json").read_text()).get("points") or []
        history = [[int(q["step"]), float(q["train_loss"])] for q in points
                   if isinstance(q, dict) and _num(q.get("step")) and _num(q.get("train_loss"))]
    except (OSError, ValueError, AttributeError):
        pass  # the curve is optional for cataloguing; the final point still gives step and loss
    return TrainingMetrics(
        global_step=int(final["step"]) if _num(final.get("step")) else None,
        final_loss=float(final["train_loss"]) if _num(final.get("train_loss")) else None,
        loss_history=history,
        eval_metrics={k: float(v) for k, v in final.items() if k.startswith("eval_") and _num(v)})


def _task_from_meta(ck: Checkpoint) -> str | None:
    """For warmstart's outputs that predate the ``task`` field: the run's target, or the data file."""
    run = _run_stage(ck.path)
    if run:
        return task_name_from_path(run.get("target"))
    data = ck.meta.get("train_data")
    return task_name_from_path(data.get("path")) if isinstance(data, dict) else None


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_meta_quietly(d: Path) -> dict:
    try:
        m = json.loads((d / "warmstart.json").read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _made_by(meta: dict) -> str | None:
    if meta.get("made_by") == "warmstart merge":
        return "merge"
    if meta.get("warmstart") == "transfer":
        return "transfer"
    if meta.get("kind") == "finetune":
        return "finetune"
    return None


def _run_stage(path: Path) -> dict:
    """``{run_dir, stage, target}`` when ``path`` lies in a merge/warm/baseline stage of a
    ``warmstart run`` directory (recognised by its run.json), else ``{}``."""
    path = path.resolve()
    for anc in list(path.parents)[:4]:
        f = anc / "run.json"
        if f.is_file() and path.relative_to(anc).parts[0] in RUN_STAGES:
            try:
                info = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and "config" in info and "target" in info:
                return {"run_dir": str(anc), "stage": path.relative_to(anc).parts[0],
                        "target": info.get("target")}
    return {}


def provenance_of(path: str | Path, meta: dict | None = None) -> dict:
    """What a checkpoint was made from, read from warmstart's own files; ``{}`` for a checkpoint
    warmstart did not make.

    ``made_by`` (merge, transfer, finetune), ``from`` (input references) and, inside a
    ``warmstart run`` directory, ``run_dir``/``stage``/``target``. ``derived`` is true for
    merges, transfers, every stage of a run (the warm start was made from the donors, the
    baseline from the run's own target) and a fine-tune whose initialization is itself derived:
    such entries are never picked as donors unless asked for (``select(include_derived=True)``).
    """
    path = Path(path)
    meta = _read_meta_quietly(path) if meta is None else meta
    made_by = _made_by(meta)
    prov: dict[str, Any] = {}
    src: list[str] = []
    if made_by == "merge":
        src = [str(i.get("ref")) for i in meta.get("inputs") or [] if isinstance(i, dict) and i.get("role") != "base"]
    elif made_by == "transfer":
        src = [str(meta["finetuned"])] if meta.get("finetuned") else []
    elif made_by == "finetune" and isinstance(meta.get("init"), dict):
        src = [str(x) for x in (meta["init"].get("model"), meta["init"].get("adapter")) if x]
    if made_by:
        prov = {"made_by": made_by, "from": src}
    prov.update(_run_stage(path))
    if not prov:
        return {}
    init_derived = made_by == "finetune" and any(
        _made_by(_read_meta_quietly(Path(x))) in ("merge", "transfer") or _run_stage(Path(x)) for x in src)
    prov["derived"] = made_by in ("merge", "transfer") or "stage" in prov or init_derived
    return prov


def _same(a, b) -> bool:
    if isinstance(a, (dict, list)) or a is None and isinstance(b, str):
        try:
            return json.loads(b) == a if isinstance(b, str) else a == b
        except ValueError:
            return False
    return a == b


def _abs_or_same(s: str) -> str:
    p = Path(s).expanduser()
    return str(p.resolve()) if p.exists() else s


_base_fp_memo: dict[str, str | None] = {}


def _base_fingerprint(base: str) -> str | None:
    """Fingerprint of the base model when it is available locally; None otherwise."""
    if base in _base_fp_memo:
        return _base_fp_memo[base]
    fp = None
    try:
        p = Path(base).expanduser()
        if p.exists() or os.environ.get("HF_HUB_OFFLINE"):
            resolve(base)
            fp = open_checkpoint(base).fingerprint()
    except WarmstartError:
        fp = None
    _base_fp_memo[base] = fp
    return fp


__all__ = [
    "SCHEMA_VERSION",
    "Entry",
    "Library",
    "ScanResult",
    "default_library_path",
    "provenance_of",
    "task_name_from_path",
]
