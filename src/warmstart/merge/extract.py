"""Extract a LoRA adapter from a full fine-tune: ΔW = W_ft − W_base ≈ B·A by truncated SVD, per module.

What mergekit-extract-lora 0.1.5 does, with the same factors (same SVD call, same
split: A = √Σ·Vᵀ, B = U·√Σ, or A = Σ·Vᵀ, B = U without ``distribute_scale``), the
same module choice (every ``nn.Linear`` decomposed; embeddings, ``lm_head`` and
modules that are not Linear — norms — saved whole in ``modules_to_save``, unless
skipped) and the same adapter config (``lora_alpha = r``, so PEFT's scaling is 1;
smaller ranks in ``rank_pattern``). Added here: the relative error
‖ΔW − BA‖_F / ‖ΔW‖_F of every module (in the result, the card and --json),
refusal of inputs that cannot give a loadable adapter (different shapes or
vocabulary), modules whose ΔW is below ``sv_epsilon`` left out instead of written
with rank 0, and an atomic output. Reads one tensor pair at a time.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_json, check_output
from ..checkpoints import open_checkpoint
from ..errors import CheckpointError, ConfigError, IncompatibleError
from ..provenance import write_artefact
from .engine import check_device


@dataclass
class ExtractResult:
    out: Path
    rank: int
    modules: dict[str, dict] = field(default_factory=dict)  # name → {rank, rel_error, shape}
    full_modules: list[str] = field(default_factory=list)  # saved whole (modules_to_save)
    skipped: dict[str, str] = field(default_factory=dict)  # name → why
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def lora_factors(delta: torch.Tensor, rank: int, *, distribute_scale: bool = True, sv_epsilon: float = 0.0):
    """(A, B) with B @ A the best rank-``rank`` approximation of ``delta`` (Eckart–Young), in delta's dtype.

    The operations are mergekit's, in its order, so the factors are bitwise the same on the same input.
    Returns ``(None, None)`` when no singular value exceeds ``sv_epsilon``.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(int((s > sv_epsilon).sum().item()), r)
    if r == 0:
        return None, None
    if distribute_scale:
        scale_a = scale_b = torch.diag(torch.sqrt(s[:r]))
    else:
        scale_a, scale_b = torch.diag(s[:r]), torch.eye(r, device=s.device)
    return (scale_a @ vh[:r]).to(delta.dtype), (u[:, :r] @ scale_b).to(delta.dtype)


def _meta_model(path: Path, cfg: dict):
    """The model's own classes on the meta device (no memory): which modules are Linear, which embeddings."""
    import transformers

    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise CheckpointError(f"config.json names no transformers architecture this version knows ({arch!r})",
                              path=path)
    with torch.device("meta"):
        return cls(transformers.AutoConfig.from_pretrained(path))


def _plan_modules(path: Path, cfg: dict, names: set[str], include, exclude, save_modules, skip_undecomposable):
    """[(module, 'lora' | 'full' | 'tied', source module)] and {module: why skipped}: mergekit's choice."""
    import torch.nn as nn

    model = _meta_model(path, cfg)
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    embeds = {id(emb_in), id(emb_out)}
    in_name = next((n for n, m in model.named_modules() if m is emb_in), None)
    wanted = lambda n: (not include or any(re.search(r, n) for r in include)) and not any(
        re.search(r, n) for r in exclude)
    save = list(save_modules)
    plan, skipped = [], {}
    for name, mod in model.named_modules():
        if not name or "weight" not in dict(mod.named_parameters(recurse=False)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if f"{name}.weight" not in names:
            if mod is emb_out and in_name and f"{in_name}.weight" in names and not any(
                    re.search(r, name) for r in exclude):
                # tied lm_head: saved whole from the input embedding, as mergekit does. PEFT unties it;
                # without it the adapter's head would stay the *base's* embedding (measured: logits off by 0.48)
                plan.append((name, "tied", in_name))
            else:
                skipped[name] = "not in the checkpoint (tied to the input embedding)"
            continue
        if (id(mod) in embeds or isinstance(mod, nn.Embedding)) and not any(re.search(r, name) for r in exclude):
            save.append(leaf)  # as mergekit: embeddings are saved whole, never decomposed
        if name in save or leaf in save:
            plan.append((name, "full", name))
        elif not wanted(name):
            skipped[name] = "excluded by --include/--exclude"
        elif isinstance(mod, nn.Linear):
            plan.append((name, "lora", name))
        elif skip_undecomposable:
            skipped[name] = f"{type(mod).__name__} cannot be decomposed (--skip-undecomposable)"
        else:
            plan.append((name, "full", name))
    return plan, skipped


def extract_lora(model: str | Path, base: str | Path, out: str | Path, *, rank: int = 128,
                 distribute_scale: bool = True, sv_epsilon: float = 0.0, include=(), exclude=(),
                 save_modules=(), skip_undecomposable: bool = False, device: str = "cpu",
                 force: bool = False) -> ExtractResult:
    """Write a PEFT LoRA adapter for ``base`` that approximates the full fine-tune ``model`` at rank ≤ ``rank``."""
    t0 = time.perf_counter()
    _check_args(rank, sv_epsilon, [*include, *exclude], device)
    ft, bs = open_checkpoint(model), open_checkpoint(base)
    for ck, role in ((ft, "model"), (bs, "base")):
        if ck.kind != "full":
            raise IncompatibleError(f"the {role} is a LoRA adapter; extraction needs two full models", path=ck.path)
    out = Path(out)
    check_output(out, force=force, inputs=[ft.path, bs.path])
    fw, bw = ft.weights(), bs.weights()
    plan, skipped = _plan_modules(ft.path, ft.config, set(fw.keys()), include, exclude, save_modules,
                                  skip_undecomposable)
    _check_shapes(plan, fw, bw, ft, bs)
    result = ExtractResult(out, rank, skipped=skipped)
    tensors, bias = _extract(plan, fw, bw, result, rank, distribute_scale, sv_epsilon, device)
    if not result.modules:
        raise ConfigError("no module to extract: every Linear module was excluded, skipped or unchanged",
                          path=ft.path)
    result.timings["total"] = time.perf_counter() - t0
    with atomic_dir(out, force=force) as tmp:
        _write(tmp, tensors, _adapter_config(bs, result, bias), ft, bs, result)
    return result


def _check_args(rank: int, sv_epsilon: float, regexes: list[str], device: str) -> None:
    if rank <= 0:
        raise ConfigError(f"rank must be positive, got {rank}")
    if sv_epsilon < 0:
        raise ConfigError(f"sv_epsilon must be >= 0, got {sv_epsilon}")
    for r in regexes:
        try:
            re.compile(r)
        except re.error as e:
            raise ConfigError(f"bad regular expression {r!r} ({e})") from None
    check_device(device)  # one line, before any work, when the device is not there


def _extract(plan, fw, bw, result: ExtractResult, rank, distribute_scale, sv_epsilon, device):
    """The adapter's tensors (PEFT names) for every planned module, one tensor pair in memory at a time."""
    tensors, bias = {}, False
    for name, how, src in plan:
        key = f"base_model.model.{name}"
        if how in ("full", "tied"):
            for p in ("weight", "bias"):
                if f"{src}.{p}" in fw:
                    tensors[f"{key}.{p}"] = fw.get(f"{src}.{p}").clone()  # clone: a tied pair shares no storage
            result.full_modules.append(name)
            continue
        delta = fw.get(f"{name}.weight").to(device) - bw.get(f"{name}.weight").to(device)
        a, b = lora_factors(delta, rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon)
        if a is None:
            result.skipped[name] = f"unchanged: no singular value of ΔW above {sv_epsilon}"
            continue
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.cpu().contiguous(), b.cpu().contiguous()
        if f"{name}.bias" in fw:  # PEFT's lora_bias: the bias change rides on lora_B
            tensors[f"{key}.lora_B.bias"] = (fw.get(f"{name}.bias") - bw.get(f"{name}.bias")).contiguous()
            bias = True
        err = (torch.linalg.norm(delta.float() - b.float() @ a.float())
               / torch.linalg.norm(delta.float()).clamp(min=1e-30))
        result.modules[name] = {"rank": a.shape[0], "rel_error": float(err), "shape": list(delta.shape)}
    if bias:  # PEFT's lora_bias gives every target a lora_B bias: zeros where the layer has none (no missing keys)
        for name in result.modules:
            k = f"base_model.model.{name}.lora_B.weight"
            tensors.setdefault(k.replace(".weight", ".bias"), torch.zeros(tensors[k].shape[0], dtype=tensors[k].dtype))
    return tensors, bias


def _check_shapes(plan, fw, bw, ft, bs) -> None:
    for _name, how, src in plan:
        w = f"{src}.weight"
        if w not in bw:
            raise IncompatibleError(f"tensor {w!r} is in the model but not in the base", path=bs.path)
        if fw.shape(w) != bw.shape(w):
            what = ("the vocabulary differs: the adapter would not load on the base (resize the base's "
                    "embeddings first)" if how == "full" else "these are not the same architecture")
            raise IncompatibleError(f"tensor {w!r} has shape {list(fw.shape(w))} in the model, "
                                    f"{list(bw.shape(w))} in the base ({what})", path=ft.path)


def _adapter_config(bs, result: ExtractResult, bias: bool) -> dict:
    ranks = {n: m["rank"] for n, m in result.modules.items()}
    r = max(ranks.values())
    other = {n: v for n, v in ranks.items() if v != r}
    full = sorted({n.rsplit(".", 1)[-1] for n in result.full_modules})
    return {"base_model_name_or_path": str(bs.path.resolve()), "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": other, "use_rslora": False,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}), "modules_to_save": full or None,
            "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
            **({"lora_bias": True} if bias else {})}  # only when needed: PEFT < 0.14 has no such field


def _write(tmp: Path, tensors: dict, cfg: dict, ft, bs, result: ExtractResult) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(tmp / "adapter_config.json", cfg)
    meta = {"made_by": "warmstart extract-lora", "kind": "lora", "model": str(ft.path), "base_model": str(bs.path),
            **{k: v for k, v in result.to_dict().items() if k != "out"}}
    write_artefact(tmp, meta, _card(cfg, ft, bs, result))


def _card(cfg: dict, ft, bs, result: ExtractResult) -> str:
    worst = max(m["rel_error"] for m in result.modules.values())
    rows = "\n".join(f"| `{n}` | {m['rank']} | {m['rel_error']:.3g} |" for n, m in result.modules.items())
    return (
        f"---\nlibrary_name: peft\nbase_model: {bs.path}\ntags: [warmstart, extract-lora]\n---\n\n"
        f"# LoRA extracted from `{ft.path}`\n\nMade with `warmstart extract-lora`: ΔW = model − base, truncated "
        f"SVD at rank ≤ {result.rank} per Linear module (lora_alpha = r, scaling 1). Saved whole: "
        f"{', '.join(cfg['modules_to_save'] or []) or 'nothing'}.\n\nWorst relative error ‖ΔW − BA‖/‖ΔW‖: "
        f"{worst:.3g}.\n\n| module | rank | rel. error |\n|---|---|---|\n{rows}\n")


__all__ = ["ExtractResult", "extract_lora", "lora_factors"]
