"""The network a run trains: built from the config, or a bundle's to fine-tune, and
compiled with its losses."""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.losses import LOSSES, ArgmaxDice, deep_supervision_weights
from medseg.training.planning import Plan
from medseg.training.run_files import (
    checkpoint_epoch,
    resume_run,
)
from medseg.training.runtime import config_errors, make_optimizer

logger = logging.getLogger(__name__)


def compiled_model(config: Config, plan: Plan, *, frozen: bool = False, progress=None):
    """Builds and compiles the network (inside the strategy's scope); with ``frozen``
    the layers matching ``train.freeze`` are not trained; ``progress``: the time
    budget's spent fraction, which a budgeted learning rate follows."""
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
    return model, compile_model(model, config, progress)


def compile_model(model, config: Config, progress=None) -> list:
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
        optimizer=make_optimizer(config, total_steps, progress),
        loss=loss,
        loss_weights=weights,
        metrics=metrics,
    )
    return metrics[0] if weights else metrics


def model_for_run(
    config: Config,
    plan: Plan,
    folder: Path,
    strategy,
    resume: bool,
    names: list[str] | None = None,
    progress=None,
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
            model, metrics = compiled_model(
                config, plan, frozen=is_frozen(config, first_epoch), progress=progress
            )
    origin = None if resume else start_from(config, model, names)
    start_epoch, best = 0, None
    if resume:
        with strategy.scope():  # restoring builds the optimizer's variables
            start_epoch, best = resume_run(folder, model)
    return model, metrics, origin, start_epoch, best


def is_frozen(config: Config, epoch: int) -> bool:
    """Whether the ``train.freeze`` layers are frozen when training from ``epoch``."""
    after = config.train.unfreeze_after
    return bool(config.train.freeze) and (after is None or epoch < after)


def record_origin(metadata: dict, folder: Path, origin: dict | None) -> None:
    """Puts the pretrained bundle's record in the new bundle's metadata; on resume,
    keeps the one the run's first session wrote."""
    if origin is None and (folder / "medseg.json").is_file():
        from medseg.bundle import read_metadata

        origin = read_metadata(folder).get("finetuned_from")
    if origin is not None:
        metadata["finetuned_from"] = origin


def start_from(config: Config, model, names: list[str] | None = None) -> dict | None:
    """Loads ``train.init_from``'s weights into a new run's model, a segmentation
    network's output classes by their label ``names``; what was done."""
    if not config.train.init_from:
        return None
    from medseg import bundle as bundles
    from medseg.models import load_model
    from medseg.models.transfer import adapt_weights

    metadata = bundles.verify(config.train.init_from)
    source = load_model(config.train.init_from)
    encoder_only = metadata.task == "reconstruction"
    classes = None
    if names is not None and metadata.task == "segmentation":
        classes = (list(metadata.label_names), names)
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
