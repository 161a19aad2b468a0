"""Provenance: what every artefact warmstart writes says about itself.

* :data:`__version__` and :func:`versions` -- the package's own version and the versions of the
  libraries that shape the numbers, recorded in every ``warmstart.json``;
* :func:`write_artefact` / :func:`update_artefact` -- the one writer of an artefact's
  ``warmstart.json`` (machine) and README model card (human), both written atomically;
* :func:`parse_size` -- the one size parser ("2GB"), in decimal units as transformers' and
  mergekit's ``max_shard_size``.

Layer L1: imports only errors and _io, so every stage can use it.
"""

from __future__ import annotations

import importlib.metadata as _md
import platform
import re
from pathlib import Path

from ._io import atomic_write_json, atomic_write_text, read_json
from .errors import ConfigError

__version__ = "0.1.0"  # the one place; warmstart.__version__ re-exports it (keep in step with pyproject.toml)

# The union of what the stages recorded before #12; a package that is not installed is left out.
VERSION_PACKAGES = ("torch", "transformers", "safetensors", "peft", "cma")


# ----------------------------------------------------------------------------
# Versions


def versions() -> dict[str, str]:
    """{"warmstart": ..., "torch": ..., ..., "python": ...}: read from the installed distributions'
    metadata, so no library is imported for it."""
    out = {"warmstart": __version__}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


# ----------------------------------------------------------------------------
# warmstart.json + model card


def front_matter(**fields: str | list[str] | None) -> list[str]:
    """The YAML header of a Hugging Face model card (``None`` fields are left out)."""
    lines = ["---"]
    for k, v in fields.items():
        if v is not None:
            lines.append(f"{k}: [{', '.join(v)}]" if isinstance(v, list) else f"{k}: {v}")
    return lines + ["---"]


def write_artefact(d: str | Path, meta: dict, card: str | list[str]) -> None:
    """``d/warmstart.json`` = ``meta`` and ``d/README.md`` = ``card`` (a text, or lines joined by
    newlines), each written atomically. ``meta`` gets ``versions`` if it has none."""
    d = Path(d)
    meta = {**meta, "versions": meta.get("versions") or versions()}
    atomic_write_json(d / "warmstart.json", meta)
    atomic_write_text(d / "README.md", card if isinstance(card, str) else "\n".join(card))


def update_artefact(d: str | Path, extra: dict, section: str = "") -> None:
    """Add keys to an artefact's ``warmstart.json`` and a section to the end of its model card
    (a later step that refines an output: e.g. optimize on the merge it wrote)."""
    d = Path(d)
    meta_path, card_path = d / "warmstart.json", d / "README.md"
    meta = read_json(meta_path, "warmstart.json") if meta_path.exists() else {}
    atomic_write_json(meta_path, {**(meta if isinstance(meta, dict) else {}), **extra})
    if section:
        card = card_path.read_text() if card_path.exists() else ""
        atomic_write_text(card_path, card + section)


# ----------------------------------------------------------------------------
# Sizes


class SizeError(ConfigError, ValueError):
    """A size that does not parse (a ValueError too: plan validation collects those)."""


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}
_SIZE_RE = re.compile(r"([-+]?[0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)\s*(KIB|MIB|GIB|TIB|KB|MB|GB|TB|B)?")


def parse_size(s: str | int) -> int:
    """'2GB' -> 2·10⁹ bytes: decimal units as transformers' ``max_shard_size`` and mergekit
    (KiB/MiB/GiB/TiB for binary ones); a bare number is bytes. Zero or less is refused."""
    if isinstance(s, int):
        return s
    t = str(s).strip().upper()
    m = _SIZE_RE.fullmatch(t)
    if not m or (m.group(2) is None and not m.group(1).lstrip("+-").isdigit()):
        raise SizeError(f"bad size {s!r} (use e.g. 500MB, 2GB)")
    try:
        n = int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m.group(2) else int(m.group(1))
    except (ValueError, OverflowError):  # OverflowError: 1e400GB is float infinity
        raise SizeError(f"bad size {s!r} (use e.g. 500MB, 2GB)") from None
    if n <= 0:
        raise SizeError(f"bad size {s!r} (a shard size must be positive)")
    return n


__all__ = ["VERSION_PACKAGES", "SizeError", "__version__", "front_matter", "parse_size", "update_artefact",
           "versions", "write_artefact"]
