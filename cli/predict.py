"""``medseg predict``: segment a scan, a folder, a glob or a dataset with a bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow


@click.command("predict")
@click.option(
    "--model",
    "bundle",
    required=True,
    type=click.Path(path_type=Path),
    help="Model bundle folder (a training run folder).",
)
@click.option(
    "--input",
    "input_path",
    required=True,
    help="A scan, a folder, a glob pattern (quote it) or a dataset.json.",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (or a file name for a single input scan).",
)
@click.option(
    "--tta/--no-tta",
    default=True,
    show_default=True,
    help="Average over mirrored copies along the axes the model was trained "
    "to be mirrored on.",
)
@click.option(
    "--overlap",
    type=click.FloatRange(0, 0.95),
    default=0.5,
    show_default=True,
    help="Sliding-window overlap.",
)
@click.option("--shard", help="K/N: only every N-th scan from the K-th (array jobs).")
@click.option("--overwrite", is_flag=True, help="Redo scans whose output exists.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run report JSON (default: OUTPUT/medseg_predict_report[-K-of-N].json).",
)
def predict(
    bundle: Path,
    input_path: str,
    output: Path,
    tta: bool,
    overlap: float,
    shard: str | None,
    overwrite: bool,
    report_path: Path | None,
) -> None:
    """Segment scans with a bundle; labels are written on each scan's own grid.

    The bundle's preprocessing is repeated exactly (orientation, crop, resampling,
    normalisation), windows are blended with Gaussian weights, and the label map goes
    back to the input's shape, affine and header codes. Existing outputs are skipped
    (re-running a killed job does only what is missing); a scan that cannot be read is
    named with the reason and the others still finish. Exit status 1 if any failed.
    """
    from medseg import batch
    from medseg.io import atomic_write_text

    ctx = click.get_current_context()
    try:
        shard_value = batch.parse_shard(shard) if shard else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None
    inputs = batch.take_shard(batch.collect_inputs(input_path), shard_value)
    single = (
        len(inputs) == 1
        and Path(input_path).is_file()
        and (output.suffix and not output.is_dir())
    )
    output_dir = output.parent if single else output
    start_tensorflow(ctx.meta.get("medseg.debug", False))
    from medseg.inference import Segmenter

    metadata_axes = ()
    if tta:
        from medseg.bundle import read_metadata

        augment = (
            read_metadata(bundle).get("config", {}).get("train", {}).get("augment", {})
        )
        metadata_axes = tuple(augment.get("mirror_axes", ()))
    segmenter = Segmenter(bundle, overlap=overlap, mirror_axes=metadata_axes)
    if single and inputs[0].name != output.name:
        inputs_named = {inputs[0]: output.name}
    else:
        inputs_named = {}
    with click.progressbar(
        length=len(inputs),
        label="segmenting",
        file=sys.stderr,
        show_pos=True,
        show_eta=True,
    ) as bar:

        def progress(result):
            bar.update(1)
            if result.status == "failed":
                click.echo(f"\nFAILED {result.error}", err=True)

        results = batch.segment_all(
            segmenter.segment,
            inputs,
            output_dir,
            overwrite=overwrite,
            progress=progress,
            rename=inputs_named,
        )
    summary = batch.report(results)
    if report_path is None:
        name = "medseg_predict_report"
        if shard_value:
            name += f"-{shard_value[0]}-of-{shard_value[1]}"
        report_path = output_dir / f"{name}.json"
    atomic_write_text(report_path, json.dumps(summary, indent=2) + "\n")
    counts = summary["counts"]
    click.echo(
        f"{counts['done']} segmented, {counts['skipped']} skipped (output "
        f"existed), {counts['failed']} failed; report: {report_path}"
    )
    if counts["failed"]:
        for result in results:
            if result.status == "failed":
                click.echo(f"  FAILED {result.error}", err=True)
        sys.exit(1)
