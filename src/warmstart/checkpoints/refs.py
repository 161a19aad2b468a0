"""References: a local path or a Hugging Face Hub id (``org/name`` or ``org/name@revision``), resolved
to a local directory (hub ids through the local HF cache first, then the Hub)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,200})?$")



def is_hub_id(ref: str) -> bool:
    return bool(HUB_ID_RE.match(ref)) and ".." not in ref


def looks_like_path(ref: str) -> bool:
    """A reference the user meant as a local path: ``./x``, ``../x``, ``/x``, ``~/x``, anything that is
    not ``org/name[@rev]``, or ``a/b`` whose first component ``a`` exists here (``runs/typo``)."""
    if ref.startswith((".", "/", "~")) or not is_hub_id(ref):
        return True
    return Path(Path(ref).parts[0]).exists()


def resolve(ref: str | Path, *, allow_pickle: bool = False) -> Path:
    """Turn a path or hub id into a local directory (hub ids via the local HF cache, then the Hub)."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError("not a directory (a checkpoint is a directory with config/adapter files)", path=p)
        if not os.access(p, os.R_OK | os.X_OK):
            raise CheckpointError("directory is not readable", path=p)
        return p.resolve()
    ref = str(ref)
    if looks_like_path(ref):
        raise CheckpointError("no such file or directory", path=ref, hint=_near_miss(Path(ref).expanduser()))
    return _resolve_hub(ref, allow_pickle=allow_pickle)


def _near_miss(p: Path) -> str | None:
    """'did you mean' for a typo in the last component (stdlib difflib: the closest sibling names)."""
    import difflib

    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return None
    try:
        names = [c.name for c in parent.iterdir()]
    except OSError:
        return None
    close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(str(parent / c) for c in close)}?" if close else None


# How long the Hub may take to answer whether a repository exists before we call the network down:
# huggingface_hub's own timeouts and retries add up to ~35 s on a machine without network.
HUB_PROBE_TIMEOUT_S = float(os.environ.get("WARMSTART_HUB_TIMEOUT", "5"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _not_found(ref: str, why: str) -> CheckpointError:
    """Both readings of a reference that is neither a local directory nor an available hub id."""
    return CheckpointError(f"no local directory {ref}; as a hub id: {why}",
                           hint="check the path, or download the model first")


def _resolve_hub(ref: str, *, allow_pickle: bool) -> Path:
    """The local cache first (no network), then a short probe of the Hub, then the download."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = ref.partition("@")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]
    if allow_pickle:
        patterns += ["*.bin"]
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        if _hub_offline():
            raise _not_found(ref, "not in the local cache and HF_HUB_OFFLINE is set") from None
    except (HfHubHTTPError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot resolve hub id ({e})", path=ref) from None
    try:  # one metadata request with a short timeout tells "no network" and "no such repo" apart, fast
        HfApi().model_info(repo_id, revision=revision or None, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise _not_found(ref, "no such repository on the Hub (or it is private)") from None
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 404:
            raise _not_found(ref, "no such repository on the Hub (or it is private)") from None
        raise CheckpointError(f"cannot resolve hub id ({str(e).splitlines()[0]})", path=ref) from None
    except Exception:  # connection refused, DNS failure, timeout: the types vary by transport
        raise _not_found(ref, "not in the local cache and no network") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot download hub id ({type(e).__name__}: {e})", path=ref) from None


__all__ = ["HUB_ID_RE", "HUB_PROBE_TIMEOUT_S", "is_hub_id", "looks_like_path", "resolve"]
