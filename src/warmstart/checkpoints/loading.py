"""Loading through transformers: the one place a bare or damaged checkpoint meets it."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import CheckpointError, WarmstartError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@contextlib.contextmanager
def _loading(path: str | Path, what: str, hint: str):
    """transformers and tokenizers raise ValueError, OSError, KeyError, JSONDecodeError, their own
    exception types... for what is, to the user, one problem: this directory cannot be loaded. Every
    one becomes a single CheckpointError naming the directory (bugs in warmstart are not in here)."""
    try:
        yield
    except (WarmstartError, MemoryError):
        raise
    except Exception as e:
        text = str(e).strip()
        msg = text.splitlines()[0][:300] if text else ""
        raise CheckpointError(f"cannot load the {what} ({type(e).__name__}{': ' + msg if msg else ''})",
                              path=path, hint=hint) from None


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)``; a missing, corrupt or unknown tokenizer is one line."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError("no tokenizer files (tokenizer.json, tokenizer_config.json, ...)", path=p,
                              hint="copy the tokenizer files of the model it was trained from into it")
    with _loading(p, "tokenizer", "copy the tokenizer files of the model it was trained from into it"):
        return AutoTokenizer.from_pretrained(p)


def load_causal_lm(path: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``; an unknown ``model_type``, a config
    transformers cannot read or weights that do not fit it are one line naming the directory."""
    from transformers import AutoModelForCausalLM

    with _loading(path, "model", "check model_type and architectures in config.json against the installed "
                                 "transformers version"):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


__all__ = ["TOKENIZER_FILES", "load_causal_lm", "load_tokenizer"]
