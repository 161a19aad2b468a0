"""Atomic outputs: write into a temporary sibling, rename into place when complete.

A crash never leaves a half-written model where a finished one is expected
(the habit of safetensors and huggingface_hub). Leftover ``*.tmp-*`` siblings
from killed runs are removed the next time the same output is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, OutputExistsError, WarmstartError

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
    """Refuse to overwrite without ``force`` and refuse outputs inside (or equal to) an input.

    This is the early check (before any work); :func:`publish` checks again at the rename, under a
    lock, so a writer that finished first in the meantime is never replaced without ``force``."""
    check_not_input(out, inputs)
    out = output_root(out).resolve()
    if os.path.lexists(out) and not force:
        raise OutputExistsError("output already exists", path=out, hint="pass --force to replace it")


def check_not_input(out: str | Path, inputs) -> None:
    """Refuse an output equal to, inside, or containing any input (a file or a directory), --force or not."""
    out = output_root(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp).resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            raise ConfigError("output path overlaps an input", path=out,
                              hint=f"choose a path outside {inp}")


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """An exclusive flock on the output's parent directory: the kernel drops it when the process dies,
    and no lock file is left behind (a lock file would itself be an unexpected output)."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # an unreadable parent: fall back to the no-replace rename alone
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def publish(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the finished ``tmp`` into ``out``. Under a lock on the parent, ``out`` is checked again:
    without ``force`` a writer that finished first wins and this one fails (its work is discarded,
    nothing finished is lost); with ``force`` the old output is swapped out by two renames."""
    with _parent_lock(out.parent):
        if not os.path.lexists(out):
            os.rename(tmp, out)
            return
        if not force:
            raise OutputExistsError("output appeared while this command was writing it (another writer "
                                    "finished first; its result is kept)", path=out,
                                    hint="pass --force to replace it, or choose another --out")
        old = _tmp_sibling(out)
        os.replace(out, old)  # move aside first so the swap is two renames, never a partial tree
        os.replace(tmp, out)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block completes."""
    out = output_root(out)
    if os.path.lexists(out) and not force:
        raise OutputExistsError("output already exists", path=out, hint="pass --force to replace it")
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(out)
        tmp = _tmp_sibling(out)
        tmp.mkdir()
    try:
        with write_errors(out):
            yield tmp
            respect_umask(tmp)
            publish(tmp, out, force=force)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


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


def atomic_write_text(path: str | Path, text: str, *, force: bool = True) -> None:
    """Write a file through a temporary sibling; ``force=False`` never replaces an existing file
    (checked at the rename, see :func:`publish`)."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            if force:
                os.replace(tmp, path)
            else:
                publish(tmp, path, force=False)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any, *, force: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", force=force)


# errno values that mean "this output cannot be written here" (disk full, read-only, no permission)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def write_errors(out: str | Path) -> Iterator[None]:
    """Where files are written: a full disk, a read-only filesystem or a missing permission is the
    user's environment, not a bug, so it becomes one line naming the output. Only errors on the output
    (its temporary sibling, or a parent being created) are converted; a failing input read is not."""
    out = Path(out)
    try:
        yield
    except OSError as e:
        fn = str(e.filename) if e.filename else None
        ours = fn is None or fn.startswith(str(out)) or str(out).startswith(fn)
        if e.errno not in _WRITE_ERRNOS or not ours:
            raise
        raise WarmstartError(f"cannot write output ({e.strerror or e})", path=out,
                             hint=f"check free space and permissions of {out.parent}") from None


def open_regular(path: str | Path, what: str = "file", error: type[WarmstartError] | None = None):
    """Open ``path`` for reading only if it is a regular file: a named pipe or a device would block
    forever or never end. O_NONBLOCK makes the open itself return at once; it is cleared after."""
    error = error or CheckpointError
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{what} not found", path=path) from None
    except OSError as e:
        raise error(f"cannot read {what} ({e.strerror})", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{what} is not a regular file", path=path)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON, turning a parse failure into a one-line error naming the file."""
    path = Path(path)
    try:
        with open_regular(path, what) as f:
            raw = f.read()
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})", path=path) from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply to parse", path=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} ({e.strerror})", path=path) from None


def read_text_file(path: str | Path, what: str, error: type[WarmstartError] | None = None) -> str:
    """A small text input (config, plan, selection): regular files only, UTF-8, a bad byte names its line."""
    path = Path(path)
    try:
        with open_regular(path, what, error) as f:
            raw = f.read()
    except OSError as e:
        raise (error or ConfigError)(f"cannot read {what} ({e.strerror})", path=path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise (error or ConfigError)(f"{what} is not UTF-8 text (line {line}: {e.reason})", path=path) from None


def read_config(path: str | Path, what: str, error: type[WarmstartError] | None = None) -> Any:
    """Parse a YAML (or, by suffix, JSON) input; every way it can fail is one error naming the file."""
    import yaml

    path = Path(path)
    error = error or ConfigError
    text = read_text_file(path, what, error)
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:
        raise error(f"{what} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", path=path) from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to read", path=path) from None
