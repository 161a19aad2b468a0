"""`warmstart run --transfer-from`: the warm start is a fine-tune carried to the run's base (issue #17).

Tiny models: an old base, a nearby "new version" of it (the run's base), a LoRA adapter and a full
fine-tune of the old base. The adapter-space init is checked against the formula written out here
and against `transfer()`'s full output; the full init bitwise against `transfer()`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warmstart import testing
from warmstart.config import RunConfig, TransferConfig
from warmstart.errors import ConfigError
from warmstart.library import Library
from warmstart.pipeline import RunDir, run
from warmstart.train import TrainConfig
from warmstart.transfer import transfer, transfer_adapter

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome")]
TRAIN = TrainConfig(steps=2, eval_every=2, batch_size=4, lr=5e-3, max_length=64)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transfer_run")
    old = testing.make_base(root / "v1")
    testing.make_variant(old, root / "v1.1", seed=11, scale=0.005)
    testing.make_adapter(old, root / "lora", seed=13, r=4, alpha=8, targets=("q_proj", "v_proj"),
                         meta={"task": "arc"})  # records its base (adapter_config.json)
    testing.make_variant(old, root / "ft", seed=12, scale=0.02,
                         meta={"kind": "finetune", "init": {"model": str(old), "adapter": None}})  # as finetune does
    testing.make_variant(old, root / "ft_norecord", seed=14, scale=0.02)  # records no base
    testing.make_base(root / "other_arch", hidden_size=48, intermediate_size=96)
    rng = random.Random(0)
    with open(root / "capitals.jsonl", "w") as f:
        for i in range(16):
            c, a = rng.choice(CAPITALS)
            f.write(json.dumps({"question": f"capital of {c} ({i})?", "choices": [x for _, x in CAPITALS],
                                "answer": a}) + "\n")
    return root


def _sd(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _cfg(**transfer) -> RunConfig:
    return RunConfig(train=TRAIN, transfer=TransferConfig(**transfer), eval_fraction=0.25)


# -- the init itself ------------------------------------------------------------------------------


def test_adapter_space_transfer_is_exact(zoo, tmp_path):
    """Same A, B·α, on the new base: merged, it is new + α·s·B@A (the formula, here) and transfer()'s output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    alpha = 0.7
    rep = transfer_adapter(zoo / "v1", zoo / "lora", zoo / "v1.1", tmp_path / "ad", alpha=alpha)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((zoo / "v1.1").resolve())
    src, got = _sd(zoo / "lora"), _sd(tmp_path / "ad")
    assert set(got) == set(src)
    for k in src:
        want = src[k] * alpha if ".lora_B." in k else src[k]
        assert torch.equal(got[k], want), k
    for key in ("cos_bases", "rel_drift", "rel_diff", "cos_drift_diff"):
        assert isinstance(rep.summary[key], float), key
    assert json.loads((tmp_path / "ad" / "transfer_report.json").read_text())["summary"] == rep.summary

    model = AutoModelForCausalLM.from_pretrained(zoo / "v1.1", dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    full = _sd(Path(transfer(zoo / "v1", zoo / "lora", zoo / "v1.1", tmp_path / "full", alpha=alpha).outputs[0]))
    new, s = _sd(zoo / "v1.1"), cfg["lora_alpha"] / cfg["r"]
    changed = 0
    for k, w_new in new.items():
        module = k.removesuffix(".weight")
        a_key, b_key = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
        want = w_new.double()
        if a_key in src:  # the formula, written out: new + α·s·B@A
            want = want + alpha * s * (src[b_key].double() @ src[a_key].double())
            changed += 1
        torch.testing.assert_close(merged[k].double(), want, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(merged[k].double(), full[k].double(), rtol=0, atol=1e-6, msg=k)
    assert changed == 4  # q_proj and v_proj of both layers


# -- runs -----------------------------------------------------------------------------------------


def test_lora_run_resumes_after_warm_failure_without_redoing_the_transfer(zoo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(source=str(zoo / "lora"), alpha=0.5)
    monkeypatch.setenv("WARMSTART_FAIL_AT", "warm")
    logs: list[str] = []
    with pytest.raises(RuntimeError, match="injected failure"):
        run(zoo / "capitals.jsonl", None, zoo / "v1.1", out, cfg, log=logs.append)  # no library: a directory
    assert any("continues the adapter's LoRA (r 4" in x and "fresh one (r 8" in x for x in logs), logs
    rd = RunDir(out)
    assert rd.done("merge") and not rd.done("warm")
    sel = rd.marker("select")["outputs"]
    assert sel["skipped"] == "transfer" and sel["donors"] == [] and sel["selection"] is None
    assert not (out / "select" / "selection.yaml").exists()
    mrg = rd.marker("merge")["outputs"]
    t = mrg["transfer"]
    assert mrg["init"] == "model" and t["output"] == "adapter" and t["alpha"] == 0.5 and t["kind"] == "lora"
    assert t["base_old"] == str((zoo / "v1").resolve()) and "adapter_config.json" in t["base_old_from"]
    assert t["base_new"] == str((zoo / "v1.1").resolve()) and t["wall_s"] > 0
    assert all(isinstance(t[k], float) for k in ("cos_bases", "rel_drift", "rel_diff"))
    assert (out / "merge" / "model" / "transfer_report.json").is_file()
    marker_before = (out / "merge" / "stage.done.json").read_text()
    weights_mtime = (out / "merge" / "model" / "adapter_model.safetensors").stat().st_mtime_ns
    info = json.loads((out / "run.json").read_text())
    assert info["library"] is None and info["transfer"]["finetuned"] == str((zoo / "lora").resolve())
    assert info["config"]["transfer"] == {"source": str(zoo / "lora"), "alpha": 0.5}

    monkeypatch.delenv("WARMSTART_FAIL_AT")
    res = run(zoo / "capitals.jsonl", None, zoo / "v1.1", out, cfg)
    assert res.skipped == ["split", "select", "merge"] and res.ran == ["warm", "baseline", "report"]
    assert (out / "merge" / "stage.done.json").read_text() == marker_before  # the transfer was not redone
    assert (out / "merge" / "model" / "adapter_model.safetensors").stat().st_mtime_ns == weights_mtime
    warm = json.loads((out / "warm" / "warmstart.json").read_text())
    assert warm["init"]["method"] == "continue-adapter"  # warm trains the transferred adapter further
    assert warm["init"]["adapter"] == str((out / "merge" / "model").resolve())
    assert warm["init"]["model"] == str((zoo / "v1.1").resolve())
    assert warm["config"] == json.loads((out / "baseline" / "warmstart.json").read_text())["config"]

    rep = res.report
    assert rep["transfer"]["alpha"] == 0.5 and rep["donors"] is None and rep["selection"] is None
    assert rep["overhead_s"] == {"transfer": rd.marker("merge")["wall_s"]}  # parity's wall clock pays for it
    assert rep["parity"]["overhead_s"] == rep["overhead_s"]
    md = (out / "report" / "report.md").read_text()
    assert f"transfer of `{(zoo / 'lora').resolve()}` (α 0.5) from `{(zoo / 'v1').resolve()}`" in md
    assert "## Transfer" in md and "## Donors" not in md and "Selection cost" not in md

    from warmstart.pipeline import render_report

    assert render_report(out)["transfer"] == rep["transfer"]  # re-renders from the markers
    with pytest.raises(ConfigError, match=r"different config.*transfer\.alpha: 0\.5 \(this run\) → 1\.0"):
        run(zoo / "capitals.jsonl", None, zoo / "v1.1", out, _cfg(source=str(zoo / "lora"), alpha=1.0))
    with pytest.raises(ConfigError, match="different config"):  # a plain run into a transfer run's directory
        run(zoo / "capitals.jsonl", None, zoo / "v1.1", out, RunConfig(train=TRAIN, eval_fraction=0.25))


def test_full_finetune_run_init_is_transfer_output(zoo, tmp_path, monkeypatch):
    """A full fine-tune (old base from its warmstart.json): merge/model is transfer()'s output, bitwise."""
    out = tmp_path / "run"
    monkeypatch.setenv("WARMSTART_FAIL_AT", "warm")  # the init is what is checked: no training needed
    with pytest.raises(RuntimeError, match="injected"):
        run(zoo / "capitals.jsonl", None, zoo / "v1.1", out, _cfg(source=str(zoo / "ft"), alpha=0.8))
    t = RunDir(out).marker("merge")["outputs"]["transfer"]
    assert t["output"] == "full" and t["kind"] == "full" and "warmstart.json" in t["base_old_from"]
    transfer(zoo / "v1", zoo / "ft", zoo / "v1.1", tmp_path / "ref", alpha=0.8)
    got, want = _sd(out / "merge" / "model"), _sd(tmp_path / "ref")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    old, ft, new = _sd(zoo / "v1"), _sd(zoo / "ft"), _sd(zoo / "v1.1")
    k = "model.layers.1.mlp.down_proj.weight"  # and the formula itself
    torch.testing.assert_close(got[k].double(), new[k].double() + 0.8 * (ft[k].double() - old[k].double()),
                               rtol=0, atol=1e-7)


def test_lora_finetune_with_full_training_transfers_a_full_model(zoo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(source=str(zoo / "lora"))
    cfg.train = TrainConfig(**{**TRAIN.to_dict(), "full": True})
    monkeypatch.setenv("WARMSTART_FAIL_AT", "warm")
    with pytest.raises(RuntimeError, match="injected"):
        run(zoo / "capitals.jsonl", None, zoo / "v1.1", out, cfg)
    assert RunDir(out).marker("merge")["outputs"]["transfer"]["output"] == "full"
    assert (out / "merge" / "model" / "config.json").is_file()
    assert not (out / "merge" / "model" / "adapter_config.json").exists()


# -- the command line -----------------------------------------------------------------------------


def _run_args(zoo, out, *more):
    return ("run", "--target", zoo / "capitals.jsonl", "--base", zoo / "v1.1", "--out", out, "--steps", 1,
            "--eval-every", 1, "--batch-size", 4, "--max-length", 64, "--eval-fraction", 0.25, *more)


def test_cli_transfer_from_a_path(zoo, tmp_path, cli):
    out = tmp_path / "run"
    r = cli(*_run_args(zoo, out, "--transfer-from", zoo / "lora", "--transfer-alpha", 0.5, "--json"))
    assert r.code == 0, r.err
    res = r.json()
    assert res["ran"] == ["split", "select", "merge", "warm", "baseline", "report"]
    assert res["report"]["transfer"]["alpha"] == 0.5 and res["report"]["parity"]["overhead_s"].keys() == {"transfer"}
    r = cli("report", out)  # the human-readable lines say what the warm start was
    assert r.code == 0 and "Warm start: transfer of" in r.err and "(α 0.5)" in r.err


def test_cli_transfer_from_a_library_entry(zoo, tmp_path, cli):
    lib = tmp_path / "lib.db"
    with Library(lib) as L:
        L.add(zoo / "ft_norecord")
        e, _ = L.add(zoo / "lora")
    for i, ref in enumerate((str(e.id), "lora")):  # by id, and by its directory's name
        out = tmp_path / f"run{i}"
        r = cli(*_run_args(zoo, out, "--library", lib, "--transfer-from", ref, "--set", "transfer.alpha=0.25",
                           "--no-baseline", "--json"))
        assert r.code == 0, r.err
        info = json.loads((out / "run.json").read_text())
        assert info["transfer"]["entry"] == e.id and info["transfer"]["finetuned"] == str((zoo / "lora").resolve())
        assert info["transfer"]["base_old_from"] == f"the base of library entry #{e.id}"
        assert r.json()["report"]["transfer"]["alpha"] == 0.25


@pytest.mark.parametrize("case", ["missing", "no_library", "not_in_library", "unrecorded", "old_missing", "shapes",
                                  "shapes_full", "with_select_flags", "bad_alpha"])
def test_cli_bad_transfer_inputs_fail_in_one_line_and_write_nothing(zoo, tmp_path, cli, case):
    lib = tmp_path / "lib.db"
    Library(lib).close()
    args, want = {
        "missing": (("--transfer-from", tmp_path / "nope"), "no such directory"),
        "no_library": (("--transfer-from", "lora-arc"), "no library"),
        "not_in_library": (("--transfer-from", "77", "--library", lib), "no such library entry"),
        "unrecorded": (("--transfer-from", zoo / "ft_norecord"), "does not record the base"),
        "old_missing": (("--transfer-from", zoo / "lora", "--transfer-base-old", tmp_path / "v0"), "old base"),
        "shapes": (("--transfer-from", zoo / "lora", "--base", zoo / "other_arch"), "does not carry over"),
        "shapes_full": (("--transfer-from", zoo / "ft", "--base", zoo / "other_arch"), "nothing of the fine-tune"),
        "with_select_flags": (("--transfer-from", zoo / "lora", "--k", 2, "--method", "ties"),
                              "select.k, merge.method would be ignored"),
        "bad_alpha": (("--transfer-from", zoo / "lora", "--transfer-alpha", "nan"), "alpha must be a finite number"),
    }[case]
    out = tmp_path / "run"
    a = list(_run_args(zoo, out))
    if "--base" in args:  # replace the run's base
        i = a.index("--base")
        a[i + 1] = args[args.index("--base") + 1]
        args = tuple(x for j, x in enumerate(args) if j not in (args.index("--base"), args.index("--base") + 1))
    r = cli(*a, *args)
    assert r.code == 1, (r.err, r.out)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], r.err
    assert "Traceback" not in r.err and not out.exists()


# -- the config section ---------------------------------------------------------------------------


def test_transfer_section_yaml_set_and_errors(tmp_path):
    cfg = RunConfig(transfer={"source": "runs/v1-lora", "alpha": 0.5})
    assert isinstance(cfg.transfer, TransferConfig) and cfg.transfer.active
    p = tmp_path / "run.yaml"
    p.write_text(cfg.to_yaml())
    assert "transfer:" in p.read_text() and RunConfig.from_yaml(p).to_dict() == cfg.to_dict()
    assert cfg.with_overrides(["transfer.alpha=0.25"]).transfer.alpha == 0.25
    assert RunConfig(transfer=TransferConfig(source=Path("x"))).to_dict()["transfer"] == {"source": "x"}
    assert "transfer" not in RunConfig().to_dict()  # run.json of a plain run as before: old runs resume
    assert not RunConfig().transfer.active
    with pytest.raises(ConfigError) as e:  # every problem in one error
        RunConfig(transfer={"alpha": -1, "base_old": 3}, train={"steps": 0}).validate()
    msg = str(e.value)
    assert "4 problems" in msg and "transfer.source" in msg and "transfer.alpha" in msg and "transfer.base_old" in msg
    with pytest.raises(ConfigError, match="select.k would be ignored"):
        RunConfig(transfer={"source": "x"}, select={"k": 2}).validate()
    with pytest.raises(ConfigError, match="unknown transfer option"):
        RunConfig.from_dict({"transfer": {"source": "x", "alhpa": 1}})


def test_cli_transfer_as_adapter_equals_transfer_adapter(zoo, tmp_path, cli):
    """`warmstart transfer --as-adapter` writes transfer_adapter()'s adapter (B·α); full-output flags are refused."""
    r = cli("transfer", "--base-old", zoo / "v1", "--finetuned", zoo / "lora", "--base-new", zoo / "v1.1",
            "--out", tmp_path / "ad", "--as-adapter", "--alpha", 0.5, "--json")
    assert r.code == 0, r.err
    src, got = _sd(zoo / "lora"), _sd(tmp_path / "ad")
    for k in src:
        assert torch.equal(got[k], src[k] * 0.5 if ".lora_B." in k else src[k]), k
    assert r.json()["alphas"] == [0.5]
    r = cli("transfer", "--base-old", zoo / "v1", "--finetuned", zoo / "lora", "--base-new", zoo / "v1.1",
            "--out", tmp_path / "ad2", "--as-adapter", "--dtype", "bfloat16")
    assert r.code != 0 and "--dtype" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "ad2").exists()
