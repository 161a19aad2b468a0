"""Finetune from any initialization: the training recipe.

A short sequence in the torchtune habit — set up model, data, trainer, train,
save — over small ``_setup_*`` helpers. The loop is transformers' ``Trainer``
(with PEFT for LoRA), never hand-written; behaviour is added through a
callback that evaluates on the held-out split at step 0, every
``eval_every`` steps and at the end, and logs the curve that the report reads.

Initializations:

* a full model directory (a merged or transferred model, or the plain base),
  trained with a fresh LoRA (the baseline when it is the base) or fully;
* a base plus an initial LoRA adapter (a merged adapter) that training
  continues (``PeftModel.from_pretrained(..., is_trainable=True)``); passing
  the adapter directory itself as ``init`` means the same.

Runs on CPU, one GPU, or several GPUs through ``accelerate launch`` unchanged
(the Trainer does the distribution; only the main process evaluates and writes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _dist
from ._io import atomic_dir, atomic_write_json, check_output, read_config
from ._precision import resolve as resolve_precision
from .checkpoints import check_adapter_fits, is_hub_id, load_causal_lm, load_tokenizer, open_checkpoint, resolve
from .data import IGNORE_INDEX, TargetData, collate, load_target, pad_id_of, tokenize
from .errors import CheckpointError, ConfigError, IncompatibleError
from .library import task_name_from_path
from .provenance import versions, write_artefact  # versions: re-exported (train.versions callers)
from .rundir import Curve

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


# ----------------------------------------------------------------------------
# Config: one validated dataclass that round-trips to YAML


@dataclass
class TrainConfig:
    """Everything that decides a training run (data paths and init are arguments, not config)."""

    steps: int = 40
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False
    eval_every: int = 10
    eval_batch_size: int = 32  # options per packed eval row (warmstart._packed); 32 measured ~15 % faster than 16
    eval_limit: int | None = None  # evaluate on at most this many held-out rows (fixed-seed sample)
    metrics: list[str] | None = None  # None: evaluate's default for the data format
    max_length: int = 512
    precision: str = "auto"
    eval_dtype: str = "auto"  # matmuls of the eval curve: auto (bf16 where fast) | float32 | bfloat16
    group_by_length: bool = False  # batches of similar length (transformers' LengthGroupedSampler): less padding
    padding_free: bool = True  # a batch's rows concatenated into one row, no padding (checked on the first batch)
    eval_async: bool = False  # eval curve on a second thread with a snapshot of the weights (docs/performance.md)
    format: str | None = None  # data format (detected when None)
    mc_style: str = "text"
    save_checkpoints: bool = False

    def errors(self) -> list[str]:
        errs = []
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "max_length", "lora_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                errs.append(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                errs.append(f"{name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            errs.append(f"lr must be a positive number, got {self.lr!r}")
        for name in ("lora_alpha", "max_grad_norm", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                errs.append(f"{name} must be a non-negative number, got {v!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            errs.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            errs.append(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            errs.append(f"eval_limit must be a positive integer or null, got {self.eval_limit!r}")
        if self.precision not in PRECISIONS:
            errs.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_dtype not in ("auto", "float32", "bfloat16"):
            errs.append(f"eval_dtype must be auto, float32 or bfloat16, got {self.eval_dtype!r}")
        for name in ("group_by_length", "padding_free", "full", "rslora", "save_checkpoints", "eval_async"):
            if not isinstance(getattr(self, name), bool):
                errs.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.scheduler not in SCHEDULERS:
            errs.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        return errs

    def validate(self) -> TrainConfig:
        """Raise one ConfigError listing every invalid field."""
        errs = self.errors()
        if errs:
            raise ConfigError("invalid training config: " + "; ".join(errs))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str | Path | None = None, validate: bool = True) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys: {', '.join(unknown)}", path=where,
                              hint=f"known keys: {', '.join(sorted(known))}")
        cfg = cls(**d)
        return cfg.validate() if validate else cfg

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> TrainConfig:
        import yaml

        p = Path(text_or_path) if not isinstance(text_or_path, str) or "\n" not in text_or_path else None
        if p is not None and not p.is_file():
            raise ConfigError("training config not found", path=p)
        try:
            d = (read_config(p, "training config") if p else yaml.safe_load(text_or_path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"training config is not valid YAML ({e})", path=p) from None
        if not isinstance(d, dict):
            raise ConfigError("training config must be a mapping", path=p)
        return cls.from_dict(d, where=p)


# ----------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    out: Path
    curve: Curve
    kind: str  # "lora" or "full": what `out` holds
    train_time_s: float
    final: dict[str, Any]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "kind": self.kind, "train_time_s": self.train_time_s, "final": self.final}


# ----------------------------------------------------------------------------
# The recipe


def finetune(init: str | Path, train_data, eval_data, out: str | Path, config: TrainConfig | None = None, *,
             adapter: str | Path | None = None, force: bool = False, progress: bool = False,
             label: str | None = None, task: str | None = None) -> TrainResult:
    """Train from ``init`` (+ optional ``adapter``) on ``train_data``, evaluating on ``eval_data``.

    ``train_data``/``eval_data`` are paths or :class:`warmstart.data.TargetData`. Writes ``out``
    atomically: the model or adapter (standard format), tokenizer, ``curve.json``/``curve.csv``,
    ``warmstart.json`` and a README model card. ``task`` is recorded in ``warmstart.json`` for the
    catalog (default: the training data's file name, or its folder's for ``train.jsonl``-like names).
    """
    cfg = (config or TrainConfig()).validate()
    out = Path(out)
    init, adapter = _resolve_init(_local(init), _local(adapter) if adapter else None)
    check_output(out, force=force, inputs=[init] + ([adapter] if adapter else []))
    # corrupt weights, bad config or PEFT type: one line naming the file, not a traceback
    opened = [open_checkpoint(ref) for ref in [init] + ([adapter] if adapter else [])]
    if adapter:
        check_adapter_fits(opened[1], opened[0])  # modules and shapes against the base, before any loading
    train_data, eval_data = _setup_data(train_data, cfg), _setup_data(eval_data, cfg, limit=cfg.eval_limit)

    import transformers

    transformers.set_seed(cfg.seed)  # before the model: a fresh LoRA's init draws from the RNG
    tokenizer = _setup_tokenizer(init, adapter)
    model, kind = _setup_model(init, adapter, cfg)
    _check_finite_params(model, adapter or init)
    _dist.start()
    main = _dist.is_main()
    with _output_dir(out, force=force, main=main) as tmp:
        from ._callbacks import EvalCurve  # imports transformers' Trainer: kept out of `warmstart --help`

        evaluator = EvalCurve(tokenizer, eval_data, cfg, label=label)
        trainer = _setup_trainer(model, tokenizer, train_data, cfg, tmp / "trainer", evaluator, progress)
        try:
            trainer.train()
        except BaseException:
            evaluator.finish(wait=False)  # training's own error (or Ctrl-C) is what the user sees
            raise
        curve = evaluator.curve(init=_describe_init(init, adapter, cfg), max_steps=cfg.steps,
                                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                                padding_free=evaluator.padding_free)
        if main:
            _save(trainer, tokenizer, tmp, kind=kind, init=init, adapter=adapter, cfg=cfg, curve=curve,
                  train_data=train_data, eval_data=eval_data, task=task)
    final = curve.points[-1] if curve.points else {}
    return TrainResult(out=out, curve=curve, kind=kind, train_time_s=curve.train_time_s, final=final)


def _local(ref: str | Path) -> Path:
    """A directory as is; a hub id (``org/name[@rev]``) through the local cache."""
    return Path(ref) if Path(ref).exists() or not is_hub_id(str(ref)) else resolve(str(ref))


def _resolve_init(init: Path, adapter: Path | None) -> tuple[Path, Path | None]:
    """An adapter directory given as ``init`` means its base plus that adapter."""
    if not init.is_dir():
        raise CheckpointError("initialization not found (expected a model or adapter directory)", path=init)
    if (init / "adapter_config.json").is_file():
        if adapter is not None:
            raise ConfigError("init is already an adapter; pass its base as --init and it as --adapter",
                              path=init)
        adapter, init = init, Path(_adapter_base(init))
        if not init.is_dir():
            raise CheckpointError("the adapter's base model was not found", path=init,
                                  hint="pass --init BASE --adapter ADAPTER")
    if not (init / "config.json").is_file():
        raise CheckpointError("not a model directory (no config.json)", path=init)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CheckpointError("not a PEFT adapter directory (no adapter_config.json)", path=adapter)
    return init, adapter


def _adapter_base(adapter: Path) -> str:
    try:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        if not isinstance(base, str) or not base:
            raise KeyError(f"it is {base!r}")
        return base
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"adapter_config.json has no usable base_model_name_or_path ({e})",
                              path=adapter) from None


def _setup_data(data, cfg: TrainConfig, limit: int | None = None):
    if not isinstance(data, TargetData):
        data = load_target(data, format=cfg.format, mc_style=cfg.mc_style)
    # a fixed sample seed: runs that differ only in their training seed are scored on the same rows
    return data.sample(limit, seed=0) if limit else data


def _setup_tokenizer(init: Path, adapter: Path | None):
    src = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else init
    tok = load_tokenizer(src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _setup_model(init: Path, adapter: Path | None, cfg: TrainConfig):
    """The model to train and what will be saved: ``"lora"`` (an adapter) or ``"full"``."""
    import torch
    model = load_causal_lm(init, dtype=torch.float32)  # mixed precision via Trainer
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=not cfg.full)
        except RuntimeError as e:  # size mismatch: an adapter trained on another architecture
            raise IncompatibleError(f"adapter does not fit the model in --init ({str(e).splitlines()[0][:300]})",
                                    path=adapter) from None
        if cfg.full:  # fold the initial adapter in, then train every weight
            return _all_trainable(model.merge_and_unload()), "full"
        return model, "lora"
    if cfg.full:
        return _all_trainable(model), "full"
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), use_rslora=cfg.rslora, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lcfg), "lora"
    except ValueError as e:  # PEFT: target modules not found in the model
        raise ConfigError(f"LoRA targets {cfg.lora_targets} do not fit this model ({e})", path=init) from None


def _check_finite_params(model, where: Path) -> None:
    """NaN/Inf in the initialization would train to NaN silently; refuse (in memory, one pass)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(p.detach().isfinite().all()):
            raise CheckpointError(f"tensor {name!r} contains NaN/Inf values", path=where,
                                  hint="repair or re-export the checkpoint")


def _all_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _precision_flags(precision: str) -> dict:
    import torch

    if precision == "auto":  # bf16 autocast (float32 master weights, optimizer and loss) where it is fast
        precision = ("bf16" if resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu") == "bfloat16"
                     else "fp32")
    flags = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    if flags["bf16"] and not torch.cuda.is_available():
        flags["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told it runs on the CPU
    return flags


def _setup_trainer(model, tokenizer, train_data, cfg: TrainConfig, workdir: Path, evaluator, progress: bool):
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from ._callbacks import QuietProgress  # imports transformers' Trainer: kept out of `warmstart --help`

    train_ds = tokenize(train_data, tokenizer, max_length=cfg.max_length)
    pad = pad_id_of(tokenizer)
    args = TrainingArguments(
        output_dir=str(workdir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, report_to="none", eval_strategy="no",
        save_strategy="steps" if cfg.save_checkpoints else "no", save_steps=cfg.eval_every,
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=not progress,
        dataloader_num_workers=0, dataloader_pin_memory=_on_gpu(), **_precision_flags(cfg.precision),
        # off by default: it changes which rows share a batch, so results differ from the random order's
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )
    # Logits only where a label is (see _labelled_logits_loss); not under torch DataParallel (n_gpu > 1),
    # which would split the position index along with the batch.
    sparse = args.n_gpu <= 1
    flat = sparse and cfg.padding_free and padding_free_ok(model, train_ds, pad, cfg.batch_size)
    evaluator.padding_free = flat
    if flat:
        collator = lambda b: _with_keep(flatten(b))  # noqa: E731
    elif sparse:
        collator = lambda b: _with_keep(collate(b, pad))  # noqa: E731
    else:
        collator = lambda b: collate(b, pad)  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                      compute_loss_func=_labelled_logits_loss if sparse else None, callbacks=[evaluator])
    # the curve is the log: keep the progress bar (stderr) but not the per-step dicts on stdout
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress)
    return trainer


def _keep_positions(labels):
    """Positions whose logits predict a label (label p+1 is predicted at position p), any row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def flatten(rows: list[dict]) -> dict:
    """A batch as one row without padding: the rows concatenated, ``position_ids`` restarting at 0 for
    each, the label of each row's first token ignored (transformers' ``DataCollatorWithFlattening``).
    transformers then masks attention per row (``masking_utils.find_packed_sequence_indices``, which it
    applies only without an attention mask and without a KV cache, hence ``use_cache=False``), so the
    loss and gradients equal the padded batch's up to float rounding, and no compute goes to padding
    (a third of the bench's training tokens). Checked per model by :func:`padding_free_ok`."""
    from transformers import DataCollatorWithFlattening

    out = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], return_tensors="pt")
    return {"input_ids": out["input_ids"], "labels": out["labels"], "position_ids": out["position_ids"],
            "use_cache": False}


def padding_free_ok(model, rows, pad_id: int, batch_size: int, tol: float = 1e-4) -> bool:
    """Whether ``model`` honours :func:`flatten`'s row boundaries: the float32 loss of the first batch
    (at most 4 rows), padded and flattened, must agree to ``tol`` (relative). A model whose attention
    ignores ``position_ids`` boundaries (custom code, a kernel without masks) would mix rows and give
    another loss; it then trains on padded batches. Costs two forwards of a few rows."""
    import torch

    rows = [rows[i] for i in range(min(len(rows), batch_size, 4))]
    if len(rows) < 2:
        return False
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, enabled=False):
            dev = next(model.parameters()).device
            losses = []
            for b in (_with_keep(collate(rows, pad_id)), _with_keep(flatten(rows))):
                labels = b.pop("labels")
                b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
                losses.append(float(_labelled_logits_loss(model(**b), labels.to(dev))))
    except (TypeError, ValueError, RuntimeError):  # a model that takes no position_ids / use_cache
        return False
    finally:
        model.train(was)
    a, b = losses
    return math.isfinite(a) and abs(a - b) <= tol * max(abs(a), 1e-8)


def _with_keep(batch: dict) -> dict:
    """The batch plus ``logits_to_keep``: transformers then runs the LM head only at those positions.

    The head (vocab × hidden) over every position is ~15-20 % of a small model's training step,
    and most positions are prompt whose logits the loss ignores.
    """
    batch["logits_to_keep"] = _keep_positions(batch["labels"])
    return batch


def _labelled_logits_loss(outputs, labels, num_items_in_batch=None):
    """transformers' causal-LM loss (ForCausalLMLoss: float32 cross-entropy, summed over the label
    tokens and divided by the Trainer's count of them across accumulated batches) on logits
    computed only at the kept positions; the full logits when the model ignored logits_to_keep."""
    import torch

    logits = outputs.logits
    keep = _keep_positions(labels)
    target = labels[:, 1:][:, keep] if logits.shape[1] == len(keep) else labels[:, 1:]
    logits = logits if logits.shape[1] == target.shape[1] else logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             target.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    if torch.is_tensor(n):
        n = n.to(loss.device)
    return loss / n


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------
# Saving: standard formats + warmstart.json + model card, atomically


class _Scratch:
    """Non-main processes of a multi-GPU run write nothing; they get a throwaway directory."""

    def __enter__(self) -> Path:
        self.d = Path(tempfile.mkdtemp(prefix="warmstart-rank-"))
        return self.d

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.d, ignore_errors=True)


def _output_dir(out: Path, *, force: bool, main: bool):
    return atomic_dir(out, force=force) if main else _Scratch()


def _describe_init(init: Path, adapter: Path | None, cfg: TrainConfig) -> dict:
    return {"model": str(init.resolve()), "adapter": str(adapter.resolve()) if adapter else None,
            "method": "full" if cfg.full else ("continue-adapter" if adapter else "new-lora")}


def _save(trainer, tokenizer, tmp: Path, *, kind, init, adapter, cfg, curve, train_data, eval_data,
          task=None) -> None:
    trainer.save_model(str(tmp))  # adapter_model.safetensors for PEFT, model.safetensors for full
    tokenizer.save_pretrained(tmp)
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; warmstart.json records the settings
    if kind == "lora":  # PEFT records the path it was given; keep it absolute so the adapter finds its base
        p = tmp / "adapter_config.json"
        c = json.loads(p.read_text())
        c["base_model_name_or_path"] = str(Path(_adapter_base(adapter) if adapter else init).resolve())
        atomic_write_json(p, c)
    if not cfg.save_checkpoints:
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
    curve.write(tmp)
    meta = {"kind": "finetune", "task": task or task_name_from_path(train_data.path), "output": kind,
            "init": _describe_init(init, adapter, cfg), "config": cfg.to_dict(),
            "train_data": {"path": _abs(train_data.path), "rows": len(train_data),
                           "fingerprint": train_data.fingerprint()},
            "eval_data": {"path": _abs(eval_data.path), "rows": len(eval_data), "fingerprint": eval_data.fingerprint()},
            "final": curve.points[-1] if curve.points else None, "train_time_s": curve.train_time_s,
            "trainable_params": curve.meta.get("trainable_params"),
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_artefact(tmp, meta, _model_card(meta))


def _abs(path: str) -> str:
    """Absolute, like the init path and the run report: a card read elsewhere still names the file."""
    return str(Path(path).expanduser().resolve())


def _model_card(meta: dict) -> str:
    init, cfg, fin = meta["init"], meta["config"], meta["final"] or {}
    what = "LoRA adapter" if meta["output"] == "lora" else "full model"
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(PATH)"
            if meta["output"] == "lora" else
            "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)")
    evals = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in fin.items()
                      if k.startswith("eval_") and isinstance(v, float))
    return "\n".join([
        "---", "library_name: " + ("peft" if meta["output"] == "lora" else "transformers"),
        "tags: [warmstart]", "---", "", f"# warmstart finetune ({what})", "",
        f"- initialization: `{init['model']}`" + (f" + adapter `{init['adapter']}`" if init["adapter"] else ""),
        f"- method: {init['method']}; {cfg['steps']} steps, lr {cfg['lr']}, batch {cfg['batch_size']}"
        f"×{cfg['grad_accum']}, seed {cfg['seed']}"
        + ("" if cfg["full"] else f", LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']} rsLoRA={cfg['rslora']}"),
        f"- train data: `{meta['train_data']['path']}` ({meta['train_data']['rows']} rows, "
        f"fingerprint {meta['train_data']['fingerprint']})",
        f"- eval data: `{meta['eval_data']['path']}` ({meta['eval_data']['rows']} rows)",
        f"- final eval: {evals or 'n/a'}", f"- training time: {meta['train_time_s']:.1f} s (evaluation excluded)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
        "The eval curve is in `curve.json` / `curve.csv`; the full settings in `warmstart.json`.", "",
        "```python", load, "```", "",
    ])


__all__ = ["TrainConfig", "TrainResult", "finetune", "versions"]
