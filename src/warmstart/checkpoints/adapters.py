"""LoRA adapters: the scaling fields of adapter_config.json, and the factor shapes checked against the
config, each other and a base model -- from the safetensors header only, no tensor is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointError, IncompatibleError
from .headers import TensorMeta


class Checkpoint(Protocol):
    """What these checks read of a :class:`~.checkpoint.Checkpoint` (a protocol: that module imports
    this one, so importing it back would make a cycle)."""

    path: Path
    config: dict
    lora: Any

    def weights(self) -> Any: ...


@dataclass(frozen=True)
class LoraInfo:
    base_model: str | None
    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    peft_type: str

    def scaling(self, module: str | None = None) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring rank/alpha patterns."""
        r, a = self.r, self.alpha
        if module is not None:
            r = _pattern_value(self.rank_pattern, module, r)
            a = _pattern_value(self.alpha_pattern, module, a)
        return a / (r ** 0.5) if self.use_rslora else a / r

    def to_dict(self) -> dict:
        return {"base_model": self.base_model, "r": self.r, "alpha": self.alpha, "use_rslora": self.use_rslora,
                "target_modules": list(self.target_modules), "rank_pattern": self.rank_pattern,
                "alpha_pattern": self.alpha_pattern, "peft_type": self.peft_type}


def _pattern_value(pattern: dict, module: str, default):
    # PEFT matches pattern keys as regex suffixes of the module name (peft.tuners.tuners_utils).
    for key, val in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def _lora_info(cfg: dict, cfg_path: Path, peft_type: str) -> LoraInfo:
    """The fields that set an adapter's scaling, each type-checked: a wrong one would merge at the
    wrong scale (or raise deep inside a merge) instead of being refused here."""
    def bad(field_: str, why: str):
        return CheckpointError(f"field {field_!r} {why}", path=cfg_path)

    r = cfg.get("r")
    if type(r) is not int or r <= 0:
        raise bad("r", f"must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if type(alpha) not in (int, float) or not (alpha == alpha) or abs(alpha) == float("inf"):
        raise bad("lora_alpha", f"must be a number, got {alpha!r}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", f"must be a string or null, got {base!r}")
    targets = cfg.get("target_modules") or []
    if not isinstance(targets, (list, str)) or (isinstance(targets, list) and
                                                not all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", f"must be a list of names or a regex string, got {targets!r}")
    patterns = {}
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise bad(key, f"must be a mapping of module regex to value, got {type(pat).__name__}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise bad(key, f"key {k!r} is not a valid regular expression ({e})") from None
            ok = type(v) is int and v > 0 if kind is int else type(v) in (int, float) and v == v
            if not ok:
                raise bad(key, f"value for {k!r} must be a {'positive integer' if kind is int else 'number'}, "
                               f"got {v!r}")
        patterns[key] = dict(pat)
    return LoraInfo(base_model=base or None, r=r, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
                    target_modules=tuple(sorted(targets)) if isinstance(targets, list) else (targets,),
                    rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
                    peft_type=peft_type)


# A PEFT LoRA tensor name (as saved or inside a PeftModel): the module, and A or B (gradient proxy, pre-rank).
PEFT_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)"
                           r"\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name in the base model, rank, and the base weight shape it needs."""

    name: str
    rank: int
    in_features: int
    out_features: int
    embedding: bool


def lora_modules(ck: Checkpoint) -> dict[str, LoraModule]:
    """Every LoRA pair of an adapter, checked from the header (no tensor is read): A is [r, in] and B
    [out, r] with the same r, and that r is what adapter_config.json says for the module (``r`` or its
    ``rank_pattern`` entry). PEFT refuses an adapter that breaks any of these; merged, it would be
    scaled by the wrong alpha/r without a word."""
    cfg_path = ck.path / "adapter_config.json"
    pairs: dict[str, dict[str, TensorMeta]] = {}
    for key, m in ck.weights().meta.items():
        if (mt := _LORA_KEY.match(key)):
            pairs.setdefault(mt["mod"], {})[mt["ab"]] = m
    out = {}
    for mod, ab in sorted(pairs.items()):
        name = mod[len(_PEFT_PREFIX):] if mod.startswith(_PEFT_PREFIX) else mod
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"module {name!r} has lora_{next(iter(ab))} without its partner", path=ck.path)
        A, B = ab["A"], ab["B"]
        if len(A.shape) != 2 or len(B.shape) != 2:
            raise CheckpointError(f"module {name!r}: LoRA factors must be matrices, got A {list(A.shape)} and B "
                                  f"{list(B.shape)}", path=A.file)
        if A.shape[0] != B.shape[1]:
            raise CheckpointError(f"module {name!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} disagree on "
                                  "the rank", path=A.file)
        want = _pattern_value(ck.lora.rank_pattern, name, ck.lora.r)
        if A.shape[0] != want:
            src = "its rank_pattern entry" if want != ck.lora.r else "r"
            raise CheckpointError(f"{src} says rank {want} for module {name!r}, its tensors have rank {A.shape[0]}",
                                  path=cfg_path, hint="the adapter would be scaled by the wrong alpha/r; fix r "
                                  "or rank_pattern in adapter_config.json")
        emb = "lora_embedding_A" in A.name
        out[name] = LoraModule(name, A.shape[0], A.shape[1], B.shape[0], emb)
    return out


def check_adapter_fits(adapter: Checkpoint, base: Checkpoint) -> None:
    """Refuse an adapter whose modules the base lacks, or whose factor shapes do not fit the base's
    weights: merged, it would give an adapter PEFT cannot attach (or a wrong ΔW shape)."""
    meta = base.weights().meta
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    for name, m in lora_modules(adapter).items():
        w = meta.get(f"{name}.weight")
        if w is None:
            raise IncompatibleError(f"adapter has LoRA factors for module {name!r}, which the base {base.path} "
                                    "does not have", path=adapter.path, hint="it was trained on another "
                                    "architecture or base")
        shapes = [(m.out_features, m.in_features)]
        if fan_in_fan_out or m.embedding:  # Conv1D / embedding weights are stored [in, out]
            shapes.append((m.in_features, m.out_features))
        if tuple(w.shape) not in shapes:
            raise IncompatibleError(f"module {name!r}: the adapter's factors make a {list(shapes[0])} update, the "
                                    f"base weight is {list(w.shape)}", path=adapter.path,
                                    hint=f"it was trained on another base than {base.path}")


def check_adapters_agree(adapters: list[Checkpoint]) -> None:
    """Adapters merged together must make updates of the same shape for every module they share."""
    seen: dict[str, tuple[tuple[int, int], Path]] = {}
    for ck in adapters:
        for name, m in lora_modules(ck).items():
            shape = (m.out_features, m.in_features)
            if name in seen and seen[name][0] != shape:
                raise IncompatibleError(f"module {name!r} is {list(seen[name][0])} in {seen[name][1]} but "
                                        f"{list(shape)} here", path=ck.path,
                                        hint="adapters of different architectures cannot be merged")
            seen.setdefault(name, (shape, ck.path))


__all__ = ["LoraInfo", "LoraModule", "check_adapter_fits", "check_adapters_agree", "lora_modules"]
