"""A run's settings: :class:`RunConfig`, its typed sections, and one check of all of them.

A run config holds one section per stage that has settings — ``train``
(:class:`warmstart.train.TrainConfig`), ``select`` (:class:`warmstart.select.SelectConfig`),
``merge`` (:class:`MergeConfig`: *what* to merge), ``merge_options`` (:class:`MergeOptions`:
*how* to run it) and ``transfer`` (:class:`TransferConfig`: a transferred fine-tune as the warm
start, in place of select and merge) — plus the held-out split's settings. :meth:`RunConfig.validate` collects every
section's problems and raises them as one :class:`ConfigError` (torchtune's ``config/_validate.py``),
before the run directory or any stage exists: a misspelt key or a bad value never costs a split,
a model load or a scored candidate.

The select and merge sections remember which fields were given (:mod:`warmstart._section`), so
``run.json`` records exactly what was asked for and the run's own rules still apply to what was
not (LoRA donors merge with ``lora_mode: svd`` at the baseline's rank unless ``lora_mode`` is given).

``pipeline`` re-exports :class:`RunConfig`, so ``from warmstart.pipeline import RunConfig`` keeps working.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import read_config
from ._section import Section, positive_int, section
from .errors import ConfigError
from .select import SelectConfig
from .train import TrainConfig

# ----------------------------------------------------------------------------
# Merge: what to merge (MergeConfig) apart from how to run it (MergeOptions), as mergekit's
# MergeConfiguration / MergeOptions. The stage joins them back into a MergePlan at the boundary
# (:func:`merge_plan_options`). mergekit keeps the dtypes with the configuration (they change the
# result); so do we.


class _MergeSection(Section):
    """Checked by MergePlan's own rules: a plan with one stand-in donor and the fields given."""

    def errors(self) -> list[str]:
        given = self.given()
        if not given:  # nothing to check, and no reason to import warmstart.merge (and torch) yet
            return []
        from .merge.plan import MergePlan, ModelSpec  # lazy: merge/__init__ imports torch; user errors must not

        probe = MergePlan(models=[ModelSpec("donor")], base="base")
        for k, v in given.items():
            setattr(probe, k, v)
        try:
            return probe.problems()
        except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type, e.g. penalty: "x"
            return [f"a value has the wrong type ({e})"]


# The fields are MergePlan's (tests/test_config.py checks names and defaults agree); only the fields
# given reach the plan, so where they are left out MergePlan's own defaults apply.
@section
class MergeConfig(_MergeSection):
    """What a run merges: the method and its parameters, the weighting, the LoRA mode, rank and
    scaling, the dtypes and the tokenizer (mergekit's MergeConfiguration). The donors and their
    weights come from the selection."""

    label = "merge"

    method: str = "linear"
    params: dict[str, Any] = field(default_factory=dict)
    weighting: str | None = None
    penalty: float = 1.0
    temperature: float = 1.0
    higher_is_better: bool = False
    base: str | None = None
    include_base: bool = False
    base_weight: float | None = None
    lora_mode: str = "cat"  # a run: svd for LoRA donors unless given (merge_plan_options)
    rank: int | None = None
    lora_scaling: float | None = None
    lora_a_norm: float | None = None
    dtype: str | None = None
    input_dtype: str | None = None
    compute_dtype: str = "float32"
    slices: list[dict] | None = None
    tokenizer_source: str | None = None
    tokenizer: dict | None = None
    chat_template: str | None = None
    config_from: str | None = None
    missing: str = "error"
    vocab: str = "error"


@section
class MergeOptions(_MergeSection):
    """How a run's merge runs (mergekit's MergeOptions): the merged weights are the same whatever these are."""

    label = "merge_options"

    shard_size: str = "5GB"
    device: str = "cpu"
    threads: int = 2

    def errors(self) -> list[str]:
        bad = positive_int("threads", self.threads) if self.is_given("threads") else None
        bad_device = None if isinstance(self.device, str) else f"device must be a name, got {self.device!r}"
        return [p for p in (bad, bad_device) if p] + super().errors()


MERGE_OPTIONS = tuple(MergeOptions.field_names())


# ----------------------------------------------------------------------------
# Transfer: the warm start is a fine-tune carried to the run's base instead of a merge of donors


@section
class TransferConfig(Section):
    """A run whose warm start is ``base + alpha·(finetuned − base_old)`` (:mod:`warmstart.transfer`)
    instead of selected and merged donors: ``source`` is the fine-tune (a directory, or a library
    entry's id or name), ``base_old`` the base it was trained from (default: the one it records).
    Set (``source`` given), the select stage scores nothing and the merge stage builds the transfer."""

    label = "transfer"

    source: str | None = None
    base_old: str | None = None
    alpha: float = 1.0

    def __post_init__(self):
        for name in ("source", "base_old"):  # a Path from Python: recorded in run.json as text
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))

    @property
    def active(self) -> bool:
        return self.source is not None

    def errors(self) -> list[str]:
        given, errs = self.given(), []
        if given and not (isinstance(self.source, str) and self.source.strip()):
            errs.append(f"source must name the fine-tune to transfer (a directory or a library entry), got "
                        f"{self.source!r}")
        if self.base_old is not None and not (isinstance(self.base_old, str) and self.base_old.strip()):
            errs.append(f"base_old must be a path or hub id, or null, got {self.base_old!r}")
        a = self.alpha
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0):
            errs.append(f"alpha must be a finite number > 0, got {a!r}")
        return errs


_SECTIONS = {"train": TrainConfig, "select": SelectConfig, "merge": MergeConfig, "merge_options": MergeOptions,
             "transfer": TransferConfig}


# ----------------------------------------------------------------------------
# The run config


@dataclass
class RunConfig:
    """Settings of a run (paths are arguments): typed sections plus the held-out split's settings.

    Sections may be given as mappings (``RunConfig(select={"k": 3})``); they are typed here and
    checked, all at once, by :meth:`validate` (which :func:`warmstart.pipeline.run` calls first).
    """

    train: TrainConfig = None  # default TrainConfig()
    select: SelectConfig = None  # default SelectConfig(): nothing given
    merge: MergeConfig = None
    merge_options: MergeOptions = None
    transfer: TransferConfig = None  # default: no transfer (the warm start is the merge of selected donors)
    eval_fraction: float = 0.2
    eval_max: int | None = 200  # most rows carved from the target (no effect on a given eval file)
    split_seed: int = 0
    baseline: bool = True

    def __post_init__(self):
        self._problems: list[str] = []
        if isinstance(self.merge, dict):  # a merge: mapping with run options in it (as before merge_options)
            how = {k: self.merge[k] for k in MERGE_OPTIONS if k in self.merge}
            if how:
                base = self.merge_options.given() if isinstance(self.merge_options, MergeOptions) else (
                    self.merge_options or {})
                self.merge = {k: v for k, v in self.merge.items() if k not in how}
                self.merge_options = {**how, **base} if isinstance(base, dict) else base
        for name, cls in _SECTIONS.items():
            v = getattr(self, name)
            if v is None:
                v = cls()
            elif isinstance(v, dict):
                known = {f.name for f in dataclasses.fields(cls)}
                unknown = sorted(set(v) - known, key=str)
                if unknown:
                    self._problems.append(f"unknown {name} option(s) {', '.join(map(str, unknown))} "
                                          f"(known: {', '.join(sorted(known))})")
                v = cls(**{k: x for k, x in v.items() if k in known})
            elif not isinstance(v, cls):
                self._problems.append(f"{name} must be a mapping of options, got {v!r}")
                v = cls()
            setattr(self, name, v)

    def errors(self) -> list[str]:
        """Every problem of every section, one line each, named ``section.field`` where it can be."""
        errs = list(self._problems)
        for name, cls in _SECTIONS.items():
            fields = {f.name for f in dataclasses.fields(cls)}
            errs += [_named(name, e, fields) for e in getattr(self, name).errors()]
        if not (isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1):
            errs.append(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.eval_max is not None and (not isinstance(self.eval_max, int) or self.eval_max < 1):
            errs.append(f"eval_max must be a positive integer or null, got {self.eval_max!r}")
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool) or self.split_seed < 0:
            errs.append(f"split_seed must be a non-negative integer, got {self.split_seed!r}")
        if not isinstance(self.baseline, bool):
            errs.append(f"baseline must be true or false, got {self.baseline!r}")
        if self.transfer.active:  # refused rather than ignored: a transfer run selects and merges nothing
            unused = [f"{name}.{k}" for name in ("select", "merge", "merge_options")
                      for k in getattr(self, name).given()]
            if unused:
                errs.append(f"transfer: a run that starts from a transfer selects and merges nothing, so "
                            f"{', '.join(unused)} would be ignored; leave {'it' if len(unused) == 1 else 'them'} "
                            "out")
        return errs

    def validate(self) -> RunConfig:
        errs = self.errors()
        if errs:
            raise ConfigError(f"invalid run config ({len(errs)} problem{'s' if len(errs) > 1 else ''}): "
                              + "; ".join(errs))
        return self

    def select_config(self) -> SelectConfig:
        """The selection's settings: the select section, with the training seed and the data format
        and multiple-choice style where the section does not give its own."""
        tc = self.train
        return SelectConfig(**{"seed": tc.seed, "format": tc.format, "mc_style": tc.mc_style,
                               **self.select.given()})

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> RunConfig:
        """A copy with ``section.key=value`` assignments applied (the CLI's ``--set``).

        ``section`` is ``train``, ``select``, ``merge``, ``merge_options`` or ``transfer`` (``merge.params.density=0.5``
        reaches a nested key) or absent for a top-level field (``eval_max=null``); ``value`` is read as
        YAML (``null``, ``true``, ``[q_proj, v_proj]``, ``2e-4``). Every key is checked, all at once.
        """
        return RunConfig.from_dict(apply_overrides(self.to_dict(), assignments))  # to_dict copies: self unchanged

    def to_dict(self) -> dict:
        """train whole, select/merge/merge_options as given (merge_options left out when empty),
        then the top-level settings: the mapping ``run.json`` records."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in _SECTIONS:
            d[name] = d[name].to_dict()
        for name in ("merge_options", "transfer"):
            if not d[name]:
                del d[name]  # as before the section existed: older run directories still resume
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str | Path | None = None) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError("run config must be a mapping", path=where)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if unknown:
            cfg._problems.insert(0, f"unknown run config keys: {', '.join(map(str, unknown))} "
                                 f"(known keys: {', '.join(sorted(known))})")
        try:
            return cfg.validate()
        except ConfigError as e:
            raise ConfigError(e.message, path=where, hint=e.hint) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        d = read_config(path, "run config") or {}
        if not isinstance(d, dict):
            raise ConfigError("run config must be a mapping", path=path)
        return cls.from_dict(d, where=path)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_overrides(d: dict, assignments: list[str] | tuple[str, ...]) -> dict:
    """``d`` (a run config mapping, changed in place and returned) with ``section.key=value`` set."""
    names = [f.name for f in dataclasses.fields(RunConfig)]
    for a in assignments:
        key, eq, raw = a.partition("=")
        path = key.strip().split(".")
        if not eq or not all(path):
            raise ConfigError(f"bad override {a!r}", hint="write section.key=value, e.g. train.warmup_steps=5")
        if path[0] not in names:
            raise ConfigError(f"bad override {a!r}: no setting {path[0]!r}",
                              hint=f"sections and settings: {', '.join(names)}")
        node = d
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad override {a!r}: {part!r} holds a single value, not settings")
        node[path[-1]] = _yaml_value(raw)
    return d


def _named(section: str, problem: str, fields: set[str]) -> str:
    """``k must be …`` → ``select.k must be …``; a problem not led by a field → ``merge: …``."""
    head = problem.split(" ", 1)[0].rstrip(":")
    return f"{section}.{problem}" if head in fields else f"{section}: {problem}"


def merge_plan_options(cfg: RunConfig, donors: list[dict]) -> dict:
    """The MergePlan keywords of a run's merge: the merge and merge_options sections as given, plus
    the run's rule for LoRA donors. They merge in adapter space to the baseline's LoRA rank and
    scaling by default (svd), so the warm start trains as many parameters as the baseline's fresh
    LoRA, at the same effective step size (with Adam a step moves ΔW by about alpha/r · lr · (|A| + |B|))."""
    opts = {**cfg.merge.given(), **cfg.merge_options.given()}
    if all(d.get("kind") == "lora" for d in donors) and not cfg.train.full:
        opts.setdefault("lora_mode", "svd")
        if opts["lora_mode"] == "svd":
            tc = cfg.train
            opts.setdefault("rank", tc.lora_r)
            opts.setdefault("lora_scaling", tc.lora_alpha / (tc.lora_r ** 0.5 if tc.rslora else tc.lora_r))
            # A's rows at a fresh LoRA's norm (PEFT's Kaiming-uniform init: 1/√3), B carrying σ: an even
            # √σ split leaves both factors small after short donor training and the warm start slow
            # (recycle-bench: svd_a_init vs train_scaling, docs/results.md)
            opts.setdefault("lora_a_norm", 3 ** -0.5)
    return opts


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


__all__ = ["MERGE_OPTIONS", "MergeConfig", "MergeOptions", "RunConfig", "TransferConfig", "apply_overrides",
           "merge_plan_options"]
