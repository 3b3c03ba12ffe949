"""``medseg train``: train a segmentation model from a YAML config."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow
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


def parse_fold(text: str | None):
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(
            f"expected a fold number or 'all', got {text!r}"
        ) from None


@click.command("train")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML config.",
)
@run_output_option("Run folder; becomes the model bundle.")
@data_option("Dataset folder (overrides data.dataset in the config).")
@epochs_option
@steps_per_epoch_option
@time_budget_option
@calibrate_option
@fold_option
@seed_option
@click.option(
    "--memory-gb",
    type=FiniteFloatRange(min=0.1),
    help="Memory budget for planning (default: the GPU's, 4 GB on CPU).",
)
@resume_option
@distribution_options
def train(
    config_path: Path,
    output: Path,
    data: Path | None,
    epochs: int | None,
    steps_per_epoch: int | None,
    time_budget: float | None,
    calibrate: bool | None,
    fold: str | None,
    seed: int | None,
    memory_gb: float | None,
    resume: bool,
    strategy: str,
    devices: tuple[str, ...] | None,
) -> None:
    """Train a segmentation model; OUTPUT becomes a bundle that `medseg predict` takes.

    The dataset is checked first (as `medseg data check`), then the plan (spacing,
    patch and batch size for the memory budget) is printed. Every epoch writes
    history.csv, progress.png and a checkpoint; a killed run continues with --resume.
    """
    from medseg.config import load_config, relative_to_config
    from medseg.errors import InputFileError

    config = load_config(config_path)
    fold_value = parse_fold(fold)
    overrides = {
        k: v
        for k, v in {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "time_budget": time_budget,
            "calibrate": calibrate,
            "fold": fold_value,
            "seed": seed,
            "memory_gb": memory_gb,
        }.items()
        if v is not None
    }
    try:
        config = config.replace(train=replace(config.train, **overrides))
        if data is not None:
            config = config.replace(
                data=replace(config.data, dataset=str(data.resolve()))
            )
        else:
            dataset = relative_to_config(config.data.dataset, config_path)
            config = config.replace(data=replace(config.data, dataset=dataset))
    except ValueError as exc:
        raise InputFileError(config_path, str(exc)) from None
    run(config, output, resume, config_path, strategy=strategy, devices=devices)


def run(
    config, output: Path, resume: bool, blame, *, strategy="auto", devices=None
) -> None:
    """Trains ``config`` into ``output`` with the ``strategy`` over ``devices``;
    setting errors are reported against ``blame`` (the config file, or the bundle a
    fine-tuning config came from)."""
    from medseg.errors import ConfigError, InputFileError

    ctx = click.get_current_context()
    start_tensorflow(ctx.meta.get("medseg.debug", False))
    logging.getLogger("medseg").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    from medseg.training.trainer import train as run_training

    try:
        folder = run_training(
            config,
            output,
            resume=resume,
            verbose=1 if sys.stdout.isatty() else 2,
            strategy=strategy,
            devices=devices,
        )
    except ConfigError as exc:  # a setting that does not fit the data or model
        raise InputFileError(blame, str(exc)) from None
    click.echo(f"bundle: {folder}")
