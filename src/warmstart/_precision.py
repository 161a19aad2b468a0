"""Compute dtype for scoring: bfloat16 where the hardware runs it fast, float32 where it matters.

Scoring (select, evaluation curves, the bench) is forward passes only, and most
of their time is matmuls; bfloat16 matmuls run 2-3x faster on CPUs with
AVX512-BF16 or AMX (oneDNN kernels) and on most GPUs. What must stay float32:
the logits that go into the log-softmax (a bf16 logit near 16 is rounded to
1/8 — an error of that size per token would move a ranking), and every sum of
log-likelihoods (float64 in evaluate.py). So the transformer body runs in
bf16, and the LM head, at the few positions that predict a target, runs in
bf16 with the logits that decide the result recomputed in float32: the
``EXACT_TOP_K`` largest at each position (they hold most of the softmax's
mass, and the argmax) and the target tokens the caller names
(:func:`exact_tokens`); the rest of the vocabulary enters the normaliser as
bf16 values, whose rounding errors are small and of either sign. Measured on
SmolLM2-135M (3,456 ARC-Easy positions, against float64): per-token log-prob
error mean 2.0e-3, max 2.7e-2 nats with k = 8, against 2.3e-2 / 1.1e-1 for a
plain bf16 head; the argmax equal at every position. Also without gradients:
each vanilla LoRA layer runs as one matmul with bf16(W + s·B·A) (merged in
float32), and the weights' bf16 copies are kept across forwards and calls
instead of autocast's cast at every matmul (docs/performance.md). With
gradients (the gradient proxy) the float32 head and autocast's casts, as before.

``auto`` picks bfloat16 only on hardware that has it; anything else, and any
explicit ``float32``, keeps the previous float32 path unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
EXACT_TOP_K = 8  # logits per position recomputed in float32 by the bf16 head (see the module docstring)
BF16_HEAD = True  # False: the previous float32 head under bf16 compute (kept callable for benchmarks/)
BF16_WEIGHTS = True  # False: autocast casts every weight at every forward (the previous path)
CACHE_LIMIT_BYTES = 2 * 2 ** 30  # bf16 copies kept per model at most (a 1B-parameter model's linears)
_BF16: dict[int, tuple] = {}  # id(weight) -> (weakref, version, bf16 copy)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux); False where they cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(dtype: str | None, device: str | None = None) -> str:
    """``auto`` -> ``bfloat16`` on a bf16-capable GPU or CPU, else ``float32``; other names pass through."""
    import torch

    if dtype in (None, "auto"):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return "bfloat16" if str(device).startswith("cpu") and cpu_has_fast_bf16() else "float32"
    return dtype


def _plain_linear_head(model):
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if get else None
    return head if type(head) is torch.nn.Linear else None  # a LoRA-wrapped head keeps its own forward


@contextlib.contextmanager
def compute(model, dtype: str | None):
    """Run ``model``'s forwards in ``dtype`` with float32 logits.

    ``bfloat16`` on a float32 model: autocast (the weights stay float32 and are
    cast per matmul); without gradients the LM head is the bf16 head with the
    deciding logits recomputed in float32 (module docstring), with gradients the
    float32 head. A model whose weights are already bf16/fp16: as is, with the
    float32 head. ``None``/``float32`` on a float32 model: nothing changes.
    """
    import torch

    param = next(model.parameters())
    low = dtype == "bfloat16" or param.dtype in (torch.bfloat16, torch.float16)
    head = _plain_linear_head(model) if low else None
    stack = contextlib.ExitStack()
    with stack:
        autocast = dtype == "bfloat16" and param.dtype == torch.float32
        if autocast:
            stack.enter_context(torch.autocast(param.device.type, dtype=torch.bfloat16))
            if BF16_WEIGHTS and not torch.is_grad_enabled():
                loras = _plain_loras(model)
                for m, a in loras:  # base + LoRA as one bf16 weight: one matmul instead of three
                    m.forward = functools.partial(_bf16_linear, _merged_bf16(m, a), m.base_layer.bias)
                    stack.callback(m.__dict__.pop, "forward", None)
                skip = {id(m.base_layer) for m, _ in loras}
                for m in _cacheable_linears(model, head):
                    if id(m) not in skip:
                        m.forward = functools.partial(_bf16_linear, _bf16_of(m.weight), m.bias)
                        stack.callback(m.__dict__.pop, "forward", None)
        if head is not None:
            w = head.weight.detach().float()
            b = None if head.bias is None else head.bias.detach().float()
            if autocast and BF16_HEAD and not torch.is_grad_enabled():
                head.forward = _refined_head(head, w, b)
            else:
                def fp32_forward(x):
                    with torch.autocast(x.device.type, enabled=False):
                        return torch.nn.functional.linear(x.float(), w, b)

                head.forward = fp32_forward  # instance attribute: shadows Linear.forward until removed
            stack.callback(lambda: head.__dict__.pop("forward", None))
            stack.callback(lambda: head.__dict__.pop("_warmstart_exact", None))
        yield


def _cacheable_linears(model, head) -> list:
    """The plain float32 linears whose bf16 copies are kept across forwards and calls: every one but the
    head and LoRA's own A/B (tiny, and what a selection swaps), if their copies fit CACHE_LIMIT_BYTES.

    Autocast casts a weight at every matmul (``aten::copy_``, 11-12 % of a multiple-choice selection's
    profile); a scorer runs the same frozen base for every candidate, so one cast serves them all."""
    import torch

    mods = [m for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head
            and m.weight.dtype == torch.float32 and ".lora_" not in f".{n}"]
    return mods if 2 * sum(m.weight.numel() for m in mods) <= CACHE_LIMIT_BYTES else []


def _plain_loras(model) -> list:
    """(layer, adapter) of every PEFT LoRA linear that computes exactly ``x @ (W + s·B·A)ᵀ + b`` now: one
    active vanilla adapter (no DoRA or other variant, no LoRA bias), not merged or disabled, no
    fan-in-fan-out, dropout off, a plain float32 base. Anything else keeps PEFT's forward."""
    import torch

    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    out = []
    for m in model.modules():
        if type(m) is not LoraLinear or m.disable_adapters or m.merged or len(m.active_adapters) != 1:
            continue
        a = m.active_adapters[0]
        if (a not in m.lora_A or a in getattr(m, "lora_variant", {}) or m.use_dora.get(a) or m.fan_in_fan_out
                or m.lora_B[a].bias is not None or type(m.base_layer) is not torch.nn.Linear
                or m.base_layer.weight.dtype != torch.float32
                or (m.training and not isinstance(m.lora_dropout[a], torch.nn.Identity))):
            continue
        out.append((m, a))
    return out


def _merged_bf16(m, a):
    """bf16(W + s·B·A) of a LoRA layer, computed in float32; kept until W, A, B or s change when all
    three are frozen (a scorer's candidates), made at each call when any is trainable (see _bf16_of)."""
    import torch

    w, la, lb, s = m.base_layer.weight, m.lora_A[a].weight, m.lora_B[a].weight, float(m.scaling[a])

    def make():
        with torch.autocast(w.device.type, enabled=False):
            return torch.addmm(w.detach(), lb.detach().float(), la.detach().float(), alpha=s).to(torch.bfloat16)

    if w.requires_grad or la.requires_grad or lb.requires_grad:
        return make()
    return _kept(lb, (id(w), id(la), w._version, la._version, lb._version, s), make)


def _bf16_of(w):
    """A bfloat16 copy of ``w``. A frozen weight's copy is kept while ``w`` lives and made again when
    ``w`` changes (an in-place write such as ``copy_`` of another checkpoint's tensors bumps its
    version; a write through ``.data`` would not, and nothing in warmstart scores after one). A
    trainable weight's is made at each call: a fused optimizer step does not bump the version."""
    import torch

    if w.requires_grad:
        return w.detach().to(torch.bfloat16)
    return _kept(w, w._version, lambda: w.detach().to(torch.bfloat16))


def _kept(anchor, version, make):
    """``make()``, kept in ``_BF16`` under ``anchor`` (dropped with it) until ``version`` changes."""
    import weakref

    key = id(anchor)
    hit = _BF16.get(key)
    if hit is not None and hit[0]() is anchor and hit[1] == version:
        return hit[2]
    if hit is None:
        weakref.finalize(anchor, _BF16.pop, key, None)
    out = make()
    _BF16[key] = (weakref.ref(anchor), version, out)
    return out


def _bf16_linear(weight, bias, x, *args, **kwargs):
    import torch.nn.functional as F

    return F.linear(x, weight, bias)  # under autocast: x and the bias cast to bf16, as autocast's linear


def exact_tokens(model, ids) -> None:
    """Token ids whose logits the next forward's bf16 head recomputes in float32 at every position
    (the targets being scored); a no-op where the head is not the bf16 one."""
    head = _plain_linear_head(model)
    if head is not None and getattr(head.__dict__.get("forward"), "refined", False):
        head._warmstart_exact = ids


def _refined_head(head, w, b):
    """The bf16 head: logits from a bf16 matmul, in float32, with the ``EXACT_TOP_K`` largest per
    position and the requested target tokens recomputed in float32 (one small matmul over their union)."""
    import torch
    import torch.nn.functional as F

    wb = _bf16_of(head.weight) if BF16_WEIGHTS else w.to(torch.bfloat16)
    bb = None if b is None else b.to(torch.bfloat16)

    def forward(x):
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.to(torch.bfloat16), wb, bb).float()
            flat, xf = z.view(-1, z.shape[-1]), x.reshape(-1, x.shape[-1]).float()
            if flat.shape[0] == 0:
                return z
            ids = [flat.topk(min(EXACT_TOP_K, flat.shape[-1]), dim=-1).indices.flatten()]
            want = head.__dict__.pop("_warmstart_exact", None)
            if want is not None:
                ids.append(torch.as_tensor(want, dtype=torch.long, device=z.device).flatten())
            u = torch.unique(torch.cat(ids))
            flat[:, u] = F.linear(xf, w[u], None if b is None else b[u])
            return z

    forward.refined = True
    return forward


__all__ = ["COMPUTE_DTYPES", "EXACT_TOP_K", "compute", "cpu_has_fast_bf16", "exact_tokens", "resolve"]
