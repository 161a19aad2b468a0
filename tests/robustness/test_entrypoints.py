"""Each place where an input enters warmstart turns every failure into one line naming the file, not a
traceback: loading through transformers, config/plan/selection files, data files, trainer_state.json,
catalog rows, the streaming reader (FP8), sizes and counts on the command line, and writing outputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from _robustness import assert_user_error, write_mc

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def w(models, tmp_path_factory):
    """Broken bases, data and config files, built once."""
    root = tmp_path_factory.mktemp("entry")

    def cp(src, name):
        shutil.copytree(models / src, root / name)
        return root / name

    d = {"root": root}
    d["notok"] = cp("base", "notok")
    for f in d["notok"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            f.unlink()
    d["badtok"] = cp("base", "badtok")
    (d["badtok"] / "tokenizer.json").write_text("{garbage")
    d["badtype"] = cp("base", "badtype")
    cfg = json.loads((d["badtype"] / "config.json").read_text())
    cfg["model_type"] = "nosuchmodel"
    (d["badtype"] / "config.json").write_text(json.dumps(cfg))
    d["notemplate"] = cp("base", "notemplate")
    tc = json.loads((d["notemplate"] / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d["notemplate"] / "tokenizer_config.json").write_text(json.dumps(tc))
    (d["notemplate"] / "chat_template.jinja").unlink(missing_ok=True)
    d["mc"] = write_mc(root / "mc.jsonl", 8)
    (root / "deep.jsonl").write_text(d["mc"].read_text().splitlines()[0] + "\n" + "[" * 100_000 + "\n")
    (root / "ragged.csv").write_text("prompt,completion\na,b\nc,d,e\nf,g\n")
    (root / "badbyte.csv").write_bytes(b"prompt,completion\na,b\nc,d\nx\xff,y\n")
    (root / "badbyte.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 3 + b'{"prompt": "\xff"}\n')
    (root / "chat.jsonl").write_text((json.dumps(CHAT) + "\n") * 4)
    (root / "latin1.yaml").write_bytes(b"steps: 2\n# caf\xe9\n")
    (root / "deep.yaml").write_text("[" * 100_000)
    return d


@pytest.fixture(scope="module")
def lib(models, tmp_path_factory):
    from warmstart.library import Library

    p = tmp_path_factory.mktemp("entrylib") / "lib.db"
    with Library(p) as L:
        L.add(models / "ft_a")
    return p


def _select(w, lib, target, base, *extra):
    return ["select", "--target", target, "--base", base, "--library", lib, "--n", 4, *extra]


TRAIN = ["--steps", 1, "--batch-size", 2, "--max-length", 32]
CASES = [  # (id, argv given (w, lib, models, out), words the error line must contain)
    ("tokenizer-missing", lambda w, L, m, o: _select(w, L, w["mc"], w["notok"]), ["notok", "no tokenizer files"]),
    ("tokenizer-corrupt", lambda w, L, m, o: _select(w, L, w["mc"], w["badtok"]), ["badtok", "tokenizer"]),
    ("model-type-unknown", lambda w, L, m, o: _select(w, L, w["mc"], w["badtype"]), ["badtype", "nosuchmodel"]),
    ("finetune-model-type-unknown", lambda w, L, m, o: ["finetune", "--init", w["badtype"], "--train", w["mc"],
                                                        "--eval", w["mc"], *TRAIN, "--out", o],
     ["badtype", "cannot load the model"]),
    ("optimize-tokenizer-missing", lambda w, L, m, o: ["optimize", m / "lora_a", m / "lora_b", "--base", w["notok"],
                                                       "--target", w["mc"], "--budget", 2, "--sample", 4, "--out", o],
     ["notok", "tokenizer"]),
    ("jsonl-nested-too-deeply", lambda w, L, m, o: _select(w, L, w["root"] / "deep.jsonl", m / "base"),
     ["deep.jsonl", "line 2", "nested too deeply"]),
    ("csv-ragged-row", lambda w, L, m, o: _select(w, L, w["root"] / "ragged.csv", m / "base"),
     ["ragged.csv", "line 3", "3 fields, the header has 2"]),
    ("csv-bad-byte", lambda w, L, m, o: _select(w, L, w["root"] / "badbyte.csv", m / "base"),
     ["badbyte.csv", "line 4", "not utf-8"]),
    ("jsonl-bad-byte", lambda w, L, m, o: _select(w, L, w["root"] / "badbyte.jsonl", m / "base"),
     ["badbyte.jsonl", "line 4", "not utf-8"]),
    ("chat-rows-no-template", lambda w, L, m, o: _select(w, L, w["root"] / "chat.jsonl", w["notemplate"]),
     ["chat.jsonl", "line 1", "chat template", "notemplate"]),
    ("run-config-not-utf8", lambda w, L, m, o: ["run", "--target", w["mc"], "--base", m / "base", "--library", L,
                                                "--config", w["root"] / "latin1.yaml", "--out", o],
     ["latin1.yaml", "not utf-8", "line 2"]),
    ("train-config-not-utf8", lambda w, L, m, o: ["finetune", "--init", m / "base", "--train", w["mc"],
                                                  "--eval", w["mc"], "--config", w["root"] / "latin1.yaml",
                                                  "--out", o], ["latin1.yaml", "not utf-8"]),
    ("plan-not-utf8", lambda w, L, m, o: ["merge", "--config", w["root"] / "latin1.yaml", "--out", o],
     ["latin1.yaml", "not utf-8"]),
    ("plan-nested-too-deeply", lambda w, L, m, o: ["merge", "--config", w["root"] / "deep.yaml", "--out", o],
     ["deep.yaml"]),
    ("selection-not-utf8", lambda w, L, m, o: ["merge", "--selection", w["root"] / "latin1.yaml", "--out", o],
     ["latin1.yaml", "not utf-8"]),
    ("shard-size-overflow", lambda w, L, m, o: ["merge", m / "ft_a", m / "ft_b", "--shard-size", "1e400GB",
                                                "--out", o], ["1e400GB"]),
    ("shard-size-negative", lambda w, L, m, o: ["merge", m / "ft_a", m / "ft_b", "--shard-size", "-1GB",
                                                "--out", o], ["-1GB", "positive"]),
    ("shard-size-zero", lambda w, L, m, o: ["merge", m / "ft_a", m / "ft_b", "--shard-size", "0", "--out", o],
     ["'0'"]),
    ("select-batch-size-0", lambda w, L, m, o: _select(w, L, w["mc"], m / "base", "--batch-size", 0),
     ["--batch-size", "at least 1"]),
    ("select-max-length-0", lambda w, L, m, o: _select(w, L, w["mc"], m / "base", "--max-length", 0),
     ["--max-length"]),
]


@pytest.mark.parametrize("argv,needles", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_entry_point_failure_is_one_line(cli, w, lib, models, tmp_path, argv, needles):
    out = tmp_path / "out"
    r = cli(*argv(w, lib, models, out))
    assert_user_error(r, *needles, out=out)


# -- trainer_state.json, catalog rows, adapters with a null base -----------------------------------


def test_non_numeric_trainer_state_is_refused_and_scan_skips_it_with_a_note(cli, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(models / "ft_a", run / "checkpoint-1")
    shutil.copytree(models / "ft_b", run / "checkpoint-2")
    (run / "checkpoint-1" / "trainer_state.json").write_text(
        json.dumps({"global_step": 1, "log_history": [{"step": 1, "loss": "low"}]}))
    r = cli("library", "add", run / "checkpoint-1", "--library", tmp_path / "a.db")
    assert_user_error(r, "checkpoint-1/trainer_state.json", "not a number")
    r = cli("library", "scan", run, "--library", tmp_path / "s.db", "--json")
    assert r.code == 0, r.err
    assert "checkpoint-1" in r.err + r.out and "not a number" in r.err + r.out
    from warmstart.library import Library

    with Library(tmp_path / "s.db") as L:
        assert [Path(e.path).name for e in L.list()] == ["checkpoint-2"]


def test_catalog_row_with_bad_json_is_one_line_and_add_repairs_it(cli, models, tmp_path):
    db = tmp_path / "lib.db"
    assert cli("library", "add", models / "ft_a", "--library", db).code == 0
    with sqlite3.connect(db) as con:
        con.execute("UPDATE checkpoints SET tags='{bad'")
    assert_user_error(cli("library", "list", "--library", db), "lib.db", "#1", "tags", "not valid json")
    assert cli("library", "add", models / "ft_a", "--library", db).code == 0  # rewrites the row
    r = cli("library", "list", "--library", db, "--json")
    assert r.code == 0, r.err


def test_finetune_with_an_adapter_whose_base_is_null(cli, models, tmp_path):
    d = tmp_path / "nullbase"
    shutil.copytree(models / "lora_a", d)
    c = json.loads((d / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = None
    (d / "adapter_config.json").write_text(json.dumps(c))
    data = write_mc(tmp_path / "t.jsonl", 4)
    out = tmp_path / "out"
    r = cli("finetune", "--init", models / "base", "--adapter", d, "--train", data, "--eval", data, *TRAIN,
            "--out", out)
    assert_user_error(r, "nullbase", "base_model_name_or_path", out=out)


# -- FP8, named pipes as data, writing -----------------------------------------------------------


def test_fp8_weights_merge_through_the_streaming_reader(cli, models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "fp8"
    shutil.copytree(models / "ft_a", d)
    sd = load_file(d / "model.safetensors")
    k = "model.layers.0.mlp.up_proj.weight"
    sd[k] = sd[k].to(torch.float8_e4m3fn)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    r = cli("merge", d, d, "--out", tmp_path / "m")
    assert r.code == 0, r.err
    got = load_file(tmp_path / "m" / "model.safetensors")[k]
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.float(), sd[k].float())  # the mean of a tensor with itself is the tensor


def test_a_named_pipe_as_the_target_is_refused_not_waited_on(cli, models, lib, tmp_path):
    import signal

    fifo = tmp_path / "t.jsonl"
    os.mkfifo(fifo)
    def hung(*_):
        raise TimeoutError("select waited on the named pipe")

    old = signal.signal(signal.SIGALRM, hung)  # a hang fails the test instead of stalling the suite
    signal.alarm(60)
    try:
        r = cli(*_select(None, lib, fifo, models / "base"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_user_error(r, "t.jsonl", "not a regular file")


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_an_unwritable_output_is_one_line_and_leaves_nothing(cli, models, tmp_path, monkeypatch, err):
    """A read-only or full filesystem (simulated: root ignores permissions, and no disk is filled)."""
    import builtins

    real_open = builtins.open

    def failing_open(p, mode="r", *a, **k):
        if ".tmp-" in str(p) and ("w" in mode or "a" in mode):
            raise OSError(err, os.strerror(err), None if err == errno.ENOSPC else str(p))
        return real_open(p, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", failing_open)
    out = tmp_path / "m"
    r = cli("merge", models / "ft_a", models / "ft_b", "--out", out)
    assert_user_error(r, "cannot write output", os.strerror(err).lower(), out=out)
    r = cli("transfer", "--base-old", models / "base", "--finetuned", models / "ft_a", "--base-new",
            models / "ft_b", "--out", out)
    assert_user_error(r, "cannot write output", out=out)


@pytest.mark.parametrize("curve", [{"points": [1, 2]}, {"points": [{"step": "x"}]}, {"points": [], "meta": []},
                                   {"points": [{"step": 1, "loss": "low"}]}])
def test_malformed_curve_file_is_one_line(tmp_path, curve):
    from warmstart.errors import DataError
    from warmstart.report import Curve

    (tmp_path / "curve.json").write_text(json.dumps(curve))
    with pytest.raises(DataError, match="curve.json"):
        Curve.from_file(tmp_path)
