"""`warmstart select` from the command line: output file, JSON, cache on a rerun, one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from warmstart.cli import app
from warmstart.library import Library




def test_select_cli_writes_selection_and_caches(models, tmp_path):
    db = tmp_path / "lib.db"
    with Library(db) as lib:
        for name in ("lora_a", "lora_b", "ft_a"):
            lib.add(models / name)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: the quick", "completion": " brown fox"}) + "\n"
                            for i in range(12)))
    runner = CliRunner()
    args = ["select", "--target", str(data), "--base", str(models / "base"), "--library", str(db),
            "--n", "6", "--k", "2", "--weights", "softmax:1", "--out", str(tmp_path / "sel.yaml")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    sel = yaml.safe_load((tmp_path / "sel.yaml").read_text())
    assert sel["target"]["sample"] == "n=6,seed=0" and len(sel["ranking"]) == 4 and len(sel["donors"]) == 2
    assert sel["base"] == str((models / "base").resolve())
    r = runner.invoke(app, args)  # exists, no --force
    assert r.exit_code == 1
    r = runner.invoke(app, args + ["--force", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert all(row["cached"] for row in out["ranking"])


def test_select_cli_bad_data_is_one_line(models, tmp_path, monkeypatch, capsys):
    from warmstart.cli._common import run_app

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n{oops\n')
    monkeypatch.setattr("sys.argv", ["warmstart", "select", "--target", str(data), "--base", str(models / "base"),
                                     "--library", str(tmp_path / "lib.db")])
    with pytest.raises(SystemExit) as ei:
        run_app(app)
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert f"{data}: line 2: invalid JSON" in " ".join(err.split()) and "Traceback" not in err


def test_select_help_has_examples():
    r = CliRunner().invoke(app, ["select", "--help"])
    assert r.exit_code == 0 and "accelerate launch" in r.output


def test_select_and_run_cli_with_optimized_weights(models, tmp_path, cli):
    """--weights optimized: the file records searched weights and task_arithmetic; `run` merges with them."""
    db = tmp_path / "lib.db"
    with Library(db) as lib:
        for name in ("lora_a", "lora_b"):
            lib.add(models / name)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: the quick", "completion": " brown fox"}) + "\n"
                            for i in range(16)))
    r = cli("select", "--target", data, "--base", models / "base", "--library", db, "--n", 6, "--k", 2,
            "--weights", "optimized", "--optimize-budget", 4, "--out", tmp_path / "sel.yaml")
    assert r.code == 0, r.err
    sel = yaml.safe_load((tmp_path / "sel.yaml").read_text())
    assert sel["method"] == "task_arithmetic" and sel["weighting"]["evaluations"] == 4
    assert "weights optimized in 4 evaluations" in r.err
    r = cli("run", "--target", data, "--base", models / "base", "--library", db, "--k", 2, "--weights", "optimized",
            "--steps", 2, "--eval-every", 1, "--batch-size", 4, "--no-baseline", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    marker = json.loads((tmp_path / "run" / "merge" / "stage.done.json").read_text())
    run_sel = yaml.safe_load((tmp_path / "run" / "select" / "selection.yaml").read_text())
    assert marker["outputs"]["recipe"]["method"] == "task_arithmetic"
    # the warm start carries the baseline's LoRA scaling (alpha/r = 16/8), not 1
    assert marker["outputs"]["recipe"]["lora_scaling"] == 2.0
    acfg = json.loads((tmp_path / "run" / "merge" / "model" / "adapter_config.json").read_text())
    assert (acfg["r"], acfg["lora_alpha"]) == (8, 16)
    from safetensors.torch import load_file

    a = [t for k, t in load_file(tmp_path / "run" / "merge" / "model" / "adapter_model.safetensors").items()
         if k.endswith("lora_A.weight")]
    assert a and all(abs(float(r) - 3 ** -0.5) < 1e-4 for t in a for r in t.norm(dim=1))
    assert [m["weight"] for m in marker["outputs"]["recipe"]["models"]] == [d["weight"] for d in run_sel["donors"]]
    r = cli("select", "--target", data, "--base", models / "base", "--library", db, "--weights", "optimised")
    assert r.code == 1 and "unknown weights 'optimised'" in r.err and "Traceback" not in r.err
