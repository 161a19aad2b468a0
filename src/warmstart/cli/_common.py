"""What every command shares: error rendering, output helpers, common options."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..errors import WarmstartError

INTERRUPTED = "interrupted; finished outputs are intact, re-run the same command to resume"


def _console(stderr: bool) -> Console:
    """Sentences are never wrapped (soft_wrap); off a terminal (logs, CI) tables get 160 columns, not 80."""
    c = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c.width = 160
    return c


err = _console(stderr=True)
out = _console(stderr=False)


class _Interrupt:
    """SIGINT: remember it, then raise KeyboardInterrupt as Python would (cleanup runs in `finally`)."""

    seen = False

    @classmethod
    def handler(cls, signum, frame):
        cls.seen = True
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> None:
        import signal

        cls.seen = False
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the shell ignores it
            signal.signal(signal.SIGINT, cls.handler)


def run_app(app: typer.Typer) -> None:
    """Run the Typer app; user errors become one line on stderr and exit code 1.

    Typer turns a KeyboardInterrupt into a silent exit 130 before it reaches us, so the SIGINT
    handler records it and the interrupted message is printed here, after every cleanup ran."""
    if "--debug" in sys.argv[1:2]:
        os.environ["WARMSTART_DEBUG"] = "1"
    _Interrupt.install()
    try:
        app()
    except WarmstartError as e:
        if os.environ.get("WARMSTART_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {e.one_line()}", markup=True, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _Interrupt.seen = True
    except SystemExit as e:
        if not (_Interrupt.seen or e.code == 130 and isinstance(e.__context__, typer.Exit)):
            raise
    if _Interrupt.seen:
        err.print(INTERRUPTED)
        sys.exit(130)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# Shared option definitions (the `hf` CLI habit: define once, reuse everywhere).
LibraryOpt = typer.Option(None, "--library", "-L", envvar="WARMSTART_LIBRARY",
                          help="Catalog file (default ./warmstart.db, or $WARMSTART_LIBRARY).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output.")
AllowPickleOpt = typer.Option(False, "--allow-pickle", help="Allow .bin (pickle) weights. Only for files you trust.")
ThreadsOpt = typer.Option(None, "--threads", min=1,
                          help="CPU threads for torch [default: one per CPU, idle workers "
                               "sleep; docs/performance.md].")


def use_threads(n: int | None) -> int:
    """Set torch's CPU thread count before torch is imported (see warmstart.threads)."""
    from ..threads import configure

    return configure(n)


def library_path(p: Path | None) -> Path:
    from ..library import default_library_path

    return Path(p) if p else default_library_path()
