"""Read a mergekit YAML into MergePlan fields, with mergekit 0.1.5's semantics.

* ``dtype`` rounds every input tensor before the math and the methods compute as mergekit's
  do (``compute_dtype: auto``); ``out_dtype`` (else ``dtype``) is the output dtype. A native plan
  keeps warmstart's semantics: ``dtype`` is the output only and the math runs in float32.
* ``parameters`` (global, per model, per slice / slice source) may be numbers, gradients
  across layers or tensor-name filters (:mod:`.settings`), resolved per tensor by the engine.
* ``slices`` with ``layer_range`` (frankenmerges, ``passthrough``); ``model+lora``.
* Every key is either used or refused in one line naming it: mergekit itself silently ignores
  keys it does not know, warmstart does not.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .methods import REGISTRY
from ..params import DTYPES, check

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template"}
NO_EFFECT = {"int8_mask"}  # mergekit memory options that do not change the result


def _model_ref(v: Any, where: str, problems: list[str]) -> tuple[str, str | None]:
    """mergekit's ModelReference: ``path`` or ``path+lora`` (split on '+', as mergekit does)."""
    if isinstance(v, dict):  # mergekit's long form {model: ..., lora: ...}
        extra = set(v) - {"model", "lora"}
        if extra or "model" not in v:
            problems.append(f"{where}: a model reference needs 'model' (and optionally 'lora'), got {v!r}")
            return str(v), None
        return str(v["model"]), (str(v["lora"]) if v.get("lora") else None)
    if not isinstance(v, str) or not v:
        problems.append(f"{where} must be a model path, got {v!r}")
        return str(v), None
    parts = v.split("+")
    if len(parts) > 2:
        problems.append(f"{where}: cannot parse {v!r} (expected MODEL or MODEL+LORA)")
        return v, None
    return parts[0], (parts[1] if len(parts) == 2 else None)


def _params(d: Any, where: str, problems: list[str]) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        problems.append(f"{where} must be a mapping of parameter names to values, got {d!r}")
        return {}
    out = {}
    for k, v in d.items():
        if k in NO_EFFECT:
            continue
        if (q := check(v, f"{where}.{k}")) is not None:
            problems.append(q)
        out[str(k)] = v
    return out


def _entry(m: Any, where: str, problems: list[str], keys: set[str]) -> dict | None:
    if not isinstance(m, dict) or "model" not in m:
        problems.append(f"{where} must be a mapping with a 'model' key, got {m!r}")
        return None
    if set(m) - keys:
        problems.append(f"{where}: unknown key(s) {sorted(set(m) - keys)} (known: {', '.join(sorted(keys))})")
    ref, lora = _model_ref(m["model"], f"{where}.model", problems)
    return {"model": ref, "lora": lora, "params": _params(m.get("parameters"), f"{where}.parameters", problems)}


def _slices(data: dict, problems: list[str]) -> list[dict] | None:
    raw = data.get("slices")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        problems.append(f"slices must be a non-empty list, got {raw!r}")
        return None
    out = []
    for i, sl in enumerate(raw):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            problems.append(f"slices[{i}] must be a mapping with a 'sources' list, got {sl!r}")
            continue
        if set(sl) - {"sources", "parameters"}:
            problems.append(f"slices[{i}]: unsupported key(s) {sorted(set(sl) - {'sources', 'parameters'})}")
        srcs = []
        for j, s in enumerate(sl["sources"]):
            e = _entry(s, f"slices[{i}].sources[{j}]", problems, {"model", "layer_range", "parameters"})
            if e is None:
                continue
            if e["lora"]:
                problems.append(f"slices[{i}].sources[{j}].model: model+lora is not supported in slices")
            e["layer_range"] = list(s.get("layer_range")) if isinstance(s.get("layer_range"), (list, tuple)) \
                else s.get("layer_range")
            srcs.append(e)
        names = [s["model"] for s in srcs]
        if len(set(names)) < len(names):
            problems.append(f"slices[{i}] lists the same model twice (mergekit refuses it too)")
        out.append({"sources": srcs, "params": _params(sl.get("parameters"), f"slices[{i}].parameters", problems)})
    return out


def plan_kwargs(data: dict, source: str | None) -> dict:
    """MergePlan keyword arguments for a mergekit YAML (models as plan entries: {ref, weight, params, lora});
    every problem is reported at once, naming the file."""
    problems = []
    if set(data) - TOP_KEYS:
        extra = sorted(set(data) - TOP_KEYS)
        why = " (mergekit's per-module syntax)" if "modules" in extra else ""
        problems.append(f"unsupported mergekit key(s) {extra}{why} (supported: {', '.join(sorted(TOP_KEYS))})")
    method = data.get("merge_method")
    m = REGISTRY.get(method) if isinstance(method, str) else None
    if m is None:
        problems.append(f"merge_method {method!r} is not supported (supported: {', '.join(sorted(REGISTRY))})")
    data = dict(data)
    for k in ("dtype", "out_dtype"):
        v = data.get(k)
        if isinstance(v, str) and v.startswith("torch."):  # mergekit's dtype_from_name accepts the prefix
            data[k] = v = v[len("torch."):]
        if v is not None and v not in DTYPES:
            problems.append(f"{k} must be one of {', '.join(DTYPES)}, got {v!r}")
    base, base_lora = (None, None) if data.get("base_model") is None else \
        _model_ref(data["base_model"], "base_model", problems)
    if base_lora:
        problems.append("base_model: base+lora is not supported for the base (apply the adapter to a model entry)")
    if data.get("models") is not None and data.get("slices") is not None:
        problems.append("give models or slices, not both (mergekit refuses both too)")
    if data.get("models") is not None and not isinstance(data["models"], list):
        problems.append(f"models must be a list, got {data['models']!r}")
    entries = [_entry(m, f"models[{i}]", problems, {"model", "parameters"})
               for i, m in enumerate(data.get("models") or [] if isinstance(data.get("models"), list) else [])]
    entries = [e for e in entries if e is not None]
    seen = [(e["model"], e["lora"]) for e in entries]
    for d in {x for x in seen if seen.count(x) > 1}:
        problems.append(f"model {'+'.join(x for x in d if x)!r} is listed twice in models (mergekit refuses "
                        "duplicate inputs too; give it one entry with the summed weight)")
    slices = _slices(data, problems)
    gparams = _params(data.get("parameters"), "parameters", problems)
    tsrc = data.get("tokenizer_source")
    if tsrc is not None and not isinstance(tsrc, str):
        problems.append(f"tokenizer_source must be base, union or a model path, got {tsrc!r}")
    if data.get("tokenizer") is not None and not isinstance(data["tokenizer"], dict):
        problems.append(f"tokenizer must be a mapping (source, tokens, pad_to_multiple_of), got {data['tokenizer']!r}")
    if m is not None:  # parameter names, all at once (mergekit ignores unknown ones silently)
        known = set(m.defaults) | {"weight"}
        named = [("parameters", gparams)] + [(f"models[{i}].parameters", e["params"]) for i, e in enumerate(entries)]
        for i, sl in enumerate(slices or []):
            named += [(f"slices[{i}].parameters", sl["params"])] + [
                (f"slices[{i}].sources[{j}].parameters", s["params"]) for j, s in enumerate(sl["sources"])]
        for where, d in named:
            if set(d) - known:
                problems.append(f"{where}: {method} has no parameter(s) {sorted(set(d) - known)} "
                                f"(known: {', '.join(sorted(known))})")
    if problems:
        raise ConfigError("invalid mergekit plan: " + "; ".join(problems), path=source)

    if "tie_break" in m.defaults:
        gparams["tie_break"] = "mergekit"  # top-k ties broken by mergekit's sort: bit-identical, slower
    models, base_entry = [], None
    for e in entries:
        spec = {"ref": e["model"], "weight": e["params"].pop("weight", None), "params": e["params"], "lora": e["lora"]}
        if base is not None and e["model"] == base and not e["lora"]:
            base_entry = spec
            if m.base_is_input:  # no θ₀ (linear): the base is one more input, in its listed place
                models.append(spec)
        else:
            models.append(spec)
    kw: dict[str, Any] = {"models": models, "method": method, "params": gparams, "slices": slices,
                          "input_dtype": data.get("dtype"), "dtype": data.get("out_dtype"),
                          "compute_dtype": "auto", "tokenizer": data.get("tokenizer"),
                          "chat_template": data.get("chat_template")}
    if m.base_is_input and base_entry is not None:
        kw["config_from"] = base  # the base's config and tokenizer, as mergekit's output has
    else:
        kw["base"] = base
    if tsrc is not None:
        kw["tokenizer_source"] = tsrc
    if m.points and not slices and not models:
        raise ConfigError(f"{method} needs a second model besides the base", path=source)
    return kw


__all__ = ["plan_kwargs"]
