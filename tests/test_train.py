"""The finetune recipe on the tiny model: inits, outputs, curve, reproducibility, config."""

from __future__ import annotations

import json
import random

import pytest

from warmstart.errors import ConfigError, OutputExistsError
from warmstart.report import Curve
from warmstart.train import TrainConfig, finetune

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome")]


def write_mc(path, n=12, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            c, a = rng.choice(CAPITALS)
            f.write(json.dumps({"question": f"capital of {c}?", "choices": [x for _, x in CAPITALS],
                                "answer": a}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_mc(d / "train.jsonl", 12, 0), write_mc(d / "eval.jsonl", 8, 1)


FAST = dict(steps=4, batch_size=4, eval_every=2, lr=5e-3, max_length=64)


def test_fresh_lora_writes_adapter_curve_and_card(models, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = finetune(models / "base", *data, tmp_path / "out", TrainConfig(**FAST), label="baseline")
    out = tmp_path / "out"
    assert res.kind == "lora"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "training_args.bin").exists()
    # curve: step 0, every eval_every steps, and the end; train loss logged after step 0
    curve = Curve.from_file(out)
    assert [p["step"] for p in curve.points] == [0, 2, 4]
    assert curve.points[0]["train_loss"] is None and all(p["train_loss"] > 0 for p in curve.points[1:])
    assert all("eval_mc_accuracy" in p and "eval_loss" in p for p in curve.points)
    assert curve.points[-1]["time_s"] >= curve.points[1]["time_s"] >= 0
    assert (out / "curve.csv").read_text().startswith("step,")
    meta = json.loads((out / "warmstart.json").read_text())
    assert meta["init"]["method"] == "new-lora" and meta["config"]["steps"] == 4
    assert "warmstart finetune" in (out / "README.md").read_text()
    # the adapter loads with PEFT unchanged and differs from the base (it trained)
    base = AutoModelForCausalLM.from_pretrained(models / "base")
    pm = PeftModel.from_pretrained(base, out)
    b = [v for k, v in pm.state_dict().items() if "lora_B" in k]
    assert b and any(float(t.abs().max()) > 0 for t in b)
    assert not list(tmp_path.glob("out.tmp-*"))


def test_same_seed_same_final_loss(models, data, tmp_path):
    a = finetune(models / "base", *data, tmp_path / "a", TrainConfig(**FAST))
    b = finetune(models / "base", *data, tmp_path / "b", TrainConfig(**FAST))
    c = finetune(models / "base", *data, tmp_path / "c", TrainConfig(**{**FAST, "seed": 1}))
    assert a.final["eval_loss"] == b.final["eval_loss"]
    assert a.final["train_loss"] == b.final["train_loss"]
    assert a.final["eval_loss"] != c.final["eval_loss"]


def test_continue_adapter_starts_from_it(models, data, tmp_path):
    """A base + initial adapter: step 0 evaluates the adapter, not the base."""
    cfg = TrainConfig(**{**FAST, "steps": 2})
    cont = finetune(models / "base", *data, tmp_path / "cont", cfg, adapter=models / "lora_b")
    fresh = Curve.from_file(finetune(models / "base", *data, tmp_path / "fresh", cfg).out)
    c0 = cont.curve.points[0]["eval_loss"]
    assert c0 != pytest.approx(fresh.points[0]["eval_loss"], rel=1e-6)
    cfg_out = json.loads((tmp_path / "cont" / "adapter_config.json").read_text())
    assert cfg_out["r"] == 8  # the adapter's own rank, not the config's fresh-LoRA rank
    # an adapter directory given as init means its base + that adapter
    same = finetune(models / "lora_b", *data, tmp_path / "same", cfg)
    assert same.curve.points[0]["eval_loss"] == pytest.approx(c0)


def test_full_finetune_from_model_dir(models, data, tmp_path):
    from transformers import AutoModelForCausalLM

    res = finetune(models / "ft_a", *data, tmp_path / "full", TrainConfig(**{**FAST, "steps": 2, "full": True}))
    assert res.kind == "full" and (tmp_path / "full" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    with pytest.raises(OutputExistsError):
        finetune(models / "ft_a", *data, tmp_path / "full", TrainConfig(**{**FAST, "steps": 2, "full": True}))


def test_config_validates_all_fields_at_once_and_roundtrips_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainConfig(steps=0, lr=-1, precision="fp8", lora_dropout=1.5).validate()
    msg = str(e.value)
    assert all(k in msg for k in ("steps", "lr", "precision", "lora_dropout"))
    cfg = TrainConfig(steps=7, lora_targets=["q_proj"], rslora=True, eval_limit=5)
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(p) == cfg
    with pytest.raises(ConfigError, match="unknown training config keys: stepz"):
        TrainConfig.from_dict({"stepz": 3})


def test_bad_lora_targets_is_a_user_error(models, data, tmp_path):
    with pytest.raises(ConfigError, match="LoRA targets"):
        finetune(models / "base", *data, tmp_path / "x", TrainConfig(**{**FAST, "lora_targets": ["nope_proj"]}))


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(models, data, tmp_path):
    """The multi-GPU path (DDP) on two CPU processes: one output, one report, a full curve."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "warmstart",
           "finetune", "--init", str(models / "base"), "--train", str(data[0]), "--eval", str(data[1]),
           "--out", str(tmp_path / "ddp"), "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('"kind": "lora"') == 1
    assert [p["step"] for p in Curve.from_file(tmp_path / "ddp").points] == [0, 2, 4]
    assert not list(tmp_path.glob("ddp.tmp-*"))


def test_labelled_logits_loss_equals_the_models_own_loss_and_gradient(models):
    """Logits only at labelled positions: the same loss and LoRA gradient as transformers' causal-LM loss
    over every position (mean over label tokens; sum / count when the Trainer passes the count)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.data import collate, encode_pair, pad_id_of
    from warmstart.train import _labelled_logits_loss, _with_keep

    tok = AutoTokenizer.from_pretrained(models / "base")
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "base"),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = [encode_pair(tok, "capital of France" + "?" * i, " Paris" + " city" * (i % 2)) for i in range(5)]
    batch = collate(rows, pad_id_of(tok))

    ref, g_ref = _loss_and_grad(pm, lambda: pm(**batch).loss)
    kb = _with_keep(dict(batch))
    labels = kb.pop("labels")
    assert len(kb["logits_to_keep"]) < batch["input_ids"].shape[1] - 1  # prompt positions are skipped
    got, g = _loss_and_grad(pm, lambda: _labelled_logits_loss(pm(**kb), labels))
    assert got == pytest.approx(ref, rel=1e-5) and torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7)
    n = int((labels[:, 1:] != -100).sum())
    assert _labelled_logits_loss(pm(**kb), labels, torch.tensor(2 * n)).item() == pytest.approx(ref / 2, rel=1e-5)


def test_training_with_labelled_logits_matches_full_logits(models, data, tmp_path, monkeypatch):
    """The whole Trainer run: the same curve with the LM head at every position; each eval point's cost
    is in the curve."""
    from warmstart import train

    cfg = TrainConfig(**FAST, eval_dtype="float32", precision="fp32")
    sparse = finetune(models / "base", *data, tmp_path / "a", cfg)
    monkeypatch.setattr(train, "_with_keep", lambda b: b)  # the model then returns every position's logits
    full = finetune(models / "base", *data, tmp_path / "b", cfg)
    for p, q in zip(sparse.curve.points, full.curve.points):
        assert p["eval_loss"] == pytest.approx(q["eval_loss"], rel=1e-4)
        assert (p["train_loss"] is None) == (q["train_loss"] is None)
        assert p["train_loss"] is None or p["train_loss"] == pytest.approx(q["train_loss"], rel=1e-4)
        assert p["evaluation_s"] > 0
    with pytest.raises(ConfigError, match="eval_dtype"):
        TrainConfig(eval_dtype="int8").validate()


def _loss_and_grad(pm, fn):
    """The loss of ``fn()`` and the gradient of pm's trainable parameters, flat."""
    import torch

    pm.zero_grad()
    loss = fn()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in pm.parameters() if p.requires_grad])


def _lora(models, seed=0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_flattened_batch_has_the_padded_batchs_loss_and_gradient(models):
    """padding_free: the rows concatenated into one row with restarting positions. Against the padded
    batch through transformers' own loss over every position (an independent path): the same loss and
    LoRA gradient; the row holds exactly the rows' tokens, and every row's first label is ignored."""
    import torch
    from transformers import AutoTokenizer

    from warmstart.data import collate, encode_pair, pad_id_of
    from warmstart.train import _labelled_logits_loss, _with_keep, flatten, padding_free_ok

    tok = AutoTokenizer.from_pretrained(models / "base")
    pm = _lora(models)
    rows = [encode_pair(tok, "capital of France" + "?" * (3 * i), " Paris" + " city" * (i % 3)) for i in range(5)]
    padded = collate(rows, pad_id_of(tok))

    ref, g_ref = _loss_and_grad(pm, lambda: pm(**padded).loss)
    flat = _with_keep(flatten(rows))
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)) and flat["use_cache"] is False
    starts = [0]
    for r in rows[:-1]:
        starts.append(starts[-1] + len(r["input_ids"]))
    assert [int(flat["position_ids"][0, s]) for s in starts] == [0] * len(rows)
    assert all(int(flat["labels"][0, s]) == -100 for s in starts)
    labels = flat.pop("labels")
    got, g = _loss_and_grad(pm, lambda: _labelled_logits_loss(pm(**flat), labels))
    assert got == pytest.approx(ref, rel=1e-5) and torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7)
    assert padding_free_ok(pm, rows, pad_id_of(tok), 8)


def test_padding_free_is_refused_for_a_model_that_mixes_rows(models):
    """A model whose attention ignores the row boundaries (here: position_ids and use_cache dropped, so
    attention runs causally across the whole row) fails the first-batch check and trains padded."""
    import torch
    from transformers import AutoTokenizer

    from warmstart.data import encode_pair, pad_id_of
    from warmstart.train import padding_free_ok

    tok = AutoTokenizer.from_pretrained(models / "base")
    pm = _lora(models)
    rows = [encode_pair(tok, "capital of Spain" + "!" * i, " Madrid") for i in range(4)]

    class Mixing(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, position_ids=None, use_cache=None, **kw):
            return self.m(**kw)

    assert padding_free_ok(pm, rows, pad_id_of(tok), 8)
    assert not padding_free_ok(Mixing(pm), rows, pad_id_of(tok), 8)
    assert not padding_free_ok(pm, rows[:1], pad_id_of(tok), 8)  # one row: nothing to gain, nothing checked


def test_padding_free_training_matches_padded_training(models, data, tmp_path):
    """The whole Trainer run in float32: the same curve either way, and the curve says which ran."""
    cfg = dict(FAST, eval_dtype="float32", precision="fp32")
    flat = finetune(models / "base", *data, tmp_path / "a", TrainConfig(**cfg))
    padded = finetune(models / "base", *data, tmp_path / "b", TrainConfig(**cfg, padding_free=False))
    assert flat.curve.meta["padding_free"] is True and padded.curve.meta["padding_free"] is False
    assert len(flat.curve.points) == len(padded.curve.points) == 3
    for p, q in zip(flat.curve.points, padded.curve.points):
        assert p["eval_loss"] == pytest.approx(q["eval_loss"], rel=1e-4)
        assert p["train_loss"] is None or p["train_loss"] == pytest.approx(q["train_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="padding_free must be true or false"):
        TrainConfig(padding_free="yes").validate()


def test_group_by_length_batches_carry_less_padding(models, tmp_path, monkeypatch):
    import warmstart.data as wd
    import warmstart.train

    d = tmp_path / "d.jsonl"
    with open(d, "w") as f:
        for i in range(16):  # lengths 1..16 words, shuffled
            n = (i * 7) % 16 + 1
            f.write(json.dumps({"prompt": "say" + " la" * n, "completion": " ok"}) + "\n")
    widths = []
    orig = wd.collate

    def spy(batch, pad):
        out = orig(batch, pad)
        widths.append(1 - float(out["attention_mask"].float().mean()))
        return out

    monkeypatch.setattr(warmstart.train, "collate", spy)  # train's training batches; evaluate has its own
    pads = {}
    for g in (False, True):
        widths.clear()
        finetune(models / "base", d, d, tmp_path / f"o{g}",
                 TrainConfig(**{**FAST, "group_by_length": g, "padding_free": False}))
        pads[g] = sum(widths) / len(widths)
    assert pads[True] < pads[False]


def test_precision_auto_is_bf16_autocast_exactly_where_the_hardware_has_it(monkeypatch):
    import torch

    from warmstart import _precision
    from warmstart.train import _precision_flags

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_precision, "cpu_has_fast_bf16", lambda: True)
    assert _precision_flags("auto") == {"bf16": True, "fp16": False, "use_cpu": True}
    monkeypatch.setattr(_precision, "cpu_has_fast_bf16", lambda: False)
    assert _precision_flags("auto") == {"bf16": False, "fp16": False}
    assert _precision_flags("fp32") == {"bf16": False, "fp16": False}


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_async_eval_curve_equals_the_synchronous_one(models, data, tmp_path, precision):
    """The same evaluation of the same weights on another thread: every eval value equal, the LoRA and
    the training unchanged. "auto" is bf16 autocast on a CPU that has it, where accelerate wraps the
    training model's forward: the evaluation copy must still run its own weights."""
    cfg = dict(FAST, steps=6, precision=precision)
    sync = finetune(models / "base", *data, tmp_path / "a", TrainConfig(**cfg))
    asyn = finetune(models / "base", *data, tmp_path / "b", TrainConfig(**cfg, eval_async=True))
    assert asyn.curve.meta["eval_async"] is True and asyn.curve.meta["eval_wait_s"] >= 0
    assert "eval_async" not in sync.curve.meta
    assert [p["step"] for p in asyn.curve.points] == [p["step"] for p in sync.curve.points] == [0, 2, 4, 6]
    for p, q in zip(sync.curve.points, asyn.curve.points):
        evals = sorted(k for k in p if k.startswith("eval_"))
        assert evals and evals == sorted(k for k in q if k.startswith("eval_"))
        assert all(p[k] == q[k] for k in evals), p["step"]
        assert p["train_loss"] == q["train_loss"] and q["evaluation_s"] > 0
    assert len({p["eval_loss"] for p in asyn.curve.points}) == 4  # the points differ: each is its own snapshot
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_async_eval_error_reaches_the_caller_and_nothing_is_written(models, data, tmp_path, monkeypatch):
    from warmstart import _callbacks

    def broken(*a, **k):
        raise RuntimeError("eval exploded")

    monkeypatch.setattr(_callbacks, "evaluate", broken)
    with pytest.raises(RuntimeError, match="eval exploded"):
        finetune(models / "base", *data, tmp_path / "out", TrainConfig(**FAST, eval_async=True))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    with pytest.raises(ConfigError, match="eval_async must be true or false"):
        TrainConfig(eval_async=1).validate()


def test_async_eval_does_not_hide_a_training_error(models, data, tmp_path, monkeypatch):
    """A failure of training itself is what is raised, not a wait for (or an error of) the evaluations."""
    from transformers import Trainer

    def broken(self, *a, **k):
        self.callback_handler.on_train_begin(self.args, self.state, self.control)  # starts the eval thread
        raise ValueError("training exploded")

    monkeypatch.setattr(Trainer, "train", broken)
    with pytest.raises(ValueError, match="training exploded"):
        finetune(models / "base", *data, tmp_path / "out", TrainConfig(**FAST, eval_async=True))
    assert not (tmp_path / "out").exists()
