"""The catalog of warmstart's own outputs: finetune metadata, provenance, derived entries kept out of donors."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from warmstart import library as library_mod
from warmstart.library import Library, provenance_of, task_name_from_path


def _finetune_like(src, out, *, init_model, init_adapter=None, task="capitals", train_path="data/capitals.jsonl"):
    """What `warmstart finetune` leaves: the adapter, warmstart.json (kind finetune, final point)
    and curve.json — and no trainer_state.json."""
    shutil.copytree(src, out)
    final = {"step": 20, "time_s": 3.0, "wall_s": 4.0, "train_loss": 0.75, "eval_loss": 1.5, "eval_exact_match": 0.25}
    meta = {"kind": "finetune", "output": "lora", "init": {"model": str(init_model), "adapter": init_adapter,
                                                           "method": "new-lora"},
            "train_data": {"path": train_path, "rows": 8}, "final": final}
    if task:
        meta["task"] = task
    (out / "warmstart.json").write_text(json.dumps(meta))
    pts = [{"step": 0, "train_loss": None, "eval_loss": 2.0}, {"step": 10, "train_loss": 1.0, "eval_loss": 1.7}, final]
    (out / "curve.json").write_text(json.dumps({"meta": {}, "points": pts}))
    return out


def _fake_run(models, root):
    """A `warmstart run` directory: run.json, a merge of two adapters, warm and baseline adapters."""
    from warmstart.merge import MergePlan, merge

    root.mkdir()
    (root / "run.json").write_text(json.dumps({"target": "/data/capitals.jsonl", "config": {}}))
    merge(MergePlan(models=[str(models / "lora_a"), str(models / "lora_b")], method="linear",
                    lora_mode="svd", rank=4), root / "merge" / "model")
    _finetune_like(models / "lora_a", root / "warm", init_model=models / "base",
                   init_adapter=str(root / "merge" / "model"), task=None, train_path=str(root / "split/train.jsonl"))
    _finetune_like(models / "lora_b", root / "baseline", init_model=models / "base", task=None,
                   train_path=str(root / "split/train.jsonl"))
    return root


@pytest.fixture
def lib(tmp_path):
    with Library(tmp_path / "lib.db") as lib:
        yield lib


def test_task_name_from_path():
    assert task_name_from_path("data/capitals.jsonl") == "capitals"
    assert task_name_from_path("bench/plurals/train.jsonl") == "plurals"  # split files name their folder
    assert task_name_from_path("/x/ds_dir") == "ds_dir"
    assert task_name_from_path(None) is None


def test_finetune_output_gets_task_step_loss_and_evals(lib, models, tmp_path):
    out = _finetune_like(models / "lora_a", tmp_path / "ft", init_model=models / "base")
    e, _ = lib.add(out)
    assert e.task == "capitals"
    assert e.global_step == 20 and e.final_loss == 0.75
    assert e.eval_metrics == {"eval_loss": 1.5, "eval_exact_match": 0.25}
    assert e.loss_history == [[10, 1.0], [20, 0.75]]
    assert not e.derived and e.provenance["made_by"] == "finetune"


def test_finetune_output_without_task_field_uses_data_file(lib, models, tmp_path):
    out = _finetune_like(models / "lora_a", tmp_path / "ft", init_model=models / "base", task=None,
                         train_path="/d/plurals/train.jsonl")
    assert lib.add(out)[0].task == "plurals"


def test_scanning_a_run_marks_its_outputs_derived_and_select_skips_them(lib, models, tmp_path):
    from warmstart.select import candidates_for

    run = _fake_run(models, tmp_path / "run")
    lib.add(models / "lora_a")
    res = lib.scan(run)
    by_stage = {e.provenance.get("stage"): e for e in res.added}
    assert set(by_stage) == {"merge", "warm", "baseline"}
    assert all(e.derived for e in res.added)
    assert by_stage["merge"].provenance["made_by"] == "merge"
    assert by_stage["merge"].provenance["from"] == [str(models / "lora_a"), str(models / "lora_b")]
    assert by_stage["warm"].task == "capitals" and by_stage["baseline"].task == "capitals"  # the run's target
    assert by_stage["warm"].global_step == 20
    cands = candidates_for(models / "base", lib)
    assert [c.ref for c in cands if c.kind != "base"] == [str(models / "lora_a")]
    with_derived = candidates_for(models / "base", lib, include_derived=True)
    assert len(with_derived) == len(cands) + 3
    assert [e.ref for e in lib.list(derived=False)] == [str(models / "lora_a")]


def test_standalone_merge_and_transfer_outputs_are_derived(lib, models, tmp_path):
    from warmstart.merge import MergePlan, merge

    merge(MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")]), tmp_path / "m")
    e, _ = lib.add(tmp_path / "m")
    assert e.derived and e.provenance == {"made_by": "merge", "from": [str(models / "ft_a"), str(models / "ft_b")],
                                          "derived": True}
    t = shutil.copytree(models / "ft_a", tmp_path / "t")
    (t / "warmstart.json").write_text(json.dumps({"warmstart": "transfer", "finetuned": "/old/ft", "task": "x"}))
    assert provenance_of(t) == {"made_by": "transfer", "from": ["/old/ft"], "derived": True}
    # a fine-tune that continued the merge is derived too; one from the plain base is not
    ft = _finetune_like(models / "lora_a", tmp_path / "ft", init_model=tmp_path / "m")
    assert provenance_of(ft)["derived"] is True
    assert provenance_of(models / "lora_a") == {}


def test_rescan_fills_provenance_of_entries_registered_before(lib, models, tmp_path):
    out = _finetune_like(models / "lora_a", tmp_path / "ft", init_model=models / "base")
    meta = json.loads((out / "warmstart.json").read_text())
    (out / "warmstart.json").unlink()
    assert lib.add(out)[0].global_step is None
    (out / "warmstart.json").write_text(json.dumps(meta))
    e, status = lib.add(out)
    assert status == "updated" and e.global_step == 20 and e.provenance["made_by"] == "finetune"


def test_migration_classifies_existing_rows(models, tmp_path, monkeypatch):
    from warmstart.merge import MergePlan, merge

    merge(MergePlan(models=[str(models / "ft_a"), str(models / "ft_b")]), tmp_path / "m")
    with Library(tmp_path / "v2.db") as lib2:
        lib2.add(tmp_path / "m")
        lib2.add(models / "ft_a")
        rows = [dict(r) for r in lib2.db.execute("SELECT * FROM checkpoints")]
    monkeypatch.setattr(library_mod, "MIGRATIONS", library_mod.MIGRATIONS[:1])
    monkeypatch.setattr(library_mod, "SCHEMA_VERSION", 1)
    Library(tmp_path / "v1.db").close()  # a catalog written by the previous warmstart
    db = sqlite3.connect(tmp_path / "v1.db")
    for r in rows:
        r = {k: v for k, v in r.items() if k not in ("id", "derived", "provenance")}
        db.execute(f"INSERT INTO checkpoints ({', '.join(r)}) VALUES ({', '.join('?' * len(r))})", list(r.values()))
    db.commit()
    db.close()
    monkeypatch.undo()
    with Library(tmp_path / "v1.db") as lib:
        assert lib.schema_version == library_mod.SCHEMA_VERSION
        assert [(e.ref, e.derived) for e in lib.list()] == [(str(tmp_path / "m"), True), (str(models / "ft_a"), False)]


def test_cli_show_prints_dates_and_no_none_and_list_marks_derived(cli, models, tmp_path):
    import re

    db = tmp_path / "lib.db"
    run = _fake_run(models, tmp_path / "run")
    assert cli("library", "add", models / "ft_a", "--library", db).code == 0
    r = cli("library", "scan", run, "--library", db)
    assert r.code == 0 and "3 added, 0 updated, 0 unchanged, 0 failed; 3 derived" in r.err
    r = cli("library", "show", str(models / "ft_a"), "--library", db)
    assert r.code == 0 and "None" not in r.out
    assert re.search(r"created_at\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", r.out)
    assert re.search(r"global_step\s+–", r.out)
    from warmstart.cli.library import _origin

    with Library(db) as lib:
        assert sorted(_origin(e) for e in lib.list()) == ["", " (run baseline)", " (run merge)", " (run warm)"]
    originals = cli("library", "list", "--library", db, "--no-derived", "--json").json()
    assert [x["ref"] for x in originals] == [str(models / "ft_a")]


def test_ranking_and_donor_rows_carry_the_catalog_task(lib, models, tmp_path):
    from rich.console import Console

    from warmstart.cli.select import checkpoint_label, ranking_table
    from warmstart.data import load_target
    from warmstart.report import render_markdown
    from warmstart.select import ScoreRow, build_selection
    from warmstart.testing import write_jsonl

    data = load_target(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}] * 2))
    e, _ = lib.add(models / "run_lora" / "checkpoint-20")
    rows = [ScoreRow("base", str(models / "base"), "base", 2.0, False), ScoreRow(e.id, e.ref, "lora", 1.0, False)]
    sel = build_selection(data, str(models / "base"), rows, metric="loss", scorer="loss", k=1, margin=None,
                          weights="uniform", penalty=1.0, entries={e.id: e})
    assert [r["task"] for r in sel.ranking] == ["task_c", None] and sel.donors[0]["task"] == "task_c"
    assert checkpoint_label(sel.ranking[0]) == "task_c (checkpoint-20)"
    assert checkpoint_label(sel.ranking[1]) == str(models / "base")  # no task: the whole reference
    console = Console(width=400, record=True)
    console.print(ranking_table(sel))
    assert "task_c (checkpoint-20)" in console.export_text()
    md = render_markdown({"metric": "eval_loss", "warm": {"final": 1.0, "final_eval_loss": 1.0, "zero_shot": None,
                                                           "steps": 1, "train_time_s": 1.0}, "donors": sel.donors})
    assert f"| {e.id} | task_c | lora |" in md


def test_real_finetune_output_is_catalogued_with_task_step_and_loss(cli, lib, models, tmp_path):
    """End to end: `warmstart finetune --task` and the API's default task, then `library add`."""
    from warmstart.testing import write_jsonl
    from warmstart.train import TrainConfig, finetune

    d = tmp_path / "plurals"
    d.mkdir()
    rows = [{"prompt": f"plural of cat{i}:", "completion": f" cat{i}s"} for i in range(6)]
    train, ev = write_jsonl(d / "train.jsonl", rows), write_jsonl(d / "eval.jsonl", rows[:2])
    r = cli("finetune", "--init", models / "base", "--train", train, "--eval", ev, "--out", tmp_path / "a",
            "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--task", "english_plurals")
    assert r.code == 0, r.err
    e, _ = lib.add(tmp_path / "a")
    fin = json.loads((tmp_path / "a" / "warmstart.json").read_text())["final"]
    assert e.task == "english_plurals" and e.global_step == 2
    assert (e.final_loss == pytest.approx(fin["train_loss"])
            and e.eval_metrics["eval_loss"] == pytest.approx(fin["eval_loss"]))
    assert not e.derived and e.provenance["from"] == [str((models / "base").resolve())]
    finetune(models / "base", train, ev, tmp_path / "b", TrainConfig(steps=1, batch_size=2, eval_every=1))
    assert lib.add(tmp_path / "b")[0].task == "plurals"  # from plurals/train.jsonl
