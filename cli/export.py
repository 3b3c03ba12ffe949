"""``medseg export``: a bundle as a TensorFlow SavedModel or ONNX model for serving."""

from __future__ import annotations

from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow


@click.command("export")
@click.option(
    "--model",
    "model",
    required=True,
    help="Bundle folder or a shipped model's name.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["savedmodel", "onnx"]),
    default="savedmodel",
    show_default=True,
    help="Export format.",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="New folder for the export.",
)
def export(model: str, fmt: str, output: Path) -> None:
    """Export a bundle for serving, checked against the bundle.

    savedmodel: a SavedModel whose `serve` endpoint maps preprocessed patches to
    logits (for TF Serving). onnx: OUTPUT/model.onnx, input `image`, the same mapping
    (needs the onnx extra: pip install 'medseg[onnx]'); the metadata is also stored in
    the ONNX file's metadata_props under "medseg.json". Either way the bundle's
    medseg.json (preprocessing, labels, patch size) is written into OUTPUT so the
    preprocessing travels with the model. The export is compared with the bundle on a
    random input and refused if their class probabilities (an autoencoder's outputs,
    to their scale) differ by more than 1e-4.
    """
    from medseg.bundle import resolve
    from medseg.export import export_bundle

    bundle = resolve(model)
    start_tensorflow(click.get_current_context().meta.get("medseg.debug", False))
    result = export_bundle(bundle, output, fmt)
    click.echo(
        f"{fmt} written to {output}; {result['compared']} match the bundle's within "
        f"{result['max_abs_difference']:.2g} on a {result['input_shape']} input"
    )
