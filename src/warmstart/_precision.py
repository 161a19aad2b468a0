"""Compute dtype for scoring: bfloat16 where the hardware runs it fast, float32 where it matters.

Scoring (select, evaluation curves, the bench) is forward passes only, and most
of their time is matmuls; bfloat16 matmuls run 2-3x faster on CPUs with
AVX512-BF16 or AMX (oneDNN kernels) and on most GPUs. What must stay float32:
the logits that go into the log-softmax (a bf16 logit near 16 is rounded to
1/8 — an error of that size per token would move a ranking), and every sum of
log-likelihoods (float64 in evaluate.py). So the transformer body runs in
bf16 and the LM head, at the few positions that predict a target, in float32.

``auto`` picks bfloat16 only on hardware that has it; anything else, and any
explicit ``float32``, keeps the previous float32 path unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


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
    cast per matmul). A model whose weights are already bf16/fp16: as is. In both
    cases the output head computes in float32 (its weight cast once here).
    ``None``/``float32`` on a float32 model: nothing changes.
    """
    import torch

    param = next(model.parameters())
    low = dtype == "bfloat16" or param.dtype in (torch.bfloat16, torch.float16)
    head = _plain_linear_head(model) if low else None
    stack = contextlib.ExitStack()
    with stack:
        if dtype == "bfloat16" and param.dtype == torch.float32:
            stack.enter_context(torch.autocast(param.device.type, dtype=torch.bfloat16))
        if head is not None:
            w = head.weight.detach().float()
            b = None if head.bias is None else head.bias.detach().float()

            def fp32_forward(x):
                with torch.autocast(x.device.type, enabled=False):
                    return torch.nn.functional.linear(x.float(), w, b)

            head.forward = fp32_forward  # instance attribute: shadows Linear.forward until removed
            stack.callback(lambda: head.__dict__.pop("forward", None))
        yield


__all__ = ["COMPUTE_DTYPES", "compute", "cpu_has_fast_bf16", "resolve"]
