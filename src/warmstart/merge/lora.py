"""Merging LoRA adapters in adapter space: the result is an adapter, with its exactness reported.

With sᵢ the scaling of adapter i (alpha/r, alpha/√r with rsLoRA, per-module
rank/alpha patterns honoured via :meth:`LoraInfo.scaling`) and wᵢ its weight,
the target is ΔW = Σ wᵢ·sᵢ·BᵢAᵢ per module.

* ``cat``: stack the factors, B = [w₁s₁B₁ … wₙsₙBₙ], A = [A₁; …; Aₙ]. Exact, rank Σ rᵢ.
  PEFT multiplies by ``lora_alpha / r`` of the *concatenated* rank, so the
  output sets alpha = s·r per module (scaling s, rsLoRA off) with
  ``rank_pattern``/``alpha_pattern`` where ranks differ, folds every sᵢ into B
  and divides both factors by √s. s = ``lora_scaling``, 1 by default. The
  product is the same for any s; s matters when the adapter is trained further:
  with Adam, a step moves ΔW by about s·lr, so a warm start meant to train like
  a fresh LoRA of alpha/r = 2 must carry s = 2 (``warmstart run`` sets it).
* ``svd``: the best rank-r approximation of the same ΔW (Eckart–Young) without
  forming it: QR of the stacked factors, SVD of the small R×R core. Falls back
  to a dense SVD only when Σrᵢ ≥ min(out, in).
* ``factors``: A = Σ wᵢAᵢ, B = Σ wᵢ(sᵢ/s₁)Bᵢ, keeping the first adapter's config.
  This is what the Mashup Learning reference does; it is *not* ΔW (the product of
  averages is not the average of products) and the card says by how much.
* Any other method (ties, dare_*, breadcrumbs, ...): applied to the dense ΔWᵢ of
  each module (base = 0), then re-factored by truncated SVD; the reported error
  is that of the re-factoring against the method's dense result.

The relative error ‖ΔW_merged − ΔW_target‖_F / ‖ΔW_target‖_F of every module is
in the result and the model card.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_json, check_output
from ..checkpoints.streaming import ST_DTYPES
from ..checkpoints import Checkpoint, open_checkpoint
from ..errors import ConfigError, IncompatibleError
from .engine import SKIP_COPY, _input_info, write_card  # the card writer and input provenance, shared
from .methods import get_method, tensor_seed, validate
from .plan import MergePlan
from .results import MergeResult, TensorReport

_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$")
_PREFIX = "base_model.model."
DENSE_ERROR_LIMIT = 1 << 22  # below this many entries, errors are measured on the dense ΔW


# ----------------------------------------------------------------------------
# Reading adapters


def _factors(ck: Checkpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (A [r×in], B [out×r]) in fp32; anything that is not a plain LoRA pair is refused."""
    w = ck.weights()
    pairs: dict[str, dict] = {}
    for k in w.keys():
        m = _KEY.match(k)
        if not m:
            raise IncompatibleError(f"adapter tensor {k!r} is not a LoRA A/B factor (modules_to_save, embedding "
                                    "LoRA or LoRA bias cannot be merged in adapter space)", path=ck.path)
        pairs.setdefault(m["mod"], {})[m["ab"]] = w.get(k, torch.float32)
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleError(f"module {mod!r} has lora_{next(iter(ab))} without its partner", path=ck.path)
    return {mod: (ab["A"], ab["B"]) for mod, ab in pairs.items()}


def _module_name(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def _check_bases(cks: Sequence[Checkpoint]) -> None:
    bases = {c.lora.base_model for c in cks}
    if len(bases) > 1:
        raise IncompatibleError(f"adapters were trained on different bases: {sorted(map(str, bases))}",
                                path=cks[0].path, hint="adapters can only be merged on the same base model")


# ----------------------------------------------------------------------------
# Per-module math


def _cat(parts):
    """parts: [(coef, A, B)] → exact stacked factors with scaling folded into B."""
    A = torch.cat([a for _, a, _ in parts], dim=0)
    B = torch.cat([c * b for c, _, b in parts], dim=1)
    return A, B


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, a_norm: float | None):
    """(A, B) with B@A = U S Vᵀ truncated to r. Default: σ split evenly (√σ on each side). With
    ``a_norm``: every row of A has that norm and B carries the rest, so A looks like a fresh LoRA's
    A (PEFT's Kaiming-uniform init has row norm 1/√3 ≈ 0.577 whatever the width)."""
    if a_norm is None:
        root = S[:r].sqrt()
        return root[:, None] * Vh[:r], U[:, :r] * root
    return a_norm * Vh[:r], U[:, :r] * (S[:r] / a_norm)


def _svd_factors(A: torch.Tensor, B: torch.Tensor, rank: int, a_norm: float | None = None):
    """Best rank-``rank`` factors of B@A via QR of the factors and an SVD of the R×R core (float64)."""
    A, B = A.double(), B.double()
    R = A.shape[0]
    if R >= min(B.shape[0], A.shape[1]):
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    else:
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.T)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
        U, Vh = Qb @ U, Vh @ Qa.T
    return _split(U, S, Vh, min(rank, S.shape[0]), a_norm)


def _rel_error(target, got) -> float:
    """‖X − Y‖_F / ‖X‖_F for X, Y given as (A, B) factor pairs or dense tensors, in float64."""
    def dense(x):
        return x if isinstance(x, torch.Tensor) else x[1].double() @ x[0].double()

    def inner(x, y):  # <B₁A₁, B₂A₂>_F = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ): no dense product needed
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return float((dense(x).double() * dense(y).double()).sum())
        return float(((x[1].double().T @ y[1].double()) * (x[0].double() @ y[0].double().T)).sum())

    shape = target.shape if isinstance(target, torch.Tensor) else (target[1].shape[0], target[0].shape[1])
    if shape[0] * shape[1] <= DENSE_ERROR_LIMIT:
        X, Y = dense(target).double(), dense(got).double()
        nx = float(X.norm())
        return float((X - Y).norm()) / nx if nx > 0 else float(Y.norm())
    xx, yy, xy = inner(target, target), inner(got, got), inner(target, got)
    return max(xx + yy - 2 * xy, 0.0) ** 0.5 / xx ** 0.5 if xx > 0 else yy ** 0.5


def _truncate(dense: torch.Tensor, rank: int, a_norm: float | None = None):
    U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return _split(U, S, Vh, min(rank, S.shape[0]), a_norm)


# ----------------------------------------------------------------------------
# The merge


def merge_adapters(adapters: Sequence[Checkpoint | str | Path], weights: Sequence[float] | None = None, *,
                   mode: str = "cat", rank: int | None = None, method: str = "linear", out: str | Path | None = None,
                   force: bool = False, progress: Callable[[int, int, str], None] | None = None,
                   plan: MergePlan | None = None, dtype: str | None = None, lora_scaling: float | None = None,
                   lora_a_norm: float | None = None, notes: list[str] | None = None, **params) -> MergeResult:
    """Merge LoRA adapters into one PEFT adapter (written to ``out`` if given; else kept in the result)."""
    t0 = time.perf_counter()
    cks = [a if isinstance(a, Checkpoint) else open_checkpoint(a) for a in adapters]
    if not cks or any(c.kind != "lora" for c in cks):
        raise IncompatibleError("merge_adapters takes LoRA adapters only",
                                path=next((c.path for c in cks if c.kind != "lora"), None))
    _check_bases(cks)
    weights = list(weights) if weights is not None else [1.0 / len(cks)] * len(cks)
    if len(weights) != len(cks):
        raise ConfigError(f"{len(weights)} weights for {len(cks)} adapters")
    plan = plan or MergePlan(models=[{"ref": c.ref, "weight": w} for c, w in zip(cks, weights)], method=method,
                             lora_mode=mode, rank=rank, params=dict(params), dtype=dtype, lora_scaling=lora_scaling,
                             lora_a_norm=lora_a_norm)
    if out is not None:
        check_output(Path(out), force=force, inputs=[c.path for c in cks])
    m = get_method(method)
    notes = list(notes or [])
    factor_space = m.factor_space
    if factor_space:
        coefs = _linear_coefs(weights, validate(m, len(cks), True, dict(params)))
    else:
        params = validate(m, len(cks), True, dict(params))
        if mode != "svd":
            notes.append(f"{method} works on dense ΔW: re-factored by truncated SVD (lora_mode {mode} ignored)")
        mode = "svd"
    facs = [_factors(c) for c in cks]
    modules = list(dict.fromkeys(k for f in facs for k in f))
    first_meta = next(iter(cks[0].weights().meta.values()))
    out_dtype = getattr(torch, dtype) if dtype else _st_dtype(first_meta.dtype)
    tensors, errors, ranks = {}, {}, {}
    # output scaling s: the same product with each factor / √s, or B / s where A keeps a set row norm
    s_out = 1.0 if mode == "factors" or lora_scaling is None else float(lora_scaling)
    keep_a = lora_a_norm is not None and mode == "svd"  # dense methods were switched to svd above
    a_div, b_div = (1.0, s_out) if keep_a else (s_out ** 0.5, s_out ** 0.5)
    for j, mod in enumerate(modules):
        name = _module_name(mod)
        have = [i for i, f in enumerate(facs) if mod in f]
        if factor_space:
            A, B, scale, err = _merge_module_linear(mod, name, cks, facs, have, coefs, mode, rank, lora_a_norm)
        else:
            A, B, scale, err = _merge_module_dense(name, cks, facs, have, mod, m, weights, params, rank, lora_a_norm)
        if s_out != 1.0:
            A, B, scale = A / a_div, B / b_div, scale * s_out
        A, B = A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()
        errors[name] = _rel_error(err, (A, B * scale))
        tensors[f"{mod}.lora_A.weight"], tensors[f"{mod}.lora_B.weight"] = A, B
        ranks[name] = A.shape[0]
        if progress:
            progress(j + 1, len(modules), name)
    if len({tuple(c.lora.target_modules) for c in cks}) > 1 or any(len(modules) != len(f) for f in facs):
        notes.append("adapters target different modules: a module missing from an adapter counts as ΔW = 0")
    cfg = _adapter_config(cks, ranks, mode, s_out)
    result = MergeResult(Path(out) if out is not None else None, method, weights, [], notes=notes,
                         lora_errors=errors, adapter_config=cfg)
    result.tensors = [TensorReport(k, list(t.shape), str(t.dtype).replace("torch.", ""), 0, f"lora-{mode}")
                      for k, t in tensors.items()]
    result.timings = {"merge": time.perf_counter() - t0}
    if out is None:
        result.state_dict = tensors
        return result
    _write_adapter(Path(out), force, tensors, cfg, cks, weights, plan, result, t0)
    return result


def _st_dtype(st: str) -> torch.dtype:
    return ST_DTYPES.get(st, torch.float32)


def _linear_coefs(weights: list[float], params: dict) -> list[float]:
    """Σ coefᵢ·ΔWᵢ: the factor-space methods' weights (params are validated, so defaults are filled in)."""
    total = sum(weights)
    norm = params["normalize"]
    lam = params.get("lambda", 1.0)
    return [lam * w / (total if norm and abs(total) > 1e-8 else 1.0) for w in weights]


def _merge_module_linear(mod, name, cks, facs, have, coefs, mode, rank, a_norm=None):
    """Returns (A, B, scale of the output config for this module, exact target as factors)."""
    parts = [(coefs[i] * cks[i].lora.scaling(name), *facs[i][mod]) for i in have]
    exact = _cat(parts)
    if mode == "cat":
        return exact[0], exact[1], 1.0, exact
    if mode == "svd":
        r = rank or max(facs[i][mod][0].shape[0] for i in have)  # default: the sources' rank
        A, B = _svd_factors(*exact, r, a_norm)
        return A, B, 1.0, exact
    # factors: average A and B separately (approximate; kept for reproducing the Mashup Learning reference)
    rs = {facs[i][mod][0].shape[0] for i in have}
    if len(rs) > 1:
        raise IncompatibleError(f"lora_mode 'factors' needs equal ranks, module {name!r} has ranks {sorted(rs)}",
                                hint="use --lora-mode cat (exact) or svd")
    s_ref = cks[0].lora.scaling(name)
    A = sum(coefs[i] * facs[i][mod][0] for i in have)
    B = sum(coefs[i] * (cks[i].lora.scaling(name) / s_ref) * facs[i][mod][1] for i in have)
    return A, B, s_ref, exact


def _merge_module_dense(name, cks, facs, have, mod, m, weights, params, rank, a_norm=None):
    dense = [cks[i].lora.scaling(name) * (facs[i][mod][1] @ facs[i][mod][0]) for i in have]
    p = {k: ([v[i] for i in have] if isinstance(v, list) else v) for k, v in params.items()}
    if "seed" in p:
        p["seed"] = tensor_seed(int(p["seed"]), name)
    target = m.fn(dense, torch.zeros_like(dense[0]), [weights[i] for i in have], **p)
    r = rank or max(facs[i][mod][0].shape[0] for i in have)
    A, B = _truncate(target, r, a_norm)
    return A, B, 1.0, target


def _adapter_config(cks: list[Checkpoint], ranks: dict[str, int], mode: str, scaling: float = 1.0) -> dict:
    cfg = dict(cks[0].config)
    targets = sorted({n.rsplit(".", 1)[-1] for n in ranks})
    cfg.update(target_modules=targets, init_lora_weights=True)
    if mode == "factors":
        return cfg  # keeps the first adapter's r / alpha / rsLoRA / patterns: B was rescaled to its scaling
    # the same scaling everywhere: alpha = s·r per module, rsLoRA off (sᵢ are already folded into B)
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    alpha = lambda k: int(scaling * k) if float(scaling * k).is_integer() else scaling * k  # noqa: E731
    cfg.update(r=r, lora_alpha=alpha(r), use_rslora=False, rank_pattern=pattern,
               alpha_pattern={n: alpha(k) for n, k in pattern.items()})
    return cfg


def _write_adapter(out: Path, force, tensors, cfg, cks, weights, plan, result, t0) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", cfg)
        for f in sorted(cks[0].path.iterdir()):  # tokenizer files saved with the adapter, if any
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")) \
                    and f.name not in SKIP_COPY:
                (tmp / f.name).write_bytes(f.read_bytes())
        result.inputs = [_input_info(c, None, "adapter") | {"weight": w} for c, w in zip(cks, weights)]
        result.timings["total"] = time.perf_counter() - t0
        write_card(tmp, plan, result, kind="adapter", base_model=cks[0].lora.base_model)


def _check_plan_base(plan: MergePlan, cks: list[Checkpoint]) -> None:
    """--base with adapters: it must be the base they were trained on (compared as resolved paths or ids).

    A recorded path that differs is refused only when it exists here with other weights: the same base
    under another path (copied, converted, a hub id vs a local dir) passes, as it does in `select`."""
    def norm(ref):
        p = Path(str(ref)).expanduser()
        return str(p.resolve()) if p.exists() else str(ref)

    theirs = {norm(c.lora.base_model) for c in cks if c.lora.base_model}
    if not theirs or norm(plan.base) in theirs:
        return
    local = [r for r in theirs if Path(r).is_dir()]
    mine = open_checkpoint(plan.base).fingerprint() if local else None
    if any(open_checkpoint(r).fingerprint() != mine for r in local):
        raise IncompatibleError(f"the adapters were trained on {sorted(theirs)}, not on --base {plan.base}",
                                path=plan.source, hint="drop --base (adapters merge without it) or fix it")


def merge_plan_adapters(plan: MergePlan, cks: list[Checkpoint], out: Path, weights: Callable[[], list[float]], *,
                        force: bool = False, progress=None, notes: list[str] | None = None) -> MergeResult:
    """The adapter engine's entry for a plan whose inputs are all adapters (opened by the dispatch);
    ``weights`` computes the donors' weights once the plan's adapter-specific checks have passed."""
    if plan.include_base:
        raise ConfigError("include_base does not apply to adapters (an adapter merge keeps the base outside)",
                          path=plan.source)
    if plan.base:
        _check_plan_base(plan, cks)
    w = weights()  # fills ``notes`` (a list the caller shares) when the weighting assumed something
    return merge_adapters(cks, w, notes=notes, mode=plan.lora_mode, rank=plan.rank, method=plan.method, out=out,
                          force=force, progress=progress, plan=plan, dtype=plan.dtype,
                          lora_scaling=plan.lora_scaling, lora_a_norm=plan.lora_a_norm, **plan.params)


__all__ = ["merge_adapters", "merge_plan_adapters"]
