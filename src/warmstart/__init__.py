"""warmstart: recycle the fine-tuning checkpoints you already have into a better
starting point for the next fine-tune.

The public API mirrors the stages: :mod:`checkpoints` and :mod:`library`
(catalog), ``select``, ``merge``, ``transfer``, ``optimize``, ``train``,
``pipeline`` and ``report``. Import the stage modules for their functions;
the names below are the ones most scripts need.
"""

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

__version__ = "0.1.0"

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
