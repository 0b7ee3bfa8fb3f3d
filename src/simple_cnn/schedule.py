"""How long training runs and how fast it learns: one callback owns the clock.

:class:`Schedule` chooses the epochs (when ``--epochs`` is not given), sets the learning
rate before every step, stops training after the chosen epochs or before an epoch would
overrun the time budget, and its :class:`Plan` tells early stopping where the decay
starts. One name for each quantity:

- ``plan.epochs``: the epochs to train, None until chosen; ``plan.horizon``: the epochs
  the learning rate decays over (until they are chosen, the most there can be);
- ``plan.budget_seconds``: the time budget, or None; ``plan.soft_budget``: it is the
  default one, which gives way to the fewest epochs;
- ``plan.decay_start``: the fraction of training where the learning rate starts to decay
  (the end of the warmup, or of ``--hold`` if later); ``plan.decay_start_epoch()``.

Importing this module imports Keras: only training imports it, when it trains.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from .config import AUTO_EPOCHS, AUTO_EPOCHS_ON_CLUSTERS, TrainConfig
from .quiet import import_keras

keras = import_keras()
log = logging.getLogger(__name__)


@dataclass
class Plan:
    """How long training runs (see the module's docstring for each field)."""

    epochs: int | None
    budget_seconds: float | None = None
    soft_budget: bool = False
    decay_start: float = 0.0

    @property
    def horizon(self) -> int:
        return self.epochs or AUTO_EPOCHS[1]

    def decay_start_epoch(self) -> int:
        """The first epoch (from 0) of the decay, for the plan as it stands."""
        return math.floor(self.decay_start * self.horizon)

    def describe(self) -> str:
        budget = f"{self.budget_seconds / 60:g} minutes" if self.budget_seconds else None
        if self.epochs is None:
            return f"epochs chosen after the second to fill {budget} ({AUTO_EPOCHS[0]} to {AUTO_EPOCHS[1]})"
        return f"{self.epochs} epochs" + (f" or {budget}, whichever ends first" if budget else "")


def plan_training(config: TrainConfig, workers: int, chosen_before: int | None) -> Plan:
    """The plan of a run: --epochs, the epochs an interrupted run chose (``chosen_before``), or to be chosen."""
    decay_start = max(config.warmup, config.hold)
    hard = config.max_minutes * 60 if config.max_minutes else None
    if config.epochs is not None:
        return Plan(config.epochs, config.budget_minutes and config.budget_minutes * 60, decay_start=decay_start)
    if workers > 1:  # every worker must stop after the same epoch
        log.info(f"Several workers: {AUTO_EPOCHS_ON_CLUSTERS} epochs, not chosen by the clock (--epochs sets them)")
        return Plan(AUTO_EPOCHS_ON_CLUSTERS, hard, decay_start=decay_start)
    if chosen_before is not None:  # a resumed run: its choice decides, not a restarted clock
        return Plan(chosen_before, hard, decay_start=decay_start)
    return Plan(None, config.budget_minutes * 60, soft_budget=config.max_minutes is None, decay_start=decay_start)


class Schedule(keras.callbacks.Callback):
    """The one callback that keeps time (see the module's docstring).

    **Choosing the epochs** (only when the plan starts without them): after the second
    epoch this process runs (the first also builds the graphs), as many as fit in the
    budget at that epoch's speed, within ``AUTO_EPOCHS``. When even the fewest do not fit
    and the budget is the default one, the budget gives way: a large dataset trains its
    fewest epochs rather than stopping half-trained. Until the decay starts (before it,
    the rate does not depend on the number of epochs) it chooses again after every epoch
    at the median speed of the last three, never so few that the decay would have begun.
    Each choice is kept in the run's state (``remember``), so that a resumed run keeps it.

    **The learning rate**: a linear warmup to ``peak`` over the first ``warmup`` of
    training, held until ``plan.decay_start``, then a cosine decay to zero. Progress is the
    larger of the epochs done and the budget used, so a run cut short by its budget still
    ends at a small rate. Not Keras' ``CosineDecay``: it counts steps of a fixed total.

    **The budget**: training stops when the time used plus the slowest epoch so far (not
    the first, once there are others) would exceed it. Keras has no time-limit callback.
    """

    def __init__(self, plan: Plan, peak: float | None, warmup: float, remember=lambda epochs: None, clock=time.monotonic):
        super().__init__()
        self.plan, self.peak, self.warmup, self.remember, self.clock = plan, peak, warmup, remember, clock
        self.choosing = plan.epochs is None

    def on_train_begin(self, logs=None):
        self.started, self.lengths, self.epoch = self.clock(), [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.began, self.epoch = self.clock(), epoch  # counts from the first epoch of a resumed run, too

    def on_train_batch_begin(self, batch, logs=None):
        if self.peak is not None:  # None: the optimizer keeps its own rate (the benchmark's baselines)
            self.model.optimizer.learning_rate.assign(self.rate(batch))

    def rate(self, batch: int) -> float:
        plan = self.plan
        progress = (self.epoch + batch / (self.params.get("steps") or 1)) / plan.horizon
        if plan.budget_seconds:
            progress = max(progress, (self.clock() - self.started) / plan.budget_seconds)
        progress = min(progress, 1.0)
        if progress < self.warmup:
            return self.peak * progress / self.warmup
        if progress < plan.decay_start:
            return self.peak
        return self.peak * 0.5 * (1 + math.cos(math.pi * (progress - plan.decay_start) / (1 - plan.decay_start)))

    def on_epoch_end(self, epoch, logs=None):
        now, done, plan = self.clock(), epoch + 1, self.plan
        self.lengths.append(now - self.began)
        if self.over_budget(now):
            self.model.stop_training = True
        first_choice = plan.epochs is None and len(self.lengths) == 2
        revising = plan.epochs is not None and plan.budget_seconds and done < plan.decay_start * plan.epochs
        if self.choosing and (first_choice or revising):
            self.choose(done, now)
        if plan.epochs is not None and done >= plan.epochs:
            self.model.stop_training = True

    def over_budget(self, now: float) -> bool:
        slowest = max(self.lengths[1:] or self.lengths)
        undecided = self.plan.soft_budget and self.plan.epochs is None  # a soft budget waits for the choice
        return bool(self.plan.budget_seconds) and not undecided and now - self.started + slowest > self.plan.budget_seconds

    def choose(self, done: int, now: float) -> None:
        plan, (low, high) = self.plan, AUTO_EPOCHS
        first = plan.epochs is None
        seconds = float(np.median(self.lengths[1:][-3:]))  # not the first: it also built the graphs
        fitting = done + max(0, int((plan.budget_seconds - (now - self.started)) // seconds))
        decay_not_begun = 0 if first else math.ceil(done / plan.decay_start)
        epochs = max(low, min(high, fitting), decay_not_begun)
        if epochs == plan.epochs:
            return
        plan.epochs = epochs
        if first and low > fitting and plan.soft_budget:
            plan.budget_seconds = None
        self.remember(plan.epochs)
        now_or_not = "" if first else " now"
        log.info(f"Training for {plan.epochs} epochs{now_or_not}: {seconds:.1f} s an epoch ({plan.describe()})")


class EarlyStoppingAfterTheHold(keras.callbacks.EarlyStopping):
    """Keras' ``EarlyStopping`` on the validation loss, counting only the epochs of the decay.

    At the held peak rate the validation loss wanders, and the epochs that lower it most
    are the decaying ones, so stopping before them would end training at its worst point.
    Keras' ``start_from_epoch`` is fixed when the callback is made; here it follows the
    plan, whose epochs may be chosen during training.
    """

    def __init__(self, patience: int, plan: Plan):
        super().__init__(monitor="val_loss", mode="min", patience=patience)
        self.plan = plan

    def on_epoch_end(self, epoch, logs=None):
        self.start_from_epoch = self.plan.decay_start_epoch()
        super().on_epoch_end(epoch, logs)
