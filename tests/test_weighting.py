"""The weighting-scheme registry (warmstart/weighting.py): formulas, specs, the MWA fallback, the CLI path."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from warmstart.errors import ConfigError
from warmstart import weighting as W
from warmstart.merge.plan import MergePlan


def test_mwa_loss_and_steps_follow_the_paper_formula():
    losses, steps, p = [2.0, 1.0, 0.5], [10, 20, 40], 1.7
    raw = [(1 / x) ** p for x in losses]  # wᵢ ∝ (1/Lᵢ)^p, written out independently of the log-space code
    assert W.compute_weights("mwa:loss", n=3, losses=losses, penalty=p) == pytest.approx([r / sum(raw) for r in raw])
    raw = [s ** p for s in steps]
    assert W.compute_weights("mwa:steps", n=3, steps=steps, penalty=p) == pytest.approx([r / sum(raw) for r in raw])


@pytest.mark.parametrize("hib", [True, False])
def test_softmax_spec_sets_the_temperature(hib):
    scores, t = [0.3, 0.5, 0.9], 0.5
    sign = 1 if hib else -1
    raw = [math.exp(sign * s / t) for s in scores]
    want = [r / sum(raw) for r in raw]
    assert W.compute_weights(f"softmax:{t}", n=3, scores=scores, higher_is_better=hib) == pytest.approx(want)
    assert W.compute_weights("softmax", n=3, scores=scores, higher_is_better=hib, temperature=t) == pytest.approx(want)


def test_parse_knows_every_registered_spec_and_refuses_the_rest():
    assert W.parse("softmax:0.25") == (W.SCHEMES["softmax"], {"temperature": 0.25})
    assert W.parse("mwa:loss")[0].needs == ("losses",)
    with pytest.raises(ConfigError, match="unknown weighting scheme 'bogus'") as e:
        W.parse("bogus")
    assert "softmax:T" in e.value.hint and "mwa:steps" in e.value.hint
    with pytest.raises(ConfigError, match="bad temperature"):
        W.parse("softmax:hot")
    with pytest.raises(ConfigError, match="select/optimize"):
        W.parse("optimized", where="merge")
    with pytest.raises(ConfigError, match="numbers per donor"):
        W.parse("given", where="select")
    assert W.parse("optimized", where="select")[0].fn is None


def test_select_and_merge_read_the_same_registry():
    from warmstart.select import parse_weights

    for spec in ("uniform", "score", "softmax:0.5", "mwa:loss", "mwa:steps"):
        scheme, args = W.parse(spec)
        assert parse_weights(spec)[0] == scheme.name
        assert MergePlan(models=["a"], weighting=spec).weighting == spec  # the plan accepts it too
    assert parse_weights("softmax:0.5") == ("softmax", 0.5)


def test_one_mwa_fallback():
    # a donor without a training loss, scores that are losses: every donor weighted by its score
    assert W.mwa_losses([1.0, None], [2.0, 3.0], higher_is_better=False) == ([2.0, 3.0], "target sample")
    # accuracy-like scores are no loss: nothing to fall back to, the scheme refuses naming the donor
    assert W.mwa_losses([1.0, None], [0.5, 0.6], higher_is_better=True) == ([1.0, None], None)
    assert W.mwa_losses([1.0, 2.0], [5.0, 6.0], higher_is_better=False) == ([1.0, 2.0], None)
    with pytest.raises(ConfigError, match=r"missing for model\(s\) \[1\]"):
        W.compute_weights("mwa:loss", n=2, losses=[1.0, None])


def _ck(path, loss=None, step=None):
    m = SimpleNamespace(final_loss=loss, global_step=step) if loss is not None or step is not None else None
    return SimpleNamespace(path=Path(path), metrics=m)


def test_resolve_weights_takes_missing_metrics_from_the_caller():
    plan = MergePlan(models=["/x/a", "/x/b"], weighting="mwa:steps", penalty=1.0)
    cks = [_ck("/x/a", 1.0, 10), _ck("/x/b")]
    with pytest.raises(ConfigError, match="missing"):
        W.resolve_weights(plan, cks, None)
    got = W.resolve_weights(plan, cks, None, {"/x/b": (0.5, 30)})
    assert got == pytest.approx([10 / 40, 30 / 40])


def test_resolve_weights_falls_back_to_selection_scores_and_says_so():
    plan = MergePlan(models=[{"ref": "/x/a", "score": 2.0}, {"ref": "/x/b", "score": 4.0}], weighting="mwa:loss")
    notes: list[str] = []
    got = W.resolve_weights(plan, [_ck("/x/a", 1.0, 10), _ck("/x/b")], None, notes=notes)
    assert got == pytest.approx([(1 / 2) / (1 / 2 + 1 / 4), (1 / 4) / (1 / 2 + 1 / 4)])
    assert notes and "target sample" in notes[0]


def test_cli_merge_weights_softmax_as_select(models, tmp_path, cli):
    """`warmstart merge --weights softmax:0.5` computes what `select` computes from the same scores."""
    from warmstart.select import ScoreRow, donor_weights

    scores = [1.3, 0.9]
    sel = tmp_path / "sel.yaml"
    sel.write_text(yaml.safe_dump({"base": str(models / "base"), "metric": "loss", "donors": [
        {"ref": str(models / n), "score": s} for n, s in zip(("ft_a", "ft_b"), scores)]}))
    r = cli("merge", "--selection", sel, "--weights", "softmax:0.5", "--out", tmp_path / "o", "--json")
    assert r.code == 0, r.err
    raw = [math.exp(-s / 0.5) for s in scores]  # loss: lower is better
    assert r.json()["weights"] == pytest.approx([x / sum(raw) for x in raw])
    rows = [ScoreRow(id=i, ref=str(i), kind="full", score=s, cached=False) for i, s in enumerate(scores)]
    assert donor_weights(rows, {}, "softmax:0.5", higher_is_better=False)[0] == pytest.approx(r.json()["weights"])
    r = cli("merge", str(models / "ft_a"), str(models / "ft_b"), "--weights", "softmax:x", "--out", tmp_path / "o2")
    assert r.code == 1 and "bad temperature in 'softmax:x'" in r.err and not (tmp_path / "o2").exists()


def test_cli_merge_mwa_metrics_from_the_library(models, copy_of, tmp_path, cli):
    """Checkpoints without trainer_state.json: the CLI looks their metrics up in the catalog."""
    from warmstart import testing
    from warmstart.library import Library

    run = testing.make_run(models / "base", tmp_path / "run", kind="full", steps=(10, 20, 30), seed=9)
    cks = [copy_of(c, f"ck{i}") for i, c in enumerate(sorted(run.glob("checkpoint-*")))]
    db = tmp_path / "lib.db"
    with Library(db) as lib:
        for c in cks:
            lib.add(c)  # registered with its trainer_state metrics
    for c in cks:
        (c / "trainer_state.json").unlink()  # now only the library knows them
    r = cli("merge", *cks, "--weights", "mwa:steps", "--penalty", "1", "--library", db, "--out", tmp_path / "o",
            "--json")
    assert r.code == 0, r.err
    assert r.json()["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    r = cli("merge", *cks, "--weights", "mwa:steps", "--library", tmp_path / "none.db", "--out", tmp_path / "o2")
    assert r.code == 1 and "missing" in r.err and not (tmp_path / "o2").exists()
    meta = json.loads((tmp_path / "o" / "warmstart.json").read_text())
    assert "library" not in meta["plan"]


def test_cli_merge_mwa_falls_back_to_selection_losses(models, tmp_path, cli):
    """The zoo's variants have no trainer_state.json: a loss selection's scores weight them, as select does."""
    scores = [2.0, 0.5]
    sel = tmp_path / "sel.yaml"
    sel.write_text(yaml.safe_dump({"base": str(models / "base"), "metric": "loss", "donors": [
        {"ref": str(models / n), "score": s} for n, s in zip(("ft_a", "ft_b"), scores)]}))
    r = cli("merge", "--selection", sel, "--weights", "mwa:loss", "--penalty", "2", "--out", tmp_path / "o", "--json")
    assert r.code == 0, r.err
    raw = [(1 / s) ** 2 for s in scores]
    assert r.json()["weights"] == pytest.approx([x / sum(raw) for x in raw])
    assert any("target sample" in n for n in r.json()["notes"])
