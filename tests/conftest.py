"""Shared fixtures: tiny real models built locally (see warmstart.testing)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WARMSTART_THREADS", "1")  # commands run in-process keep the one thread below

from warmstart import testing  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: torch's intra-op threads only contend on a shared 2-core machine (3-10x slower measured)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own digest cache and no default library in the cwd."""
    monkeypatch.setenv("WARMSTART_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("WARMSTART_LIBRARY", raising=False)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """A read-only zoo: base, sharded base, two full variants, adapters, a training run.

    Tests that modify files must copy them first (see ``copy_of``).
    """
    root = tmp_path_factory.mktemp("zoo")
    base = testing.make_base(root / "base")
    testing.make_base(root / "base_sharded", shard_size="20KB")
    testing.make_variant(base, root / "ft_a", seed=1, meta={"task": "task_a"})
    testing.make_variant(base, root / "ft_b", seed=2, meta={"task": "task_b"})
    testing.make_adapter(base, root / "lora_a", seed=3, meta={"task": "task_a"})
    testing.make_adapter(base, root / "lora_b", seed=4, r=8, alpha=16, meta={"task": "task_b"})
    testing.make_run(base, root / "run_lora", kind="lora", steps=(10, 20, 30), seed=5, task="task_c")
    testing.make_base(root / "other_arch", hidden_size=48, intermediate_size=96)
    return root


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return _copy


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        import json

        return json.loads(self.out)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real `warmstart` entry point in-process: ``cli("library", "list")``.

    Returns exit code, stdout and stderr, exactly as a user would see them
    (errors go through the same one-line renderer as the console script).
    """
    import sys

    from warmstart.cli import main

    def _run(*args) -> CliResult:
        # `--debug` sets WARMSTART_DEBUG in os.environ; monkeypatch restores it after the test.
        monkeypatch.delenv("WARMSTART_DEBUG", raising=False)
        monkeypatch.setattr(sys, "argv", ["warmstart", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return _run
