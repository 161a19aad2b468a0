"""A run's settings: :class:`RunConfig` and its checks (moved out of ``pipeline`` for #12).

``pipeline`` re-exports everything here, so ``from warmstart.pipeline import RunConfig`` keeps working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class RunConfig:
    """Settings of a run (paths are arguments). ``select`` and ``merge`` are passed through
    to :func:`warmstart.select.select` and :meth:`MergePlan.from_selection`."""

    train: Any = None  # TrainConfig; default TrainConfig()
    select: dict[str, Any] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)
    eval_fraction: float = 0.2
    eval_max: int | None = 200  # most rows carved from the target (no effect on a given eval file)
    split_seed: int = 0
    baseline: bool = True

    def __post_init__(self):
        from .train import TrainConfig

        if self.train is None:
            self.train = TrainConfig()
        elif isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train, validate=False)  # validate() reports all at once

    def validate(self) -> RunConfig:
        errs = self.train.errors()
        if not (isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1):
            errs.append(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.eval_max is not None and (not isinstance(self.eval_max, int) or self.eval_max < 1):
            errs.append(f"eval_max must be a positive integer or null, got {self.eval_max!r}")
        for name in ("select", "merge"):
            opts = getattr(self, name)
            if not isinstance(opts, dict):
                errs.append(f"{name} must be a mapping of options")
            elif opts:
                unknown = sorted(set(opts) - _known_options(name))
                if unknown:
                    errs.append(f"unknown {name} option(s) {', '.join(unknown)} (known: "
                                f"{', '.join(sorted(_known_options(name)))})")
                if name == "select":
                    errs += _select_errors(opts)
        if errs:
            raise ConfigError("invalid run config: " + "; ".join(errs))
        return self

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> RunConfig:
        """A copy with ``section.key=value`` assignments applied (the CLI's ``--set``).

        ``section`` is ``train``, ``select`` or ``merge`` (``merge.params.density=0.5`` reaches a
        nested key) or absent for a top-level field (``eval_max=null``); ``value`` is read as YAML
        (``null``, ``true``, ``[q_proj, v_proj]``, ``2e-4``). Every key is checked, all at once.
        """
        import copy

        d = copy.deepcopy(self.to_dict())  # to_dict shares the select/merge mappings with self
        for a in assignments:
            key, eq, raw = a.partition("=")
            path = key.strip().split(".")
            if not eq or not all(path):
                raise ConfigError(f"bad override {a!r}", hint="write section.key=value, e.g. train.warmup_steps=5")
            if path[0] not in d:
                raise ConfigError(f"bad override {a!r}: no setting {path[0]!r}",
                                  hint=f"sections and settings: {', '.join(d)}")
            node = d
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"bad override {a!r}: {part!r} holds a single value, not settings")
            node[path[-1]] = _yaml_value(raw)
        return RunConfig.from_dict(d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str | Path | None = None) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown run config keys: {', '.join(unknown)}", path=where,
                              hint=f"known keys: {', '.join(sorted(known))}")
        try:
            return cls(**d).validate()
        except ConfigError as e:
            raise ConfigError(e.message, path=where, hint=e.hint) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        from ._io import read_config

        path = Path(path)
        d = read_config(path, "run config") or {}
        if not isinstance(d, dict):
            raise ConfigError("run config must be a mapping", path=path)
        return cls.from_dict(d, where=path)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _yaml_value(raw: str) -> Any:
    """An override's value as YAML, with numbers like 2e-4 that YAML 1.1 reads as text taken as floats."""
    import yaml

    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override value {raw!r} is not valid YAML ({e})") from None
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _select_errors(opts: dict) -> list[str]:
    """The select options a user mistypes most, checked before any model is loaded."""
    from .select import SCORERS, metric_key, parse_weights

    errs = []
    for name, check in (("metric", metric_key), ("weights", parse_weights)):
        if name in opts:
            try:
                check(str(opts[name]))
            except ConfigError as e:
                errs.append(f"select.{name}: {e.message}")
    if opts.get("scorer", "loss") not in SCORERS:
        errs.append(f"select.scorer must be one of {', '.join(SCORERS)}, got {opts['scorer']!r}")
    elif opts.get("scorer") == "grad" and str(opts.get("metric", "loss")).replace("_", "-") != "loss":
        errs.append("select.scorer grad predicts the loss: use select.metric loss (--metric loss) with it")
    for name, none_ok in (("n", True), ("k", False), ("optimize_budget", False), ("shortlist", False),
                          ("halving_rows", False), ("prerank_rows", False)):
        v = opts.get(name, 1)
        if not (v is None and none_ok) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            errs.append(f"select.{name} must be a positive integer{' or null (all rows)' if none_ok else ''}, "
                        f"got {v!r}")
    for name in ("margin", "min_own_gain"):
        v = opts.get(name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v != v):
            errs.append(f"select.{name} must be a number or null, got {v!r}")
    return errs


# Options of select() / MergePlan that a run fixes itself (the data, the model, the process layout).
_RUN_OWNED = {"select": {"target", "base", "library", "model", "tokenizer", "rank", "world_size", "progress"},
              "merge": {"models", "source"}}


def _known_options(section: str) -> set[str]:
    """The keys a run's ``select`` / ``merge`` mapping may hold: select()'s parameters, MergePlan's fields."""
    if section == "select":
        import inspect

        from .select import select

        names = set(inspect.signature(select).parameters)
    else:
        from .merge.plan import MergePlan

        names = {f.name for f in dataclasses.fields(MergePlan)}
    return names - _RUN_OWNED[section]
