"""Per-tensor comparison of warmstart's methods_more with mergekit 0.1.5's kernels, on the same fp32 (and bf16) tensors.

Run with the interpreter that has mergekit (it is not a warmstart dependency)::

    PYTHONPATH=src /work/venv-mergekit/bin/python benchmarks/mergekit_methods_compare.py

Prints one line per (method, case): max |Δ| in fp32 ulps of the result and whether it is bitwise
equal. Randomised methods (della*) are compared with mergekit's global generator seeded the way
our per-tensor generator is, so the same draws are made.
"""

from __future__ import annotations

import sys

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

from warmstart.merge import REGISTRY, merge_tensors
from warmstart.merge.methods import validate


def mk(name, tensors, base, weights, params, seed=None):
    if name == "karcher":  # base policy "ignored": the base is one more input, appended after the models
        ts = list(tensors) + ([base] if base is not None else [])
        group = TensorGroup.from_tensors(ts)
    else:
        ts = ([base] if base is not None else []) + list(tensors)
        group = TensorGroup.from_tensors(ts, base_index=0 if base is not None else None)
    p = dict(params)
    if weights is not None:
        p["weight"] = list(weights)
    if seed is not None:
        torch.manual_seed(seed)
    return registry.get(name)([group], parameters=p)[0]


def ulps(a, b):
    d = (a.double() - b.double()).abs()
    fi = torch.finfo(b.dtype)
    spacing = fi.eps * b.double().abs().clamp(min=fi.tiny)
    return float((d / spacing).max()), float(d.max())


CASES = [
    ("nuslerp", True, [0.3, 0.7], {}),
    ("nuslerp", False, [0.3, 0.7], {}),
    ("nuslerp", True, [1.0, 1.0], {"nuslerp_flatten": False}),
    ("nuslerp", False, [1.0, 2.0], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", True, [0.2, 0.3, 0.5], {}),
    ("multislerp", False, [1.0, 1.0, 2.0], {}),
    ("karcher", True, None, {}),
    ("karcher", False, None, {"max_iter": 5}),
    ("nearswap", True, None, {"t": 0.05}),
    ("arcee_fusion", True, None, {}),
    ("sce", True, None, {}),
    ("sce", True, None, {"select_topk": 0.3}),
    ("ram", True, None, {}),
    ("ram", True, None, {"epsilon": 0.05}),
    ("ramplus_tl", True, None, {"epsilon": 0.05}),
    ("ramplus_tl", True, None, {"r": 0.5, "alpha": 0.5, "epsilon": 0.05}),
    ("della", True, [0.5, 0.3, 0.2], {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", True, [0.5, 0.3, 0.2], {"density": 0.4, "epsilon": 0.2, "lambda": 0.9}),
    ("della", True, [0.5, 0.3, 0.2], {"density": 0.5, "epsilon": 0.1, "rescale": False, "normalize": False}),
]
N_MODELS = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}


def main() -> int:
    worst = 0.0
    for shape, dt in [((64, 48), torch.float32), ((300,), torch.float32), ((64, 48), torch.bfloat16)]:
        g = torch.Generator().manual_seed(1)
        base = torch.randn(shape, generator=g)
        donors = [(base + 0.05 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6)).to(dt)
                  for _ in range(3)]
        base = base.to(dt)
        for name, with_base, w, params in CASES:
            n = N_MODELS.get(name, 3)
            ds = donors[:n]
            ww = w[:n] if w else None
            b = base if with_base else None
            seed = 1234 if name.startswith("della") else None
            want = mk(name, ds, b, ww, params, seed)
            ours_params = dict(params, **({"seed": seed} if seed is not None else {}))
            if dt == torch.float32:
                got = merge_tensors(name, ds, b, ww, **ours_params)
            else:  # the kernel itself on 16-bit inputs (what the engine does for a mergekit `dtype`)
                m = REGISTRY[name]
                kw = validate(m, len(ds), b is not None, ours_params)
                got = m.fn([d.clone() for d in ds], b, ww or [1.0] * len(ds), **kw)
            u, d = ulps(got, want)
            same = torch.equal(got, want) and got.dtype == want.dtype
            worst = max(worst, u)
            print(f"{name:13s} {str(dt)[6:]:8s} shape={shape!s:9s} base={with_base!s:5s} {params} -> "
                  f"{'bitwise' if same else f'max {u:.2f} ulp ({d:.2e})'}")
    print(f"worst: {worst:.2f} ulp")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
