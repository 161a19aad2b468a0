"""Merging checkpoints: per-tensor methods, weighting schemes, streaming engine, LoRA adapter space.

Layout (imports go down this list, never up): ``methods``/``methods_more`` and ``weights`` are the
registries of method and weighting-scheme names; ``plan`` (+ ``mergekit_yaml``, ``settings``) the
validated description of a merge; ``results`` the shared result types; ``engine`` (full models,
streamed) and ``lora`` (adapters) the two engines; ``dispatch`` the entry point on top.

In memory (for the weight optimizer)::

    from warmstart.merge import merge_tensors, merge_state_dicts
    sd = merge_state_dicts("ties", [sd_a, sd_b], base_sd, [0.5, 0.5], density=0.5)

On disk (streaming, bounded memory, atomic)::

    from warmstart.merge import MergePlan, merge
    result = merge(MergePlan.from_yaml("plan.yaml"), Path("out/merged"))
"""

from . import methods_more  # noqa: F401  (registers nuslerp, della, sce, ... into REGISTRY)
from .dispatch import merge
from .methods import REGISTRY, Method, get_method, merge_state_dicts, merge_tensors
from .plan import MergePlan, ModelSpec
from .results import MergeResult, TensorReport
from ..weighting import SCHEMES, compute_weights

__all__ = [
    "REGISTRY",
    "SCHEMES",
    "MergePlan",
    "MergeResult",
    "Method",
    "ModelSpec",
    "TensorReport",
    "compute_weights",
    "get_method",
    "merge",
    "merge_state_dicts",
    "merge_tensors",
]
