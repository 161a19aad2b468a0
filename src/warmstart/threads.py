"""How many CPU threads torch computes with.

Torch's default is one thread per core, with OpenMP workers that spin while they wait. On a
machine whose cores are shared with other work that collapses: a descheduled worker stalls every
parallel region, and a training step on 2 busy cores ran 5.5x slower with 2 threads than with 1
(issue 15; the measurements and the reasoning for the default are in docs/performance.md).

:func:`configure` is called by every command that computes with torch, before torch is imported,
so the OpenMP settings it exports take effect; from Python call it yourself before ``import torch``
(or at any time for the intra-op count alone).
"""

from __future__ import annotations

import os

from .errors import ConfigError

ENV = "WARMSTART_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (affinity / cgroup cpusets included), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """One thread per CPU this process may use: with OMP_WAIT_POLICY=PASSIVE (set by :func:`configure`)
    that was the fastest setting both on a quiet and on a loaded machine (docs/performance.md); what
    collapses under load is the spinning, not the thread count."""
    return available_cpus()


def chosen_threads(n: int | None = None) -> tuple[int, str]:
    """The thread count and where it came from: ``n``, $WARMSTART_THREADS, $OMP_NUM_THREADS or the default."""
    for value, source in ((n, "--threads"), (os.environ.get(ENV), ENV), (os.environ.get("OMP_NUM_THREADS"),
                                                                          "OMP_NUM_THREADS")):
        if value is None or value == "":
            continue
        try:
            k = int(value)
        except ValueError:
            raise ConfigError(f"{source} must be a positive integer, got {value!r}") from None
        if k < 1:
            raise ConfigError(f"{source} must be a positive integer, got {value!r}")
        return k, source
    return default_threads(), "default"


def configure(n: int | None = None) -> int:
    """Use ``n`` threads (None: see :func:`chosen_threads`) for torch's intra-op work; returns the count.

    Exports OMP_NUM_THREADS / MKL_NUM_THREADS for a torch not yet imported, and makes idle OpenMP
    workers sleep instead of spin (OMP_WAIT_POLICY=PASSIVE) unless the environment already says.
    """
    import sys

    k, _ = chosen_threads(n)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(k)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(k)
    return k


__all__ = ["ENV", "available_cpus", "chosen_threads", "configure", "default_threads"]
