"""Atomic outputs: write into a temporary sibling, rename into place when complete.

A crash never leaves a half-written model where a finished one is expected
(the habit of safetensors and huggingface_hub). Leftover ``*.tmp-*`` siblings
from killed runs are removed the next time the same output is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputExistsError

TMP_MARK = ".tmp-"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def clean_stale_tmp(path: Path) -> list[Path]:
    """Remove temporary siblings of ``path`` left by runs whose process is gone."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for cand in path.parent.glob(f"{path.name}{TMP_MARK}*"):
        pid_part = cand.name[len(path.name) + len(TMP_MARK):].split("-", 1)[0]
        if pid_part.isdigit() and _pid_alive(int(pid_part)) and int(pid_part) != os.getpid():
            continue  # another live process is writing it
        shutil.rmtree(cand, ignore_errors=True) if cand.is_dir() else cand.unlink(missing_ok=True)
        removed.append(cand)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def output_root(out: str | Path) -> Path:
    """An output directory path, refusing an empty one (``--out ""`` would mean the working directory)."""
    if str(out).strip() in ("", "."):
        raise ConfigError(f"output directory {str(out)!r} is empty or the working directory",
                          hint="name a new directory with --out")
    return Path(out)


def check_output(out: Path, *, force: bool, inputs: list[Path] = ()) -> None:
    """Refuse to overwrite without ``force`` and refuse outputs inside (or equal to) an input."""
    out = output_root(out).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            raise ConfigError("output path overlaps an input", path=out,
                              hint=f"choose a directory outside {inp}")
    if out.exists() and not force:
        raise OutputExistsError("output already exists", path=out, hint="pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block completes."""
    out = output_root(out)
    if out.exists() and not force:
        raise OutputExistsError("output already exists", path=out, hint="pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    tmp = _tmp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        respect_umask(tmp)
        if out.exists():
            old = _tmp_sibling(out)
            os.replace(out, old)  # move aside first so the swap is two renames, never a partial tree
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def respect_umask(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` would (0644 under umask 022).

    transformers/PEFT ``save_pretrained`` writes its safetensors 0600 (a temporary file renamed into
    place), so a shared model folder would hold one file other users cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            mode = f.stat().st_mode
            want = (0o666 & ~mask) | (mode & 0o111 & ~mask)
            if mode & 0o777 != want:
                os.chmod(f, want)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON, turning a parse failure into a one-line error naming the file."""
    from .errors import CheckpointError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})", path=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} ({e.strerror})", path=path) from None
