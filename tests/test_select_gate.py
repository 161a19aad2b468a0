"""The own-task gate: a candidate whose own training never learned its task is ranked but never a donor."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from warmstart.errors import ConfigError
from warmstart.library import Library
from warmstart.rundir import read_selection, write_selection
from warmstart.select import DEFAULT_MIN_OWN_GAIN, own_training, select
from warmstart.testing import write_jsonl

ROWS = [{"prompt": f"Q{i}: the quick brown", "completion": " fox jumps over"} for i in range(12)]


def _curve(d, start: float, final: float, loss=(2.0, 1.5)) -> None:
    """A curve.json as `warmstart finetune` writes it: step 0 and the last step, accuracy and loss."""
    pts = [{"step": 0, "time_s": 0.0, "eval_loss": loss[0], "eval_mc_accuracy": start},
           {"step": 40, "time_s": 9.0, "train_loss": 1.6, "eval_loss": loss[1], "eval_mc_accuracy": final}]
    (d / "curve.json").write_text(json.dumps({"meta": {}, "points": pts}))


def test_own_training_evidence_and_gain(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    _curve(d, 0.28169, 0.29577)  # recycle-bench currency_code: one question of 71 in 40 steps
    ev = own_training(SimpleNamespace(path=str(d), loss_history=[]))
    assert ev["metric"] == "eval_mc_accuracy" and ev["from"] == "curve.json"
    assert ev["gain"] == pytest.approx(0.29577 - 0.28169) and ev["gain"] < DEFAULT_MIN_OWN_GAIN
    # only a loss logged: the relative fall of the eval loss
    loss_only = [{"step": 0, "eval_loss": 4.0}, {"step": 9, "eval_loss": 3.0}]
    (d / "curve.json").write_text(json.dumps({"points": loss_only}))
    assert own_training(SimpleNamespace(path=str(d), loss_history=[]))["gain"] == pytest.approx(0.25)
    # no curve: the catalog's training-loss history (from trainer_state.json)
    e = SimpleNamespace(path=str(tmp_path / "b"), loss_history=[[10, 2.0], [20, 1.99], [30, 1.98]])
    ev = own_training(e)
    assert ev["from"] == "trainer_state.json" and ev["gain"] == pytest.approx(0.01)
    # nothing known: no evidence, the candidate is not judged
    assert own_training(SimpleNamespace(path=str(tmp_path / "c"), loss_history=[[10, 2.0]])) is None
    assert own_training(None) is None


@pytest.fixture
def two_adapters(models, copy_of, tmp_path):
    a, b = copy_of(models / "lora_a"), copy_of(models / "lora_b")
    target = write_jsonl(tmp_path / "t.jsonl", ROWS)
    db = tmp_path / "lib.db"
    with Library(db) as lib:
        ids = {p.name: lib.add(p)[0].id for p in (a, b)}
    return a, b, target, db, ids


@pytest.mark.parametrize("scorer", ["loss", "grad"])
def test_gate_skips_the_top_ranked_donor_that_never_learned(models, two_adapters, scorer):
    a, b, target, db, ids = two_adapters
    names = {v: k for k, v in ids.items()}
    with Library(db) as lib:
        free = select(target, models / "base", library=lib, n=6, k=1, scorer=scorer, min_own_gain=None)
        top = names[free.donors[0]["id"]]
        other = "lora_b" if top == "lora_a" else "lora_a"
        _curve(a if top == "lora_a" else b, 0.25, 0.25)  # the first choice stayed at chance on its own task
        _curve(a if other == "lora_a" else b, 0.25, 0.61)
        gated = select(target, models / "base", library=lib, n=6, k=1, scorer=scorer)
    assert [d["id"] for d in gated.donors] == [ids[other]]
    # the gate changes the donors, not the scores: the ranking is the same (now from the cache)
    assert [(r["id"], r["score"]) for r in gated.ranking] == [(r["id"], r["score"]) for r in free.ranking]
    ex = gated.own_gate["excluded"]
    assert gated.own_gate["min_gain"] == DEFAULT_MIN_OWN_GAIN
    assert [x["id"] for x in ex] == [ids[top]] and ex[0]["gain"] == 0.0 and ex[0]["from"] == "curve.json"


def test_gate_threshold_and_everyone_excluded(models, two_adapters, tmp_path):
    a, b, target, db, ids = two_adapters
    _curve(a, 0.25, 0.26)
    _curve(b, 0.25, 0.30)
    with Library(db) as lib:
        kw = dict(library=lib, n=6, k=2)
        assert {d["id"] for d in select(target, models / "base", **kw).donors} == {ids["lora_b"]}
        assert {d["id"] for d in select(target, models / "base", min_own_gain=0.005, **kw).donors} == set(ids.values())
        sel = select(target, models / "base", min_own_gain=0.1, **kw)
        assert sel.donors == [] and len(sel.own_gate["excluded"]) == 2
        write_selection(sel, tmp_path / "sel.yaml")
        with pytest.raises(ConfigError, match="min_own_gain"):
            select(target, models / "base", min_own_gain="big", **kw)
    assert read_selection(tmp_path / "sel.yaml").selection().own_gate["min_gain"] == 0.1


def test_select_cli_reports_the_excluded_donor(models, two_adapters, cli, tmp_path):
    a, b, target, db, ids = two_adapters
    _curve(a, 0.25, 0.25)
    args = ("select", "--target", target, "--base", models / "base", "--library", db, "--n", 6, "--k", 2)
    r = cli(*args, "--json")
    assert r.code == 0, r.err
    assert [d["id"] for d in r.json()["donors"]] == [ids["lora_b"]]
    line = "not a donor: lora_a never learned its own task (eval_mc_accuracy 0.2500 → 0.2500"
    assert line in " ".join(r.err.split())
    r = cli(*args, "--no-own-gate", "--json")
    assert r.code == 0 and len(r.json()["donors"]) == 2 and r.json()["own_gate"]["min_gain"] is None
