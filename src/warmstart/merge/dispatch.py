"""The one entry point of an on-disk merge: open the inputs, then the full-weight or the adapter engine.

Both engines take what this module opened (checkpoints, weights) instead of re-opening paths; the
weights come from the one weighting registry (:mod:`.weights`). Training metrics for MWA that a
checkpoint does not carry (no trainer_state.json) are looked up by the caller (the CLI asks the
library catalog) and handed in as ``metrics``: merging never opens the catalog.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .._io import check_output
from ..checkpoints import check_adapter_fits, check_adapters_agree, open_checkpoint
from ..errors import IncompatibleError
from .engine import check_device, merge_models
from .lora import merge_plan_adapters
from .lora_apply import applied_loras
from .plan import MergePlan
from .results import MergeResult
from .slices import open_slice_models
from ..weighting import Metrics, resolve_weights


def merge(plan: MergePlan, out: str | Path, *, force: bool = False,
          progress: Callable[[int, int, str], None] | None = None, allow_nonfinite: bool = False,
          metrics: Mapping[str, Metrics] | None = None) -> MergeResult:
    """Run ``plan`` and write the merged model (or adapter) to ``out`` atomically.

    NaN/Inf in any input tensor is refused unless ``allow_nonfinite`` (it would poison the merge).
    ``metrics``: resolved checkpoint path → (final training loss, global step), used by MWA where
    a checkpoint has no trainer_state.json of its own."""
    out = Path(out)
    check_device(plan.device)
    if any(m.lora for m in plan.models):
        with applied_loras(plan, out) as applied:
            return merge(applied, out, force=force, progress=progress, allow_nonfinite=allow_nonfinite,
                         metrics=metrics)
    t0 = time.perf_counter()
    base_ck = open_checkpoint(plan.base, allow_nonfinite=allow_nonfinite) if plan.base else None
    if plan.slices:
        cks = open_slice_models(plan, base_ck, allow_nonfinite)
    else:
        cks = [open_checkpoint(m.ref, allow_nonfinite=allow_nonfinite) for m in plan.models]
    kinds = {c.kind for c in cks}
    if kinds == {"lora"} and not plan.slices:
        check_adapters_agree(cks)
        if base_ck is not None and base_ck.kind == "full":
            for c in cks:
                check_adapter_fits(c, base_ck)
        notes: list[str] = []  # what the weighting assumed (the MWA fallback), for the card
        return merge_plan_adapters(plan, cks, out, lambda: resolve_weights(plan, cks, None, metrics, notes),
                                   force=force, progress=progress, notes=notes)
    if "lora" in kinds or (base_ck is not None and base_ck.kind != "full"):
        raise IncompatibleError("cannot mix LoRA adapters and full models in one merge",
                                hint="merge the adapters first, or merge each adapter into its base model")
    check_output(out, force=force, inputs=[c.path for c in cks] + ([base_ck.path] if base_ck else []))
    notes = []
    weights = resolve_weights(plan, cks, base_ck, metrics, notes) if not plan.slices else [None] * len(cks)
    return merge_models(plan, cks, base_ck, out, weights, force=force, progress=progress, t0=t0, notes=notes)


__all__ = ["merge"]
