"""A run's wall-clock time budget: the clock, the learning rate that decays over it,
and the callback that stops the run when it is spent.

The budget counts the run's whole wall-clock time (preparing cases, steps,
validation, checkpoints); a resumed run starts its clock at the seconds its
checkpoint recorded, so a run killed and resumed ends when the same budget is spent.
"""

from __future__ import annotations

import logging
import time

import keras

from medseg.config import format_duration
from medseg.errors import ConfigError

logger = logging.getLogger(__name__)


#: the epochs ``fit`` is given under a time budget, which ends the run first
UNBOUNDED_EPOCHS = 1_000_000


def epochs_to_run(config) -> int:
    """The epochs a run's ``fit`` spans: ``train.epochs``, or without limit under a
    time budget."""
    return UNBOUNDED_EPOCHS if config.train.time_budget else config.train.epochs


#: ``MEDSEG_BUDGET_CLOCK=cpu`` counts a budget in the run's own CPU time per core
#: instead of wall-clock time, so that runs compared at one budget on a shared
#: machine get the same compute however busy it is (recipe studies)
BUDGET_CLOCK_VARIABLE = "MEDSEG_BUDGET_CLOCK"


def cpu_seconds_per_core() -> float:
    """This process's CPU time divided by the cores it may use: the seconds an idle
    machine would have taken for the same work."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return time.process_time() / (cores or os.cpu_count() or 1)


def budget_clock():
    """The clock budgets count with: ``time.monotonic``, or with
    ``MEDSEG_BUDGET_CLOCK=cpu`` :func:`cpu_seconds_per_core`.

    Raises:
        ConfigError: another value of the variable.
    """
    import os

    name = os.environ.get(BUDGET_CLOCK_VARIABLE, "wall")
    clocks = {"wall": time.monotonic, "cpu": cpu_seconds_per_core}
    if name not in clocks:
        raise ConfigError(
            f"{BUDGET_CLOCK_VARIABLE}={name!r}: expected one of {sorted(clocks)}"
        )
    return clocks[name]


class TimeBudget:
    """The seconds a run has spent, of its budget (``None``: no budget).

    Args:
        seconds: the budget.
        spent: seconds spent before this process (from the checkpoint).
        clock: the time source (:func:`budget_clock`; tests pass their own).
    """

    def __init__(self, seconds: float | None, spent: float = 0.0, clock=None):
        self.seconds = seconds
        self.spent_before = float(spent)
        clock = clock or budget_clock()
        self._clock = clock
        self._started = clock()
        self.progress = keras.Variable(
            self.fraction(), dtype="float32", trainable=False, name="budget_progress"
        )

    def elapsed(self) -> float:
        return self.spent_before + self._clock() - self._started

    def fraction(self) -> float:
        """The part of the budget spent, 0 to 1 (0 without a budget)."""
        if self.seconds is None:
            return 0.0
        return min(1.0, self.elapsed() / self.seconds)

    def left(self) -> float | None:
        if self.seconds is None:
            return None
        return max(0.0, self.seconds - self.elapsed())

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def describe(self) -> str:
        """``12m 30s of 45m 00s left``."""
        return f"{format_duration(self.left())} of {format_duration(self.seconds)} left"

    def update_progress(self) -> None:
        self.progress.assign(self.fraction())


@keras.saving.register_keras_serializable(package="medseg")
class BudgetPolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``lr * (1 - f) ** exponent``, ``f`` the fraction of the time budget spent:
    nnU-Net's poly schedule over wall-clock time instead of steps, so that a run
    reaches its smallest learning rate when its budget ends however fast its steps
    are. ``progress`` is the variable :class:`BudgetCallback` sets before each step."""

    def __init__(self, initial_learning_rate, exponent=0.9, progress=None):
        self.initial_learning_rate = initial_learning_rate
        self.exponent = exponent
        self.progress = (
            progress
            if progress is not None
            else keras.Variable(0.0, dtype="float32", trainable=False)
        )

    def __call__(self, step):
        del step  # the schedule follows the clock
        progress = keras.ops.clip(keras.ops.cast(self.progress, "float32"), 0.0, 1.0)
        return self.initial_learning_rate * keras.ops.power(
            1.0 - progress, self.exponent
        )

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "exponent": self.exponent,
        }


class BudgetCallback(keras.callbacks.Callback):
    """Sets the budget's progress before each step and stops the run once the
    budget is spent (the epoch under way ends there, and is validated and saved)."""

    def __init__(self, budget: TimeBudget):
        super().__init__()
        self.budget = budget

    def on_train_begin(self, logs=None):
        logger.info("time budget: %s", self.budget.describe())

    def on_train_batch_begin(self, batch, logs=None):
        self.budget.update_progress()

    def on_train_batch_end(self, batch, logs=None):
        if self.budget.exhausted():
            self.model.stop_training = True


class BudgetProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, headed by the epoch and the time left instead of
    "Epoch 3/100000" (with a budget the number of epochs is not known)."""

    def __init__(self, budget: TimeBudget):
        super().__init__()
        self.budget = budget

    def on_epoch_begin(self, epoch, logs=None):
        self._reset_progbar()
        self._maybe_init_progbar()
        if self.verbose:
            print(f"Epoch {epoch + 1} ({self.budget.describe()})", flush=True)
