"""``medseg evaluate``: Dice, IoU, HD95, ASSD and surface Dice against the truth."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from medseg_cli.options import FiniteFloatRange


def parse_labels(text: str | None):
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected label values like 1,2, got {text!r}"
        ) from None


@click.command("evaluate")
@click.option(
    "--prediction",
    required=True,
    type=click.Path(path_type=Path),
    help="Predicted label file, or a folder of them; or a classification "
    "predictions CSV.",
)
@click.option(
    "--truth",
    required=True,
    type=click.Path(path_type=Path),
    help="Truth label file, or a folder matched by file name; for classification a "
    "CSV (case,label) or a MedMNIST-style .npz.",
)
@click.option(
    "--labels",
    help="Label values to score, e.g. 1,2 (default: the non-zero values present).",
)
@click.option(
    "--tolerance-mm",
    type=FiniteFloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Tolerance of the surface Dice (nsd).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Per case and label CSV.",
)
@click.option(
    "--summary",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Summary JSON (mean, std, median per label and metric).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for pictures: overlays of the best, median and worst cases and a "
    "box plot of Dice per label.",
)
@click.option(
    "--images",
    type=click.Path(exists=True, path_type=Path),
    help="The scans (file or folder, matched by case name, nnU-Net's _0000 "
    "channel suffix allowed) to draw the --report overlays on.",
)
@click.option(
    "--label-names",
    "names_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="dataset.json whose labels name the label values in the table and pictures "
    "(default: a dataset.json in the truth folder or its parent, when there is one).",
)
@click.option(
    "--lesion-wise",
    is_flag=True,
    help="Also score each label's connected components as lesions: counts of truth, "
    "detected, predicted and false lesions, lesion-wise recall, precision, F1 and "
    "Dice (a false component counting as a lesion of Dice 0).",
)
@click.option(
    "--min-lesion-mm3",
    type=FiniteFloatRange(min=0),
    default=0.0,
    show_default=True,
    help="With --lesion-wise: leave out components smaller than this (mm^2 in 2D) "
    "on both sides.",
)
@click.option(
    "--probabilities",
    type=click.Path(exists=True, path_type=Path),
    help="Probability files (medseg predict --probabilities: a folder of "
    "CASE_probabilities.npz, or one file) to measure calibration on: the expected "
    "calibration error (ECE), per label and of the top class, in the output and the "
    "summary, and a reliability diagram in the --report folder.",
)
@click.option(
    "--bins",
    type=click.IntRange(min=2),
    default=15,
    show_default=True,
    help="Equal-width probability bins of the calibration.",
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    help="Split of a .npz truth (classification).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Cases scored at once, each in a process of its own (each holds its two "
    "label maps and their distance maps in memory).",
)
def evaluate(
    prediction: Path,
    truth: Path,
    labels: str | None,
    tolerance_mm: float,
    output: Path | None,
    summary: Path | None,
    report_dir: Path | None,
    images: Path | None,
    names_file: Path | None,
    lesion_wise: bool,
    min_lesion_mm3: float,
    probabilities: Path | None,
    bins: int,
    split: str,
    workers: int,
) -> None:
    """Score predicted label maps against the truth, per case and label, in mm.

    Metrics: dice, iou, hd95_mm (larger of the two directed 95th percentile surface
    distances), assd_mm (mean of the two directed mean distances), nsd (surface Dice at
    --tolerance-mm), volumes in ml. Distances use each file's voxel spacing. Both masks
    empty: every metric NaN (left out of the means, counted as "both"); one empty: Dice
    0 and distances inf (counted as "one"). --lesion-wise adds lesion counts and
    lesion-wise scores per case and label. --probabilities adds the calibration of
    the predicted probabilities.

    A predictions CSV from a classification model is scored instead with accuracy,
    balanced accuracy (mean recall per class) and one-vs-rest AUC per class.
    """
    from medseg.evaluation import folders
    from medseg.evaluation.scoring import format_summary, pair_files
    from medseg.inference.jobs.outputs import make_output_dir

    for folder in (  # before any work, which a folder that cannot be made would lose
        *(path.parent for path in (output, summary) if path is not None),
        *([report_dir] if report_dir is not None else []),
    ):
        make_output_dir(folder)
    if prediction.suffix == ".csv":
        _evaluate_classification(prediction, truth, split, summary)
        return
    lesions = min_lesion_mm3 if lesion_wise else None
    pairs = pair_files(prediction, truth)
    with click.progressbar(
        length=len(pairs), label="evaluating", file=sys.stderr
    ) as bar:
        evaluation = folders.evaluate_folders(
            pairs,
            truth,
            labels=parse_labels(labels),
            tolerance_mm=tolerance_mm,
            names_file=names_file,
            lesions=lesions,
            workers=workers,
            progress=lambda _case: bar.update(1),
        )
    names, failed = evaluation.names, len(evaluation.failures)
    if probabilities is not None:
        with click.progressbar(
            length=len(evaluation.pairs), label="calibration", file=sys.stderr
        ) as bar:
            folders.add_calibration(
                evaluation, probabilities, bins, progress=lambda _case: bar.update(1)
            )
    if names and evaluation.names_from != folders.DATASET_LABELS:
        click.echo(
            "label names from the truth's 3D Slicer segments: "
            + ", ".join(f"{value} {name}" for value, name in names.items())
        )
    click.echo(
        f"{len(evaluation.pairs)} case(s) scored"
        + (f", {failed} failed (not in the means)" if failed else "")
        + "; mean (median) over cases with a defined value"
    )
    click.echo(format_summary(evaluation.summary, names))
    if evaluation.calibration is not None:
        click.echo(folders.format_calibration(evaluation.calibration))
    if output is not None:
        folders.write_table(evaluation, output)
        click.echo(f"metrics written to {output}")
    if summary is not None:
        folders.write_summary(evaluation, summary, tolerance_mm, lesions)
        click.echo(f"summary written to {summary}")
    if report_dir is not None:
        written = folders.write_pictures(evaluation, report_dir, images)
        click.echo(f"{len(written)} pictures written to {report_dir}")
    for _, message in evaluation.failures:
        click.echo(f"FAILED {message}", err=True)
    if evaluation.failures:
        sys.exit(1)


def _evaluate_classification(prediction, truth, split, summary) -> None:
    from medseg.evaluation.scoring import evaluate_classification
    from medseg.io import atomic_write_text
    from medseg.io.files import json_text

    result = evaluate_classification(prediction, truth, split=split)
    click.echo(
        f"{result['cases']} case(s): accuracy {result['accuracy']:.4f}, balanced "
        f"accuracy {result['balanced_accuracy']:.4f}, AUC {result['auc']:.4f}"
    )
    for name, auc in result["auc_per_class"].items():
        click.echo(f"  class {name}: AUC (one vs rest) {auc:.4f}")
    if summary is not None:
        atomic_write_text(summary, json_text(result))
        click.echo(f"summary written to {summary}")
