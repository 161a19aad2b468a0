"""`warmstart library ...`: register, scan, list, show and remove checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import ConfigError
from ..library import Entry, Library
from ._common import AllowPickleOpt, JsonOpt, LibraryOpt, err, library_path, out, print_json

app = typer.Typer(help="The checkpoint catalog (SQLite).", no_args_is_help=True)

EXAMPLES_ADD = """
Examples:

  warmstart library add runs/fr-lora/checkpoint-500 --task country_fr --tag lr=2e-4

  warmstart library add HuggingFaceTB/SmolLM2-135M-Instruct@main
"""


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    outd = {}
    for t in tags or []:
        if "=" not in t:
            raise ConfigError(f"--tag {t!r} must be KEY=VALUE")
        k, v = t.split("=", 1)
        outd[k.strip()] = v.strip()
    return outd


class _open:
    """The library; one this command created is removed again if the command fails (nothing written)."""

    def __init__(self, lib: Path | None, create: bool = True):
        self.path = library_path(lib)
        self.new = create and not self.path.exists()
        self.lib = Library(self.path, create=create)

    def __enter__(self) -> Library:
        return self.lib.__enter__()

    def __exit__(self, typ, exc, tb):
        self.lib.__exit__(typ, exc, tb)
        if typ is not None:
            self.discard()

    def discard(self) -> None:
        """Remove the catalog if this command created it."""
        if self.new:
            for p in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm", "-journal"))):
                p.unlink(missing_ok=True)


@app.command("add", epilog=EXAMPLES_ADD)
def add(
    refs: list[str] = typer.Argument(..., help="Checkpoint directories or hub ids (org/name[@rev])."),
    task: str = typer.Option(None, "--task", "-t", help="Task or dataset the checkpoint was trained on."),
    tag: list[str] = typer.Option(None, "--tag", help="KEY=VALUE, repeatable."),
    base: str = typer.Option(None, "--base", help="Base model (path or hub id), if the files do not say."),
    allow_pickle: bool = AllowPickleOpt,
    library: Path = LibraryOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Register checkpoints (full models or LoRA adapters)."""
    tags = _parse_tags(tag)
    with _open(library) as lib:
        results = [lib.add(r, task=task, tags=tags, base=base, allow_pickle=allow_pickle) for r in refs]
    if json_out:
        print_json([{"status": s, **e.to_dict()} for e, s in results])
        return
    for e, status in results:
        err.print(f"{status}: #{e.id} {e.kind} {e.ref}")


@app.command("scan", epilog="""
Examples:

  warmstart library scan runs/ --base HuggingFaceTB/SmolLM2-135M-Instruct

  warmstart library scan /mnt/checkpoints --tag team=nlp --json
""")
def scan(
    root: Path = typer.Argument(..., help="Directory tree of training outputs."),
    task: str = typer.Option(None, "--task", "-t", help="Task for every entry found (else from warmstart.json)."),
    tag: list[str] = typer.Option(None, "--tag", help="KEY=VALUE, repeatable."),
    base: str = typer.Option(None, "--base", help="Base model for entries whose files do not name one."),
    allow_pickle: bool = AllowPickleOpt,
    library: Path = LibraryOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Register every checkpoint under a tree, each checkpoint-* of a run included. Idempotent."""
    from rich.progress import Progress

    tags = _parse_tags(tag)
    opened = _open(library)
    with opened as lib, Progress(console=err, transient=True) as prog:
        tid = prog.add_task("scanning", total=None)
        res = lib.scan(root, task=task, tags=tags, base=base, allow_pickle=allow_pickle,
                       progress=lambda i, n, p: prog.update(tid, completed=i, total=n, description=Path(p).name))
    if json_out:
        print_json({"added": [e.to_dict() for e in res.added], "updated": [e.to_dict() for e in res.updated],
                    "unchanged": len(res.unchanged), "failed": [{"path": p, "error": m} for p, m in res.failed]})
    else:
        n_derived = sum(e.derived for e in res.added + res.updated)
        err.print(f"{len(res.added)} added, {len(res.updated)} updated, {len(res.unchanged)} unchanged, "
                  f"{len(res.failed)} failed" + (f"; {n_derived} derived (merges, transfers or run outputs: not "
                                                 "offered as donors unless `select --include-derived`)"
                                                 if n_derived else ""), soft_wrap=True)
        for _, msg in res.failed:
            err.print(f"  skipped: {msg}")
    if res.failed and not (res.added or res.updated or res.unchanged):
        opened.discard()  # nothing catalogued: a library this scan created is not left behind
        raise typer.Exit(1)


def _fmt_loss(x):
    return "" if x is None else f"{x:.4g}"


def entries_table(entries: list[Entry]) -> Table:
    t = Table(show_lines=False)
    for col in ("id", "kind", "task", "base", "step", "loss", "ref"):
        t.add_column(col, overflow="fold")
    for e in entries:
        kind = e.kind + (f" r{e.lora['r']}" if e.lora else "") + _origin(e)
        ref = e.ref + (" [red](missing)[/]" if e.missing else "")
        t.add_row(str(e.id), kind, e.task or "", _short(e.base_model),
                  "" if e.global_step is None else str(e.global_step), _fmt_loss(e.final_loss), ref)
    return t


def _origin(e: Entry) -> str:
    """' (merge)', ' (run warm)', ...: derived entries are marked; they are not donors by default."""
    if not e.derived:
        return ""
    p = e.provenance
    return f" ({'run ' + p['stage'] if p.get('stage') else p.get('made_by', 'derived')})"


def _show_value(k: str, v):
    """One `library show` value as a person reads it: dates as ISO dates, no 'None'."""
    import datetime

    if v is None or v == {} or v == []:
        return "–"
    if k == "created_at":
        return datetime.datetime.fromtimestamp(v, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if k == "loss_history":
        return f"{len(v)} points, last {v[-1]}"
    if k == "provenance":
        return ", ".join(f"{a}: {b}" for a, b in v.items())
    return v


def _short(s: str | None) -> str:
    if not s:
        return ""
    return s if len(s) <= 40 else "…" + s[-39:]


@app.command("list", epilog="""
Examples:

  warmstart library list --task country_fr

  warmstart library list --compatible-with models/base --kind lora --json
""")
def list_(
    base: str = typer.Option(None, "--base", help="Only entries whose base model is this."),
    task: str = typer.Option(None, "--task", "-t"),
    kind: str = typer.Option(None, "--kind", help="full or lora."),
    tag: list[str] = typer.Option(None, "--tag", help="KEY=VALUE, repeatable."),
    compatible_with: str = typer.Option(None, "--compatible-with",
                                        help="Only entries that can be merged with this base model."),
    derived: bool = typer.Option(None, "--derived/--no-derived",
                                 help="Only merges, transfers and run outputs / only the others."),
    library: Path = LibraryOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List entries (missing files are flagged)."""
    if kind and kind not in ("full", "lora"):
        raise ConfigError(f"--kind must be 'full' or 'lora', got {kind!r}")
    with _open(library, create=False) as lib:
        entries = lib.list(base=base, task=task, kind=kind, tag=_parse_tags(tag), compatible_with=compatible_with,
                           derived=derived)
    if json_out:
        print_json([e.to_dict() for e in entries])
        return
    out.print(entries_table(entries))
    missing = sum(e.missing for e in entries)
    err.print(f"{len(entries)} entries" + (f", {missing} with missing files (remove with `library prune`)"
                                           if missing else ""))


@app.command("show", epilog="\nExample:\n\n  warmstart library show 3 --json\n")
def show(
    entry: str = typer.Argument(..., help="Entry id or reference."),
    library: Path = LibraryOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Everything the library knows about one entry."""
    with _open(library, create=False) as lib:
        e = lib.get(entry)
    d = e.to_dict()
    if json_out:
        print_json(d)
        return
    for k, v in d.items():
        out.print(f"[bold]{k:>16}[/]  {_show_value(k, v)}", highlight=False)


@app.command("remove", epilog="\nExample:\n\n  warmstart library remove 3 7\n")
def remove(
    entries: list[str] = typer.Argument(..., help="Entry ids or references."),
    library: Path = LibraryOpt,
) -> None:
    """Remove entries from the catalog (the files are never touched)."""
    with _open(library, create=False) as lib:
        for ident in entries:
            e = lib.remove(lib.get(ident).id)
            err.print(f"removed #{e.id} {e.ref}")


@app.command("prune", epilog="\nExample:\n\n  warmstart library prune\n")
def prune(library: Path = LibraryOpt) -> None:
    """Remove entries whose files no longer exist."""
    with _open(library, create=False) as lib:
        gone = lib.prune_missing()
    for e in gone:
        err.print(f"removed #{e.id} {e.ref} (files missing)")
    err.print(f"{len(gone)} removed")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="library")
