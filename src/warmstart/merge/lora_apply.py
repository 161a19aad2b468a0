"""mergekit's ``model+lora`` syntax: apply a LoRA adapter to a model before it takes part in a merge.

As mergekit 0.1.5 (``ModelReference.merged``), the adapter is applied by PEFT's
``merge_and_unload`` on the model loaded as stored, and the result is saved to a temporary
directory next to the output (removed afterwards), which then is an ordinary merge input. PEFT
is used rather than our own W + s·BA so the weights are PEFT's, bit for bit (and every PEFT
adapter type it can merge works); the cost is one model in memory while it is applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError


def _apply(model: str, lora: str, dst: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for p, what in ((model, "model"), (lora, "LoRA adapter")):
        if not Path(p).exists():
            raise CheckpointError(f"{what} of {model}+{lora} not found", path=p)
    if not (Path(lora) / "adapter_config.json").exists():
        raise CheckpointError(f"{model}+{lora}: {lora} is not a PEFT adapter (no adapter_config.json)", path=lora)
    m = AutoModelForCausalLM.from_pretrained(model)
    m = PeftModel.from_pretrained(m, lora, is_trainable=False).merge_and_unload()
    m.save_pretrained(dst, safe_serialization=True)
    for f in Path(model).iterdir():  # tokenizer and other side files, as the model has them
        if f.is_file() and not (dst / f.name).exists() and not f.name.endswith((".safetensors", ".bin", ".json.index")):
            shutil.copy2(f, dst / f.name)


@contextlib.contextmanager
def applied_loras(plan, out: Path):
    """A copy of ``plan`` whose ``model+lora`` entries point at temporary models with the adapter applied."""
    parent = out.parent if out.parent.exists() else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lora-", dir=parent))
    try:
        models = []
        for i, m in enumerate(plan.models):
            if m.lora:
                dst = tmp / f"model{i}"
                _apply(m.ref, m.lora, dst)
                m = dataclasses.replace(m, ref=str(dst), lora=None)
            models.append(m)
        cfg = plan.config_from or (plan.base if plan.base else None)
        if cfg is None and plan.models[0].lora:
            cfg = plan.models[0].ref  # the config of the model the first adapter was applied to
        yield dataclasses.replace(plan, models=models, config_from=cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["applied_loras"]
