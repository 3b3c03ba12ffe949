"""The training run: plan, prepare data, fit, validate, checkpoint, bundle.

A run folder holds ``config.yaml`` (resolved), ``history.csv``, ``progress.png``,
``tensorboard/``, ``checkpoint/`` (weights, optimizer state, epoch) and, at its top, the
bundle (``model.keras`` + ``medseg.json``) of the best validation Dice so far
(``train.keep: last``: of the latest validated epoch; without validation cases: of the
last epoch). A run killed at any point continues with
``resume=True`` from its last completed epoch, drawing the same patches it would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import keras

from medseg.bundle import write_bundle
from medseg.config import Config
from medseg.datasets import load_dataset
from medseg.errors import ConfigError, InputFileError
from medseg.io import atomic_write_text, hold_folder
from medseg.losses import LOSSES, ArgmaxDice, deep_supervision_weights
from medseg.models import main_output
from medseg.preprocessing import (
    CTNormalization,
    Preprocessor,
    ZScoreNormalization,
    normalizer_from_dict,
)
from medseg.training import data as training_data
from medseg.training.augment import Augmenter
from medseg.training.planning import Plan, plan_training
from medseg.training.run_files import (
    append_history,
    check_resumable,
    checkpoint_epoch,
    checkpoint_folder,
    plot_progress,
    prepare_run,
    resume_run,
    save_checkpoint,
)
from medseg.training.validation import validate

logger = logging.getLogger(__name__)

#: the lock file a training run holds in its run folder while it lives
TRAIN_LOCK = ".medseg_train.lock"


@keras.saving.register_keras_serializable(package="medseg")
class PolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``lr * (1 - step / total_steps) ** exponent`` (nnU-Net's poly schedule)."""

    def __init__(self, initial_learning_rate, total_steps, exponent=0.9):
        self.initial_learning_rate = initial_learning_rate
        self.total_steps = total_steps
        self.exponent = exponent

    def __call__(self, step):
        progress = keras.ops.minimum(
            keras.ops.cast(step, "float32") / self.total_steps, 1.0
        )
        return self.initial_learning_rate * keras.ops.power(
            1.0 - progress, self.exponent
        )

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "exponent": self.exponent,
        }


@contextlib.contextmanager
def config_errors():
    """Reports a ``ValueError`` raised while setting a run up as a :class:`ConfigError`
    (a setting that does not work), leaving input-file errors as they are."""
    try:
        yield
    except (ConfigError, InputFileError):
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _normalizers(config: Config, fingerprint: dict, channels: int):
    schemes = config.data.normalization or ({"scheme": "zscore"},) * channels
    if len(schemes) != channels and config.train.init_from:
        # a pretrained model's scheme for channel 0, for each channel of the new data
        schemes = (schemes[0],) * channels
    if len(schemes) != channels:
        raise ConfigError(
            f"data.normalization lists {len(schemes)} scheme(s) for "
            f"{channels} channel(s)"
        )
    out = []
    for c, scheme in enumerate(schemes):
        if scheme.get("scheme") == "ct" and len(scheme) == 1:
            stats = fingerprint["foreground_intensity"][c]
            out.append(
                CTNormalization(
                    stats["percentile_0.5"],
                    stats["percentile_99.5"],
                    stats["mean"],
                    stats["std"],
                )
            )
        else:
            with config_errors():
                out.append(normalizer_from_dict(scheme))
    return tuple(out) or (ZScoreNormalization(),)


def _precision(config: Config) -> str:
    """The Keras policy ``train.precision`` asks for here: ``auto`` is mixed float16
    on a GPU and float32 on a CPU. On a CPU, float16 falls back to float32 (a bundle
    trained on a GPU, fine-tuned on a laptop) and bfloat16 without AVX-512 is warned
    of; both with a warning."""
    import tensorflow as tf

    from medseg.inference import SLOW_BFLOAT16, bfloat16_is_slow_here

    policy = config.train.precision
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if policy == "auto":
        return "mixed_float16" if gpu else "float32"
    if not gpu and policy == "mixed_float16":
        logger.warning(
            "train.precision mixed_float16 is for GPUs: on a CPU TensorFlow has no "
            "float16 kernel for 3D max pooling and float16 is no faster; training in "
            "float32"
        )
        return "float32"
    if policy == "mixed_bfloat16" and bfloat16_is_slow_here():
        logger.warning(
            "train.precision mixed_bfloat16: %s; auto or float32 trains faster here",
            SLOW_BFLOAT16,
        )
    return policy


def _strategy():
    """MultiWorkerMirrored when ``TF_CONFIG`` describes a cluster, Mirrored over
    several local GPUs, else the default. Created before any other TensorFlow op."""
    import os

    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _worker(strategy) -> tuple[int, int]:
    """``(index, count)`` of this worker; (0, 1) outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    index = resolver.task_id + (
        1 if resolver.task_type == "worker" and "chief" in spec else 0
    )
    return index, workers


class _Run:
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


class _EpochEnd(keras.callbacks.Callback):
    """Validation, history.csv, progress.png, bundle of the best model, checkpoint."""

    def __init__(self, run: _Run):
        super().__init__()
        self.run = run
        self.started = time.time()

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
        validated = run.val_cases and (
            number % run.config.train.val_interval == 0 or number == run.total_epochs
        )
        if validated:
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
            write_bundle(
                run.folder,
                main_output(self.model),
                {
                    **run.metadata,
                    "epoch": number,
                    "validation": metrics,
                },
            )
        save_checkpoint(run.folder, self.model, number, run.best, run.metadata)


def _optimizer(config: Config, total_steps: int):
    train = config.train
    rate = (
        PolyDecay(train.learning_rate, total_steps, train.poly_exponent)
        if train.lr_schedule == "poly"
        else train.learning_rate
    )
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(
            rate,
            momentum=train.momentum,
            nesterov=True,
            weight_decay=train.weight_decay or None,
        )
    return keras.optimizers.Adam(rate, weight_decay=train.weight_decay or None)


def _fit_multi_worker(
    model,
    metrics,
    stream,
    strategy,
    run: _Run,
    start_epoch: int,
    *,
    global_batch: int,
    verbose: int,
) -> None:
    """The training loop for several workers, written out with ``strategy.run``.

    Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (it tries to reduce
    the per-replica input batch; keras-team/keras#20585), so the step is spelled out:
    per-sample losses averaged over the global batch, gradients all-reduced by the
    optimizer, the same end-of-epoch work as ``fit``'s callback.
    """
    import tensorflow as tf

    loss_fn = model.loss
    optimizer = model.optimizer
    iterator = iter(strategy.experimental_distribute_dataset(stream))

    @tf.function
    def train_step():
        def step(images, labels):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                loss = tf.nn.compute_average_loss(
                    loss_fn.call(labels, logits), global_batch_size=global_batch
                )
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True)
            )
            for metric in metrics:
                metric.update_state(labels, logits)
            return loss

        per_replica = strategy.run(step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    callback = _EpochEnd(run)
    callback.set_model(model)
    steps = run.config.train.steps_per_epoch
    for epoch in range(start_epoch, run.total_epochs):
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
        callback.on_epoch_end(epoch, logs)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _checked_dataset(config: Config):
    """The dataset, its labels overridden by the config, checked like ``data check``."""
    from medseg.checks import check_dataset

    if not config.data.dataset:
        raise ConfigError("no dataset: give data.dataset in the config or --data")
    dataset = load_dataset(config.data.dataset, strict=False)  # all problems counted
    if config.data.labels is not None:
        dataset = replace(dataset, labels=config.data.labels)
    report = check_dataset(dataset)
    if not report.ok:
        first = report.problems[0]
        raise InputFileError(
            first.path or dataset.root,
            f"case {first.case_id}: {first.problem} "
            f"({len(report.problems)} problem(s); run 'medseg data check')",
        )
    return dataset, report.fingerprint


def _check_spatial_dims(config: Config, dataset, fingerprint: dict) -> None:
    """Refuses a dataset of 2D pictures for a 3D network, and fine-tuning a model on
    scans of other dimensions than those it was trained on (a 2D network on 3D
    volumes is trained on their slices)."""
    shape = fingerprint.get("shape", {}).get("median")
    if shape is None:
        return
    scans = f"{len(shape)}D scans (median {' x '.join(map(str, shape))})"
    wanted = config.model.spatial_dims
    pretrained = config.train.init_from
    if len(shape) < wanted:
        model = (
            f"the pretrained model {pretrained}" if pretrained else "the config's model"
        )
        raise InputFileError(
            dataset.root,
            f"{scans}, but {model} is {wanted}D (model.spatial_dims: {wanted})",
        )
    trained_on = len(config.data.target_spacing_mm or shape)
    if pretrained and trained_on != len(shape):
        raise InputFileError(
            dataset.root,
            f"{scans}, but the pretrained model {pretrained} was trained on "
            f"{trained_on}D scans",
        )


def _metadata(config, dataset, values, plan, preprocessor, fingerprint, split) -> dict:
    """What the bundle records besides the model."""
    labels = None
    if values is not None:
        labels = {
            str(k): {"value": v, "name": dataset.labels[v]}
            for k, v in enumerate(values)
        }
    return {
        "task": config.data.task,
        "labels": labels,
        "in_channels": config.model.in_channels,
        "channel_names": list(dataset.channel_names or ()),
        "spatial_dims": config.model.spatial_dims,
        "patch_size": list(plan.patch_size),
        "preprocessing": preprocessor.to_dict(),
        "plan": plan.to_dict(),
        "fingerprint": fingerprint,
        "config": config.to_dict(),
        "split": {
            "fold": config.train.fold,
            "folds": config.train.folds,
            "train": split[0],
            "validation": split[1],
        },
    }


def _compiled_model(config: Config, plan: Plan, *, frozen: bool = False):
    """Builds and compiles the network (inside the strategy's scope); with ``frozen``
    the layers matching ``train.freeze`` are not trained."""
    from medseg.models import build_model
    from medseg.models.transfer import freeze_layers

    kwargs = config.model.builder_kwargs()
    same = config.model.options.get("padding", "same") == "same"
    kwargs["patch_size"] = None if same else plan.patch_size
    model = build_model(config.model.name, **kwargs)
    if frozen:
        names = freeze_layers(model, config.train.freeze)
        if not names:
            raise ConfigError(
                f"train.freeze {list(config.train.freeze)} matches no layer "
                "(see the layer names with medseg info)"
            )
        logger.info("frozen: %d layers (%s)", len(names), ", ".join(names[:6]))
    return model, _compile(model, config)


def _compile(model, config: Config) -> list:
    """Compiles with a fresh optimizer; returns the metrics."""
    total_steps = config.train.epochs * config.train.steps_per_epoch
    weights = None
    if config.data.task == "reconstruction":
        loss, metrics = keras.losses.MeanSquaredError(), []
    elif config.data.task == "classification":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        loss = LOSSES[config.train.loss]()
        metrics = [ArgmaxDice(k) for k in range(1, config.model.num_classes)]
        outputs = len(model.outputs)
        if outputs > 1:  # deep supervision: a loss per output, the Dice of the first
            loss = [LOSSES[config.train.loss]() for _ in range(outputs)]
            weights = deep_supervision_weights(outputs)
            metrics = [metrics, *([] for _ in range(outputs - 1))]
    model.compile(
        optimizer=_optimizer(config, total_steps),
        loss=loss,
        loss_weights=weights,
        metrics=metrics,
    )
    return metrics[0] if weights else metrics


def _model_for_run(
    config: Config,
    plan: Plan,
    folder: Path,
    strategy,
    resume: bool,
    names: list[str] | None = None,
):
    """The compiled model of a run, frozen as the epoch it starts from needs, with the
    pretrained weights of a new fine-tuning run (its output classes matched to
    ``names``, the run's label names, by name) or the checkpoint of a resumed one.

    Returns:
        ``(model, metrics, origin, start_epoch, best)``; ``origin`` describes the
        pretrained bundle of a new run (else ``None``).
    """
    first_epoch = checkpoint_epoch(folder) if resume else 0
    with strategy.scope():
        with config_errors():
            model, metrics = _compiled_model(
                config, plan, frozen=_is_frozen(config, first_epoch)
            )
    origin = None if resume else _start_from(config, model, names)
    start_epoch, best = resume_run(folder, model) if resume else (0, None)
    return model, metrics, origin, start_epoch, best


def _is_frozen(config: Config, epoch: int) -> bool:
    """Whether the ``train.freeze`` layers are frozen when training from ``epoch``."""
    after = config.train.unfreeze_after
    return bool(config.train.freeze) and (after is None or epoch < after)


def _record_origin(metadata: dict, folder: Path, origin: dict | None) -> None:
    """Puts the pretrained bundle's record in the new bundle's metadata; on resume,
    keeps the one the run's first session wrote."""
    if origin is None and (folder / "medseg.json").is_file():
        from medseg.bundle import read_metadata

        origin = read_metadata(folder).get("finetuned_from")
    if origin is not None:
        metadata["finetuned_from"] = origin


def _start_from(config: Config, model, names: list[str] | None = None) -> dict | None:
    """Loads ``train.init_from``'s weights into a new run's model, a segmentation
    network's output classes by their label ``names``; what was done."""
    if not config.train.init_from:
        return None
    from medseg import bundle as bundles
    from medseg.models import load_model
    from medseg.models.transfer import adapt_weights

    metadata = bundles.verify(config.train.init_from)
    source = load_model(config.train.init_from)
    encoder_only = metadata.get("task") == "reconstruction"
    labels = metadata.get("labels") or {}
    classes = None
    if names is not None and metadata.get("task") == "segmentation" and labels:
        classes = ([labels[str(k)]["name"] for k in range(len(labels))], names)
    report = adapt_weights(
        source,
        model,
        prefixes=("enc", "bottleneck") if encoder_only else None,
        classes=classes,
    )
    if not report["copied"] and not report["adapted"]:
        raise ConfigError(
            f"no layer of {config.train.init_from} fits this network (different "
            "architecture?)"
        )
    logger.info(
        "weights from %s: %d layers copied, %d adapted, %d initialised afresh (%s)",
        config.train.init_from,
        len(report["copied"]),
        len(report["adapted"]),
        len(report["initialised"]),
        ", ".join(report["initialised"]) or "none",
    )
    return {
        "bundle": str(config.train.init_from),
        "model_sha256": metadata.get("model_sha256"),
        "task": metadata.get("task"),
        "labels": metadata.get("labels"),
        "preprocessing": metadata.get("preprocessing"),
        "validation": metadata.get("validation"),
        "weights": report,
    }


def train(
    config: Config, folder: str | Path, *, resume: bool = False, verbose: int = 1
) -> Path:
    """Trains a segmentation model (or, with ``data.task: reconstruction``, an
    autoencoder) and leaves a bundle in ``folder``.

    Args:
        config: the run's config (``data.dataset`` must name the dataset).
        folder: the run folder (created).
        resume: continue the run in ``folder`` from its last checkpoint; the saved
            config is used, with ``train.epochs`` taken from ``config``.
        verbose: Keras progress output (1 bar, 2 one line per epoch, 0 silent).

    Returns:
        The run folder, which is a bundle.

    Raises:
        InputFileError: bad dataset, broken cases, or a run folder in the wrong state.
    """
    strategy = _strategy()  # before any other TensorFlow op
    worker, workers = _worker(strategy)
    if workers > 1:
        logger.info(
            "MultiWorkerMirroredStrategy: worker %d of %d workers", worker, workers
        )
    folder = Path(folder)
    if worker:  # only the chief writes the run; the others keep their own scratch copy
        folder = folder / f".worker-{worker}"
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    # one run in a run folder at a time: a job started again by its scheduler while
    # the first still runs would write the same checkpoints
    held = hold_folder(
        folder,
        TRAIN_LOCK,
        what="medseg train run",
        advice="wait for it to end, or train into another --output",
    )
    written = folder / "config.yaml"
    if (resume and checkpoint_folder(folder) is not None) or written.exists():
        written = None  # not this run's to remove
    try:
        return _train_in(config, folder, strategy, worker, workers, resume, verbose)
    except BaseException:
        held.release()
        # refused before training started (a freeze pattern that matches no layer,
        # say): leave neither an empty run folder nor one holding only its config
        if written is not None and folder.is_dir():
            if [p.name for p in folder.iterdir()] == [written.name]:
                written.unlink()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    finally:
        held.release()


def _train_in(config, folder, strategy, worker, workers, resume, verbose) -> Path:
    """:func:`train` in its run folder, which exists."""
    config = prepare_run(folder, config, resume=resume)
    resume = resume and checkpoint_folder(folder) is not None  # else a new run
    done = checkpoint_epoch(folder) if resume else 0
    if done >= config.train.epochs and (folder / "medseg.json").is_file():
        logger.info(
            "%s: trained to epoch %d of %d already, nothing to resume",
            folder,
            done,
            config.train.epochs,
        )
        return folder
    if config.data.task == "classification":
        return _train_classification(
            config, folder, strategy, worker, workers, resume=resume, verbose=verbose
        )
    dataset, fingerprint = _checked_dataset(config)
    _check_spatial_dims(config, dataset, fingerprint)
    segmentation = config.data.task == "segmentation"
    values = training_data.class_values(dataset) if segmentation else None
    channels = int(next(iter(fingerprint["num_channels"])))
    config = config.replace(
        model=replace(
            config.model,
            num_classes=len(values) if segmentation else None,
            in_channels=channels,
        )
    )
    levels = int(config.model.options.get("deep_supervision") or 0)
    if levels and (not segmentation or workers > 1):
        raise ConfigError(
            "model.deep_supervision trains segmentation on one machine only"
        )
    if levels and config.model.options.get("padding", "same") != "same":
        raise ConfigError("model.deep_supervision needs padding: same")
    keras.mixed_precision.set_global_policy(_precision(config))
    with config_errors():  # e.g. a patch size the network cannot take
        plan = plan_training(config, fingerprint)
    logger.info(plan.describe())
    preprocessor = Preprocessor(
        _normalizers(config, fingerprint, channels),
        plan.target_spacing_mm,
        config.data.crop_nonzero,
        config.data.nonfinite,
    )
    if not resume:
        import yaml

        atomic_write_text(
            folder / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
    split = training_data.kfold_split(
        [c.case_id for c in dataset.cases], config.train.folds, config.train.fold
    )
    if split[1] and config.train.keep == "best":
        logger.info(
            "the bundle will be the epoch with the best validation score on the %d "
            "held-out cases of fold %s; to score those cases without that choice "
            "(cross-validation), set train.keep: last",
            len(split[1]),
            config.train.fold,
        )
    metadata = _metadata(
        config, dataset, values, plan, preprocessor, fingerprint, split
    )
    if resume:  # before the cases are prepared: a changed dataset is refused first
        check_resumable(folder, metadata)
    cache = Path(config.data.cache_dir) if config.data.cache_dir else None
    by_id = {c.case_id: c for c in dataset.cases}
    prepared = {
        i: training_data.prepare_case(by_id[i], preprocessor, values, cache)
        for i in split[0] + split[1]
    }
    if workers > 1 and config.train.unfreeze_after:
        raise ConfigError("train.unfreeze_after is not available with several workers")
    model, metrics, origin, start_epoch, best = _model_for_run(
        config,
        plan,
        folder,
        strategy,
        resume,
        [dataset.labels[v] for v in values] if segmentation else None,
    )
    if start_epoch >= config.train.epochs:
        return folder
    sampler = training_data.PatchSampler(
        [prepared[i] for i in split[0]],
        plan.patch_size,
        foreground_oversample=config.data.foreground_oversample,
        seed=config.train.seed + 1000 * worker,  # each worker draws its own patches
        samples_per_epoch=config.train.steps_per_epoch * plan.batch_size * workers,
        slice_axis=plan.slice_axis,
    )
    augmenter = Augmenter(config.train.augment, config.model.spatial_dims)

    def stream(first_epoch):
        return training_data.make_dataset(
            sampler,
            augmenter,
            plan.batch_size * workers,
            first_epoch,
            shard=workers == 1,
            target="image" if not segmentation else "label",
            deep_supervision=levels,
        )

    _record_origin(metadata, folder, origin)
    run = _Run(
        folder,
        config,
        plan,
        preprocessor,
        [prepared[i] for i in split[1]],
        metadata,
        config.train.epochs,
        best,
    )
    _fit(
        model,
        metrics,
        stream,
        strategy,
        run,
        start_epoch,
        global_batch=plan.batch_size * workers,
        workers=workers,
        verbose=verbose,
    )
    return folder


def _fit(
    model,
    metrics,
    stream,
    strategy,
    run: _Run,
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
        _fit_multi_worker(
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
    callbacks = [_EpochEnd(run)]
    if _has_tensorboard():
        callbacks.append(
            keras.callbacks.TensorBoard(run.folder / "tensorboard", write_graph=False)
        )
    else:
        logger.info(
            "tensorboard is not installed: no TensorBoard logs "
            "(pip install 'medseg[tensorboard]')"
        )
    train = run.config.train
    phases = [(start_epoch, run.total_epochs)]
    if _is_frozen(run.config, start_epoch) and train.unfreeze_after is not None:
        if train.unfreeze_after < run.total_epochs:
            phases = [(start_epoch, train.unfreeze_after)]
            phases.append((train.unfreeze_after, run.total_epochs))
    for number, (first, last) in enumerate(phases):
        if number:
            with strategy.scope():
                for layer in model.layers:
                    layer.trainable = True
                _compile(model, run.config)
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


def _train_classification(
    config: Config,
    folder: Path,
    strategy,
    worker: int,
    workers: int,
    *,
    resume: bool,
    verbose: int,
) -> Path:
    """Classification on a MedMNIST-style ``.npz``: train on train, select on val."""
    import yaml

    from medseg.training import classification

    if not config.data.dataset:
        raise ConfigError("no dataset: give data.dataset in the config or --data")
    config, preprocessor, arrays, dataset = classification.load_arrays(config)
    keras.mixed_precision.set_global_policy(_precision(config))
    images, labels = arrays["train"]
    spatial = tuple(images.shape[1:-1])
    batch = config.train.batch_size or classification.DEFAULT_BATCH
    plan = Plan(
        (),
        spatial,
        spatial,
        batch,
        float(config.train.memory_gb or 0),
        0.0,
        config.model.num_classes,
        config.model.in_channels,
    )
    if not resume:
        atomic_write_text(
            folder / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
    model, metrics, origin, start_epoch, best = _model_for_run(
        config, plan, folder, strategy, resume
    )
    if start_epoch >= config.train.epochs:
        return folder
    augmenter = Augmenter(config.train.augment, config.model.spatial_dims)

    def stream(first_epoch):
        return classification.make_stream(
            images,
            labels,
            augmenter,
            batch * workers,
            config.train.seed + 1000 * worker,
            first_epoch,
            config.train.steps_per_epoch,
        )

    metadata = {
        "task": "classification",
        "labels": {
            str(k): {"value": k, "name": str(k)}
            for k in range(config.model.num_classes)
        },
        "in_channels": config.model.in_channels,
        "spatial_dims": config.model.spatial_dims,
        "patch_size": list(spatial),
        "preprocessing": preprocessor.to_dict(),
        "plan": plan.to_dict(),
        "config": config.to_dict(),
        "dataset": {
            "path": str(dataset.path),
            "splits": {k: int(len(v[0])) for k, v in dataset.splits.items()},
        },
    }
    if resume:
        check_resumable(folder, metadata)
    _record_origin(metadata, folder, origin)
    run = _Run(
        folder,
        config,
        plan,
        preprocessor,
        arrays["val"] or (),
        metadata,
        config.train.epochs,
        best,
    )
    _fit(
        model,
        metrics,
        stream,
        strategy,
        run,
        start_epoch,
        global_batch=batch * workers,
        workers=workers,
        verbose=verbose,
    )
    return folder
