"""Options that several commands share, defined once so that they read alike."""

from __future__ import annotations

from pathlib import Path

import click

# sliding-window prediction: medseg predict, and medseg info SCAN --model


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that refuses NaN and infinities (which pass its
    comparisons), as a usage error naming the option."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def overlap_option(help: str = "Sliding-window overlap."):
    return click.option(
        "--overlap",
        type=FiniteFloatRange(0, 0.95),
        default=0.5,
        show_default=True,
        help=help,
    )


def tta_option(
    help: str = "Average over mirrored copies along the axes the model was trained "
    "to be mirrored on.",
):
    return click.option("--tta/--no-tta", default=True, show_default=True, help=help)


# a training run: medseg train and medseg finetune


def run_output_option(help: str):
    return click.option(
        "--output",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help=help,
    )


def data_option(help: str):
    return click.option("--data", type=click.Path(path_type=Path), help=help)


epochs_option = click.option(
    "--epochs", type=click.IntRange(min=1), help="Overrides train.epochs."
)
steps_per_epoch_option = click.option(
    "--steps-per-epoch",
    type=click.IntRange(min=1),
    help="Overrides train.steps_per_epoch.",
)
fold_option = click.option(
    "--fold", help="Fold to hold out (0..folds-1) or 'all' to train on every case."
)


class Duration(click.ParamType):
    """``45m``, ``2h``, ``1h30m``, ``90s`` or seconds, as seconds."""

    name = "duration"

    def convert(self, value, param, ctx):
        from medseg.config import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, "the time budget")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


time_budget_option = click.option(
    "--time-budget",
    type=Duration(),
    help="Wall-clock time the run may take (45m, 2h, 1h30m): the learning rate "
    "decays over it and the run stops when it is spent, with its bundle; --epochs "
    "is then no limit. Overrides train.time_budget.",
)


calibrate_option = click.option(
    "--calibrate/--no-calibrate",
    default=None,
    help="After training, fit a softmax temperature on the validation cases so the "
    "bundle's probabilities match how often they are right (labels unchanged); "
    "predict uses it. Overrides train.calibrate.",
)


def distribution_options(command):
    """``--strategy`` and ``--devices``: how a run spreads over devices and machines."""
    from medseg.config import STRATEGIES

    command = click.option(
        "--devices",
        callback=lambda ctx, param, value: (
            tuple(d for d in value.split(",") if d.strip()) if value else None
        ),
        help="This machine's devices to train on: GPU numbers (0,1) or TensorFlow "
        "device names (/cpu:0). Default: all its GPUs.",
    )(command)
    return click.option(
        "--strategy",
        type=click.Choice(STRATEGIES),
        default="auto",
        show_default=True,
        help="none: one device; mirrored: a replica per device of this machine; "
        "multiworker: the workers of a cluster (TF_CONFIG, or the tasks of a Slurm "
        "job step); auto: multiworker in a cluster, mirrored over several devices, "
        "else none. The batch size is the global batch.",
    )(command)


seed_option = click.option("--seed", type=int, help="Overrides train.seed.")
resume_option = click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --output from its last checkpoint; without one, start "
    "it (so a job its scheduler may start again can always pass --resume).",
)
