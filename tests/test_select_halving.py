"""Selection at scale: catalogued adapter summaries, the pre-score, successive halving (``scorer="halving"``)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

import warmstart.library as library_mod
from warmstart import _prerank
from warmstart._gradproxy import base_gradient, lora_dot
from warmstart._halving import nested_subset
from warmstart.cli import app
from warmstart.data import load_target
from warmstart.library import Library
from warmstart.select import load_base, select
from warmstart.testing import make_adapter, write_jsonl

TARGET = [{"prompt": f"Q{i}: the quick brown", "completion": " fox jumps over the lazy dog"} for i in range(24)]


def _dense_deltas(path):
    """{module: s·B·A} formed explicitly by PEFT (an independent route to the update)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((path / "adapter_config.json").read_text())
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), path)
    return {name.removeprefix("base_model.model."): mod.get_delta_weight("default").detach()
            for name, mod in pm.named_modules()
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})}


def test_summary_is_the_top_singular_triplets_and_round_trips_through_the_catalog(models, tmp_path):
    with Library(tmp_path / "lib.db") as lib:
        entry, _ = lib.add(models / "lora_b")  # r=8, alpha=16
        assert _prerank.load(lib.prerank(entry.fingerprint)).popitem()[1][0].shape[1] == _prerank.PRERANK_RANK
        blob = _prerank.summarise(models / "lora_b", rank=2)
        lib.put_prerank(entry.fingerprint, blob)
    assert blob is not None
    with Library(tmp_path / "lib.db") as lib:  # stored, not recomputed
        assert lib.prerank(entry.fingerprint) == blob
        assert lib.prerank(entry.fingerprint, method="svd7") is None
    summary = _prerank.load(blob)
    dense = _dense_deltas(models / "lora_b")
    assert set(summary) == set(dense)
    for module, d in dense.items():
        su, v = summary[module]
        u, s, vh = torch.linalg.svd(d.double())
        top = (u[:, :2] * s[:2]) @ vh[:2]  # rank-2 truncation (Eckart–Young), sign-free
        assert su.shape == (d.shape[0], 2) and v.shape == (d.shape[1], 2)
        assert torch.allclose((su @ v.T).double(), top, atol=2e-3 * float(s[0]))
        # int8 with a scale per column: each element off by at most max|column| / 254, so a column of
        # n elements by ‖e‖ ≤ √n·max/254, and vᵀv off the identity by ‖eᵢ‖ + ‖eⱼ‖ + ‖eᵢ‖‖eⱼ‖ at most
        e = v.abs().amax(0).double() * d.shape[1] ** 0.5 / 254
        bound = e[:, None] + e[None, :] + e[:, None] * e[None, :]
        assert ((v.T.double() @ v.double() - torch.eye(2, dtype=torch.float64)).abs() <= bound + 1e-6).all()
        assert bound.max() < 0.05  # and the bound is tight enough to mean something


def test_full_rank_prescore_equals_the_gradient_proxy(models, tmp_path):
    """With every triplet kept, ΣσⱼuⱼᵀGvⱼ is ⟨G, s·B·A⟩ exactly; with 2 of 8 it is ⟨G, top-2 truncation⟩."""
    model, tok = load_base(models / "base")
    data = load_target(write_jsonl(tmp_path / "t.jsonl", TARGET)).sample(8)
    _, g = base_gradient(model, tok, data)
    base_params = {n: p.detach() for n, p in model.named_parameters()}
    exact = lora_dot(g, models / "lora_b", base_params)
    full = _prerank.prescore(g, _prerank.load(_prerank.summarise(models / "lora_b", rank=8, quantise=False)))
    assert full == pytest.approx(exact, rel=1e-5)
    truncated = 0.0
    for module, d in _dense_deltas(models / "lora_b").items():
        u, s, vh = torch.linalg.svd(d.double())
        truncated += float((g[f"{module}.weight"].double() * ((u[:, :2] * s[:2]) @ vh[:2])).sum())
    top2 = _prerank.summarise(models / "lora_b", rank=2, quantise=False)
    assert _prerank.prescore(g, _prerank.load(top2)) == pytest.approx(truncated, rel=1e-5)
    # the stored int8 form: every element within half a step (max|column| / 254) of the float32 one
    q8 = _prerank.load(_prerank.summarise(models / "lora_b", rank=2))
    for module, (su, v) in _prerank.load(top2).items():
        for x, y in zip((su, v), q8[module]):
            assert ((x - y).abs() <= x.abs().amax(0) / 254 * (1 + 1e-5) + 1e-12).all()
            assert (x - y).abs().max() > 0  # rounded, not stored as is
    assert _prerank.summarise(models / "ft_a") is None  # a full checkpoint has no summary


def test_migration_adds_the_table_and_selection_backfills_old_entries(models, tmp_path, monkeypatch):
    monkeypatch.setattr(library_mod, "MIGRATIONS", library_mod.MIGRATIONS[:2])
    monkeypatch.setattr(library_mod, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(Library, "ensure_prerank", lambda *a, **k: None)  # the previous add() had none
    with Library(tmp_path / "v2.db") as lib:  # a catalog written by the previous warmstart
        lib.add(models / "lora_a")
    db = sqlite3.connect(tmp_path / "v2.db")
    assert not db.execute("SELECT name FROM sqlite_master WHERE name='preranks'").fetchall()
    db.close()
    monkeypatch.undo()
    with Library(tmp_path / "v2.db") as lib:
        assert lib.schema_version == 3
        e = lib.list()[0]
        assert lib.prerank(e.fingerprint) is None  # nothing computed at migration time
        got, ref = _prerank.load(lib.ensure_prerank(e.fingerprint, e.path)), _prerank.load(
            _prerank.summarise(models / "lora_a"))  # bytes differ: safetensors orders the metadata freely
        assert got.keys() == ref.keys() and all(torch.equal(got[m][i], ref[m][i]) for m in got for i in (0, 1))
        assert lib.prerank(e.fingerprint) is not None


def test_nested_subsets_are_nested_and_keep_file_order(tmp_path):
    data = load_target(write_jsonl(tmp_path / "t.jsonl", TARGET)).sample(16, seed=1)
    small, big = nested_subset(data, 4, 0), nested_subset(data, 8, 0)
    pos = {ex.prompt: i for i, ex in enumerate(data.examples)}
    assert len(small) == 4 and {e.prompt for e in small} < {e.prompt for e in big}
    assert [pos[e.prompt] for e in big] == sorted(pos[e.prompt] for e in big)
    assert small.fingerprint() != data.fingerprint() and nested_subset(data, 16, 0) is data


@pytest.fixture(scope="module")
def big_library(models, tmp_path_factory):
    """A planted donor (trained on TARGET) among 11 random adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.data import collate, pad_id_of, tokenize
    from warmstart.testing import write_jsonl as wj

    root = tmp_path_factory.mktemp("halving")
    base = models / "base"
    tok = AutoTokenizer.from_pretrained(base)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    data = load_target(wj(root / "target.jsonl", TARGET))
    batch = collate(tokenize(data, tok), pad_id_of(tok))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    torch.manual_seed(0)
    for _ in range(15):
        pm(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(root / "planted")
    c = json.loads((root / "planted" / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = str(base.resolve())
    (root / "planted" / "adapter_config.json").write_text(json.dumps(c))
    refs = [make_adapter(base, root / f"rand{i:02d}", seed=100 + i) for i in range(11)]
    with Library(root / "lib.db") as lib:
        for ref in refs[:6] + [root / "planted"] + refs[6:]:
            lib.add(ref)
    return root


def test_halving_finds_the_planted_donor_with_the_loss_scorers_scores(models, big_library, tmp_path):
    import shutil

    shutil.copy(big_library / "lib.db", tmp_path / "lib.db")
    model, tok = load_base(models / "base")
    kw = dict(n=16, k=1, model=model, tokenizer=tok, compute_dtype="float32", min_own_gain=None)
    with Library(tmp_path / "lib.db") as lib:
        planted = next(e.id for e in lib.list() if e.ref.endswith("planted"))
        sel = select(big_library / "target.jsonl", models / "base", library=lib, scorer="halving", shortlist=8,
                     halving_rows=2, **kw)
    assert sel.scorer == "halving" and sel.donors[0]["id"] == planted
    h = sel.halving
    assert h["candidates"] == 12 and h["prescored"] == 12 and h["shortlist"] == 8
    # 8 on 2 rows → best 4 on 4 rows → best 2 (k=1 keeps 2) and the base on all 16
    assert [(r["rows"], r["candidates"]) for r in h["rounds"]] == [(2, 8), (4, 4), (16, 3)]
    assert h["row_evaluations"] == 2 * 8 + 4 * 4 + 16 * 3
    stages = [r.get("rows") for r in sel.ranking]
    assert stages == [None] * 3 + [4] * 2 + [2] * 4 + [0] * 4  # best first, then by how far each got
    assert all(r["score"] is None for r in sel.ranking if r.get("rows") == 0)
    with Library(tmp_path / "full.db") as lib:  # the loss scorer on the same candidates, fresh cache
        for e in Library(tmp_path / "lib.db").list():
            lib.add(e.path)
        full = select(big_library / "target.jsonl", models / "base", library=lib, **kw)
    by_ref = {r["ref"]: r["score"] for r in full.ranking}
    for r in sel.ranking:
        if "rows" not in r:  # scored on the whole sample: the loss scorer's own number
            assert r["score"] == pytest.approx(by_ref[r["ref"]], rel=1e-6)
    assert full.ranking[0]["ref"] == sel.ranking[0]["ref"]


def test_select_cli_halving_and_a_bad_shortlist(models, big_library, tmp_path, cli):
    import shutil

    shutil.copy(big_library / "lib.db", tmp_path / "lib.db")
    args = ["select", "--target", str(big_library / "target.jsonl"), "--base", str(models / "base"), "--library",
            str(tmp_path / "lib.db"), "--n", "8", "--k", "1", "--scorer", "halving", "--no-own-gate",
            "--compute-dtype", "float32"]
    r = CliRunner().invoke(app, args + ["--shortlist", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["scorer"] == "halving" and out["halving"]["prescored"] == 12 and out["donors"][0]["ref"].endswith(
        "planted")
    r = cli(*args, "--shortlist", "0")
    assert r.code == 1 and r.err.strip() == ("error: invalid select settings: --shortlist must be a positive integer "
                                             "(at least 1), got 0")


def test_run_takes_the_halving_options():
    import re

    from warmstart.errors import ConfigError
    from warmstart.pipeline import RunConfig

    cfg = RunConfig().with_overrides(["select.scorer=halving", "select.shortlist=16", "select.prerank_rows=8"])
    assert cfg.select.to_dict() == {"scorer": "halving", "shortlist": 16, "prerank_rows": 8}
    with pytest.raises(ConfigError, match=re.escape("select.shortlist must be a positive integer")):
        RunConfig().with_overrides(["select.shortlist=0"])
    r = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert re.search(r"--shortlist .*?\[default: 8\]", " ".join(r.output.split()))


def test_batched_prescores_equal_one_by_one_and_header_names_the_modules(models):
    g = {}
    s1, s2 = (_prerank.load(_prerank.summarise(models / n)) for n in ("lora_a", "lora_b"))
    torch.manual_seed(0)
    for m, (su, v) in {**s1, **s2}.items():
        g[f"{m}.weight"] = torch.randn(su.shape[0], v.shape[0])
    many = _prerank.prescore_many(g, [s1, s2, s1])
    one = [_prerank.prescore(g, s) for s in (s1, s2)]
    assert many == pytest.approx(one + one[:1], rel=1e-6)
    hand = sum(float(((g[f"{m}.weight"] @ v) * su).sum()) for m, (su, v) in s2.items())
    assert one[1] == pytest.approx(hand, rel=1e-5)
    assert _prerank.modules_of(_prerank.summarise(models / "lora_b")) == {f"{m}.weight" for m in s2}
