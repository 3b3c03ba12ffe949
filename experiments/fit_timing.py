"""Training-step time measured inside one ``model.fit`` call.

Timing a whole ``fit`` call also counts what happens around its steps. Here the end
of a ``fit`` call sometimes waited several seconds (totals came out as multiples of
about 10.2 s whatever the steps took), which made rates from ``fit`` totals swing by
up to 2x between identical runs. A training run is one ``fit`` call, so the steps are
what it pays: this times them from the start of the first timed step to the end of
the last, data fetching included.
"""

from __future__ import annotations

import time

import keras


class _StepClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.begins: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.begins.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def fit_seconds(model, data, steps: int, warmup: int = 0) -> float:
    """Seconds that ``steps`` training steps take, after ``warmup`` untimed ones in
    the same ``fit`` call (the first steps of a model trace its graph)."""
    clock = _StepClock()
    model.fit(
        data, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[clock]
    )
    return clock.ends[-1] - clock.begins[warmup]
