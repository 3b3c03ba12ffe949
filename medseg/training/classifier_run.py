"""Training a classifier on arrays (MedMNIST-style npz datasets)."""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.io.files import atomic_write_text
from medseg.training.augment import Augmenter
from medseg.training.budget import TimeBudget, epochs_to_run
from medseg.training.fitting import Run, fit_run
from medseg.training.network import model_for_run, record_origin
from medseg.training.planning import Plan
from medseg.training.run_files import (
    check_resumable,
)
from medseg.training.runtime import precision_policy

logger = logging.getLogger(__name__)


def train_classification(
    config: Config,
    folder: Path,
    strategy,
    worker: int,
    workers: int,
    *,
    resume: bool,
    verbose: int,
    budget: TimeBudget,
) -> Path:
    """Classification on a MedMNIST-style ``.npz``: train on train, select on val."""
    import yaml

    from medseg.training import classification

    if not config.data.dataset:
        raise ConfigError("no dataset: give data.dataset in the config or --data")
    config, preprocessor, arrays, dataset = classification.load_arrays(config)
    keras.mixed_precision.set_global_policy(precision_policy(config))
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
    model, metrics, origin, start_epoch, best = model_for_run(
        config, plan, folder, strategy, resume, progress=budget.progress
    )
    if start_epoch >= epochs_to_run(config):
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
    record_origin(metadata, folder, origin)
    run = Run(
        folder,
        config,
        plan,
        preprocessor,
        arrays["val"] or (),
        metadata,
        epochs_to_run(config),
        best,
        budget,
    )
    fit_run(
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
