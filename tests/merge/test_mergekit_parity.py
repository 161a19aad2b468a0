"""Every configuration in tests/fixtures/mergekit/cases*.yaml against mergekit 0.1.5's stored output.

The references were produced by running mergekit (tests/fixtures/mergekit/regenerate.py --refs);
this test needs only warmstart. Each case is bitwise equal, within its stated bound, or refused
with the stated message — and where mergekit refuses a configuration, warmstart must refuse it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "mergekit"
sys.path.insert(0, str(FIX))
import harness  # noqa: E402

from warmstart.errors import WarmstartError  # noqa: E402

CASES = harness.load_cases()
MANIFEST = harness.manifest()


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("status") != "todo"])
def test_case_matches_mergekit(name, tmp_path):
    case, ref = CASES[name], MANIFEST.get(name)
    assert ref is not None, f"no stored mergekit output for {name}: run regenerate.py --refs {name}"
    out = tmp_path / "out"
    if "refuse" in case or "error" in ref:
        with pytest.raises(WarmstartError) as e:
            harness.run_warmstart(case, out)
        assert case.get("refuse", "") in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()
        return
    harness.run_warmstart(case, out)
    rep = harness.compare(harness.load_dir(out), harness.load_dir_ref(name),
                          aliases=case.get("expect") in ("superset", "structure"))
    ok, text = harness.within(case, rep)
    assert ok, text
    cfg = json.loads((out / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size", "dtype"):  # what mergekit writes into the config
        if key in ref["config"]:
            assert cfg.get(key) == ref["config"][key], (key, cfg.get(key), ref["config"][key])
    assert not harness.tokenizer_problems(out, ref)  # vocabulary (token → id) and chat template, where recorded


def test_ulps_metric():
    import torch

    b = torch.tensor([1.0, 1.0, -2.0, 0.0], dtype=torch.bfloat16)
    a = torch.tensor([1.0, 1.0078125, -2.03125, 0.0], dtype=torch.bfloat16)  # 0, 1, 2 ulp (bf16: 7 bits)
    assert harness.ulps(a, b).tolist() == [0.0, 1.0, 2.0, 0.0]
    rep = harness.compare({"x": a}, {"x": b})
    assert rep["max_ulp"] == 2.0 and not rep["bitwise"] and rep["identical"] == 0
    assert harness.compare({"x": b}, {"x": b.clone()})["bitwise"]


def test_fixtures_are_small():
    size = sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file())
    assert size < 5_000_000, f"mergekit fixtures are {size / 1e6:.1f} MB"


def test_tokenizer_problems_metric():
    chatml, base = harness.MODELS / "tok_chatml", harness.MODELS / "tok_base"
    facts = harness.tokenizer_facts(chatml)
    assert len(facts["vocab"]) == 66 and facts["vocab"]["<|im_start|>"] == 64 and facts["chat_template"] is None
    assert harness.tokenizer_problems(chatml, facts) == [] and harness.tokenizer_problems(chatml, {}) == []
    bad = harness.tokenizer_problems(base, {**facts, "chat_template": "{{ x }}"})
    assert len(bad) == 2 and bad[0].startswith("vocabulary differs (64 vs 66")
