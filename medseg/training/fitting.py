"""The fit loop: epochs, validation, checkpoints and the history, on one worker or
several."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import keras

from medseg.bundle import write_bundle
from medseg.config import Config
from medseg.errors import ConfigError
from medseg.losses import deep_supervision_weights
from medseg.models import main_output
from medseg.training.budget import BudgetCallback, BudgetProgbar, TimeBudget
from medseg.training.network import compile_model, is_frozen
from medseg.training.planning import Plan
from medseg.training.run_files import (
    append_history,
    plot_progress,
    save_checkpoint,
)
from medseg.training.runtime import has_tensorboard
from medseg.training.validation import validate

logger = logging.getLogger(__name__)


class Run:
    """State shared by the callbacks of one run."""

    def __init__(
        self,
        folder: Path,
        config: Config,
        plan: Plan,
        preprocessor,
        val_cases,
        metadata: dict,
        total_epochs: int,
        best: float | None,
        budget: TimeBudget | None = None,
    ):
        self.folder = folder
        self.config = config
        self.plan = plan
        self.preprocessor = preprocessor
        self.val_cases = val_cases
        self.metadata = metadata
        self.total_epochs = total_epochs
        self.best = best
        self.task = config.data.task
        self.budget = budget or TimeBudget(None)

    @property
    def score_key(self) -> str:
        """The validation number that picks the best model."""
        return {"segmentation": "val_dice_mean", "classification": "val_auc"}.get(
            self.task, "val_mse"
        )

    def improves(self, score) -> bool:
        if score is None or math.isnan(score):
            return False
        if self.best is None:
            return True
        if self.task == "reconstruction":
            return score < self.best
        return score > self.best


@contextlib.contextmanager
def averaged_weights(model):
    """The model with the moving average of its weights in place (``train.ema``),
    its trained weights back afterwards; the model as it is without an average."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "use_ema", False):
        yield model
        return
    trained = [keras.ops.copy(v.value) for v in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)
    try:
        yield model
    finally:
        for variable, value in zip(model.trainable_variables, trained, strict=True):
            variable.assign(value)


class EpochEnd(keras.callbacks.Callback):
    """Validation, history.csv, progress.png, bundle of the best model, checkpoint."""

    def __init__(self, run: Run, *, stop_on_budget: bool = True):
        super().__init__()
        self.run = run
        self.started = time.time()
        # several workers decide together when to stop (fit_multi_worker)
        self.stop_on_budget = stop_on_budget

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        run = self.run
        # a deep-supervised model's metrics are its first output's: logits_dice_1 is
        # dice_1 (the losses of the outputs keep their names, logits_ds1_loss, ...)
        logs = {
            k.removeprefix("logits_") if k.startswith("logits_dice_") else k: v
            for k, v in (logs or {}).items()
        }
        number = epoch + 1
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            # nothing of this epoch is kept: the bundle and checkpoint stay those of
            # the last epoch whose weights were numbers
            raise ConfigError(
                f"the training loss became {loss} in epoch {number} (learning rate "
                f"{run.config.train.learning_rate} too high for this network and "
                "data?); nothing of this epoch is kept"
            )
        # the last epoch: the run's last, or the one the time budget ended
        last = number == run.total_epochs or bool(self.model.stop_training)
        validated = run.val_cases and (
            number % run.config.train.val_interval == 0 or last
        )
        if validated:
            with averaged_weights(self.model):
                logs.update(validate(self.model, run))
            logger.info(
                "epoch %d validation: %s",
                number,
                {k: round(v, 4) for k, v in logs.items() if k.startswith("val_")},
            )
        logs["lr"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        logs["seconds"] = round(time.time() - self.started, 3)
        spent = run.budget.elapsed()
        logs["elapsed"] = round(spent, 1)
        if self.stop_on_budget and run.budget.seconds is not None:
            # validation may have spent the rest: no epoch begins after the budget
            self.model.stop_training |= spent >= run.budget.seconds
        append_history(run.folder / "history.csv", number, logs)
        plot_progress(run.folder)
        score = logs.get(run.score_key)
        improved = bool(validated) and run.improves(score)
        if improved:
            run.best = score
        keep_last = run.config.train.keep == "last"
        if (
            (improved and not keep_last)
            or (validated and keep_last)
            or not run.val_cases
        ):
            metrics = {k: v for k, v in logs.items() if k.startswith("val_")}
            with averaged_weights(self.model):
                write_bundle(
                    run.folder,
                    main_output(self.model),
                    {
                        **run.metadata,
                        "epoch": number,
                        "trained_seconds": logs["elapsed"],
                        "validation": metrics,
                    },
                )
        save_checkpoint(
            run.folder,
            self.model,
            number,
            run.best,
            run.metadata,
            seconds=spent,
        )


def fit_multi_worker(
    model,
    metrics,
    stream,
    strategy,
    run: Run,
    start_epoch: int,
    *,
    global_batch: int,
    verbose: int,
) -> None:
    """The training loop for several workers, written out with ``strategy.run``.

    Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (it tries to reduce
    the per-replica input batch; keras-team/keras#20585), so the step is spelled out:
    per-sample losses averaged over the global batch, gradients all-reduced by the
    optimizer, the same end-of-epoch work as ``fit``'s callback. With a time budget,
    the workers agree on the time spent (the largest of their clocks) at each
    epoch's start and end: the learning rate moves once an epoch, and every worker
    stops after the same epoch.
    """
    import tensorflow as tf

    # a deep-supervised network: a loss per output, weighted as compile weighs them,
    # the metrics on the first (full-resolution) output
    losses = model.loss if isinstance(model.loss, list | tuple) else [model.loss]
    weights = deep_supervision_weights(len(losses)) if len(losses) > 1 else [1.0]
    optimizer = model.optimizer
    iterator = iter(strategy.experimental_distribute_dataset(stream))

    def first(outputs):
        return outputs[0] if len(losses) > 1 else outputs

    @tf.function
    def train_step():
        def step(images, labels):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                pairs = (
                    zip(labels, logits, strict=True)
                    if len(losses) > 1
                    else [(labels, logits)]
                )
                per_sample = sum(
                    w * fn.call(y, out)
                    for w, fn, (y, out) in zip(weights, losses, pairs, strict=True)
                )
                loss = tf.nn.compute_average_loss(
                    per_sample, global_batch_size=global_batch
                )
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True)
            )
            for metric in metrics:
                metric.update_state(first(labels), first(logits))
            return loss

        per_replica = strategy.run(step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def spent_everywhere() -> float:
        # all-reduce has no maximum: gather every replica's clock instead
        per_worker = strategy.run(lambda: tf.constant([run.budget.elapsed()]))
        return float(tf.reduce_max(strategy.gather(per_worker, axis=0)))

    budget = run.budget
    callback = EpochEnd(run, stop_on_budget=False)
    logging_callbacks = tensorboard_callbacks(run)
    for each in [callback, *logging_callbacks]:
        each.set_model(model)
    for each in logging_callbacks:
        each.on_train_begin()
    model.stop_training = False
    steps = run.config.train.steps_per_epoch
    for epoch in range(start_epoch, run.total_epochs):
        if budget.seconds is not None:
            spent = spent_everywhere()
            if spent >= budget.seconds:  # the last epoch's validation spent the rest
                break
            budget.progress.assign(spent / budget.seconds)
        callback.on_epoch_begin(epoch)
        for metric in metrics:
            metric.reset_state()
        bar = keras.utils.Progbar(steps, verbose=verbose)
        total = 0.0
        for index in range(steps):
            loss = float(train_step())
            total += loss
            bar.update(index + 1, [("loss", loss)])
        logs = {"loss": total / steps}
        logs.update({m.name: float(m.result()) for m in metrics})
        if budget.seconds is not None:
            model.stop_training = spent_everywhere() >= budget.seconds
        callback.on_epoch_end(epoch, logs)
        for each in logging_callbacks:
            each.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    for each in logging_callbacks:
        each.on_train_end()


def tensorboard_callbacks(run: Run) -> list:
    """TensorBoard logging into the run folder, where TensorBoard is installed."""
    if has_tensorboard():
        return [
            keras.callbacks.TensorBoard(run.folder / "tensorboard", write_graph=False)
        ]
    logger.info(
        "tensorboard is not installed: no TensorBoard logs "
        "(pip install 'medseg[tensorboard]')"
    )
    return []


def fit_run(
    model,
    metrics,
    stream,
    strategy,
    run: Run,
    start_epoch: int,
    *,
    global_batch: int,
    workers: int,
    verbose: int,
) -> None:
    """Keras ``fit`` on one machine; the explicit loop across several workers.

    ``stream(epoch)`` gives the training batches from that epoch on. With
    ``train.unfreeze_after`` the frozen layers are unfrozen at that epoch: the model is
    recompiled with a fresh optimizer whose step count (and so its learning-rate
    schedule) continues where the first one stopped.
    """
    if workers > 1:
        fit_multi_worker(
            model,
            metrics,
            stream(start_epoch),
            strategy,
            run,
            start_epoch,
            global_batch=global_batch,
            verbose=verbose,
        )
        return
    callbacks = [EpochEnd(run)]
    if run.budget.seconds is not None:
        callbacks += [BudgetCallback(run.budget), BudgetProgbar(run.budget)]
    callbacks += tensorboard_callbacks(run)
    train = run.config.train
    phases = [(start_epoch, run.total_epochs)]
    if is_frozen(run.config, start_epoch) and train.unfreeze_after is not None:
        if train.unfreeze_after < run.total_epochs:
            phases = [(start_epoch, train.unfreeze_after)]
            phases.append((train.unfreeze_after, run.total_epochs))
    for number, (first, last) in enumerate(phases):
        if run.budget.exhausted():
            break
        if number:
            with strategy.scope():
                for layer in model.layers:
                    layer.trainable = True
                compile_model(model, run.config, run.budget.progress)
                model.optimizer.build(model.trainable_variables)
                model.optimizer.iterations.assign(first * train.steps_per_epoch)
            logger.info("epoch %d: every layer trainable from here on", first)
        model.fit(
            stream(first),
            epochs=last,
            initial_epoch=first,
            steps_per_epoch=train.steps_per_epoch,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )  # the stream is already random
