"""MergePlan: one validated description of a merge that round-trips to YAML.

Native YAML::

    method: ties
    base: runs/base
    models:
      - {ref: runs/a, weight: 0.6}
      - {ref: runs/b, weight: 0.4}
    params: {density: 0.5}
    dtype: bfloat16

mergekit YAML is read by :mod:`.mergekit_yaml` with mergekit 0.1.5's
semantics (``dtype`` rounds the inputs, gradients and filters in parameters,
``slices``, ``base+lora``); every key either works or is refused naming it.
Every problem in a file is collected and reported at once, naming the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import read_config
from ..errors import ConfigError
from ..params import DTYPES
from ..params import check as check_setting
from ..provenance import parse_size  # the one size parser; re-exported for plan.parse_size callers
from ..weighting import parse as parse_weighting
from .mergekit_yaml import plan_kwargs
from .methods import REGISTRY
from .tokenizer import tokenizer_problems

COMPUTE_DTYPES = DTYPES + ("auto",)  # auto: the inputs' dtype (after input_dtype rounding), as mergekit
POLICIES = ("error", "reference")
LORA_MODES = ("cat", "svd", "factors")


@dataclass
class ModelSpec:
    ref: str
    weight: Any = None  # a number, or (mergekit plans) a gradient / filter setting, see .settings
    params: dict[str, Any] = field(default_factory=dict)  # per-model overrides (e.g. density)
    score: float | None = None  # from a selection file; used by weighting "score"/"softmax"
    lora: str | None = None  # mergekit's "model+lora": this adapter is applied to ref before merging


@dataclass
class MergePlan:
    models: list[ModelSpec]
    method: str = "linear"
    base: str | None = None
    include_base: bool = False  # linear only: the base takes part with `base_weight` (never implied)
    base_weight: float | None = None
    weighting: str | None = None  # a scheme of .weights (softmax:T too); None: "given" if any weight, else "uniform"
    penalty: float = 1.0
    temperature: float = 1.0
    higher_is_better: bool = False  # for score/softmax weighting: accuracy-like (True) or loss-like (False)
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # output dtype; None keeps the reference model's (mergekit: out_dtype or dtype)
    input_dtype: str | None = None  # every input rounded to it before the math (mergekit's `dtype`)
    compute_dtype: str = "float32"  # "auto": the (rounded) inputs' dtype, each method computing as mergekit's
    slices: list[dict] | None = None  # mergekit frankenmerge: [{sources: [{model, layer_range, params}], params}]
    tokenizer_source: str | None = None  # mergekit: base | union | a model (the latter also sets config_from)
    tokenizer: dict | None = None  # mergekit's tokenizer: block (source, tokens, pad_to_multiple_of)
    chat_template: str | None = None  # mergekit: a template name or a literal Jinja template
    shard_size: str = "5GB"
    config_from: str | None = None  # config + tokenizer source; default base, else first model
    missing: str = "error"  # tensors missing/extra in some inputs
    vocab: str = "error"  # embedding rows differ between inputs
    device: str = "cpu"
    threads: int = 2
    lora_mode: str = "cat"
    rank: int | None = None
    lora_scaling: float | None = None  # cat/svd output scaling (alpha/r) of every module; None: 1
    lora_a_norm: float | None = None  # svd: row norm of A (None: σ split evenly between A and B)
    source: str | None = field(default=None, compare=False)  # the file it came from (for messages)

    # -- validation ---------------------------------------------------------
    def __post_init__(self):
        self.models = [m if isinstance(m, ModelSpec) else _model_spec(m, []) for m in self.models]
        problems = self.problems()
        if problems:
            raise ConfigError("invalid merge plan: " + "; ".join(problems), path=self.source)

    def problems(self) -> list[str]:
        """Every problem of the plan, one string each; an empty list means it can run."""
        p = self._type_problems()
        if p:  # the value checks below assume the types
            return p
        if not self.models and not self.slices:
            p.append("no models to merge")
        method = REGISTRY.get(self.method)
        if method is None:
            p.append(f"unknown method {self.method!r} (known: {', '.join(sorted(REGISTRY))})")
        if method is not None:  # parameter names, from the method's signature (values: checked per tensor)
            given = set(self.params) | {k for m in self.models for k in m.params}
            if unknown := sorted(given - set(method.defaults) - {"weight"}):
                p.append(f"method {method.name!r} has no parameter(s) {unknown} "
                         f"(known: {', '.join(sorted(method.defaults)) or 'none'})")
        if self.weighting is not None:
            try:
                parse_weighting(self.weighting, where="merge")
            except ConfigError as e:
                p.append(f"{e.message} ({e.hint})" if e.hint else e.message)
        for name, val, allowed in [("dtype", self.dtype, DTYPES + (None,)), ("compute_dtype", self.compute_dtype,
                                                                            COMPUTE_DTYPES),
                                   ("input_dtype", self.input_dtype, DTYPES + (None,)),
                                   ("missing", self.missing, POLICIES), ("vocab", self.vocab, POLICIES),
                                   ("lora_mode", self.lora_mode, LORA_MODES)]:
            if val not in allowed:
                p.append(f"{name} must be one of {[a for a in allowed if a]}, got {val!r}")
        dens = [self.params.get("density")] + [m.params.get("density") for m in self.models]
        for d in dens:
            if d is not None and not isinstance(d, bool) and isinstance(d, (int, float)) and not 0 <= d <= 1:
                p.append(f"density must be in [0, 1], got {d!r}")
            elif d is not None and check_setting(d, "density"):
                p.append(check_setting(d, "density"))
        for m in self.models:
            if m.weight is not None and (q := check_setting(m.weight, f"weight of {m.ref!r}")):
                p.append(q)
        ws = [m.weight for m in self.models if m.weight is not None]
        if (method is not None and method.weighted_average and self.params.get("normalize", True) is not False and ws
                and len(ws) == len(self.models) and all(isinstance(w, (int, float)) for w in ws)
                and abs(sum(ws) + (self.base_weight or 0)) < 1e-12):
            # Only where the result is undefined: a normalised linear divides by Σw (mergekit writes inf/NaN).
            # Task vectors with weights summing to zero (task negation) are fine and run.
            p.append(f"model weights {ws} sum to zero (a normalised linear merge divides by their sum; "
                     "set normalize: false, or use task_arithmetic for task negation)")
        p += self._slice_problems() + self._tokenizer_problems()
        if self.include_base and not self.base:
            p.append("include_base needs a base")
        if self.include_base and method is not None and not method.base_is_input:
            p.append(f"include_base applies to linear merges only (method {self.method!r} uses the base as θ₀)")
        if self.penalty < 0:
            p.append(f"penalty must be >= 0, got {self.penalty}")
        if self.rank is not None and self.rank <= 0:
            p.append(f"rank must be positive, got {self.rank}")
        for k in ("lora_scaling", "lora_a_norm"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                p.append(f"{k} must be a positive number, got {v!r}")
        try:
            parse_size(self.shard_size)
        except ValueError as e:
            p.append(str(e))
        return p

    def _type_problems(self) -> list[str]:
        """Values of the wrong type, so that a YAML typo is one line in the list, not a TypeError."""
        want = {"method": (str, "a method name"), "base": ((str, type(None)), "a path or hub id"),
                "include_base": (bool, "true or false"), "base_weight": ((int, float, type(None)), "a number"),
                "weighting": ((str, type(None)), "a weighting scheme"), "penalty": ((int, float), "a number"),
                "temperature": ((int, float), "a number"), "higher_is_better": (bool, "true or false"),
                "params": (dict, "a mapping"), "shard_size": ((str, int), "a size such as 2GB"),
                "threads": (int, "a whole number"), "rank": ((int, type(None)), "a whole number"),
                "device": (str, "a device name"), "slices": ((list, type(None)), "a list")}
        p = []
        for k, (types, what) in want.items():
            v = getattr(self, k)
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types)):
                p.append(f"{k} must be {what}, got {v!r}")
        return p

    def _slice_problems(self) -> list[str]:
        if self.slices is None:
            return []
        if self.models:
            return ["give models or slices, not both"]
        p = []
        for i, sl in enumerate(self.slices):
            srcs = sl.get("sources") if isinstance(sl, dict) else None
            if not srcs:
                p.append(f"slices[{i}] needs a non-empty sources list")
                continue
            lens = set()
            for j, s in enumerate(srcs):
                lr = s.get("layer_range")
                if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(x, int) for x in lr)
                        and 0 <= lr[0] < lr[1]):
                    p.append(f"slices[{i}].sources[{j}].layer_range must be [start, end) with 0 <= start < end, "
                             f"got {lr!r}")
                else:
                    lens.add(lr[1] - lr[0])
            if len(lens) > 1:
                p.append(f"slices[{i}]: every source must have the same number of layers, got {sorted(lens)}")
        return p

    def _tokenizer_problems(self) -> list[str]:
        """mergekit's tokenizer surgery (merge/tokenizer.py): checked up front, never ignored."""
        if self.slices and (self.tokenizer_source or self.tokenizer):
            return ["tokenizer_source / tokenizer: with slices is not supported"]
        return tokenizer_problems(self.tokenizer_source, self.tokenizer, self.chat_template)

    # -- YAML ---------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> MergePlan:
        path = Path(path)
        data = _load_file(path)
        if not isinstance(data, dict):
            raise ConfigError("a merge plan must be a mapping", path=path)
        if "merge_method" in data:
            return cls.from_mergekit(data, source=str(path))
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> MergePlan:
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - names)
        problems = [f"unknown key(s) {unknown} (known: {', '.join(sorted(names))})"] if unknown else []
        models = data.get("models") or []
        if not isinstance(models, list):
            problems.append(f"models must be a list, got {models!r}")
            models = []
        models = [_model_spec(m, problems) for m in models]
        kw = {k: v for k, v in data.items() if k in names and k != "models"}
        # Every problem at once: the keys and entries above, then every field's value, before any work.
        plan = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(plan, f.name, kw.get(f.name, default))
        plan.models, plan.source = models, source
        problems += plan.problems()
        if problems:
            raise ConfigError("invalid merge plan: " + "; ".join(problems), path=source)
        return cls(models=models, source=source, **kw)

    @classmethod
    def from_mergekit(cls, data: dict, *, source: str | None = None) -> MergePlan:
        """A mergekit YAML, read with mergekit 0.1.5's semantics (see :mod:`.mergekit_yaml`)."""
        return cls(source=source, **plan_kwargs(data, source))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["models"] = [{k: v for k, v in dataclasses.asdict(m).items() if v not in (None, {})} for m in self.models]
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        return {k: v for k, v in d.items() if k in ("models", "method") or v != defaults.get(k, object())
                and v not in ({}, None)}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _model_spec(m, problems: list[str]) -> ModelSpec:
    if isinstance(m, ModelSpec):
        return m
    if isinstance(m, str):
        return ModelSpec(m)
    if isinstance(m, dict) and "ref" in m:
        extra = set(m) - {"ref", "weight", "params", "score", "lora"}
        if extra:
            problems.append(f"unknown key(s) {sorted(extra)} in model {m['ref']!r}")
        w = m.get("weight")
        if w is not None and (q := check_setting(w, f"weight of {m['ref']!r}")):
            problems.append(q)
        return ModelSpec(str(m["ref"]), w, dict(m.get("params") or {}), m.get("score"), m.get("lora"))
    problems.append(f"bad model entry {m!r} (expected a path or {{ref: ..., weight: ...}})")
    return ModelSpec(str(m))


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _load_file(path: Path):
    # not found, not a regular file, not UTF-8, not YAML/JSON, nested too deeply: one line each
    return read_config(path, "plan file")


__all__ = ["MergePlan", "ModelSpec", "parse_size"]
