"""The types both merge engines share: the result of a merge, its per-tensor report, a planned tensor.

They live apart from the engines so the full-weight engine (:mod:`.engine`), the adapter engine
(:mod:`.lora`) and the frankenmerge planner (:mod:`.slices`) import them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoints import TensorMeta


@dataclass
class TensorReport:
    name: str
    shape: list[int]
    dtype: str
    inputs: int  # how many donors took part
    action: str  # merged | copied | vocab-resized | tied-embedding
    note: str = ""


@dataclass
class MergeResult:
    out: Path
    method: str
    weights: list[float]
    inputs: list[dict]
    tensors: list[TensorReport] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    lora_errors: dict[str, float] | None = None  # LoRA merges: relative ΔW error per module
    state_dict: dict | None = field(default=None, repr=False)  # in-memory adapter merges (out=None)
    adapter_config: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("state_dict")
        d["out"] = str(self.out) if self.out is not None else None
        return d


@dataclass
class Item:
    """One output tensor of a full-weight merge, as planned before any tensor is read."""

    name: str
    out_dtype: torch.dtype
    shape: tuple
    base: TensorMeta | None  # θ₀ (or the reference, for copies)
    srcs: list[tuple[int, TensorMeta]]  # (donor index, meta) of the donors that take part
    action: str = "merged"
    note: str = ""
    t: float = 0.0  # position in the layer stack, for mergekit's gradient parameters (0 outside the layers)
    specs: list | None = None  # per src: its ModelSpec / slice source (None: the base as a donor)
    slice_params: dict | None = None  # the slice's own parameters (slices only)
    weights: list[float] | None = None  # resolved per tensor (see engine._resolve_items)
    params: dict | None = None
    permute: Callable | None = None  # tokenizer merging: (base, inputs) → re-indexed to the output vocabulary


def torch_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    """A plan's dtype name ("bfloat16") as a torch dtype; ``default`` when the plan leaves it unset."""
    return getattr(torch, name) if name else default


__all__ = ["Item", "MergeResult", "TensorReport", "torch_dtype"]
