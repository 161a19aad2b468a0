"""The run directory contract: layout, stage markers, evaluation curves, the selection file.

A run directory (``warmstart run --out RUN``) holds ``run.json`` (the run's settings) and one
directory per stage (:data:`STAGES`). A stage directory is trusted only once it holds its marker,
``stage.done.json``: ``{"stage", "wall_s", "outputs", "finished"}``, where ``outputs`` is the
stage's own record (:class:`SplitOutputs`, :class:`SelectOutputs`, ...). The training stages hold
``curve.json`` / ``curve.csv`` (:class:`Curve`), the select stage the selection file
(:func:`read_selection` / :func:`write_selection`, the one reader and writer of that format, which
``warmstart select --out`` and ``warmstart merge --selection`` use too).

This module only reads and writes these files; :mod:`warmstart.pipeline` decides when, and
:mod:`warmstart.report` reads nothing else. The on-disk format is that of earlier versions, so old
run directories resume and re-render unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ._io import atomic_write_json, atomic_write_text, output_root, read_config, read_json
from .errors import ConfigError, DataError
from . import metrics as _metrics
from .select import Selection

STAGES = ("split", "select", "merge", "warm", "baseline", "report")
MARKER = "stage.done.json"
RUN_FILE = "run.json"
CURVE_FILE = "curve.json"
SELECTION_FILE = "selection.yaml"  # in RUN/select


# ----------------------------------------------------------------------------
# Stage markers


class _Outputs:
    """A stage's ``outputs`` record. Read from a file, it writes back exactly the keys it was read
    with (old markers lack newer fields; a re-rendered report copies them as they are); made in
    code, every field but the ``OPTIONAL`` ones left None."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    _keys: list[str] | None = None  # the file's keys, in order (None: made in code)
    _extra: ClassVar[dict] = {}  # keys this version does not know, kept as they are

    @classmethod
    def from_dict(cls, d: dict) -> _Outputs:
        known = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        out._keys, out._extra = list(d), {k: v for k, v in d.items() if k not in known}
        return out

    def to_dict(self) -> dict:
        if self._keys is not None:
            return {k: self._extra[k] if k in self._extra else getattr(self, k) for k in self._keys}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self.OPTIONAL or getattr(self, f.name) is not None}


@dataclass
class SplitOutputs(_Outputs):
    format: str | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    eval_rows_given: int | None = None  # before train.eval_limit
    eval_limit: int | None = None
    eval_source: str | None = None  # "file" (--eval) or "carved" (from the target)
    train_fingerprint: str | None = None
    eval_fingerprint: str | None = None


@dataclass
class SelectOutputs(_Outputs):
    OPTIONAL = ("skipped",)
    selection: str | None = SELECTION_FILE  # None: nothing selected (``skipped`` says why)
    donors: list[dict] | None = None
    ranking: list[dict] | None = None
    metric: str | None = None
    scorer: str | None = None
    sample: str | None = None
    sample_rows: int | None = None  # None in runs selected before the marker recorded its sample
    candidates: int | None = None
    cached: int | None = None
    excluded: list | None = None
    skipped: str | None = None  # why nothing was scored (a transfer run: "transfer")


@dataclass
class MergeOutputs(_Outputs):
    """The warm start's initialisation: a merge of the donors (``recipe``, ``result``) or, in a
    transfer run, the transferred model or adapter (``transfer``: inputs, α, compatibility numbers)."""

    OPTIONAL = ("result", "note", "transfer")
    init: str = ""  # "model" (in the merge stage's directory) or the base's absolute path
    recipe: dict | None = None
    result: dict | None = None
    note: str | None = None
    transfer: dict | None = None

    def init_path(self, stage_dir: Path) -> Path:
        init = Path(self.init)
        return init if init.is_absolute() else stage_dir / init


@dataclass
class TrainOutputs(_Outputs):
    init: str = ""
    kind: str = ""  # "lora" or "full"
    train_time_s: float = 0.0
    final: dict = field(default_factory=dict)


@dataclass
class ReportOutputs(_Outputs):
    files: list[str] = field(default_factory=list)


OUTPUTS: dict[str, type[_Outputs]] = {"split": SplitOutputs, "select": SelectOutputs, "merge": MergeOutputs,
                                      "warm": TrainOutputs, "baseline": TrainOutputs, "report": ReportOutputs}


@dataclass
class Marker:
    """A finished stage: its wall time and outputs (``stage.done.json``)."""

    stage: str
    wall_s: float
    outputs: Any  # the stage's _Outputs record
    finished: str = ""

    @classmethod
    def done(cls, stage: str, t0: float, outputs: _Outputs) -> Marker:
        """The marker of a stage that started at ``t0`` (``time.perf_counter()``) and ends now."""
        return cls(stage, round(time.perf_counter() - t0, 3), outputs,
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_dict(self) -> dict:
        return {"stage": self.stage, "wall_s": self.wall_s, "outputs": self.outputs.to_dict(),
                "finished": self.finished}

    @classmethod
    def from_dict(cls, d: Any, stage: str, path: Path) -> Marker:
        """``stage``'s marker read from ``path`` (its outputs typed by the stage's record)."""
        if not (isinstance(d, dict) and finite(d.get("wall_s")) and isinstance(d.get("outputs"), dict)):
            raise DataError("not a stage marker (needs wall_s and an outputs mapping)", path=path)
        return cls(d.get("stage", stage), d["wall_s"], OUTPUTS[stage].from_dict(d["outputs"]), d.get("finished", ""))

    def write(self, stage_dir: Path) -> None:
        atomic_write_json(Path(stage_dir) / MARKER, self.to_dict())


# ----------------------------------------------------------------------------
# The run directory


class RunDir:
    """Paths of a run and its completion markers."""

    def __init__(self, root: str | Path):
        self.root = output_root(root)

    def stage(self, name: str) -> Path:
        return self.root / name

    def marker(self, name: str) -> dict | None:
        """The stage's marker as the JSON it is on disk; None if unfinished (no marker, or a torn one)."""
        p = self.stage(name) / MARKER
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            return None  # a torn marker means an unfinished stage

    def read_marker(self, name: str) -> Marker | None:
        """The stage's marker, typed; None if unfinished."""
        d = self.marker(name)
        return None if d is None else Marker.from_dict(d, name, self.stage(name) / MARKER)

    def done(self, name: str) -> bool:
        return self.marker(name) is not None

    def stage_times(self) -> dict[str, float]:
        return {s: m["wall_s"] for s in STAGES if (m := self.marker(s))}

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    def is_run(self) -> bool:
        return self.run_file.is_file()

    def info(self) -> dict:
        return read_json(self.run_file, "run file")

    def update_info(self, **fields: Any) -> None:
        atomic_write_json(self.run_file, {**self.info(), **fields})

    def split_files(self) -> tuple[Path, Path]:
        """train.jsonl and eval.jsonl of the split stage: the rows every later stage reads."""
        d = self.stage("split")
        return d / "train.jsonl", d / "eval.jsonl"

    def selection_file(self) -> Path:
        return self.stage("select") / SELECTION_FILE

    def curve(self, name: str) -> Curve:
        return Curve.from_file(self.stage(name))


# ----------------------------------------------------------------------------
# Curves: one row per evaluation (step, time, train loss, eval metrics)


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Curve:
    """An evaluation curve. Each point has ``step``, ``time_s`` (training time so far,
    evaluation excluded), ``wall_s`` (since start, evaluation included), ``train_loss``
    and ``eval_*`` metrics."""

    points: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> Curve:
        path = Path(path)
        if path.is_dir():
            path = path / CURVE_FILE
        d = read_json(path, "curve file")
        if not isinstance(d, dict) or not isinstance(d.get("points"), list):
            raise DataError("curve file has no 'points' list", path=path)
        if not isinstance(d.get("meta", {}), dict):
            raise DataError("curve file's 'meta' is not a mapping", path=path)
        for i, p in enumerate(d["points"]):  # the report does arithmetic on every value
            num = (int, float, type(None))
            if not isinstance(p, dict) or not isinstance(p.get("step"), (int, float)) or \
                    not all(isinstance(v, num) for v in p.values()):
                raise DataError(f"curve point {i} is not a mapping of numbers with a 'step'", path=path)
        return cls(points=d["points"], meta=d.get("meta", {}))

    def to_dict(self) -> dict:
        return {"meta": self.meta, "points": self.points}

    def columns(self) -> list[str]:
        cols: list[str] = []
        for p in self.points:
            cols += [k for k in p if k not in cols]
        return cols

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        w.writeheader()
        for p in self.points:
            w.writerow({k: ("" if v is None else v) for k, v in p.items()})
        return buf.getvalue()

    def write(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / CURVE_FILE, self.to_dict())
        atomic_write_text(out_dir / "curve.csv", self.to_csv())

    def series(self, key: str, x: str = "step") -> list[tuple[float, float]]:
        """(x, value) pairs where ``key`` was logged, in step order."""
        pts = [p for p in self.points if finite(p.get(key)) and finite(p.get(x))]
        pts.sort(key=lambda p: p["step"])
        return [(float(p[x]), float(p[key])) for p in pts]

    def final(self, key: str) -> float | None:
        s = self.series(key)
        return s[-1][1] if s else None

    @property
    def steps(self) -> int:
        return int(self.meta.get("max_steps") or max((p["step"] for p in self.points), default=0))

    @property
    def train_time_s(self) -> float:
        return float(self.meta.get("train_time_s") or max((p.get("time_s") or 0 for p in self.points), default=0))


# ----------------------------------------------------------------------------
# The selection file (written by `select`, a run's select stage, `optimize`; read by merge and runs)


@dataclass
class SelectionFile:
    """A selection file as read: ``data`` is the mapping as written (:class:`Selection`'s fields, or
    the subset `warmstart optimize` writes), checked so that a hand edit fails here, naming the file."""

    path: Path
    data: dict

    @property
    def donors(self) -> list[dict]:
        return self.data["donors"]

    @property
    def higher_is_better(self) -> bool:
        """As recorded, else from the metric table (a file written before the field existed)."""
        hib = self.data.get("higher_is_better")
        return hib if isinstance(hib, bool) else _metrics.get(self.metric).higher_is_better

    @property
    def metric(self) -> str:
        return str(self.data.get("metric") or "loss")

    def plan_dict(self, *, method: str | None = None, **overrides: Any) -> dict:
        """A merge plan (``MergePlan.from_dict``'s input): ``base``, ``donors[].ref/.weight/.score``,
        and the file's ``method``/``params`` (optimize's weights were searched for that method)
        unless ``method`` is given."""
        if not self.donors:
            raise ConfigError("selection file needs a non-empty 'donors' list", path=self.path)
        if method is None:
            method = str(self.data.get("method") or "linear")
            if isinstance(self.data.get("params"), dict) and "params" not in overrides:
                overrides["params"] = dict(self.data["params"])
        models = [{"ref": str(d["ref"]), "weight": d.get("weight"), "score": d.get("score")} for d in self.donors]
        return {"models": models, "method": method, "base": self.data.get("base"),
                "higher_is_better": self.higher_is_better, **overrides}

    def selection(self) -> Selection:
        """The file as a :class:`Selection` (only `select` writes every field it needs)."""
        missing = {"target", "base", "metric", "ranking"} - set(self.data)
        if missing:
            raise ConfigError(f"selection file lacks {sorted(missing)}", path=self.path)
        d = {"scorer": "loss", "weighting": {}, **self.data, "higher_is_better": self.higher_is_better}
        return Selection(**{k: v for k, v in d.items() if k in Selection.__dataclass_fields__})


def read_selection(path: str | Path) -> SelectionFile:
    """Read and check a selection file (YAML, or JSON by suffix); every problem is one error naming it."""
    path = Path(path)
    data = read_config(path, "selection file")
    if not isinstance(data, dict):
        raise ConfigError("selection file must hold a mapping", path=path)
    if not isinstance(data.get("donors"), list):
        raise ConfigError("selection file needs a 'donors' list", path=path)
    for d in data["donors"]:
        if not isinstance(d, dict) or not isinstance(d.get("ref"), str) or not d["ref"]:
            raise ConfigError(f"selection donor without a 'ref' path: {d!r}", path=path)
        _check_types(d, path)
    _check_types({k: data[k] for k in ("base", "method", "metric", "params") if k in data}, path)
    if not isinstance(data.get("higher_is_better"), bool):
        try:
            _metrics.get(str(data.get("metric") or "loss"))
        except ConfigError as e:
            raise ConfigError(f"selection file: {e.message}", path=path, hint=e.hint) from None
    return SelectionFile(path, data)


def _check_types(d: dict, path: Path) -> None:
    """A selection file may be edited by hand: a string where a weight belongs would fail deep in
    the merge with a TypeError instead of naming the field."""
    def num(v):
        return v is None or finite(v)

    want = {"weight": (num, "a finite number"), "score": (num, "a finite number"),
            "base": (lambda v: v is None or (isinstance(v, str) and v), "a path or hub id"),
            "method": (lambda v: v is None or isinstance(v, str), "a method name"),
            "metric": (lambda v: v is None or isinstance(v, str), "a metric name"),
            "params": (lambda v: v is None or isinstance(v, dict), "a mapping")}
    for k, (ok, what) in want.items():
        if k in d and not ok(d[k]):
            raise ConfigError(f"selection field {k!r} must be {what}, got {d[k]!r}", path=path)


def write_selection(sel: Selection | dict, path: str | Path, *, force: bool = True) -> Path:
    """Write a selection atomically, YAML (or JSON by suffix); ``force=False`` never replaces a file
    that appeared meanwhile (another writer that finished first)."""
    path = Path(path)
    d = sel if isinstance(sel, dict) else sel.to_dict()
    if path.suffix.lower() == ".json":
        atomic_write_json(path, d, force=force)
    else:
        atomic_write_text(path, yaml.safe_dump(d, sort_keys=False, allow_unicode=True), force=force)
    return path


__all__ = ["CURVE_FILE", "MARKER", "OUTPUTS", "RUN_FILE", "SELECTION_FILE", "STAGES", "Curve", "Marker",
           "MergeOutputs", "ReportOutputs", "RunDir", "SelectOutputs", "SelectionFile", "SplitOutputs",
           "TrainOutputs", "finite", "read_selection", "write_selection"]
