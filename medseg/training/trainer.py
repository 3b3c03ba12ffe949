"""The training run: plan, prepare data, fit, validate, checkpoint, bundle.

A run folder holds ``config.yaml`` (resolved), ``history.csv``, ``progress.png``,
``tensorboard/``, ``checkpoint/`` (weights, optimizer state, epoch) and, at its top, the
bundle (``model.keras`` + ``medseg.json``) of the best validation Dice so far
(``train.keep: last``: of the latest validated epoch; without validation cases: of the
last epoch). A run killed at any point continues with
``resume=True`` from its last completed epoch, drawing the same patches it would have.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import keras

from medseg.config import Config, format_duration
from medseg.datasets.layouts import load_dataset
from medseg.errors import ConfigError, InputFileError
from medseg.io.files import atomic_write_text, hold_folder
from medseg.preprocessing.intensity import (
    CTNormalization,
    ZScoreNormalization,
    normalizer_from_dict,
)
from medseg.preprocessing.preprocessor import Preprocessor
from medseg.training import data as training_data
from medseg.training.augment import Augmenter
from medseg.training.budget import TimeBudget, epochs_to_run
from medseg.training.classifier_run import train_classification
from medseg.training.fitting import Run, fit_run
from medseg.training.network import model_for_run, record_origin
from medseg.training.planning import plan_training
from medseg.training.run_files import (
    check_resumable,
    checkpoint_epoch,
    checkpoint_folder,
    checkpoint_seconds,
    prepare_run,
    take_chief_checkpoint,
)
from medseg.training.runtime import (
    config_errors,
    distribution_strategy,
    precision_policy,
    worker_index,
)
from medseg.training.validation import calibrate_bundle, profile_bundle

logger = logging.getLogger(__name__)


#: the lock file a training run holds in its run folder while it lives
TRAIN_LOCK = ".medseg_train.lock"


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


def _checked_dataset(config: Config):
    """The dataset, its labels overridden by the config, checked like ``data check``."""
    from medseg.datasets.checks import check_dataset

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


def train(
    config: Config,
    folder: str | Path,
    *,
    resume: bool = False,
    verbose: int = 1,
    strategy: str = "auto",
    devices=None,
) -> Path:
    """Trains a segmentation model (or, with ``data.task: reconstruction``, an
    autoencoder) and leaves a bundle in ``folder``.

    Args:
        config: the run's config (``data.dataset`` must name the dataset).
        folder: the run folder (created).
        resume: continue the run in ``folder`` from its last checkpoint; the saved
            config is used, with ``train.epochs`` taken from ``config``.
        verbose: Keras progress output (1 bar, 2 one line per epoch, 0 silent).
        strategy: how to spread training over devices and machines: ``auto``,
            ``none``, ``mirrored`` or ``multiworker`` (see
            :func:`medseg.training.runtime.distribution_strategy`). The batch size
            is the global batch, split among the replicas.
        devices: this machine's devices to train on (GPU numbers or TensorFlow
            device names); ``None``: all of its GPUs.

    Returns:
        The run folder, which is a bundle.

    Raises:
        InputFileError: bad dataset, broken cases, or a run folder in the wrong state.
    """
    strategy = distribution_strategy(strategy, devices)  # before any other TF op
    worker, workers = worker_index(strategy)
    if workers > 1:
        logger.info(
            "MultiWorkerMirroredStrategy: worker %d of %d workers", worker, workers
        )
    elif strategy.num_replicas_in_sync > 1:
        logger.info(
            "MirroredStrategy: %d replicas (%s)",
            strategy.num_replicas_in_sync,
            ", ".join(strategy.extended.worker_devices),
        )
    folder = chief = Path(folder)
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
    if worker and resume:
        take_chief_checkpoint(chief, folder)
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


def _fitted_to_the_data(config, values, channels: int):
    """``config`` with the classes and channels the dataset has, its deep
    supervision checked against the task and the padding."""
    segmentation = values is not None
    config = config.replace(
        model=replace(
            config.model,
            num_classes=len(values) if segmentation else None,
            in_channels=channels,
        )
    )
    levels = int(config.model.options.get("deep_supervision") or 0)
    if levels and not segmentation:
        raise ConfigError("model.deep_supervision is for segmentation")
    if levels and config.model.options.get("padding", "same") != "same":
        raise ConfigError("model.deep_supervision needs padding: same")
    return config


def _split(config, dataset) -> tuple[list, list]:
    """The training and validation cases of the fold ``config`` holds out."""
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
    return split


def label_margins(model) -> tuple[int, ...]:
    """The voxels on each side of its input that an unpadded (``"valid"``) U-Net
    gives no output for, per spatial axis (all 0 for a padded network)."""
    inputs, outputs = model.input_shape[1:-1], model.output_shape[1:-1]
    if any(n is None for n in (*inputs, *outputs)):
        return (0,) * len(inputs)
    return tuple((i - o) // 2 for i, o in zip(inputs, outputs, strict=True))


def _finished(folder: Path, config: Config, budget: TimeBudget) -> bool:
    """Whether the run in ``folder`` has trained all it was asked to already."""
    if not (folder / "medseg.json").is_file():
        return False
    if budget.seconds is not None:
        if budget.exhausted():
            logger.info(
                "%s: its time budget of %s is spent, nothing to resume",
                folder,
                format_duration(budget.seconds),
            )
        return budget.exhausted()
    done = checkpoint_epoch(folder)
    if done >= config.train.epochs:
        logger.info(
            "%s: trained to epoch %d of %d already, nothing to resume",
            folder,
            done,
            config.train.epochs,
        )
    return done >= config.train.epochs


def _train_in(config, folder, strategy, worker, workers, resume, verbose) -> Path:
    """:func:`train` in its run folder, which exists."""
    config = prepare_run(folder, config, resume=resume)
    resume = resume and checkpoint_folder(folder) is not None  # else a new run
    budget = TimeBudget(
        config.train.time_budget, checkpoint_seconds(folder) if resume else 0.0
    )
    finished = resume and _finished(folder, config, budget)
    if finished and not _records_missing(folder, config, worker):
        return folder
    # the network's initial weights too come from train.seed: the same config
    # trains the same network (up to the order of floating-point sums)
    keras.utils.set_random_seed(config.train.seed)
    if config.data.task == "classification":
        return train_classification(
            config,
            folder,
            strategy,
            worker,
            workers,
            resume=resume,
            verbose=verbose,
            budget=budget,
        )
    dataset, fingerprint = _checked_dataset(config)
    _check_spatial_dims(config, dataset, fingerprint)
    segmentation = config.data.task == "segmentation"
    values = training_data.class_values(dataset) if segmentation else None
    channels = int(next(iter(fingerprint["num_channels"])))
    config = _fitted_to_the_data(config, values, channels)
    keras.mixed_precision.set_global_policy(precision_policy(config))
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
    split = _split(config, dataset)
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
    run = Run(
        folder,
        config,
        plan,
        preprocessor,
        [prepared[i] for i in split[1]],
        metadata,
        epochs_to_run(config),
        None,
        budget,
    )
    if not finished:
        _fit(
            run,
            [prepared[i] for i in split[0]],
            [dataset.labels[v] for v in values] if segmentation else None,
            strategy,
            worker,
            workers,
            resume=resume,
            verbose=verbose,
        )
    missing = _records_missing(folder, config, worker)
    if "calibration" in missing:
        _calibrate(run)
    if "ood" in missing:
        logger.info(
            "profiling the training scans for predict's out-of-distribution check"
        )
        profile_bundle(folder, [prepared[i] for i in split[0]], config.train.seed)
    return folder


def _fit(run, train_cases, labels, strategy, worker, workers, *, resume, verbose):
    """Trains the network of ``run`` on the prepared ``train_cases``, from its
    checkpoint when resuming."""
    config, plan = run.config, run.plan
    model, metrics, origin, start_epoch, run.best = model_for_run(
        config,
        plan,
        run.folder,
        strategy,
        resume,
        labels,
        progress=run.budget.progress,
    )
    if start_epoch >= run.total_epochs:
        return
    sampler = training_data.PatchSampler(
        train_cases,
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
            target="label" if run.task == "segmentation" else "image",
            deep_supervision=int(config.model.options.get("deep_supervision") or 0),
            label_margins=label_margins(model),
        )

    record_origin(run.metadata, run.folder, origin)
    fit_run(
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


def _records_missing(folder: Path, config: Config, worker: int) -> list[str]:
    """What a segmentation run's bundle should record after training and does not
    yet (a run killed in between): ``"calibration"`` (with ``train.calibrate``) and
    ``"ood"`` (the training scans' profile). The chief writes them."""
    if worker or config.data.task != "segmentation":
        return []
    try:
        record = json.loads((folder / "medseg.json").read_text())
    except (OSError, ValueError):
        return []  # no bundle: nothing was trained
    wanted = ["calibration"] if config.train.calibrate else []
    return [key for key in (*wanted, "ood") if key not in record]


def _calibrate(run: Run) -> None:
    """Fits the bundle's temperature on the validation cases, and says how much the
    calibration moved."""
    if not run.val_cases:
        logger.warning(
            "train.calibrate: no validation cases (train.fold %s), no temperature "
            "fitted",
            run.config.train.fold,
        )
        return
    record = calibrate_bundle(run.folder, run)
    logger.info(
        "calibration on %d validation case(s): temperature %.3f; ECE (top class) "
        "%.4f -> %.4f, NLL %.4f -> %.4f",
        record["cases"],
        record["temperature"],
        record["ece"]["before"],
        record["ece"]["after"],
        record["nll"]["before"],
        record["nll"]["after"],
    )
