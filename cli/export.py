"""``medseg export``: a bundle as a TensorFlow SavedModel for serving."""

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
    type=click.Choice(["savedmodel"]),
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

    The SavedModel's `serve` endpoint maps preprocessed patches to logits (for TF
    Serving); the bundle's medseg.json (preprocessing, labels, patch size) is written
    beside it so the preprocessing travels with the model. The export is compared with
    the bundle on a random input and refused if they differ by more than 1e-4.
    """
    from medseg.bundle import resolve
    from medseg.export import export_savedmodel

    bundle = resolve(model)
    start_tensorflow(click.get_current_context().meta.get("medseg.debug", False))
    result = export_savedmodel(bundle, output)
    click.echo(
        f"{fmt} written to {output}; outputs match the bundle within "
        f"{result['max_abs_difference']:.2g} on a {result['input_shape']} input"
    )
