"""Selection: the right donor ranks first, cache hits cost no forward, grad proxy, multi-process split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from warmstart.data import collate, load_target, pad_id_of, tokenize
from warmstart.errors import ConfigError
from warmstart.evaluate import evaluate
from warmstart.library import Library
from warmstart.rundir import read_selection, write_selection
from warmstart.select import (
    Candidate,
    ScoreConfig,
    ScoreRow,
    candidates_for,
    choose_donors,
    load_base,
    rank_rows,
    score_candidates,
    select,
    shard,
)
from warmstart.testing import write_jsonl

TARGET = [{"prompt": f"Q{i}: the quick brown", "completion": " fox jumps over the lazy dog"} for i in range(24)]
OTHER = [{"prompt": f"count {i}:", "completion": " one two three four five six"} for i in range(24)]





def _train(model, tok, rows, steps, lr):
    """A tiny hand-written loop: full batch, Adam, loss on completions only."""
    from types import SimpleNamespace

    data = SimpleNamespace(examples=[SimpleNamespace(prompt=r["prompt"], completion=r["completion"], messages=None)
                                     for r in rows])
    batch = collate(tokenize(data, tok), pad_id_of(tok))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def zoo(models, tmp_path_factory):
    """Base + donors whose fit to TARGET is known by construction."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("select_zoo")
    base = models / "base"
    tok = AutoTokenizer.from_pretrained(base)
    for name, rows in (("lora_target", TARGET), ("lora_other", OTHER)):
        m = AutoModelForCausalLM.from_pretrained(base)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                         task_type="CAUSAL_LM")
        pm = get_peft_model(m, cfg)
        _train(pm, tok, rows, steps=15, lr=2e-2)
        pm.save_pretrained(root / name)
        c = json.loads((root / name / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = str(base.resolve())
        (root / name / "adapter_config.json").write_text(json.dumps(c))
    m = AutoModelForCausalLM.from_pretrained(base)
    _train(m, tok, TARGET, steps=6, lr=3e-3)
    m.save_pretrained(root / "full_target")
    tok.save_pretrained(root / "full_target")
    write_jsonl(root / "target.jsonl", TARGET)
    return root


@pytest.fixture
def lib(zoo, models, tmp_path):
    lib = Library(tmp_path / "lib.db")
    for ref in (zoo / "lora_target", zoo / "lora_other", zoo / "full_target", models / "ft_a", models / "lora_a",
                models / "other_arch"):
        lib.add(ref, base=str(models / "base"))
    yield lib
    lib.close()


def counted(models):
    model, tok = load_base(models / "base")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return model, tok, calls


# -- the right donor, scores that match independent evaluation ----------------------

def test_right_donors_rank_first(zoo, models, lib):
    model, tok, calls = counted(models)
    sel = select(zoo / "target.jsonl", models / "base", library=lib, n=16, k=2, model=model, tokenizer=tok)
    ids = {e.ref.rsplit("/", 1)[-1]: e.id for e in lib.list()}
    assert {d["id"] for d in sel.donors} == {ids["lora_target"], ids["full_target"]}
    score = {r["id"]: r["score"] for r in sel.ranking}
    assert score[ids["lora_target"]] < score[ids["lora_other"]]
    kinds = {r["id"]: r["kind"] for r in sel.ranking}
    assert kinds["base"] == "base" and ids["other_arch"] not in kinds  # incompatible: not scored
    assert len(sel.ranking) == 6  # base + 5 compatible
    scores = [r["score"] for r in sel.ranking]
    assert scores == sorted(scores)
    assert sum(d["weight"] for d in sel.donors) == pytest.approx(1.0)
    assert len(calls) > 0 and not any(r["cached"] for r in sel.ranking)


def test_scores_equal_fresh_evaluation(zoo, models, lib):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = load_target(zoo / "target.jsonl").sample(8, seed=3)
    cands = candidates_for(models / "base", lib)
    model, tok = load_base(models / "base")
    ident = id(model)
    cfg = ScoreConfig(compute_dtype="float32")  # exact equality; bf16 agreement: test_compute_dtype_*
    rows = {r.ref: r.score for r in score_candidates(data, models / "base", cands, model=model, tokenizer=tok,
                                                     config=cfg)}
    assert id(model) == ident
    for name in ("full_target", "lora_target"):
        ref = str((zoo / name).resolve())
        fresh = AutoModelForCausalLM.from_pretrained(models / "base")
        if name.startswith("lora"):
            fresh = PeftModel.from_pretrained(fresh, zoo / name)
        else:
            fresh = AutoModelForCausalLM.from_pretrained(zoo / name)
        assert rows[ref] == pytest.approx(evaluate(fresh, tok, data)["loss"], rel=1e-5)


def test_adapter_swap_scores_equal_peft_loading(zoo, models, lib, monkeypatch):
    """Adapters with the resident one's config are copied into its layers (no new injection); the
    scores equal PEFT's own loading of each adapter into a fresh model, and another config still loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from warmstart import _scoring

    data = load_target(zoo / "target.jsonl").sample(8, seed=3)
    cands = [c for c in candidates_for(models / "base", lib) if c.kind == "lora"]
    names = sorted(str(c.path).rsplit("/", 1)[-1] for c in cands)
    assert names == ["lora_a", "lora_other", "lora_target"]
    swaps = []
    real = _scoring._swap_weights
    monkeypatch.setattr(_scoring, "_swap_weights", lambda *a: swaps.append(real(*a)) or swaps[-1])
    model, tok = load_base(models / "base")
    rows = {str(r.ref).rsplit("/", 1)[-1]: r.score for r in score_candidates(
        data, models / "base", cands, model=model, tokenizer=tok, config=ScoreConfig(compute_dtype="float32"))}
    assert sorted(swaps) == [False, True]  # lora_other swapped into lora_target's layers; lora_a (other modules) loaded
    assert not any("lora" in n for n, _ in model.named_modules())  # the caller's model is the bare base again
    for name in names:
        path = zoo / name if (zoo / name).is_dir() else models / name
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"), path)
        assert rows[name] == pytest.approx(evaluate(fresh, tok, data)["loss"], rel=1e-6), name


# -- cache ---------------------------------------------------------------------------------

def test_second_select_costs_no_forward(zoo, models, lib):
    model, tok, calls = counted(models)
    first = select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok)
    assert calls
    calls.clear()
    second = select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok)
    assert calls == [] and all(r["cached"] for r in second.ranking)
    assert [r["score"] for r in second.ranking] == [r["score"] for r in first.ranking]
    # the token accuracy was computed in the same pass: also free
    acc = select(zoo / "target.jsonl", models / "base", library=lib, n=8, metric="accuracy", model=model,
                 tokenizer=tok)
    assert calls == [] and acc.higher_is_better
    # another sample is another key
    select(zoo / "target.jsonl", models / "base", library=lib, n=8, seed=1, model=model, tokenizer=tok)
    assert calls


# -- gradient proxy --------------------------------------------------------------------------

def test_grad_proxy_agrees_with_loss_scorer(zoo, models, lib):
    model, tok = load_base(models / "base")
    kw = dict(library=lib, n=16, model=model, tokenizer=tok)
    by_loss = select(zoo / "target.jsonl", models / "base", **kw)
    by_grad = select(zoo / "target.jsonl", models / "base", scorer="grad", **kw)
    assert by_grad.donors[0]["id"] == by_loss.donors[0]["id"]
    base_loss = next(r["score"] for r in by_loss.ranking if r["kind"] == "base")
    assert next(r["score"] for r in by_grad.ranking if r["kind"] == "base") == pytest.approx(base_loss, rel=1e-5)
    with pytest.raises(ConfigError, match="predicts the loss"):
        select(zoo / "target.jsonl", models / "base", scorer="grad", metric="accuracy", **kw)


def test_lora_dot_equals_explicit_delta(zoo, models):
    """⟨g, s·B·A⟩ from factors == the inner product with ΔW formed explicitly (PEFT's get_delta_weight)."""
    from peft import PeftModel

    from warmstart._gradproxy import base_gradient, lora_dot

    model, tok = load_base(models / "base")
    data = load_target(zoo / "target.jsonl").sample(8)
    loss0, g = base_gradient(model, tok, data)
    base_params = {n: p.detach() for n, p in model.named_parameters()}
    got = lora_dot(g, zoo / "lora_target", base_params)
    pm = PeftModel.from_pretrained(model, zoo / "lora_target")
    ref = 0.0
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            pname = name.removeprefix("base_model.model.") + ".weight"
            ref += float((g[pname] * mod.get_delta_weight("default")).sum())
    assert got == pytest.approx(ref, rel=1e-4)
    # first order: a small step along the adapter changes the loss by ≈ ε·⟨g, δ⟩
    eps = 1e-3
    for _name, mod in pm.named_modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
            mod.scaling["default"] *= eps
    assert evaluate(pm, tok, data)["loss"] - loss0 == pytest.approx(eps * got, rel=0.05)


# -- ranking, donors, weights, file ------------------------------------------------------------

def _row(i, score, kind="lora"):
    return ScoreRow("base" if kind == "base" else i, f"/m/{i}", kind, score, False)


def test_ties_broken_by_score_then_id():
    rows = [_row(5, 1.0), _row(2, 1.0), _row(0, 1.0, "base"), _row(9, 0.5), _row(7, None)]
    assert [r.id for r in rank_rows(rows, higher_is_better=False)] == [9, "base", 2, 5]
    assert [r.id for r in rank_rows(rows, higher_is_better=True)] == ["base", 2, 5, 9]


def test_margin_filters_donors():
    ranked = rank_rows([_row(0, 2.0, "base"), _row(1, 1.5), _row(2, 1.95), _row(3, 2.5)], False)
    assert [r.id for r in choose_donors(ranked, k=3, margin=None, higher_is_better=False)] == [1, 2, 3]
    assert [r.id for r in choose_donors(ranked, k=3, margin=0.1, higher_is_better=False)] == [1]
    assert choose_donors(ranked, k=3, margin=1.0, higher_is_better=False) == []


def test_weights_and_selection_file_roundtrip(zoo, models, lib, tmp_path):
    from warmstart.merge.plan import MergePlan

    model, tok = load_base(models / "base")
    sel = select(zoo / "target.jsonl", models / "base", library=lib, n=8, k=3, weights="softmax:0.5",
                 model=model, tokenizer=tok)
    s = [d["score"] for d in sel.donors]
    w = torch.softmax(-torch.tensor(s, dtype=torch.float64) / 0.5, 0).tolist()
    assert [d["weight"] for d in sel.donors] == pytest.approx(w)
    assert sel.weighting == {"scheme": "softmax", "temperature": 0.5}
    for ext in ("yaml", "json"):
        path = write_selection(sel, tmp_path / f"sel.{ext}")
        back = read_selection(path).selection()
        assert back == sel
        assert set(back.to_dict()) >= {"target", "base", "metric", "ranking", "donors", "weighting"}
        assert back.target["fingerprint"] == load_target(zoo / "target.jsonl").sample(8).fingerprint()
        plan = MergePlan.from_dict(read_selection(path).plan_dict())
        assert [m.ref for m in plan.models] == [d["ref"] for d in sel.donors]
    mwa = select(zoo / "target.jsonl", models / "base", library=lib, n=8, k=2, weights="mwa:loss",
                 model=model, tokenizer=tok)
    assert mwa.weighting["losses_from"] == "target sample"  # these donors carry no trainer_state.json
    with pytest.raises(ConfigError):
        read_selection(tmp_path / "missing.yaml")


# -- several processes -------------------------------------------------------------------------

def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ConfigError):
        shard(items, 3, 3)


def test_two_ranks_split_then_gather(zoo, models, lib):
    data = load_target(zoo / "target.jsonl").sample(8)
    cands = candidates_for(models / "base", lib)
    cfg = ScoreConfig()
    m1, tok, calls1 = counted(models)
    score_candidates(data, models / "base", cands, library=lib, config=cfg, model=m1, tokenizer=tok,
                     rank=1, world_size=2, wait=False)
    m0, _, calls0 = counted(models)
    rows = score_candidates(data, models / "base", cands, library=lib, config=cfg, model=m0, tokenizer=tok,
                            rank=0, world_size=2)
    assert len(rows) == len(cands) and all(r.score is not None for r in rows)
    # each rank evaluated its half: 3 + 3 candidates, one forward each (8 rows, batch 16)
    assert len(calls1) == 3 and len(calls0) == 3
    assert sum(r.cached for r in rows) == 3


def test_candidates_need_a_full_base(models, lib):
    with pytest.raises(ConfigError, match="full model"):
        candidates_for(models / "lora_a", lib)
    assert [c.kind for c in candidates_for(models / "base", None)] == ["base"]
    assert isinstance(candidates_for(models / "base", lib)[1], Candidate)


def test_mc_and_chat_targets(models, lib, tmp_path):
    model, tok, calls = counted(models)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"Capital {i}?", "choices": ["Paris", "Berlin", "Rome"],
                                              "answer": i % 3} for i in range(9)])
    sel = select(mc, models / "base", library=lib, metric="mc-accuracy", n=None, model=model, tokenizer=tok,
                 batch_size=32)
    assert sel.higher_is_better and sel.target["format"] == "mc" and sel.target["sample"] == "all"
    scores = [r["score"] for r in sel.ranking]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert len(calls) == 6  # all 27 option rows of a candidate in one batch: one forward each
    calls.clear()
    select(mc, models / "base", library=lib, metric="mc-accuracy-norm", n=None, model=model, tokenizer=tok)
    assert calls == []  # the normalised variant was cached by the same pass
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                               {"role": "assistant", "content": "hello"}]}
                                                 for i in range(5)])
    sel = select(chat, models / "base", library=lib, n=None, model=model, tokenizer=tok)
    assert sel.target["format"] == "messages" and len(sel.ranking) == 6
    with pytest.raises(ConfigError, match="needs question/choices/answer"):
        select(chat, models / "base", library=lib, metric="mc-accuracy", model=model, tokenizer=tok)


def test_scores_are_cached_as_they_come(zoo, models, lib, monkeypatch):
    """A run that dies on the third candidate keeps the first two scores; the rerun scores the rest."""
    import warmstart._scoring as S  # the scorer lives there (select re-exports it)

    model, tok, calls = counted(models)
    real = S.evaluate
    seen = []

    def dying(*a, **kw):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(S, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok)
    monkeypatch.setattr(S, "evaluate", real)
    assert not any("lora" in n for n, _ in model.named_modules())  # the caller's model is clean again
    sel = select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok)
    assert sum(r["cached"] for r in sel.ranking) == 2
    data = load_target(zoo / "target.jsonl").sample(8)
    fresh = {r.ref: r.score for r in score_candidates(data, models / "base", candidates_for(models / "base", lib))}
    assert {r["ref"]: r["score"] for r in sel.ranking} == pytest.approx(fresh, rel=1e-6)


# -- optimized weights -----------------------------------------------------------------------

def _by_hand_loss(models, donors, weights, data):
    """Independent: base + Σ wᵢ·sᵢ·BᵢAᵢ written into a plain model, then the loss."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    sd = model.state_dict()
    for ref, w in zip(donors, weights):
        cfg = json.loads((ref / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / cfg["r"]
        t = load_file(ref / "adapter_model.safetensors")
        for k, a in t.items():
            if ".lora_A." in k:
                name = k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                b = t[k.replace(".lora_A.", ".lora_B.")]
                sd[name] += w * s * (b.double() @ a.double()).float()
    model.load_state_dict(sd)
    return evaluate(model.eval(), AutoTokenizer.from_pretrained(models / "base"), data)["loss"]


def test_optimized_weights_are_exact_task_arithmetic(zoo, models, tmp_path):
    from warmstart.merge import MergePlan, merge
    from warmstart.optimize import optimize_selection
    from warmstart.select import SelectConfig, parse_weights

    with Library(tmp_path / "lib.db") as lib:
        for ref in (zoo / "lora_target", zoo / "lora_other", models / "lora_a"):
            lib.add(ref, base=str(models / "base"))
        cfg = SelectConfig(n=8, k=2, weights="optimized", optimize_budget=8)
        sel = select(zoo / "target.jsonl", models / "base", cfg, library=lib)
        assert sel.weighting.get("pending") == "optimized"  # select() only scores; the search is the next step
        sel = optimize_selection(sel, zoo / "target.jsonl", cfg, library=lib)
    w = sel.weighting
    assert w["scheme"] == "optimized" and w["evaluations"] == 8 and sel.method == "task_arithmetic"
    assert w["cost_chosen"] <= w["cost_uniform"]  # the search starts at uniform and keeps the best point
    weights = [d["weight"] for d in sel.donors]
    data = load_target(zoo / "target.jsonl").sample(8, 0)
    refs = [Path(d["ref"]) for d in sel.donors]
    assert _by_hand_loss(models, refs, weights, data) == pytest.approx(w["cost_chosen"], rel=1e-4)
    assert _by_hand_loss(models, refs, [0.5, 0.5], data) == pytest.approx(w["cost_uniform"], rel=1e-4)
    # the selection file carries the method, so the merge applies the weights unnormalized (exact with cat)
    path = write_selection(sel, tmp_path / "sel.yaml")
    plan = MergePlan.from_dict(read_selection(path).plan_dict(lora_mode="cat"))
    assert plan.method == "task_arithmetic" and [m.weight for m in plan.models] == weights
    res = merge(plan, tmp_path / "merged")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"), res.out).eval()
    assert evaluate(pm, AutoTokenizer.from_pretrained(models / "base"), data)["loss"] == pytest.approx(
        w["cost_chosen"], rel=1e-4)
    with pytest.raises(ConfigError, match="unknown weights"):
        parse_weights("optimised")


def test_compute_dtype_is_part_of_the_cache_key(zoo, models, lib):
    """bfloat16 scores differ slightly from float32 ones: a float32 run never reads a bf16 score."""
    model, tok, calls = counted(models)
    bf = select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok,
                compute_dtype="bfloat16")
    calls.clear()
    fp = select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok,
                compute_dtype="float32")
    assert calls and not any(r["cached"] for r in fp.ranking)
    assert [r["id"] for r in bf.ranking][:2] == [r["id"] for r in fp.ranking][:2]
    calls.clear()
    again = select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok,
                   compute_dtype="bfloat16")
    assert calls == [] and [r["score"] for r in again.ranking] == [r["score"] for r in bf.ranking]
    with pytest.raises(ConfigError, match="compute dtype"):
        select(zoo / "target.jsonl", models / "base", library=lib, n=8, model=model, tokenizer=tok,
               compute_dtype="int8")


def test_select_opens_the_base_once(zoo, models, lib, monkeypatch):
    """#12: candidates, the catalog query, the model load and the restore after full candidates share
    one opened base (before: opened and fingerprinted three times, four with a model to load)."""
    import warmstart.checkpoints.checkpoint as ckmod

    base = (models / "base").resolve()
    real, opened = ckmod._open_full, []

    def counting(ref, d, allow_pickle):
        if d == base:
            opened.append(ref)
        return real(ref, d, allow_pickle)

    monkeypatch.setattr(ckmod, "_open_full", counting)
    sel = select(zoo / "target.jsonl", models / "base", library=lib, n=4, k=1)
    assert any(r["kind"] == "full" for r in sel.ranking)  # the restore after a full candidate ran too
    assert len(opened) == 1
