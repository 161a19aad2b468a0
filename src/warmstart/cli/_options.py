"""Flags declared once, their defaults read from the config dataclasses (the `hf` CLI's ``_cli_utils``).

Every such flag defaults to ``None`` ("not given"), so a flag left out keeps what ``--config`` or
the dataclass says; the default ``--help`` shows is read from the dataclass field, so it lives in
exactly one place. :func:`given` collects the flags given on the command line, and
:func:`config_error` renders a config's problems in flag names (``--k``, not ``k``).
"""

from __future__ import annotations

import re
from typing import Any

import typer

from ..config import MergeConfig, RunConfig, TransferConfig
from ..errors import ConfigError
from ..select import SelectConfig
from ..train import TrainConfig

_SECTIONS = {"train": TrainConfig, "select": SelectConfig, "merge": MergeConfig, "transfer": TransferConfig,
             "run": RunConfig}


def shown(v: Any) -> str:
    """A default as --help shows it: None → none, a list → a,b,c."""
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def default_of(section: str, name: str) -> Any:
    cls = _SECTIONS[section]
    return cls.defaults()[name] if hasattr(cls, "defaults") else _field_default(cls, name)


def _field_default(cls, name: str) -> Any:
    import dataclasses

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _help(text: str, default: str) -> str:
    return text + rf" \[default: {default}]"  # escaped: rich would read [default: …] as markup


def opt(section: str, name: str, *decls: str, help: str, panel: str | None = None, show: str | None = None,
        **kw) -> Any:
    """A flag for field ``name`` of a section (train, select, run); ``show`` words a default that is
    a rule rather than a value (e.g. ``eval_limit``: all rows)."""
    text = show if show is not None else shown(default_of(section, name))
    info = typer.Option(None, *decls, help=_help(help, text), show_default=False, rich_help_panel=panel, **kw)
    info.config_field = (section, name, show)  # what tests/test_config.py checks the shown default against
    return info


def switch(section: str, name: str, decl: str, *, help: str, panel: str | None = None,
           on: Any = True) -> Any:
    """An on/off flag (``--rslora/--no-rslora``); its default shown is the half that matches the field."""
    yes, no = decl.split("/")
    return typer.Option(None, decl, help=_help(help, (yes if default_of(section, name) == on else no).lstrip("-")),
                        show_default=False, rich_help_panel=panel)


def given(**flags) -> dict:
    """The flags given on the command line (a flag left out is None and keeps the config's value)."""
    return {k: v for k, v in flags.items() if v is not None}


# -- the selection flags `select` and `run` share (one declaration each) ------------------------

SELECT_HELP = {
    "scorer": (("--scorer",), "loss (evaluate each candidate), grad (first-order proxy, one backward pass) or "
               "halving (pre-rank by catalogued summaries, then successive halving: large libraries, "
               "docs/select.md)."),
    "shortlist": (("--shortlist",), "--scorer halving: candidates kept by the pre-rank."),
    "halving_rows": (("--halving-rows",), "--scorer halving: rows of the first round (doubled each round)."),
    "prerank_rows": (("--prerank-rows",), "--scorer halving: rows of the pre-rank's backward pass."),
    "metric": (("--metric", "-m"), "Selection metric: loss, accuracy, exact-match, mc-accuracy, mc-accuracy-norm "
               "(grad: loss only)."),
    "k": (("--k", "-k"), "Donors to select."),
    "margin": (("--margin",), "Only donors better than the base by at least this."),
    "weights": (("--weights", "-w"), "Donor weights: uniform, score, softmax:T, mwa:loss, mwa:steps or optimized "
                "(CMA-ES on the target sample)."),
    "penalty": (("--penalty",), "MWA penalty exponent p."),
    "optimize_budget": (("--optimize-budget",), "Evaluations of the weight search (--weights optimized)."),
    "min_own_gain": (("--min-own-gain",), "A donor must have gained this much on its own task in its own "
                     "training (docs/select.md)."),
    "mc_mode": (("--mc-mode",), "mc-accuracy by option text rank, or letter."),
}


def select_opt(name: str, panel: str | None = None) -> Any:
    decls, text = SELECT_HELP[name]
    return opt("select", name, *decls, help=text, panel=panel)


def own_gate_opt(panel: str | None = None) -> Any:
    return typer.Option(None, "--own-gate/--no-own-gate", help=_help(
        "Skip donors that never learned their own task (--min-own-gain).",
        "own-gate" if default_of("select", "min_own_gain") is not None else "no-own-gate"),
        show_default=False, rich_help_panel=panel)


def config_error(e: ConfigError, flags: dict[str, str]) -> ConfigError:
    """``e`` with each ``section.field`` / ``field`` it names written as the flag that sets it."""
    msg = e.message
    for name, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        msg = re.sub(rf"(?<![\w.-]){re.escape(name)}(?= must| is |:)", flag, msg)
    return ConfigError(msg, path=e.path, hint=e.hint)


__all__ = ["SELECT_HELP", "config_error", "default_of", "given", "opt", "own_gate_opt", "select_opt", "shown",
           "switch"]
