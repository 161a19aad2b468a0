"""Checkpoints: weights and identity.

* :mod:`.refs` -- references (local paths, Hub ids) resolved to a directory;
* :mod:`.dtypes` -- the one dtype table (safetensors names, sizes, torch dtypes, user names);
* :mod:`.headers` -- safetensors headers, parsed and validated without loading a tensor;
* :mod:`.readers` -- lazy per-tensor readers (memory-mapped safetensors, opt-in pickle);
* :mod:`.streaming` -- pread reader and streamed shard writer of the merge engine and transfer
  (imports torch: not imported here);
* :mod:`.digests` -- per-tensor digests (cached), fingerprints, architecture signatures;
* :mod:`.adapters` -- LoRA adapter fields and factor-shape checks;
* :mod:`.checkpoint` -- :func:`open_checkpoint`, :class:`Checkpoint`, :func:`discover`;
* :mod:`.loading` -- loading through transformers with one-line errors.

The names below are the ones callers import from ``warmstart.checkpoints``.
"""

from .adapters import LoraInfo, LoraModule, check_adapter_fits, check_adapters_agree, lora_modules
from .adapters import _pattern_value  # noqa: F401  (the tests' name for PEFT's pattern lookup)
from .checkpoint import PICKLE_NAMES, Checkpoint, Kind, TrainingMetrics, discover, is_checkpoint_dir, open_checkpoint
from .digests import DigestCache, cache_dir, default_digest_cache, signature_hash
from .dtypes import DTYPE_SIZES
from .headers import MAX_HEADER, TensorMeta, read_header
from .loading import TOKENIZER_FILES, load_causal_lm, load_tokenizer
from .readers import PickleWeightReader, WeightReader, check_finite
from .refs import HUB_ID_RE, HUB_PROBE_TIMEOUT_S, is_hub_id, looks_like_path, resolve

_check_finite = check_finite  # the name callers used before the split

__all__ = [
    "DTYPE_SIZES",
    "HUB_ID_RE",
    "HUB_PROBE_TIMEOUT_S",
    "MAX_HEADER",
    "PICKLE_NAMES",
    "TOKENIZER_FILES",
    "Checkpoint",
    "DigestCache",
    "Kind",
    "LoraInfo",
    "LoraModule",
    "PickleWeightReader",
    "TensorMeta",
    "TrainingMetrics",
    "WeightReader",
    "cache_dir",
    "check_adapter_fits",
    "check_adapters_agree",
    "check_finite",
    "default_digest_cache",
    "discover",
    "is_checkpoint_dir",
    "is_hub_id",
    "load_causal_lm",
    "load_tokenizer",
    "looks_like_path",
    "lora_modules",
    "open_checkpoint",
    "read_header",
    "resolve",
    "signature_hash",
]
