"""The wall-clock time budget of a training run."""

from __future__ import annotations

import json
import os
import subprocess

import keras
import numpy as np
import pytest
import yaml

from medseg.config import Config, format_duration, parse_duration
from medseg.training.budget import BudgetCallback, BudgetPolyDecay, TimeBudget
from tests.conftest import tiny_classification
from tests.training.test_training import TINY_TRAIN, _history, _train_command


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400)],
)
def test_durations_read_as_seconds(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(seconds) == seconds


@pytest.mark.parametrize("bad", ["0", "-5m", "nan", "inf", "", "soon", "5 min", True])
def test_a_duration_that_is_no_positive_time_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="train.time_budget must be a"):
        parse_duration(bad, "train.time_budget")
    with pytest.raises(ValueError, match="train.time_budget must be a"):
        Config.from_dict({"model": {"name": "unet"}, "train": {"time_budget": bad}})


def test_durations_are_written_for_people():
    assert [format_duration(s) for s in (7500, 750, 40, -3)] == [
        "2h 05m",
        "12m 30s",
        "40s",
        "0s",
    ]
    config = Config.from_dict(
        {"model": {"name": "unet"}, "train": {"time_budget": "2h"}}
    )
    assert config.to_dict()["train"]["time_budget"] == 7200.0


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_budget_counts_time_spent_before_a_resume():
    clock = _Clock()
    budget = TimeBudget(60.0, spent=45.0, clock=clock)
    assert budget.elapsed() == 45.0 and budget.fraction() == 0.75
    clock.now += 10
    assert budget.left() == 5.0 and not budget.exhausted()
    assert budget.describe() == "5s of 1m 00s left"
    clock.now += 5
    assert budget.exhausted() and budget.fraction() == 1.0
    clock.now += 50
    assert budget.fraction() == 1.0 and budget.left() == 0.0
    unbounded = TimeBudget(None, clock=clock)
    assert unbounded.fraction() == 0.0 and not unbounded.exhausted()


def test_a_fit_stops_when_the_budget_is_spent_and_its_rate_decays_over_it():
    """One fake second per step, a budget of 5 s: the fit stops after its 5th step,
    in the middle of its second epoch, and each step's learning rate is
    lr * (1 - seconds spent / 5) ** 0.9."""
    clock = _Clock()
    budget = TimeBudget(5.0, clock=clock)
    rates, steps = [], []

    class Tick(keras.callbacks.Callback):  # before the budget's callback
        def on_train_batch_end(self, batch, logs=None):
            clock.now += 1.0
            steps.append(batch)

    class Rates(keras.callbacks.Callback):  # after it
        def on_train_batch_begin(self, batch, logs=None):
            rates.append(float(self.model.optimizer.learning_rate))

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras.optimizers.SGD(BudgetPolyDecay(0.1, 0.9, budget.progress)),
        loss="mse",
    )
    x = np.ones((6, 3), "float32")
    history = model.fit(
        x,
        np.ones((6, 1), "float32"),
        batch_size=2,
        epochs=1000,
        callbacks=[Tick(), BudgetCallback(budget), Rates()],
        verbose=0,
    )
    assert len(steps) == 5 and len(history.history["loss"]) == 2
    expected = [0.1 * (1 - spent / 5) ** 0.9 for spent in range(5)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def _budget_run(tmp_path, *extra):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TRAIN.format(epochs=2, steps=3))
    # the run's own CPU time: on a busy machine (CI beside other jobs) a wall-clock
    # budget of 12 s can end inside the first epoch
    return subprocess.run(
        _train_command(config, tmp_path / "run", *extra),
        capture_output=True,
        text=True,
        env={**os.environ, "MEDSEG_BUDGET_CLOCK": "cpu"},
    )


@pytest.mark.slow
def test_a_budgeted_run_stops_at_its_budget_and_a_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    result = _budget_run(tmp_path, "--time-budget", "12s")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _history(run / "history.csv")
    # the budget, not the config's 2 epochs, ended the run
    assert len(rows) > 2
    elapsed = [float(r["elapsed"]) for r in rows]
    # the budget ended the run, in the first epoch that reached it
    assert elapsed == sorted(elapsed) and elapsed[-2] <= 12.0 <= elapsed[-1]
    assert float(rows[-1]["lr"]) < 0.05 * 0.001  # decayed to about nothing
    # an epoch's last step ran after the previous epoch ended and before its own
    # end: the rate it logs lies between the poly decay at those two times, however
    # fast this machine is (the elapsed times are rounded to 0.1 s)
    for i, row in enumerate(rows):
        before = elapsed[i - 1] / 12.0 - 0.01 if i else 0.0
        after = min(1.0, elapsed[i] / 12.0 + 0.01)
        assert (
            0.001 * (1 - after) ** 0.9
            <= float(row["lr"])
            <= 0.001 * (1 - max(0.0, before)) ** 0.9 + 1e-9
        )
    assert yaml.safe_load((run / "config.yaml").read_text())["train"][
        "time_budget"
    ] == pytest.approx(12.0)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == len(rows) and state["seconds"] >= 12.0
    metadata = json.loads((run / "medseg.json").read_text())
    assert metadata["config"]["train"]["time_budget"] == pytest.approx(12.0)
    assert 0 < metadata["trained_seconds"] <= elapsed[-1]

    again = _budget_run(tmp_path, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "time budget of 12s is spent, nothing to resume" in again.stderr
    assert _history(run / "history.csv") == rows

    longer = _budget_run(tmp_path, "--resume", "--time-budget", "30s")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resuming with a time budget of 30s instead of 12s" in longer.stderr
    more = _history(run / "history.csv")
    assert more[: len(rows)] == rows and len(more) > len(rows)
    resumed = [float(r["elapsed"]) for r in more[len(rows) :]]
    # the clock went on from the checkpoint's seconds, not from zero
    assert resumed[0] > state["seconds"]
    assert resumed[-2] <= 30.0 <= resumed[-1]


@pytest.mark.slow
def test_a_classifier_trains_to_its_time_budget(tmp_path, rng):
    npz, config = tiny_classification(tmp_path, rng, ", time_budget: 8s")
    command = _train_command(config, tmp_path / "run")
    command[command.index("--data") + 1] = str(npz)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _history(tmp_path / "run" / "history.csv")
    assert len(rows) > 1 and float(rows[-1]["elapsed"]) >= 8.0
    assert "val_auc" in rows[-1] and rows[-1]["val_auc"] != ""


def test_the_budget_clock_is_wall_time_or_cpu_time_per_core(monkeypatch):
    import time

    from medseg.errors import ConfigError
    from medseg.training.budget import budget_clock, cpu_seconds_per_core

    monkeypatch.delenv("MEDSEG_BUDGET_CLOCK", raising=False)
    assert budget_clock() is time.monotonic
    monkeypatch.setenv("MEDSEG_BUDGET_CLOCK", "cpu")
    assert budget_clock() is cpu_seconds_per_core
    monkeypatch.setattr(time, "process_time", lambda: 10.0)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_seconds_per_core() == 2.5  # 10 CPU seconds over 4 cores
    monkeypatch.setenv("MEDSEG_BUDGET_CLOCK", "sundial")
    with pytest.raises(ConfigError, match="MEDSEG_BUDGET_CLOCK='sundial'"):
        budget_clock()


def test_the_averaged_weights_are_in_place_inside_and_the_trained_ones_after():
    """``train.ema``: the moving average a_1 = w_1, a_k = m a_(k-1) + (1 - m) w_k of
    the weights after each step, in the model only inside ``averaged_weights``."""
    from medseg.training.fitting import averaged_weights

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.6), loss="mse"
    )
    seen, at_epoch_end = [], {}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([np.array(w) for w in self.model.get_weights()])

        def on_epoch_end(self, epoch, logs=None):  # where validation happens
            with averaged_weights(self.model):
                at_epoch_end["inside"] = self.model.get_weights()
            at_epoch_end["after"] = self.model.get_weights()

    rng = np.random.default_rng(0)
    x, y = rng.random((8, 3), "float32"), rng.random((8, 2), "float32")
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[Record()], verbose=0,
              shuffle=False)  # fmt: skip
    average = seen[0]
    for weights in seen[1:]:
        average = [0.6 * a + 0.4 * w for a, w in zip(average, weights, strict=True)]
    inside, trained = at_epoch_end["inside"], seen[-1]
    for got, want in zip(inside, average, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(at_epoch_end["after"], trained, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.allclose(inside[0], trained[0])
