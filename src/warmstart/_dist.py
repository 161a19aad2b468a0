"""Multi-process launches (``accelerate launch`` / ``torchrun``): which process this is, and barriers.

One place for what the pipeline, training and selection need: the main process (rank 0) writes
every file; all processes meet at a barrier after each stage. Outside a launch this is one process,
the main one, and a barrier is a no-op. torch and accelerate are imported only when asked.
"""

from __future__ import annotations

import os


def rank_world() -> tuple[int, int]:
    """(rank, world size) as set by ``accelerate launch`` / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start() -> None:
    """Set up torch.distributed when launched with several processes (accelerate's PartialState,
    which the Trainer shares); nothing otherwise."""
    from accelerate import PartialState

    PartialState()


def _group():
    """torch.distributed when a process group is running, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def is_main() -> bool:
    """Whether this process writes: rank 0 of the process group, or of the launch's environment."""
    dist = _group()
    return dist.get_rank() == 0 if dist is not None else rank_world()[0] == 0


def barrier() -> bool:
    """Wait for every process of the group; False (without waiting) when no group is running."""
    dist = _group()
    if dist is None:
        return False
    dist.barrier()
    return True


__all__ = ["barrier", "is_main", "rank_world", "start"]
