"""The `warmstart` command: wiring only. Each command group lives in its own module
with a ``register(app)`` function; the library code does the work."""

from __future__ import annotations

import importlib

import typer

from ._common import run_app

app = typer.Typer(
    name="warmstart",
    help="Recycle fine-tuning checkpoints into a better start for the next fine-tune.\n\n"
    "Stages: library → select → merge → finetune → report (or all at once with `run`); "
    "transfer carries a fine-tune to a new base version.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _no_flag_metavars() -> None:
    """Typer's rich help prints ``<bool>`` as the value of every on/off flag (``--force <bool>``), which
    reads as if the flag took a value; flags show no metavar here, as in click's plain help."""
    from typer.core import TyperOption

    show = TyperOption.display_type_rich
    if getattr(show, "_warmstart", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else show(self, ctx)

    display_type_rich._warmstart = True
    TyperOption.display_type_rich = display_type_rich


_no_flag_metavars()

# One module per command group, each with register(app). Order = order in --help.
COMMAND_MODULES = ["library", "select", "merge", "extract", "finetune", "run", "transfer", "optimize", "bench"]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    if debug:
        import os

        os.environ["WARMSTART_DEBUG"] = "1"


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as e:  # a stage not built yet; anything else is a real error
        if e.name != f"{__name__}.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    run_app(app)
