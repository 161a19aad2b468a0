"""The gradient proxy: rank N candidates with one backward pass instead of N evaluations.

At the base θ₀ the target loss is L(θ₀) with gradient g = ∇L(θ₀). A candidate
θᵢ = θ₀ + δᵢ has, to first order, L(θᵢ) ≈ L(θ₀) + ⟨g, δᵢ⟩ (the linearisation
behind task-vector analyses, e.g. Ortiz-Jimenez et al. 2023,
https://arxiv.org/abs/2305.12827). The cost is one forward + backward on the
target sample, then one inner product per candidate, read tensor by tensor.

For a LoRA module δW = s·B·A (B: out×r, A: r×in). ΔW is never formed:
⟨G, s·B·A⟩ = s·tr(Gᵀ B A) = s·Σ((Bᵀ G) ⊙ A), an r×in product instead of out×in
memory. Embedding LoRA and fan-in-fan-out (Conv1D) layers store the transpose;
the shapes tell which. ``modules_to_save`` tensors are full replacements:
δ = W_saved − W₀.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .checkpoints import open_checkpoint
from .checkpoints.adapters import PEFT_LORA_KEY as _LORA_KEY
from .data import IGNORE_INDEX, collate, pad_id_of, tokenize
from .errors import ConfigError, IncompatibleError
from .evaluate import target_logits

_PEFT_PREFIX = "base_model.model."


def base_gradient(model, tokenizer, target, *, params: set[str] | None = None, batch_size: int = 16,
                  max_length: int = 512, progress: Callable[[int], None] | None = None):
    """(mean target loss, {param name: gradient}) at the model's current weights.

    Only ``params`` (all when None) get gradients: a LoRA library touching q/v
    projections needs no weight-gradient for the embeddings or the LM head.
    """

    rows = tokenize(target, tokenizer, max_length=max_length)
    n_tok = sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    if n_tok == 0:
        raise ConfigError("the target sample has no target tokens after truncation", path=target.path)
    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for n, p in named.items():
            p.requires_grad_(params is None or n in params)
            p.grad = None
        for start in range(0, len(rows), batch_size):
            t = collate(rows[start:start + batch_size], pad_id_of(tokenizer))
            logits, labels, mask = target_logits(model, t["input_ids"].to(device), t["attention_mask"].to(device),
                                                 t["labels"][:, 1:].to(device))
            nll = -logits[mask].float().log_softmax(-1).gather(-1, labels[mask][:, None]).sum()
            (nll / n_tok).backward()  # token-weighted mean over the whole sample, as evaluate() reports
            total += nll.item()
            if progress:
                progress(len(t["input_ids"]))
        grads = {n: p.grad.detach().float() for n, p in named.items() if p.grad is not None}
    finally:
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(flags[n])
        model.train(was_training)
    return total / n_tok, grads


def lora_modules(path) -> set[str]:
    """Names of the base parameters an adapter changes (``<module>.weight`` and saved modules)."""
    out = set()
    for key in open_checkpoint(path).weights().keys():
        m = _LORA_KEY.match(key)
        out.add(f"{m['module']}.weight" if m else key.removeprefix(_PEFT_PREFIX))
    return out


def lora_dot(grads: dict, path, base_params: dict) -> float:
    """⟨g, δ⟩ for a PEFT LoRA adapter, from its factors (never forming B·A)."""
    import torch

    ck = open_checkpoint(path)
    reader = ck.weights()
    factors: dict[str, dict[str, Any]] = {}
    total = torch.zeros((), dtype=torch.float64)
    for key in reader.keys():
        if "lora_magnitude_vector" in key:
            raise ConfigError("the gradient proxy does not support DoRA adapters", path=ck.path,
                              hint="use --scorer loss")
        m = _LORA_KEY.match(key)
        if m:
            factors.setdefault(m["module"], {})[m["ab"]] = key
            continue
        name = key.removeprefix(_PEFT_PREFIX)  # modules_to_save: a full replacement tensor
        g = _grad_for(grads, name, ck.path)
        total += (g * (reader.get(key, torch.float32).to(g.device) - base_params[name].float())).double().sum()
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleError(f"adapter module {module!r} lacks lora_A or lora_B", path=ck.path)
        g = _grad_for(grads, f"{module}.weight", ck.path)
        a = reader.get(ab["A"], torch.float32).to(g.device)
        b = reader.get(ab["B"], torch.float32).to(g.device)
        if g.shape != (b.shape[0], a.shape[1]):
            g = g.T  # embedding LoRA / Conv1D: the weight is (B·A)ᵀ
        total += ck.lora.scaling(module) * ((b.T @ g) * a).double().sum()
    return float(total)


def full_dot(grads: dict, path, base_params: dict) -> float:
    """⟨g, θᵢ − θ₀⟩ for a full checkpoint, streamed one tensor at a time."""
    import torch

    reader = open_checkpoint(path).weights()
    total = torch.zeros((), dtype=torch.float64)
    for name, g in grads.items():
        if name not in reader:
            raise IncompatibleError(f"checkpoint has no tensor {name!r}", path=path)
        delta = reader.get(name, torch.float32).to(g.device) - base_params[name].float()
        total += (g * delta).double().sum()
    return float(total)


def _grad_for(grads: dict, name: str, path):
    if name not in grads:
        raise IncompatibleError(f"adapter changes {name!r}, which the base model does not have", path=path)
    return grads[name]


def score(model, tokenizer, target, order, *, base, batch_size: int, max_length: int,
          progress: Callable[[str, Any], None] | None = None) -> dict[str, dict[str, float]]:
    """Predicted loss L₀ + ⟨g, δᵢ⟩ for each candidate, keyed by candidate fingerprint."""
    need: set[str] | None = set()
    for c in order:
        if c.kind == "full":
            need = None  # a full checkpoint changes everything
            break
        if c.kind == "lora":
            need |= lora_modules(c.path)
    if progress:
        progress("start", len(target) + len(order))
    loss0, grads = base_gradient(model, tokenizer, target, params=need, batch_size=batch_size,
                                 max_length=max_length, progress=(lambda n: progress("rows", n)) if progress else None)
    base_params = {n: p.detach() for n, p in model.named_parameters()}
    out = {}
    for c in order:
        if progress:
            progress("candidate", c)
        if c.kind == "base":
            d = 0.0
        elif c.kind == "lora":
            d = lora_dot(grads, c.path, base_params)
        else:
            d = full_dot(grads, c.path, base_params)
        out[c.fingerprint] = {"loss": loss0 + d, "delta": d}
        if progress:
            progress("rows", 1)
    return out


__all__ = ["base_gradient", "full_dot", "lora_dot", "lora_modules", "score"]
