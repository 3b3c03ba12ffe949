"""``medseg info``: layers, parameters, receptive field, FLOPs and memory of a model;
or the grid, orientation and values of a scan."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow
from medseg_cli.options import overlap_option, tta_option


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"64,64,32"`` or ``"64x64x32"`` -> ``(64, 64, 32)``."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(
            f"expected sizes like 64,64,32, got {text!r}"
        ) from None
    if not shape or any(n <= 0 for n in shape):
        raise click.BadParameter(f"sizes must be positive, got {text!r}")
    return shape


@click.command("info")
@click.argument(
    "model_or_config", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "--input-shape",
    help="Spatial input size, e.g. 64,64,64 (needed for "
    "FLOPs and activation memory when the model takes any size).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Batch size for the training memory estimate; with scans and --model, "
    "the windows per forward pass, as medseg predict's --batch-size (default: "
    "predict's).",
)
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "adamw", "sgd", "none"]),
    default="adam",
    show_default=True,
    help="Optimizer whose state is counted.",
)
@click.option(
    "--mixed-precision",
    is_flag=True,
    help="Count activations at 2 bytes (float16/bfloat16) instead of 4.",
)
@click.option(
    "--model",
    "scan_model",
    help="With scans: also show what medseg predict would do with each scan and "
    "this segmentation bundle (or shipped model): refused or not, the grid it is "
    "resampled to, the windows and forward passes, the probabilities' memory, and "
    "its warnings; the network is not run.",
)
@overlap_option("With --model: the sliding-window overlap predict would use.")
@tta_option("With --model: count test-time mirroring as predict does by default.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the summary as JSON.",
)
def info(
    model_or_config: tuple[Path, ...],
    input_shape: str | None,
    batch_size: int,
    optimizer: str,
    mixed_precision: bool,
    scan_model: str | None,
    overlap: float,
    tta: bool,
    json_path: Path | None,
) -> None:
    """Describe MODEL_OR_CONFIG: a .keras model, a model bundle folder (or the name of
    a shipped model) or a YAML config; a bundle is described at its training patch
    size unless --input-shape gives another.

    Prints every layer with its output shape and parameters, the parameter totals,
    the receptive field, FLOPs per sample and the training memory estimate
    (parameters, gradients, optimizer state, activations) at --batch-size, so you can
    see whether a patch and batch size fit your GPU before training.

    Given scans instead (NIfTI, picture, NumPy, MetaImage or NRRD files, or DICOM
    series folders; one or more), prints each as every command reads it: shape,
    spacing, field of view, orientation and obliquity, affine, voxel type, the range
    of its values (and each value's count where there are few whole ones: a label
    map), and what the reader had to fix or assume. Of several, one that cannot be
    read is named and the others described (exit 1). A folder, a list of scans
    (.txt), a dataset.json or a quoted glob pattern names its scans, as for medseg
    predict.

    With --model, also what medseg predict would do with each scan and that bundle,
    without running the network: refused or not (and why), the grid it is resampled
    to, the windows and forward passes, the memory of the class probabilities and
    its warnings; several scans close with totals. Exit 1 when a scan cannot be read
    or would be refused.
    """
    from medseg.describe import (
        InputShapeError,
        bundle_for_scans,
        model_to_describe,
        names_scans,
    )
    from medseg.errors import InputFileError

    given = click.get_current_context().get_parameter_source
    meant = scan_model is not None  # scans, whatever a folder holds
    if len(model_or_config) > 1 or names_scans(model_or_config[0], meant):
        model = bundle_for_scans(scan_model) if scan_model is not None else None
        if given("batch_size") == click.core.ParameterSource.COMMANDLINE:
            if model is None:
                raise click.UsageError(
                    "--batch-size describes a model, or scans with --model"
                )
            windows = batch_size
        else:
            windows = None
        _scans(
            model_or_config,
            input_shape,
            mixed_precision,
            json_path,
            model,
            overlap=overlap,
            tta=tta,
            batch_size=windows,
        )
        return
    for name, option in [("scan_model", "--model"), ("overlap", "--overlap")]:
        if given(name) == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(
                f"{model_or_config[0]} is not a scan; {option} describes scans"
            )
    (model_or_config,) = model_or_config
    shape = parse_shape(input_shape)
    if not model_or_config.exists():
        from medseg.bundle import shipped_models

        model_or_config = shipped_models().get(str(model_or_config), model_or_config)
    slice_axis = None
    if (model_or_config / "medseg.json").is_file():
        from medseg.bundle import read_metadata

        metadata = read_metadata(model_or_config)
        slice_axis = metadata.slice_axis
        if shape is None:
            # a bundle: its training patch, so that FLOPs and memory can be counted
            shape = metadata.patch_size
    suffix = model_or_config.suffix.lower()
    if not (model_or_config.is_dir() or suffix in (".keras", ".yaml", ".yml")):
        raise InputFileError(
            model_or_config,
            "expected a .keras model, a bundle folder, a shipped model's name or a "
            ".yaml config",
        )
    if not model_or_config.exists():
        raise InputFileError(model_or_config, "not found")
    start_tensorflow(click.get_current_context().meta.get("medseg.debug", False))
    try:
        model = model_to_describe(model_or_config, suffix, shape)
    except InputShapeError as exc:
        raise click.BadParameter(str(exc), param_hint="--input-shape") from None
    from medseg.io import atomic_write_text
    from medseg.io.files import json_text
    from medseg.models.info import describe_model, format_info

    summary = describe_model(
        model,
        batch_size=batch_size,
        optimizer=optimizer,
        activation_bytes=2 if mixed_precision else 4,
    )
    click.echo(format_info(summary))
    if slice_axis is not None:
        click.echo(
            f"a 2D network trained on slices of volumes: segments a volume slice by "
            f"slice, across axis {slice_axis} of the scan in RAS order"
        )
    if json_path is not None:
        atomic_write_text(json_path, json_text(summary.to_dict()))
        click.echo(f"summary written to {json_path}")


def _scans(
    paths, input_shape, mixed_precision: bool, json_path, model=None, **options
) -> None:
    """``medseg info SCAN...``: one scan's summary (a JSON object), or several's (a
    JSON list, each failure as its path and error); with ``model``, a closing line of
    totals over several."""
    from medseg.describe import (
        describe_scan,
        expand_scans,
        format_scan,
        is_scan_path,
        names_scans,
        totals_line,
    )
    from medseg.errors import InputFileError
    from medseg.io import atomic_write_text
    from medseg.io.files import json_text

    others = [str(p) for p in paths if not names_scans(p, model is not None)]
    if others:
        raise click.UsageError(
            f"{', '.join(others)}: not a scan; give one model or config, or scans"
        )
    if model is None and (options["overlap"] != 0.5 or not options["tta"]):
        raise click.UsageError("--overlap and --no-tta describe scans with --model")
    if input_shape is not None or mixed_precision:
        raise click.UsageError(
            f"{paths[0]} is a scan; --input-shape and --mixed-precision describe models"
        )
    one = len(paths) == 1 and is_scan_path(paths[0])
    channels = int(model[1].get("in_channels") or 1) if model else 1
    summaries, failed = [], 0

    def fail(path, exc: InputFileError) -> None:
        nonlocal failed
        if one:
            raise exc
        click.echo(f"Error: {exc}", err=True)
        summaries.append({"path": str(path), "error": str(exc)})
        failed += 1

    for given in paths:
        try:  # a folder, a list, a pattern: its scans; one slice: its series
            scans, read = expand_scans(given, channels)
        except InputFileError as exc:
            if len(paths) == 1:  # names nothing: an input error, as for predict
                raise
            fail(given, exc)
            continue
        for path in scans:
            try:
                summary = describe_scan(path, model, read=read, **options)
            except InputFileError as exc:
                fail(path, exc)
                continue
            click.echo(("\n" if summaries else "") + format_scan(summary))
            summaries.append(summary)
    if model is not None and len(summaries) > 1:
        click.echo("\n" + totals_line(summaries))
    if json_path is not None:
        record = summaries[0] if one else summaries
        atomic_write_text(json_path, json_text(record))
        click.echo(f"summary written to {json_path}")
    refused = any((s.get("model") or {}).get("refused") for s in summaries)
    if failed or refused:
        sys.exit(1)
