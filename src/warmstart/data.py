"""Target datasets: read a file, normalise its rows, tokenize with loss masks.

Three row formats, detected from the first row (or given with ``format=``):

* ``prompt_completion`` — ``{"prompt", "completion"}``; loss on the completion only.
* ``messages`` — ``{"messages": [{"role", "content"}, ...]}``; loss on every
  assistant turn, rendered with the tokenizer's chat template.
* ``mc`` — ``{"question", "choices", "answer"}`` (answer: index, letter or the
  choice's text). Trained with the answer's text as completion
  (``mc_style="text"``, the lm-eval "rank classification" form) or with a
  lettered prompt whose completion is the letter (``mc_style="letter"``).

Inputs: JSONL / JSON, CSV, Parquet, a ``datasets`` ``save_to_disk`` directory,
or a directory holding ``<split>.jsonl`` (or .json/.csv/.parquet). Every error
names the file and the line (or row) that is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._io import open_regular
from .errors import ConfigError, DataError

FORMATS = ("prompt_completion", "messages", "mc")
MC_STYLES = ("text", "letter")
# Prompt templates for multiple-choice rows. ``{options}`` is one "A. text" line per choice.
# The completion is " <choice text>" (text style) or " <letter>" (letter style): the leading
# space is lm-eval's target delimiter, so the option is scored as a separate word.
MC_TEMPLATES = {
    "text": "Question: {question}\nAnswer:",
    "letter": "Question: {question}\n{options}\nAnswer:",
}
LETTERS = string.ascii_uppercase
IGNORE_INDEX = -100  # labels the loss ignores (torch CrossEntropyLoss default)
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# ----------------------------------------------------------------------------
# Data classes


@dataclass
class Example:
    """One row, normalised. ``options`` are the completions of every MC choice."""

    prompt: str
    completion: str
    choices: list[str] | None = None
    answer: int | None = None
    messages: list[dict] | None = None
    line: int | None = None
    question: str | None = None
    options: list[str] | None = None

    def content(self) -> dict:
        """What the fingerprint hashes: everything that reaches the tokenizer."""
        return {"p": self.prompt, "c": self.completion, "o": self.options, "a": self.answer,
                "m": self.messages}


@dataclass
class TargetData:
    path: str
    format: str
    split: str | None
    examples: list[Example]
    sample_spec: str = "all"
    mc_style: str = "text"
    mc_template: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def fingerprint(self) -> str:
        """Content hash of the rows used (after sampling), their format and rendering."""
        h = hashlib.sha256(f"{self.format}|{self.mc_style}\n".encode())
        for ex in self.examples:
            h.update(json.dumps(ex.content(), sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()[:32]

    def sample(self, n: int | None, seed: int = 0) -> TargetData:
        """A random sample of ``n`` rows (kept in file order); all rows when n ≥ len or n is None."""
        if n is None or n >= len(self.examples):
            return replace(self, examples=list(self.examples), sample_spec="all")
        if n <= 0:
            raise DataError(f"sample size must be positive, got {n}", path=self.path)
        idx = sorted(random.Random(seed).sample(range(len(self.examples)), n))
        return replace(self, examples=[self.examples[i] for i in idx], sample_spec=f"n={n},seed={seed}")

    def with_mc_style(self, style: str, template: str | None = None) -> TargetData:
        """The same multiple-choice rows rendered in another style (e.g. lettered)."""
        if self.format != "mc":
            raise DataError(f"mc style needs multiple-choice rows, this dataset is {self.format!r}",
                            path=self.path)
        _check_style(style, self.path)
        exs = [_render_mc(ex.question, ex.choices, ex.answer, ex.line, style, template) for ex in self.examples]
        return replace(self, examples=exs, mc_style=style, mc_template=template)


# ----------------------------------------------------------------------------
# Reading files into raw rows: (line number, dict)


def _read_rows(path: Path, split: str | None) -> tuple[list[tuple[int, Any]], str, str | None]:
    """Rows with their line (text files) or row number (tables); also 'line'/'row' and the split."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            rows, split = _read_saved_dataset(path, split)
            return rows, "row", split
        for suffix in _FILE_SUFFIXES:
            f = path / f"{split or 'train'}{suffix}"
            if f.exists():
                rows, unit, _ = _read_rows(f, None)
                return rows, unit, split or "train"
        raise DataError("directory is neither a `save_to_disk` dataset nor holds "
                        f"{split or 'train'}.jsonl/.json/.csv/.parquet", path=path)
    if not path.exists():
        raise DataError("no such file", path=path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path), "line", split
    if suffix == ".parquet":
        return _read_parquet(path), "row", split
    if suffix in (".jsonl", ".json", ".ndjson", ""):
        return _read_json_lines(path), "line", split
    raise DataError(f"unsupported file type {suffix!r}", path=path,
                    hint="use .jsonl, .json, .csv, .parquet or a save_to_disk directory")


def _read_text(path: Path) -> str:
    """A data file's text (regular files only: a named pipe would block); a bad byte names its line."""
    try:
        with open_regular(path, "data file", DataError) as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read data file ({e.strerror})", path=path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"line {line}: not UTF-8 text ({e.reason} at byte {col})", path=path) from None


def _loads(text: str, where: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where or f'line {e.lineno}'}: invalid JSON ({e.msg} at column {e.colno})",
                        path=path) from None
    except RecursionError:
        raise DataError(f"{where or 'file'}: JSON nested too deeply to read", path=path) from None


def _read_json_lines(path: Path) -> list[tuple[int, Any]]:
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):  # a .json file holding one list of rows
        rows = _loads(text, "", path)
        if not isinstance(rows, list):
            raise DataError("a .json file must hold one list of rows", path=path)
        return [(i + 1, r) for i, r in enumerate(rows)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            out.append((lineno, _loads(line, f"line {lineno}", path)))
    return out


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    import io

    out = []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader, None)
        for cells in reader:
            if not cells:
                continue  # a blank line, as DictReader skips it
            if len(cells) != len(header):  # DictReader would file extra cells under None, fill missing with None
                raise DataError(f"line {reader.line_num}: {len(cells)} fields, the header has {len(header)}",
                                path=path)
            out.append((reader.line_num, dict(zip(header, cells))))
    except csv.Error as e:
        raise DataError(f"line {reader.line_num}: malformed CSV ({e})", path=path) from None
    return out


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"cannot read Parquet ({e})", path=path) from None
    return [(i + 1, r) for i, r in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, split: str | None) -> tuple[list[tuple[int, Any]], str | None]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/... for broken dirs
        raise DataError(f"cannot load dataset directory ({e})", path=path) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else names[0]
        if split not in ds:
            raise DataError(f"no split {split!r}", path=path, hint=f"available: {', '.join(names)}")
        ds = ds[split]
    return [(i + 1, r) for i, r in enumerate(ds)], split


# ----------------------------------------------------------------------------
# Normalising rows


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if {"question", "choices"} <= row.keys():
        return "mc"
    if {"prompt", "completion"} <= row.keys():
        return "prompt_completion"
    return None


def load_target(path: str | Path, *, split: str | None = None, format: str | None = None,
                mc_style: str = "text", mc_template: str | None = None) -> TargetData:
    """Read and validate a target dataset; raises DataError naming the file and line."""
    path = Path(path).expanduser()
    rows, unit, split = _read_rows(path, split)
    where = path
    if not rows:
        raise DataError("dataset is empty", path=where)
    if format is None:
        format = detect_format(rows[0][1])
        if format is None:
            keys = sorted(rows[0][1]) if isinstance(rows[0][1], dict) else type(rows[0][1]).__name__
            raise DataError(f"{unit} {rows[0][0]}: cannot detect the row format from {keys}", path=where,
                            hint="expected prompt/completion, messages, or question/choices/answer "
                                 "fields; or pass --format")
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}", path=where, hint=f"choose one of {', '.join(FORMATS)}")
    _check_style(mc_style, where)
    examples = [_normalise(row, no, unit, where, format, mc_style, mc_template) for no, row in rows]
    return TargetData(str(path), format, split, examples, mc_style=mc_style, mc_template=mc_template)


def _check_style(style: str, where) -> None:
    if style not in MC_STYLES:
        raise DataError(f"unknown mc style {style!r}", path=where, hint="choose text or letter")


# ----------------------------------------------------------------------------
# Splitting a target and writing rows back out


def split_target(data: TargetData, *, fraction: float, max_rows: int | None, seed: int) -> tuple[TargetData,
                                                                                                 TargetData]:
    """(train, eval): ``fraction`` of the rows (at least one, at most ``max_rows``) held out by a
    seeded shuffle; both keep the file order."""
    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(fraction * len(idx)))
    if max_rows:
        n_eval = min(n_eval, max_rows)
    if len(idx) - n_eval < 1:
        raise ConfigError(f"target has {len(idx)} rows: too few to carve an eval split", path=data.path,
                          hint="add rows or pass --eval FILE")
    held = set(idx[:n_eval])
    return (replace(data, examples=[e for i, e in enumerate(data.examples) if i not in held]),
            replace(data, examples=[e for i, e in enumerate(data.examples) if i in held]))


def write_rows(path: str | Path, data: TargetData) -> None:
    """The rows as JSONL in the normalised format (messages, question/choices/answer or
    prompt/completion), so that :func:`load_target` reads back the same examples."""
    with open(path, "w") as f:
        for ex in data.examples:
            if ex.messages is not None:
                row = {"messages": ex.messages}
            elif data.format == "mc":
                row = {"question": ex.question, "choices": ex.choices, "answer": ex.answer}
            else:
                row = {"prompt": ex.prompt, "completion": ex.completion}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _normalise(row: Any, no: int, unit: str, where: Path, format: str, mc_style: str,
               mc_template: str | None) -> Example:
    def bad(msg: str) -> DataError:
        return DataError(f"{unit} {no}: {msg}", path=where)

    if not isinstance(row, dict):
        raise bad(f"expected an object, got {type(row).__name__}")

    def field_(name: str):
        if name not in row or row[name] is None:
            raise bad(f"missing field {name!r}")
        return row[name]

    if format == "prompt_completion":
        prompt, completion = field_("prompt"), field_("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise bad("prompt and completion must be strings")
        if not completion:
            raise bad("empty completion (nothing to score or train on)")
        return Example(prompt, completion, line=no)
    if format == "messages":
        return _normalise_messages(_maybe_json(field_("messages"), bad), no, bad)
    question = field_("question")
    choices = _maybe_json(field_("choices"), bad)
    if not isinstance(question, str):
        raise bad("question must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise bad("choices must be a list of at least two strings")
    answer = _answer_index(field_("answer"), choices, bad)
    return _render_mc(question, choices, answer, no, mc_style, mc_template, bad)


def _maybe_json(value: Any, bad) -> Any:
    """CSV cells hold lists as JSON text."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise bad(f"invalid JSON in cell ({e.msg})") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet/datasets
        return value.tolist()
    return value


def _answer_index(answer: Any, choices: list[str], bad) -> int:
    """An index (int or digit string), a letter ('B'), or the text of one choice."""
    n = len(choices)
    if isinstance(answer, bool):
        raise bad(f"answer must be an index, a letter or a choice, got {answer!r}")
    if isinstance(answer, str):
        s = answer.strip()
        if s.lstrip("-").isdigit():
            answer = int(s)
        elif len(s) == 1 and s.upper() in LETTERS[:n]:
            return LETTERS.index(s.upper())
        elif answer in choices:
            return choices.index(answer)
        else:
            raise bad(f"answer {answer!r} is not an index, a letter A-{LETTERS[n - 1]} or one of the choices")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if not isinstance(answer, int):
        raise bad(f"answer must be an index, a letter or a choice, got {answer!r}")
    if not 0 <= answer < n:
        raise bad(f"answer index {answer} out of range for {n} choices (0..{n - 1})")
    return answer


def _render_mc(question: str, choices: list[str], answer: int, no: int | None, style: str,
               template: str | None, bad=None) -> Example:
    if len(choices) > len(LETTERS) and style == "letter":
        raise (bad or DataError)(f"{len(choices)} choices is more than letters A-Z")
    opts_text = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    try:
        prompt = (template or MC_TEMPLATES[style]).format(question=question, options=opts_text)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"bad mc template ({e!r}); use {{question}} and {{options}}") from None
    options = [f" {c}" for c in choices] if style == "text" else [f" {LETTERS[i]}" for i in range(len(choices))]
    return Example(prompt, options[answer], choices=list(choices), answer=answer, line=no,
                   question=question, options=options)


def _normalise_messages(msgs: Any, no: int, bad) -> Example:
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad(f"message {i} needs string 'role' and 'content' fields")
        clean.append({"role": m["role"], "content": m["content"]})
    last = max((i for i, m in enumerate(clean) if m["role"] == "assistant"), default=None)
    if last is None:
        raise bad("no assistant message (nothing to score or train on)")
    # prompt/completion give a plain view (for exact match, display); tokenize() uses the template.
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in clean[:last]) + "assistant:"
    return Example(prompt, clean[last]["content"], messages=clean, line=no)


# ----------------------------------------------------------------------------
# Tokenizing with loss masks


def encode_pair(tokenizer, prompt: str, completion: str, *, max_length: int = 512,
                add_eos: bool = False) -> dict[str, list[int]]:
    """Token ids of prompt + completion, labels -100 on the prompt.

    The two parts are tokenized separately and concatenated, so a completion's
    tokens do not depend on its prompt: the same option text scores the same
    tokens under every question (what rank classification compares). Too long:
    the prompt is cut from the left, then the completion from the right.
    """
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    c = c[:max_length]
    p = p[max(0, len(p) - (max_length - len(c))):] if len(p) + len(c) > max_length else p
    ids = p + c
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p) + c}


def encode_messages(tokenizer, messages: list[dict], *, max_length: int = 512) -> dict[str, list[int]]:
    """Chat rows: loss on every assistant turn (its text and end-of-turn token).

    Each assistant turn's span is found by rendering the conversation up to it
    with and without that turn; the text between is the target.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat rows need a tokenizer with a chat template",
                        hint="use a tokenizer that defines chat_template, or prompt/completion rows")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and upto.startswith(before)):
            # e.g. templates that rewrite earlier turns once a later one exists
            raise DataError("the chat template does not render conversations prefix by prefix; cannot "
                            "locate the assistant turns", hint="use prompt/completion rows instead")
        for text, train in ((before[len(done):], False), (upto[len(before):], True)):
            t = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += t
            labels += t if train else [IGNORE_INDEX] * len(t)
        done = upto
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize(data: TargetData, tokenizer, *, max_length: int = 512, add_eos: bool = False) -> list[dict]:
    """One dict per example: ``input_ids``, ``attention_mask``, ``labels`` (-100 off-target)."""
    if any(ex.messages is not None for ex in data.examples) and not getattr(tokenizer, "chat_template", None):
        first = next(ex for ex in data.examples if ex.messages is not None)
        raise DataError(f"line {first.line}: chat rows need a tokenizer with a chat template, and the tokenizer "
                        f"of {getattr(tokenizer, 'name_or_path', '') or 'the model'} has none", path=data.path,
                        hint="use a model whose tokenizer defines chat_template, or prompt/completion rows")
    out = []
    for ex in data.examples:
        if ex.messages is not None:
            out.append(encode_messages(tokenizer, ex.messages, max_length=max_length))
        else:
            out.append(encode_pair(tokenizer, ex.prompt, ex.completion, max_length=max_length, add_eos=add_eos))
    return out


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a list of tokenized examples into tensors (labels padded with -100)."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.tensor([b[k] + [v] * (width - len(b[k])) for b in batch], dtype=torch.long)
            for k, v in fill.items()}


def pad_id_of(tokenizer) -> int:
    """The pad token id, falling back to EOS (many causal LMs ship without a pad token)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


__all__ = [
    "Example", "TargetData", "FORMATS", "MC_TEMPLATES", "IGNORE_INDEX", "load_target", "detect_format",
    "tokenize", "encode_pair", "encode_messages", "collate", "pad_id_of", "split_target", "write_rows",
]
