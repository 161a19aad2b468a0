"""The Trainer callbacks of :mod:`warmstart.train`.

Kept apart from ``train.py`` because subclassing ``TrainerCallback`` imports transformers' trainer
(and torch: ~5 s idle, minutes on a loaded machine); ``TrainConfig`` and every input check must be
importable without it so that a mistake is reported in about a second (issue 15).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from transformers import ProgressCallback, TrainerCallback

from .evaluate import evaluate
from .rundir import Curve


class QuietProgress(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


# ----------------------------------------------------------------------------
# Evaluation curve: a TrainerCallback (the Trainer's own eval loop knows no accuracy)

class EvalCurve(TrainerCallback):
    """Evaluates at step 0, every ``eval_every`` steps and at the end; keeps the curve.

    ``time_s`` is training time with evaluation subtracted, so both runs are compared
    on what training costs, not on how often we chose to measure it.
    """

    def __init__(self, tokenizer, eval_data, cfg, label: str | None = None):  # cfg: a train.TrainConfig
        self.tokenizer, self.data, self.cfg, self.label = tokenizer, eval_data, cfg, label
        self.metrics = list(cfg.metrics) if cfg.metrics else (
            ["loss", "token_accuracy", "exact_match", "mc_accuracy"] if eval_data.format == "mc"
            else ["loss", "token_accuracy", "exact_match"])
        self.points: list[dict] = []
        self.padding_free = False  # set by train._setup_trainer: whether batches are flattened rows
        self._losses: list[float] = []
        self._t0 = 0.0
        self._eval_s = 0.0
        self._last_step = -1
        self._pending: tuple | None = None
        self._async: AsyncEval | None = None
        self.eval_wait_s = 0.0  # with eval_async: how long training waited for the evaluations at the end

    def _now(self) -> tuple[float, float]:
        wall = time.perf_counter() - self._t0
        return wall - self._eval_s, wall

    def _evaluate(self, model, step: int, is_main: bool) -> None:
        if step == self._last_step:
            return
        self._last_step = step
        train_s, wall = self._now()
        point: dict[str, Any] = {"step": step, "time_s": round(train_s, 4), "wall_s": round(wall, 4),
                                 "train_loss": sum(self._losses) / len(self._losses) if self._losses else None}
        self._losses = []
        if not is_main:  # other ranks wait at the next collective; evaluating twice would add nothing
            return
        self.points.append(point)
        if self._async is not None:
            self._async.submit(point, model)  # filled in by the evaluation thread
        else:
            self._eval_s += self.fill(point, model)

    def fill(self, point: dict, model) -> float:
        """Evaluate ``model`` into ``point`` (its eval metrics and ``evaluation_s``, what this point cost:
        visible in curve.json and the report); returns the seconds."""
        t = time.perf_counter()
        res = evaluate(model, self.tokenizer, self.data, metrics=self.metrics, batch_size=self.cfg.eval_batch_size,
                       max_length=self.cfg.max_length, compute_dtype=self.cfg.eval_dtype)
        dt = time.perf_counter() - t
        point["evaluation_s"] = round(dt, 4)
        point.update({f"eval_{k}": v for k, v in res.items() if k not in ("n_examples", "n_tokens")})
        return dt

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._t0 = time.perf_counter()
        if self.cfg.eval_async and state.is_world_process_zero and args.world_size == 1:
            self._async = AsyncEval(model, self)
        self._evaluate(model, 0, state.is_world_process_zero)

    # The Trainer calls on_step_end before it logs that step's loss (on_log), so an
    # evaluation due at a step waits for its log to keep the train loss aligned.
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.cfg.eval_every == 0 or state.global_step >= state.max_steps:
            self._pending = (model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))
        self._flush(state)

    def on_train_end(self, args, state, control, **kw):
        self._flush(state)

    def _flush(self, state) -> None:
        if self._pending is not None:
            model, step = self._pending
            self._pending = None
            self._evaluate(model, step, state.is_world_process_zero)

    def finish(self, wait: bool = True) -> None:
        """Wait for the evaluations still running on the evaluation thread (none without eval_async);
        ``wait=False`` (training failed or was interrupted): drop them, the thread dies with the process."""
        if self._async is not None:
            t = time.perf_counter()
            worker, self._async = self._async, None
            worker.close(wait)
            self.eval_wait_s = time.perf_counter() - t

    def curve(self, **meta) -> Curve:
        self.finish()  # the last asynchronous evaluations (the wait is part of the run's time)
        train_s = self.points[-1]["time_s"] if self.points else 0.0
        extra = {"eval_async": True, "eval_wait_s": round(self.eval_wait_s, 4)} if self.cfg.eval_async else {}
        return Curve(points=self.points, meta={"label": self.label, "max_steps": self.cfg.steps,
                                               "train_time_s": train_s, "metrics": self.metrics,
                                               "eval_examples": len(self.data), **extra, **meta})


class AsyncEval:
    """The eval curve computed on a second thread while training goes on (``eval_async``).

    At each evaluation point the training thread copies the trainable weights (a LoRA's factors:
    a few MB; a full fine-tune: the whole model) and goes on; the evaluation thread loads them into
    its own copy of the model and evaluates. The copy shares every frozen tensor with the training
    model (``deepcopy`` with those tensors in its memo), so a LoRA run holds its base once. Torch
    releases the GIL inside its kernels, so the two threads compute on two cores; both use torch's
    intra-op thread count, so this pays where training leaves a core idle (``--threads 1`` on two
    cores), not on a machine whose every core trains. Results equal the synchronous curve's: the
    same weights, the same evaluation (tested). An error on the evaluation thread is raised on the
    training thread when the run finishes.
    """

    def __init__(self, model, curve: EvalCurve):
        import copy

        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=dict(frozen))
        for m in self.model.modules():
            # accelerate's mixed precision wraps `forward` in an instance attribute whose closure holds
            # the *training* model's forward: the copy must run its own class's forward
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_original_forward", None)
        self.model.eval()
        self.curve = curve
        self.error: BaseException | None = None
        self.stopped = False
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="warmstart-eval", daemon=True)
        self.thread.start()

    def submit(self, point: dict, model) -> None:
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.queue.put((point, snapshot))

    def _run(self) -> None:
        import torch

        params = dict(self.model.named_parameters())
        while (item := self.queue.get()) is not None:
            if self.error is not None or self.stopped:
                continue
            point, snapshot = item
            try:
                with torch.no_grad():
                    for name, t in snapshot.items():
                        params[name].copy_(t)
                self.curve.fill(point, self.model)
            except BaseException as e:  # handed to the training thread by close()
                self.error = e

    def close(self, wait: bool = True) -> None:
        self.stopped = not wait  # training failed: the queued points are skipped
        self.queue.put(None)
        if wait:
            self.thread.join()
            if self.error is not None:
                raise self.error
