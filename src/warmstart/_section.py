"""Typed config sections: dataclasses that check every field at once and remember which were given.

A section (``SelectConfig``, ``MergeConfig``, ...) is a plain dataclass made with :func:`section`
over :class:`Section`. Two habits come from the configs we copy:

* torchtune's ``config/_validate.py``: :meth:`Section.errors` returns *every* problem of the
  section as a line, so a run config can report all of its sections' problems in one error
  before any work starts;
* pydantic's ``model_fields_set`` (which mergekit's configs rely on): a section remembers the
  fields that were *given* (constructor keywords, mapping keys, later assignments). A run records
  only those in ``run.json`` (so a resumed run compares exactly what the user asked for), and a
  stage can tell "left at the default" from "set to the default" — e.g. a run merges LoRA donors
  with ``lora_mode: svd`` unless ``lora_mode`` was given, even as ``cat``.

Only ``errors`` lives here; the sections (and their checks) live with the stage that reads them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

S = TypeVar("S", bound="Section")


def section(cls: type[S]) -> type[S]:
    """``@dataclass`` plus the record of the fields given to the constructor."""
    if "__dataclass_fields__" not in cls.__dict__:  # make_dataclass has done it already
        cls = dataclasses.dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        init(self, *args, **kw)
        object.__setattr__(self, "_given", set(names[:len(args)]) | set(kw))

    cls.__init__ = __init__
    return cls


class Section:
    """Base of a config section; ``label`` names it in messages (``select``, ``merge``)."""

    label = "config"

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        given = self.__dict__.get("_given")  # absent while the dataclass __init__ runs
        if given is not None and not name.startswith("_"):
            given.add(name)

    # -- fields -------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (the one place a default lives; the CLI's help reads it)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def given(self) -> dict[str, Any]:
        """The fields that were set explicitly, in field order."""
        return {n: getattr(self, n) for n in self.field_names() if n in self._given}

    def is_given(self, name: str) -> bool:
        return name in self._given

    def replace(self: S, **changes) -> S:
        """A copy with ``changes`` applied; given = this one's given fields plus the changed ones
        (``dataclasses.replace`` would mark every field given)."""
        return type(self)(**{**copy.deepcopy(self.given()), **changes})

    # -- mappings -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The given fields (a sparse mapping: what a user wrote, round-trips through from_dict)."""
        return copy.deepcopy(self.given())

    @classmethod
    def unknown_errors(cls, d: dict) -> list[str]:
        unknown = sorted(set(d) - set(cls.field_names()), key=str)
        if not unknown:
            return []
        return [f"unknown {cls.label} option(s) {', '.join(map(str, unknown))} "
                f"(known: {', '.join(sorted(cls.field_names()))})"]

    @classmethod
    def from_dict(cls: type[S], d: dict | None, where: str | Path | None = None, *, validate: bool = True) -> S:
        """A section from a mapping; unknown keys (and, with ``validate``, bad values) refused in one error."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.label} must be a mapping of options, got {d!r}", path=where)
        errs = cls.unknown_errors(d)
        if errs:
            raise ConfigError(f"invalid {cls.label} config: " + "; ".join(errs), path=where)
        obj = cls(**copy.deepcopy(d))
        return obj.validate(where) if validate else obj

    # -- checks -------------------------------------------------------------
    def errors(self) -> list[str]:
        """Every problem of this section, one line each (empty: valid). Subclasses extend it."""
        return []

    def validate(self: S, where: str | Path | None = None) -> S:
        errs = self.errors()
        if errs:
            raise ConfigError(f"invalid {self.label} config: " + "; ".join(errs), path=where)
        return self


# -- field checks shared by the sections (each returns a problem line or None) -------------------


def positive_int(name: str, v: Any, *, none_ok: bool = False, zero_ok: bool = False) -> str | None:
    if v is None and none_ok:
        return None
    low = 0 if zero_ok else 1
    if isinstance(v, int) and not isinstance(v, bool) and v >= low:
        return None
    what = "a non-negative" if zero_ok else "a positive"
    return f"{name} must be {what} integer (at least {low}){' or null' if none_ok else ''}, got {v!r}"


def number(name: str, v: Any, *, none_ok: bool = False) -> str | None:
    if v is None and none_ok:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:  # v == v: not NaN
        return None
    return f"{name} must be a number{' or null' if none_ok else ''}, got {v!r}"


def one_of(name: str, v: Any, choices, *, none_ok: bool = False) -> str | None:
    if (v is None and none_ok) or v in choices:
        return None
    return f"{name} must be one of {', '.join(map(str, choices))}{' or null' if none_ok else ''}, got {v!r}"


def boolean(name: str, v: Any) -> str | None:
    return None if isinstance(v, bool) else f"{name} must be true or false, got {v!r}"


__all__ = ["Section", "boolean", "number", "one_of", "positive_int", "section"]
