"""``medseg evaluate``: Dice, IoU, HD95, ASSD and surface Dice against the truth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


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
    type=click.FloatRange(min=0),
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
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="With --lesion-wise: leave out components smaller than this (mm^2 in 2D) "
    "on both sides.",
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
    split: str,
    workers: int,
) -> None:
    """Score predicted label maps against the truth, per case and label, in mm.

    Metrics: dice, iou, hd95_mm (larger of the two directed 95th percentile surface
    distances), assd_mm (mean of the two directed mean distances), nsd (surface Dice at
    --tolerance-mm), volumes in ml. Distances use each file's voxel spacing. Both masks
    empty: every metric NaN (left out of the means, counted as "both"); one empty: Dice
    0 and distances inf (counted as "one"). --lesion-wise adds lesion counts and
    lesion-wise scores per case and label.

    A predictions CSV from a classification model is scored instead with accuracy,
    balanced accuracy (mean recall per class) and one-vs-rest AUC per class.
    """
    from medseg.inference.jobs.outputs import make_output_dir

    for folder in (  # before any work, which a folder that cannot be made would lose
        *(path.parent for path in (output, summary) if path is not None),
        *([report_dir] if report_dir is not None else []),
    ):
        make_output_dir(folder)
    if prediction.suffix == ".csv":
        _evaluate_classification(prediction, truth, split, summary)
        return
    from medseg.evaluation.scoring import (
        evaluate_pairs,
        format_summary,
        pair_files,
        summarize,
        to_csv,
    )
    from medseg.io import atomic_write_text
    from medseg.io.itk import segment_names

    pairs = pair_files(prediction, truth)
    names, names_from = label_names(names_file, truth), "the dataset's labels"
    if not names:  # 3D Slicer segmentations as the truth name their segments
        names = segment_names([truth_path for _, _, truth_path in pairs])
        names_from = "the other truth files"
        if names:
            click.echo(
                "label names from the truth's 3D Slicer segments: "
                + ", ".join(f"{value} {name}" for value, name in names.items())
            )
    failures: list[tuple[str, str]] = []
    with click.progressbar(
        length=len(pairs), label="evaluating", file=sys.stderr
    ) as bar:
        rows = evaluate_pairs(
            pairs,
            labels=parse_labels(labels),
            tolerance_mm=tolerance_mm,
            progress=lambda _case: bar.update(1),
            failures=failures,
            lesions=min_lesion_mm3 if lesion_wise else None,
            names=names,
            names_from=names_from,
            workers=workers,
        )
    failed = {case for case, _ in failures}
    pairs = [pair for pair in pairs if pair[0] not in failed]
    result = summarize(rows)
    click.echo(
        f"{len(pairs)} case(s) scored"
        + (f", {len(failed)} failed (not in the means)" if failed else "")
        + "; mean (median) over cases with a defined value"
    )
    click.echo(format_summary(result, names))
    if output is not None:
        atomic_write_text(output, to_csv(rows))
        click.echo(f"metrics written to {output}")
    if summary is not None:
        atomic_write_text(
            summary,
            json.dumps(
                {
                    "tolerance_mm": tolerance_mm,
                    **({"min_lesion_mm3": min_lesion_mm3} if lesion_wise else {}),
                    "cases": len(pairs),
                    "failed": {case: message for case, message in failures},
                    "label_names": {str(k): v for k, v in sorted(names.items())},
                    "labels": result,
                },
                indent=2,
            )
            + "\n",
        )
        click.echo(f"summary written to {summary}")
    if report_dir is not None:
        from medseg.figures import write_report

        written = write_report(
            report_dir, rows, pairs, _image_files(images, pairs), names
        )
        click.echo(f"{len(written)} pictures written to {report_dir}")
    if failures:
        for _, message in failures:
            click.echo(f"FAILED {message}", err=True)
        sys.exit(1)


def label_names(names_file: Path | None, truth: Path) -> dict[int, str]:
    """Label names from ``--label-names``, or from a dataset.json beside the label
    maps ``truth`` (a folder or a file; MSD and nnU-Net keep it in the parent of
    labelsTr); one found on its own that cannot be read is passed over with a
    warning."""
    from medseg.datasets.layouts import read_label_names
    from medseg.errors import InputFileError

    if names_file is not None:
        return read_label_names(names_file)
    folder = truth if truth.is_dir() else truth.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            try:
                return read_label_names(candidate)
            except InputFileError as exc:
                click.echo(f"warning: label names not used: {exc}", err=True)
                return {}
    return {}


def _image_files(images: Path | None, pairs) -> dict[str, Path]:
    """Case -> scan file for the overlays (a case without one is drawn without)."""
    from medseg.io import SCAN_SUFFIXES, split_suffix

    if images is None:
        return {}
    if images.is_file():
        return {case: images for case, _, _ in pairs}
    found = {}
    for path in sorted(images.iterdir()):
        stem, suffix = split_suffix(path)
        if suffix in SCAN_SUFFIXES:
            found.setdefault(stem, path)
            if stem.endswith("_0000"):
                found.setdefault(stem[: -len("_0000")], path)
    return {case: found[case] for case, _, _ in pairs if case in found}


def _evaluate_classification(prediction, truth, split, summary) -> None:
    from medseg.evaluation.scoring import evaluate_classification
    from medseg.io import atomic_write_text

    result = evaluate_classification(prediction, truth, split=split)
    click.echo(
        f"{result['cases']} case(s): accuracy {result['accuracy']:.4f}, balanced "
        f"accuracy {result['balanced_accuracy']:.4f}, AUC {result['auc']:.4f}"
    )
    for name, auc in result["auc_per_class"].items():
        click.echo(f"  class {name}: AUC (one vs rest) {auc:.4f}")
    if summary is not None:
        atomic_write_text(summary, json.dumps(result, indent=2) + "\n")
        click.echo(f"summary written to {summary}")
