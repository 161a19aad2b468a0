"""The Trainer callbacks of :mod:`warmstart.train`.

Kept apart from ``train.py`` because subclassing ``TrainerCallback`` imports transformers' trainer
(and torch: ~5 s idle, minutes on a loaded machine); ``TrainConfig`` and every input check must be
importable without it so that a mistake is reported in about a second (issue 15).
"""

from __future__ import annotations

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
        if is_main:  # other ranks wait at the next collective; evaluating twice would add nothing
            t = time.perf_counter()
            res = evaluate(model, self.tokenizer, self.data, metrics=self.metrics,
                           batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                           compute_dtype=self.cfg.eval_dtype)
            dt = time.perf_counter() - t
            self._eval_s += dt
            point["evaluation_s"] = round(dt, 4)  # what this point cost: visible in curve.json and the report
            point.update({f"eval_{k}": v for k, v in res.items() if k not in ("n_examples", "n_tokens")})
            self.points.append(point)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._t0 = time.perf_counter()
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

    def curve(self, **meta) -> Curve:
        train_s = self.points[-1]["time_s"] if self.points else 0.0
        return Curve(points=self.points, meta={"label": self.label, "max_steps": self.cfg.steps,
                                               "train_time_s": train_s, "metrics": self.metrics,
                                               "eval_examples": len(self.data), **meta})
