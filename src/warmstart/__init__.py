"""warmstart: recycle the fine-tuning checkpoints you already have into a better
starting point for the next fine-tune.

The public API mirrors the stages: :mod:`checkpoints` and :mod:`library`
(catalog), ``select``, ``merge``, ``transfer``, ``optimize``, ``train``,
``pipeline`` and ``report``. Import the stage modules for their functions;
the names below are the ones most scripts need.
"""

import warnings as _warnings

from .checkpoints import Checkpoint, LoraInfo, TrainingMetrics, WeightReader, discover, open_checkpoint
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleError,
    LibraryError,
    OutputExistsError,
    WarmstartError,
)
from .library import Entry, Library
from .provenance import __version__

# PEFT reads transformers' deprecated `is_gradient_checkpointing` on every adapter load; the
# FutureWarning is about those two libraries, not about anything a warmstart user can change.
# (Set after the imports above: none of them imports torch/transformers/peft or warns.)
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Entry",
    "IncompatibleError",
    "Library",
    "LibraryError",
    "LoraInfo",
    "OutputExistsError",
    "TrainingMetrics",
    "WarmstartError",
    "WeightReader",
    "discover",
    "open_checkpoint",
    "__version__",
]
