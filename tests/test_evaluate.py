"""evaluate(): every metric against a hand computation on unbatched, unpadded forwards."""

from __future__ import annotations

import pytest
import torch

from warmstart.data import load_target
from warmstart.errors import ConfigError
from warmstart.evaluate import evaluate, loglikelihoods, option_loglikelihoods
from warmstart.testing import write_jsonl


@pytest.fixture(scope="module")
def base(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return (AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32),
            AutoTokenizer.from_pretrained(models / "base"))





PC = [{"prompt": "The quick brown" + " fox" * i, "completion": " jumps over" + " the" * (i % 3)} for i in range(7)]
MC = [{"question": f"Capital number {i}?", "choices": ["Paris", "Berlin town", "Madrid", "Rome"], "answer": i % 4}
      for i in range(9)]


def hand_target_logprobs(model, tok, prompt, completion):
    """Independent reference: one sequence, no padding, log_softmax over the full logits."""
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    lps = [logp[len(p) + j - 1, t].item() for j, t in enumerate(c)]
    hits = [logp[len(p) + j - 1].argmax().item() == t for j, t in enumerate(c)]
    return lps, hits


def test_token_metrics_match_hand_computation(tmp_path, base):
    model, tok = base
    data = load_target(write_jsonl(tmp_path / "d.jsonl", PC))
    got = evaluate(model, tok, data, batch_size=3)
    all_lp, all_hit, em = [], [], []
    for r in PC:
        lps, hits = hand_target_logprobs(model, tok, r["prompt"], r["completion"])
        all_lp += lps
        all_hit += hits
        em.append(all(hits))
    assert got["loss"] == pytest.approx(-sum(all_lp) / len(all_lp), rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(sum(all_hit) / len(all_hit))
    assert got["exact_match"] == pytest.approx(sum(em) / len(em))
    assert got["n_tokens"] == len(all_lp) and got["n_examples"] == 7
    # batch size and padding do not change anything
    assert evaluate(model, tok, data, batch_size=1)["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_mc_rank_and_norm_match_hand(tmp_path, base):
    model, tok = base
    data = load_target(write_jsonl(tmp_path / "mc.jsonl", MC))
    got = evaluate(model, tok, data, batch_size=5)
    lls = option_loglikelihoods(model, tok, data, batch_size=7)
    hit_sum = hit_norm = 0
    for ex, row_lls in zip(data.examples, lls):
        hand = [sum(hand_target_logprobs(model, tok, ex.prompt, o)[0]) for o in ex.options]
        assert row_lls == pytest.approx(hand, rel=1e-5, abs=1e-5)
        hit_sum += max(range(4), key=lambda i: hand[i]) == ex.answer
        per_byte = [h / len(o.encode()) for h, o in zip(hand, ex.options)]
        hit_norm += max(range(4), key=lambda i: per_byte[i]) == ex.answer
    assert got["mc_accuracy_sum"] == pytest.approx(hit_sum / 9)
    assert got["mc_accuracy_norm"] == pytest.approx(hit_norm / 9)
    assert got["mc_accuracy"] == got["mc_accuracy_sum"]
    assert evaluate(model, tok, data, length_normalize=True)["mc_accuracy"] == got["mc_accuracy_norm"]
    # loss on MC data = NLL of the correct option's text
    ref = [hand_target_logprobs(model, tok, ex.prompt, ex.completion)[0] for ex in data.examples]
    flat = [x for r in ref for x in r]
    assert got["loss"] == pytest.approx(-sum(flat) / len(flat), rel=1e-5)


def test_mc_letter_mode_compares_valid_letters_only(tmp_path, base):
    model, tok = base
    data = load_target(write_jsonl(tmp_path / "mc.jsonl", MC))
    got = evaluate(model, tok, data, mc_mode="letter")
    lettered = data.with_mc_style("letter")
    hits = 0
    for ex in lettered.examples:
        p = tok(ex.prompt)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p])).logits[0, -1].log_softmax(-1)
        letter_lp = []
        for o in ex.options:  # " A", " B", ...: score all tokens of each letter option
            ids = tok(o, add_special_tokens=False)["input_ids"]
            letter_lp.append(sum(hand_target_logprobs(model, tok, ex.prompt, o)[0]) if len(ids) > 1
                             else logp[ids[0]].item())
        hits += max(range(4), key=lambda i: letter_lp[i]) == ex.answer
    assert got["mc_accuracy"] == pytest.approx(hits / len(MC))


def test_peft_models_and_adapter_switching(models, tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tok = base
    data = load_target(write_jsonl(tmp_path / "d.jsonl", PC))
    m = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    plain = evaluate(m, tok, data)["loss"]
    pm = PeftModel.from_pretrained(m, models / "lora_a", adapter_name="a")
    pm.load_adapter(models / "lora_b", adapter_name="b")
    pm.set_adapter("a")
    la = evaluate(pm, tok, data)["loss"]
    pm.set_adapter("b")
    lb = evaluate(pm, tok, data)["loss"]
    with pm.disable_adapter():
        assert evaluate(pm, tok, data)["loss"] == pytest.approx(plain, rel=1e-6)
    assert len({round(plain, 6), round(la, 6), round(lb, 6)}) == 3
    # reference: each adapter merged into a fresh base
    for path, got in ((models / "lora_a", la), (models / "lora_b", lb)):
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"), path)
        assert evaluate(ref.merge_and_unload(), tok, data)["loss"] == pytest.approx(got, rel=1e-4)
    # a weighted mix is just another active adapter
    pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], adapter_name="mix", combination_type="cat")
    pm.set_adapter("mix")
    assert evaluate(pm, tok, data)["loss"] not in (pytest.approx(la), pytest.approx(lb))


def test_loglikelihoods_and_errors(tmp_path, base):
    model, tok = base
    (s,) = loglikelihoods(model, tok, [("The quick", " brown fox")])
    lps, hits = hand_target_logprobs(model, tok, "The quick", " brown fox")
    assert s.logprob == pytest.approx(sum(lps), rel=1e-5) and s.n_tokens == len(lps)
    data = load_target(write_jsonl(tmp_path / "d.jsonl", PC))
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(model, tok, data, metrics=("bleu",))
    with pytest.raises(ConfigError, match="needs question/choices/answer"):
        evaluate(model, tok, data, metrics=("mc_accuracy",))
    assert "mc_accuracy" not in evaluate(model, tok, data)
    model.train()  # evaluation switches to eval mode (no dropout) and restores the caller's mode
    try:
        evaluate(model, tok, data)
        assert model.training is True
    finally:
        model.eval()


# Questions with 2-4 options of different lengths, prompts of different lengths.
MC_VARIED = [{"question": f"Capital number {i}?" + " more" * i,
              "choices": ["Paris", "Berlin town", "Madrid", "Rome" + " x" * i][: 2 + i % 3], "answer": i % 2}
             for i in range(11)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_scoring_equals_per_option_rows(models, tmp_path, attn):
    """The packed path (prompt once, options after it under a block mask) against one row per option
    and against unbatched hand forwards; also under a LoRA adapter (PEFT passes the mask through)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.evaluate import mc_option_scores

    tok = AutoTokenizer.from_pretrained(models / "base")
    m = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32, attn_implementation=attn)
    data = load_target(write_jsonl(tmp_path / "mc.jsonl", MC_VARIED))
    for model in (m, PeftModel.from_pretrained(m, models / "lora_a")):
        packed = mc_option_scores(model, tok, data, batch_size=5)
        rows = mc_option_scores(model, tok, data, batch_size=5, shared_prompt=False)
        hand = [hand_target_logprobs(model, tok, ex.prompt, o) for ex in data.examples for o in ex.options]
        assert len(packed) == len(rows) == len(hand) == sum(len(r["choices"]) for r in MC_VARIED)
        for p, r, (lps, hits) in zip(packed, rows, hand):
            assert p.logprob == pytest.approx(r.logprob, abs=1e-4)  # the stated tolerance (fp32): 1e-4 nats
            assert p.logprob == pytest.approx(sum(lps), abs=1e-4)
            assert (p.n_tokens, p.n_correct) == (r.n_tokens, r.n_correct) == (len(lps), sum(hits))
        a, b = evaluate(model, tok, data), evaluate(model, tok, data, shared_prompt=False)
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_loss_rows_packed_without_padding_equal_padded_batches(models, tmp_path, attn):
    """(prompt, completion) rows are packed as groups of one (no padding, the shared prefix once per
    batch): per-row scores equal the padded path's and unbatched hand forwards; a row whose tokens
    after the prompt are not all targets (plain text: no prompt at all) goes through the padded path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart._packed import pack
    from warmstart.data import tokenize

    tok = AutoTokenizer.from_pretrained(models / "base")
    m = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32, attn_implementation=attn)
    data = load_target(write_jsonl(tmp_path / "pc.jsonl", PC))
    rows = tokenize(data, tok)
    assert all(pack([r]) is not None for r in rows)
    broken = dict(rows[0], labels=rows[0]["labels"][:-1] + [-100])  # last token not a target
    assert pack([broken]) is None
    for bs in (1, 3, 16):
        a, b = evaluate(m, tok, data, batch_size=bs), evaluate(m, tok, data, batch_size=bs, shared_prompt=False)
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    all_lp = [lp for r in PC for lp in hand_target_logprobs(m, tok, r["prompt"], r["completion"])[0]]
    assert evaluate(m, tok, data)["loss"] == pytest.approx(-sum(all_lp) / len(all_lp), rel=1e-5)
    from warmstart._packed import score_packed
    from warmstart.data import pad_id_of
    from warmstart.evaluate import RowScore, score_rows

    pad = pad_id_of(tok)
    mixed = [[broken]] + [[r] for r in rows[1:]]
    got = score_packed(m, mixed, pad_id=pad, result=RowScore, fallback=lambda rs: score_rows(m, rs, pad_id=pad))
    ref = score_rows(m, [g[0] for g in mixed], pad_id=pad)
    assert [g.logprob for g in got] == pytest.approx([r.logprob for r in ref], abs=1e-4)
    assert [g.n_tokens for g in got] == [r.n_tokens for r in ref] and got[0].n_tokens == ref[0].n_tokens


def test_shared_prompt_falls_back_where_packing_would_change_a_score(models, tmp_path, base):
    """A prompt cut by max_length differently per option cannot be shared: those questions go through
    the per-option path, so the results still equal it."""
    from warmstart._packed import pack
    from warmstart.data import encode_pair
    from warmstart.evaluate import mc_option_scores

    model, tok = base
    data = load_target(write_jsonl(tmp_path / "mc.jsonl", MC_VARIED))
    ex = data.examples[10]
    short = [encode_pair(tok, ex.prompt, o, max_length=12) for o in ex.options]
    assert pack(short) is None and pack([encode_pair(tok, ex.prompt, o) for o in ex.options]) is not None
    # questions sharing an instruction prefix share it in the row: fewer tokens than prompt-per-question
    from warmstart._packed import build_row

    items = [pack([encode_pair(tok, e.prompt, o) for o in e.options]) for e in data.examples[:3]]
    row = build_row(items)
    own = sum(len(it["prompt"]) + sum(map(len, it["options"])) for it in items)
    lcp = len(tok("Capital number ")["input_ids"]) - 1  # the shared text, minus a token that may merge
    assert len(row["input_ids"]) <= own - 2 * lcp and row["question"][:lcp] == [-1] * lcp
    packed = mc_option_scores(model, tok, data, max_length=12)
    rows = mc_option_scores(model, tok, data, max_length=12, shared_prompt=False)
    assert [p.logprob for p in packed] == pytest.approx([r.logprob for r in rows], abs=1e-4)
    assert [p.n_tokens for p in packed] == [r.n_tokens for r in rows]


def test_bf16_compute_is_close_to_float32_and_leaves_the_model_as_it_was(tmp_path, base, monkeypatch):
    """bfloat16 matmuls (autocast) with the deciding logits in float32: the loss within 1 % and the same
    choices on this tiny model; afterwards the model computes exactly as before (the head patch is removed)."""
    from warmstart import _precision

    model, tok = base
    data = load_target(write_jsonl(tmp_path / "mc.jsonl", MC_VARIED))
    ref = evaluate(model, tok, data)
    got = evaluate(model, tok, data, compute_dtype="bfloat16")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-2) and got["loss"] != ref["loss"]
    assert "forward" not in model.lm_head.__dict__ and evaluate(model, tok, data) == ref
    seen = []
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append((tuple(w.shape), x.dtype, torch.is_autocast_enabled("cpu")))
        return orig(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    evaluate(model, tok, data, compute_dtype="bfloat16")
    vocab, hidden = model.lm_head.weight.shape
    head = [s for s in seen if s[0][1] == hidden and s[0][0] <= vocab and not s[2]]  # the head runs outside autocast
    full, exact = [s for s in head if s[0][0] == vocab], [s for s in head if s[0][0] < vocab]
    assert full and all(dt == torch.bfloat16 for _, dt, _ in full)  # every logit from a bf16 matmul, then
    assert len(exact) == len(full) and all(dt == torch.float32 for _, dt, _ in exact)  # the deciding ones in fp32
    # auto: bfloat16 exactly when the CPU flags say so
    monkeypatch.setattr(_precision, "cpu_has_fast_bf16", lambda: False)
    assert _precision.resolve("auto", "cpu") == "float32" and _precision.resolve("float32", "cpu") == "float32"
    monkeypatch.setattr(_precision, "cpu_has_fast_bf16", lambda: True)
    assert _precision.resolve("auto", "cpu") == "bfloat16"


def test_bf16_head_recomputes_the_deciding_logits_in_float32():
    """The bf16 head (warmstart._precision): against log-softmax in float64 written here, the requested
    targets' and the top logits are float32-exact, the argmax is the exact one, and the log-probs of the
    other tokens are far closer than a plain bf16 head's (which rounds logits of ~10 by up to 1/32)."""
    from warmstart import _precision

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 4000, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4000, 64, generator=g) * 0.4)
    x = torch.randn(3, 5, 64, generator=g) * 1.5  # (batch, positions, hidden): logits of std ~5
    tgt = torch.randint(0, 4000, (15,), generator=g)
    w = head.weight.detach()
    ref = (x.reshape(-1, 64).double() @ w.double().T).log_softmax(-1)
    fwd = _precision._refined_head(head, w, None)
    head._warmstart_exact = tgt
    z = fwd(x)
    assert z.dtype == torch.float32 and z.shape == (3, 5, 4000) and "_warmstart_exact" not in head.__dict__
    lp = z.reshape(-1, 4000).double().log_softmax(-1)
    plain = (x.reshape(-1, 64).bfloat16() @ w.bfloat16().T).double().log_softmax(-1)
    logits = x.reshape(-1, 64).double() @ w.double().T
    flat = z.reshape(-1, 4000).double()
    top = logits.topk(8, -1).indices
    for idx in (tgt[:, None], top):  # the requested targets at their own positions; the top 8 everywhere
        assert (flat.gather(1, idx) - logits.gather(1, idx)).abs().max() < 1e-4
    at_target = (lp.gather(1, tgt[:, None]) - ref.gather(1, tgt[:, None])).abs().mean()
    assert at_target < (plain.gather(1, tgt[:, None]) - ref.gather(1, tgt[:, None])).abs().mean() / 3
    assert torch.equal(lp.argmax(-1), ref.argmax(-1))
    err, err_plain = (lp - ref).abs().mean(), (plain - ref).abs().mean()
    assert err < err_plain / 2  # the tail stays bf16: a flat synthetic softmax leaves more of it than a real LM


def test_bf16_weight_copies_are_the_autocast_casts_kept_and_follow_in_place_writes(tmp_path, models, monkeypatch):
    """The bf16 copies of plain linear weights (warmstart._precision) compute exactly what autocast's own
    per-matmul casts compute (the same rounding), a frozen weight written in place (a swapped
    checkpoint) is cast again, a trainable one after a fused optimizer step too (its version does not
    move), nothing of it stays on the model, and the copies go with the model."""
    import gc

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart import _precision

    tok = AutoTokenizer.from_pretrained(models / "base")
    model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32).requires_grad_(False)
    data = load_target(write_jsonl(tmp_path / "mc.jsonl", MC_VARIED))
    before = len(_precision._BF16)

    def both(m):
        monkeypatch.setattr(_precision, "BF16_WEIGHTS", False)
        cast_each_time = evaluate(m, tok, data, compute_dtype="bfloat16")
        monkeypatch.setattr(_precision, "BF16_WEIGHTS", True)
        return cast_each_time, evaluate(m, tok, data, compute_dtype="bfloat16")

    ref, kept = both(model)
    assert kept == ref and len(_precision._BF16) > before
    layer = model.model.layers[0].mlp.down_proj
    assert "forward" not in layer.__dict__  # the instance forward is removed on leaving compute()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # in place: the kept copy is stale and must not be used
    ref2, kept2 = both(model)
    assert kept2 == ref2 and kept2["loss"] != kept["loss"]
    # a trainable weight is cast at each call: a fused optimizer step does not bump the version
    layer.weight.requires_grad_(True)
    opt = torch.optim.AdamW([layer.weight], lr=0.5, fused=True)
    layer.weight.grad = torch.ones_like(layer.weight)
    version = layer.weight._version
    opt.step()
    ref3, kept3 = both(model)
    assert layer.weight._version == version and kept3 == ref3 and kept3["loss"] != kept2["loss"]
    layer.weight.requires_grad_(False)
    mine = {id(p) for p in model.parameters()} & set(_precision._BF16)
    assert mine
    del model, layer, opt  # the optimizer holds the weight too
    gc.collect()
    assert not mine & set(_precision._BF16)  # the copies went with the model


def test_bf16_lora_layer_is_one_matmul_with_the_merged_weight_and_follows_the_adapter(models):
    """Under bf16 compute a vanilla LoRA layer computes x @ (W + s·B·A)ᵀ with that weight merged once in
    float32 and rounded to bf16: against the float64 formula written here, within bf16's rounding; an
    adapter written in place (select's swap of candidates) is merged again; a DoRA layer keeps PEFT's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from warmstart import _precision

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))

    def formula():
        b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        y = x.double() @ (layer.base_layer.weight.double() + 2.0 * b @ a).T  # scaling = alpha / r = 2
        return y if layer.base_layer.bias is None else y + layer.base_layer.bias.double()

    for _ in range(2):
        with torch.no_grad(), _precision.compute(model, "bfloat16"):
            assert "forward" in layer.__dict__  # the merged path is the one running
            got = layer(x).double()
        want = formula()
        lora_part = want - x.double() @ layer.base_layer.weight.double().T
        assert (got - want).abs().max() <= 2e-2 * want.abs().max() < 0.2 * lora_part.abs().max()  # a stale one fails
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(-4.0)  # the next round must see the new adapter
    assert "forward" not in layer.__dict__
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad(), _precision.compute(dora, "bfloat16"):
        assert "forward" not in dora.base_model.model.model.layers[0].self_attn.q_proj.__dict__
