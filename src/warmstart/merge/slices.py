"""mergekit ``slices``: output layers taken (and merged) from layer ranges of the inputs.

Each slice lists sources ``{model, layer_range: [start, end), parameters}`` of equal length; the
output's layers are the slices' layers in order. Layer k of a slice merges layer ``start + k`` of
every source (a frankenmerge is a slice with one source, ``passthrough``). As mergekit 0.1.5
(plan.py): the tensors before the layer stack (embeddings) are merged over the first slice's
sources, those after it (final norm, lm_head) over the last slice's, both at t = 0; gradient
parameters run over each slice's own layers (t = k / (n − 1)). Layers are found by tensor name
(``….layers.N.…``), which covers the decoder-only families; the config's layer count is rewritten.
"""

from __future__ import annotations

import re

import torch

from ..checkpoints import Checkpoint, open_checkpoint
from ..checkpoints.dtypes import FLOAT_DTYPES
from ..checkpoints.streaming import ST_DTYPES
from ..errors import ConfigError, IncompatibleError
from .results import Item as _Item
from .results import torch_dtype as _dtype

_LAYER = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe")  # tensors that come before the layer stack
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _refs(plan) -> list[str]:
    out = []
    for sl in plan.slices:
        for s in sl["sources"]:
            if s["model"] not in out:
                out.append(s["model"])
    return out


def open_slice_models(plan, base_ck: Checkpoint | None, allow_nonfinite: bool) -> list[Checkpoint]:
    """One checkpoint per distinct source model (the base's own object when it is a source)."""
    return [base_ck if base_ck is not None and r == plan.base else open_checkpoint(r, allow_nonfinite=allow_nonfinite)
            for r in _refs(plan)]


def _layers(ck: Checkpoint) -> tuple[dict[int, list[str]], list[str], list[str]]:
    """Tensor names per layer index, and the non-layer names before / after the stack."""
    per, pre, post = {}, [], []
    for name in ck.weights().meta:
        m = _LAYER.search(name)
        if m:
            per.setdefault(int(m.group(3)), []).append(name)
        else:
            (pre if any(p in name for p in _PRE) else post).append(name)
    return per, pre, post


def _rename(name: str, index: int) -> str:
    m = _LAYER.search(name)
    return name[:m.start(3)] + str(index) + name[m.end(3):]


def plan_slices(plan, cks: list[Checkpoint], base_ck, use_base: bool, notes: list[str]):
    """The engine's items for a slices plan, and the output's layer count."""
    idx = {r: i for i, r in enumerate(_refs(plan))}
    layout = {r: _layers(cks[i]) for r, i in idx.items()}
    items, k = [], 0

    def add(name: str, sl: dict, si: int, in_names: list[str], t: float):
        metas = []
        for s, n in zip(sl["sources"], in_names):
            m = cks[idx[s["model"]]].weights().meta.get(n)
            if m is None:
                raise IncompatibleError(f"tensor {n!r} is missing from {s['model']} (slices[{si}])",
                                        path=cks[idx[s["model"]]].path)
            metas.append((s, m))
        first = metas[0][1]
        float_t = first.dtype in FLOAT_DTYPES
        out_dtype = _dtype(plan.dtype, ST_DTYPES.get(first.dtype, torch.float32)) if float_t else ST_DTYPES[first.dtype]
        it = _Item(name, out_dtype, first.shape, None, [], t=t, specs=[], slice_params=sl.get("params") or None)
        for s, m in metas:
            if m.shape != first.shape:
                raise IncompatibleError(f"tensor {m.name!r} has shape {list(m.shape)}, {first.name!r} of the "
                                        f"first source has {list(first.shape)} (slices[{si}])")
            if use_base and s["model"] == plan.base:
                it.base = m
            else:
                it.srcs.append((idx[s["model"]], m))
                it.specs.append(s)
        if use_base and it.base is None:
            raise ConfigError(f"slices[{si}]: the base model {plan.base!r} must be one of the slice's sources "
                              f"(method {plan.method!r} merges relative to it)", path=plan.source)
        if not float_t:
            it.action, it.note, it.base, it.srcs, it.specs = "copied", "not a float tensor: copied", first, [], []
        items.append(it)

    first, last = plan.slices[0], plan.slices[-1]
    for name in layout[first["sources"][0]["model"]][1]:
        add(name, first, 0, [name] * len(first["sources"]), 0.0)
    for si, sl in enumerate(plan.slices):
        srcs = sl["sources"]
        n = srcs[0]["layer_range"][1] - srcs[0]["layer_range"][0]
        for off in range(n):
            per = [layout[s["model"]][0] for s in srcs]
            lay = [s["layer_range"][0] + off for s in srcs]
            for p, j, s in zip(per, lay, srcs):
                if j not in p:
                    raise ConfigError(f"slices[{si}]: {s['model']} has no layer {j} (layer_range "
                                      f"{s['layer_range']})", path=plan.source)
            for name in per[0][lay[0]]:
                add(_rename(name, k), sl, si, [_rename(name, j) for j in lay], off / (n - 1) if n > 1 else 1.0)
            k += 1
    for name in layout[last["sources"][0]["model"]][2]:
        add(name, last, len(plan.slices) - 1, [name] * len(last["sources"]), 0.0)
    notes.append(f"slices: {k} output layers from {len(plan.slices)} slice(s)")
    return items, k


def set_num_layers(cfg: dict, n: int) -> None:
    """Write the layer count into the config keys the architecture uses (and its text_config)."""
    for d in (cfg, cfg.get("text_config") or {}):
        for key in _LAYER_KEYS:
            if key in d:
                d[key] = n


__all__ = ["open_slice_models", "plan_slices", "set_num_layers"]
