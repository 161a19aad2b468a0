"""Target data: formats, detection, sampling, fingerprints, loss masks, and every malformed case."""

from __future__ import annotations

import json

import pytest

from warmstart import testing
from warmstart.data import IGNORE_INDEX, collate, load_target, tokenize
from warmstart.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return testing.make_tokenizer()


PC = [{"prompt": f"What is {i}+{i}?", "completion": f" {2 * i}"} for i in range(20)]
MC = [{"question": "Capital of France?", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
      {"question": "Capital of Spain?", "choices": ["Paris", "Berlin", "Madrid"], "answer": "C"},
      {"question": "Capital of Germany?", "choices": ["Paris", "Berlin", "Madrid"], "answer": "Berlin"}]
CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "cat?"},
                      {"role": "assistant", "content": "hat"}]}]


# -- formats and detection -----------------------------------------------------

def test_prompt_completion_detected(tmp_path):
    d = load_target(write_jsonl(tmp_path / "d.jsonl", PC))
    assert d.format == "prompt_completion" and len(d) == 20
    assert d.examples[3].prompt == "What is 3+3?" and d.examples[3].completion == " 6"
    assert d.examples[3].line == 4


def test_mc_answer_forms_and_styles(tmp_path):
    p = write_jsonl(tmp_path / "mc.jsonl", MC)
    d = load_target(p)
    assert d.format == "mc"
    assert [e.answer for e in d] == [0, 2, 1]
    assert [e.completion for e in d] == [" Paris", " Madrid", " Berlin"]
    assert d.examples[0].options == [" Paris", " Berlin", " Madrid"]
    lt = load_target(p, mc_style="letter")
    assert lt.examples[1].completion == " C" and "B. Berlin" in lt.examples[1].prompt
    assert d.with_mc_style("letter").examples[1].prompt == lt.examples[1].prompt
    custom = load_target(p, mc_style="letter", mc_template="Q: {question}\n{options}\nA:")
    assert custom.examples[0].prompt.startswith("Q: Capital of France?\nA. Paris")
    assert custom.fingerprint() != lt.fingerprint() != d.fingerprint()


def test_csv_parquet_and_saved_dataset_agree(tmp_path):
    import csv

    import datasets

    rows = [{"question": r["question"], "choices": json.dumps(r["choices"]), "answer": str(r["answer"])}
            for r in MC]
    with open(tmp_path / "mc.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "choices", "answer"])
        w.writeheader()
        w.writerows(rows)
    ref = load_target(write_jsonl(tmp_path / "mc.jsonl", MC))
    assert load_target(tmp_path / "mc.csv").fingerprint() == ref.fingerprint()
    ds = datasets.Dataset.from_list(MC[:1] + [dict(MC[1], answer=2), dict(MC[2], answer=1)])
    ds.to_parquet(str(tmp_path / "mc.parquet"))
    assert load_target(tmp_path / "mc.parquet").fingerprint() == ref.fingerprint()
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert load_target(tmp_path / "saved").fingerprint() == ref.fingerprint()
    test = load_target(tmp_path / "saved", split="test")
    assert test.split == "test" and len(test) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        load_target(tmp_path / "saved", split="dev")


def test_split_file_in_directory(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", PC[:3])
    d = load_target(tmp_path, split="validation")
    assert len(d) == 3 and d.split == "validation"


# -- sampling and fingerprint -----------------------------------------------------

def test_sample_is_random_seeded_and_recorded(tmp_path):
    d = load_target(write_jsonl(tmp_path / "d.jsonl", PC))
    s1, s2, s3 = d.sample(5, seed=0), d.sample(5, seed=0), d.sample(5, seed=1)
    assert [e.line for e in s1] == [e.line for e in s2]
    assert [e.line for e in s1] != [e.line for e in s3]
    assert [e.line for e in s1] != [1, 2, 3, 4, 5]
    assert s1.sample_spec == "n=5,seed=0" and len(s1) == 5
    assert s1.fingerprint() == s2.fingerprint() != d.fingerprint()
    assert d.sample(100).sample_spec == "all" and len(d.sample(100)) == 20


def test_fingerprint_follows_content_only(tmp_path):
    a = load_target(write_jsonl(tmp_path / "a.jsonl", PC))
    b = load_target(write_jsonl(tmp_path / "b.jsonl", PC))
    c = load_target(write_jsonl(tmp_path / "c.jsonl", PC[:-1] + [{"prompt": "x", "completion": " y"}]))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# -- tokenizing ---------------------------------------------------------------------

def test_labels_mask_prompt(tmp_path, tok):
    d = load_target(write_jsonl(tmp_path / "d.jsonl", PC[:2]))
    enc = tokenize(d, tok)
    p = tok("What is 1+1?")["input_ids"]
    c = tok(" 2", add_special_tokens=False)["input_ids"]
    assert enc[1]["input_ids"] == p + c
    assert enc[1]["labels"] == [IGNORE_INDEX] * len(p) + c
    eos = tokenize(d, tok, add_eos=True)[1]
    assert eos["input_ids"][-1] == tok.eos_token_id and eos["labels"][-1] == tok.eos_token_id


def test_truncation_keeps_completion(tmp_path, tok):
    d = load_target(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 50, "completion": " Paris"}]))
    enc = tokenize(d, tok, max_length=8)[0]
    c = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(enc["input_ids"]) == 8 and enc["labels"][-len(c):] == c


def test_chat_loss_on_every_assistant_turn(tmp_path, tok):
    d = load_target(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert d.format == "messages" and d.examples[0].completion == "hat"
    enc = tokenize(d, tok)[0]
    targets = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert targets == "hello<|im_end|>\nhat<|im_end|>\n"
    full = tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert tok.decode(enc["input_ids"]) == full


def test_collate_right_pads(tok):
    batch = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
             {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    t = collate(batch, pad_id=3)
    assert t["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert t["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert t["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# -- malformed data: each error names the file and the line ---------------------------

def _raises(path, match, **kw):
    with pytest.raises(DataError) as ei:
        load_target(path, **kw)
    msg = ei.value.one_line()
    assert str(path) in msg, msg
    assert match in msg, msg
    return msg


def test_bad_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(PC[0]) + "\n" + json.dumps(PC[1]) + "\n{not json\n")
    _raises(p, "line 3: invalid JSON")


def test_missing_field(tmp_path):
    _raises(write_jsonl(tmp_path / "d.jsonl", PC[:2] + [{"prompt": "x"}]), "line 3: missing field 'completion'")


def test_missing_answer_and_out_of_range(tmp_path):
    rows = [MC[0], {"question": "q", "choices": ["a", "b"]}]
    _raises(write_jsonl(tmp_path / "a.jsonl", rows), "line 2: missing field 'answer'")
    rows = [MC[0], MC[1], {"question": "q", "choices": ["a", "b"], "answer": 2}]
    _raises(write_jsonl(tmp_path / "b.jsonl", rows), "line 3: answer index 2 out of range")
    rows = [{"question": "q", "choices": ["a", "b"], "answer": "Z"}]
    _raises(write_jsonl(tmp_path / "c.jsonl", rows), "line 1: answer 'Z' is not")


def test_empty_dataset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n")
    _raises(p, "dataset is empty")


def test_unknown_format(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    _raises(p, "line 1: cannot detect the row format")
    _raises(p, "unknown format 'chat'", format="chat")


def test_bad_rows_in_other_formats(tmp_path):
    _raises(write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
            "line 1: no assistant message")
    _raises(write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "choices": "abc", "answer": 0}]),
            "line 1: choices must be a list")
    _raises(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": ""}]), "line 1: empty completion")
    _raises(write_jsonl(tmp_path / "d.jsonl", [PC[0], [1, 2]]), "line 2: expected an object")


def test_bad_csv_row_and_missing_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\n"a"," b"\n"c",\n')
    _raises(p, "line 3: empty completion")
    _raises(tmp_path / "nope.jsonl", "no such file")
    (tmp_path / "x.txt").write_text("hi")
    _raises(tmp_path / "x.txt", "unsupported file type")


def test_chat_template_that_rewrites_history_is_refused(tmp_path, tok):
    import copy

    t = copy.deepcopy(tok)
    # drops every earlier assistant turn once another message follows (like some reasoning templates)
    t.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                       "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    d = load_target(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    with pytest.raises(DataError, match="prefix by prefix"):
        tokenize(d, t)
