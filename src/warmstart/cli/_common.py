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

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def run_app(app: typer.Typer) -> None:
    """Run the Typer app; user errors become one line on stderr and exit code 1."""
    if "--debug" in sys.argv[1:2]:
        os.environ["WARMSTART_DEBUG"] = "1"
    try:
        app()
    except WarmstartError as e:
        if os.environ.get("WARMSTART_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {e.one_line()}", markup=True, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; finished outputs are intact, re-run the same command to resume")
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
                          help="CPU threads for torch (default: the idle cores, 1 on a busy machine; "
                               "docs/performance.md).")


def use_threads(n: int | None) -> int:
    """Set torch's CPU thread count before torch is imported (see warmstart.threads)."""
    from ..threads import configure

    return configure(n)


def library_path(p: Path | None) -> Path:
    from ..library import default_library_path

    return Path(p) if p else default_library_path()
