"""``medseg finetune``: train from a bundle's weights on new data and labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from medseg_cli.options import (
    FiniteFloatRange,
    calibrate_option,
    data_option,
    distribution_options,
    epochs_option,
    fold_option,
    resume_option,
    run_output_option,
    seed_option,
    steps_per_epoch_option,
    time_budget_option,
)
from medseg_cli.train import parse_fold, run


@click.command("finetune")
@click.option(
    "--model",
    "model",
    required=True,
    help="Pretrained bundle folder or a shipped model's name (a reconstruction "
    "bundle gives its encoder).",
)
@run_output_option("Run folder; becomes the new bundle.")
@data_option("Dataset folder (default: data.dataset of --config).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML config for the training schedule (default: the bundle's own).",
)
@click.option(
    "--freeze",
    multiple=True,
    help="Glob on layer names to keep frozen, e.g. 'enc*' (repeatable).",
)
@click.option(
    "--unfreeze-after",
    type=click.IntRange(min=1),
    help="Unfreeze the --freeze layers after this many epochs.",
)
@epochs_option
@steps_per_epoch_option
@time_budget_option
@calibrate_option
@click.option(
    "--lr", type=FiniteFloatRange(min=0, min_open=True), help="Learning rate."
)
@fold_option
@seed_option
@resume_option
@distribution_options
def finetune(
    model: str,
    output: Path,
    data: Path | None,
    config_path: Path | None,
    freeze: tuple[str, ...],
    unfreeze_after: int | None,
    epochs: int | None,
    steps_per_epoch: int | None,
    time_budget: float | None,
    calibrate: bool | None,
    lr: float | None,
    fold: str | None,
    seed: int | None,
    resume: bool,
    strategy: str,
    devices: tuple[str, ...] | None,
) -> None:
    """Fine-tune a pretrained bundle on a new dataset; OUTPUT becomes a bundle.

    The network keeps the pretrained architecture and every weight that fits: a new
    label set gets a new output layer, a new number of input channels an adapted first
    convolution (pretrained kernel averaged over channels and repeated). The new data
    is preprocessed as the pretrained model expects (its spacing, normalisation, crop
    and patch size), and the new bundle records the pretrained one.
    """
    from medseg.bundle import read_metadata, resolve
    from medseg.config import (
        MODEL_OPTIONS,
        Config,
        ModelConfig,
        load_config,
        relative_to_config,
    )
    from medseg.errors import InputFileError

    bundle = resolve(model).resolve()
    metadata = read_metadata(bundle)
    if metadata.task not in ("segmentation", "reconstruction"):
        raise InputFileError(
            bundle,
            f"fine-tuning takes a segmentation or reconstruction bundle, not "
            f"{metadata.task!r}",
        )
    blame = config_path or bundle / "medseg.json"
    try:
        saved = Config.from_dict(metadata["config"])
        config = load_config(config_path) if config_path else saved
        preprocessing = metadata["preprocessing"]
        # the network and what it depends on come from the pretrained bundle; an
        # autoencoder's gives a U-Net of the same encoder (its options that a U-Net
        # takes), whose encoder starts from the autoencoder's
        model_section = replace(
            saved.model,
            num_classes=None,
            patch_size=metadata.patch_size,
        )
        if saved.model.name == "autoencoder":
            model_section = ModelConfig(
                name="unet",
                spatial_dims=saved.model.spatial_dims,
                in_channels=saved.model.in_channels,
                patch_size=metadata.patch_size,
                options={
                    k: v
                    for k, v in saved.model.options.items()
                    if k in MODEL_OPTIONS["unet"]
                },
            )
        spacing = preprocessing.get("target_spacing_mm")
        data_section = replace(
            config.data,
            task="segmentation",
            target_spacing_mm=tuple(spacing) if spacing else None,
            normalization=tuple(preprocessing["normalizers"]),
            crop_nonzero=preprocessing.get("crop_nonzero", True),
            labels=config.data.labels if config_path else None,
            cache_dir=config.data.cache_dir if config_path else None,
        )
        if data is not None:
            data_section = replace(data_section, dataset=str(data.resolve()))
        elif config_path and data_section.dataset:
            dataset = relative_to_config(data_section.dataset, config_path)
            data_section = replace(data_section, dataset=dataset)
        else:
            raise click.UsageError("give the new dataset with --data (or --config)")
        overrides = {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "time_budget": time_budget,
            "calibrate": calibrate,
            "learning_rate": lr,
            "fold": parse_fold(fold),
            "seed": seed,
            "unfreeze_after": unfreeze_after,
        }
        train_section = replace(
            config.train,
            init_from=str(bundle),
            freeze=freeze or config.train.freeze,
            **{k: v for k, v in overrides.items() if v is not None},
        )
        if not config_path and time_budget is None:
            # the pretraining's time budget: not this run's length (--epochs is)
            train_section = replace(train_section, time_budget=None)
        config = Config(model_section, data_section, train_section)
    except (ValueError, KeyError) as exc:
        raise InputFileError(
            blame, f"cannot make a fine-tuning config ({exc})"
        ) from None
    run(config, output, resume, blame, strategy=strategy, devices=devices)
