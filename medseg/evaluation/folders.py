"""``medseg evaluate`` as library calls: predicted label maps paired with the truth,
named, scored, and written as a table, a summary and pictures."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import InputFileError
from medseg.evaluation.calibration import (
    DEFAULT_BINS,
    case_reliability,
    probabilities_file,
)
from medseg.evaluation.scoring import evaluate_pairs, summarize, to_csv
from medseg.io.files import atomic_write_text, json_text
from medseg.io.volume import SCAN_SUFFIXES, split_suffix

logger = logging.getLogger(__name__)

DATASET_LABELS = "the dataset's labels"


@dataclass
class Evaluation:
    """A scored folder (or pair of files).

    Attributes:
        pairs: ``(case, prediction, truth)`` of the cases scored.
        rows: one per case and label
            (:func:`~medseg.evaluation.scoring.evaluate_pairs`).
        summary: per label and metric (:func:`~medseg.evaluation.scoring.summarize`).
        failures: ``(case, message)`` of the cases that could not be scored.
        names: label names (value -> name), and where they came from.
        calibration: with probability files, their
            :meth:`~medseg.evaluation.calibration.Reliability.summary` over the
            cases, plus each case's top-class ECE (``"ece_per_case"``).
    """

    pairs: list[tuple[str, Path, Path]]
    rows: list[dict]
    summary: dict
    failures: list[tuple[str, str]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    names_from: str = DATASET_LABELS
    calibration: dict | None = None


def label_names(names_file: Path | None, truth: Path) -> dict[int, str]:
    """Label names from ``names_file``, or from a dataset.json beside the label
    maps ``truth`` (a folder or a file; MSD and nnU-Net keep it in the parent of
    labelsTr); one found on its own that cannot be read is passed over with a
    warning."""
    from medseg.datasets.layouts import read_label_names

    if names_file is not None:
        return read_label_names(names_file)
    folder = truth if truth.is_dir() else truth.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            try:
                return read_label_names(candidate)
            except InputFileError as exc:
                logger.warning("label names not used: %s", exc)
                return {}
    return {}


def evaluate_folders(
    pairs: list[tuple[str, Path, Path]],
    truth: Path,
    *,
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    names_file: Path | None = None,
    lesions: float | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Scores ``pairs`` (:func:`~medseg.evaluation.scoring.pair_files` of a
    prediction and the ``truth``), every case that can be, naming those that cannot.

    Args:
        names_file: a dataset.json naming the labels (default: one beside the truth;
            else 3D Slicer segments of the truth name them).
        lesions: also score lesion-wise, leaving out components under this size
            (mm^3).
        progress: called with each case scored.

    Raises:
        InputFileError: label names a 3D Slicer segmentation contradicts.
    """
    from medseg.io.itk import segment_names

    names, names_from = label_names(names_file, truth), DATASET_LABELS
    if not names:  # 3D Slicer segmentations as the truth name their segments
        names = segment_names([truth_path for _, _, truth_path in pairs])
        names_from = "the other truth files"
    failures: list[tuple[str, str]] = []
    rows = evaluate_pairs(
        pairs,
        labels=labels,
        tolerance_mm=tolerance_mm,
        progress=progress,
        failures=failures,
        lesions=lesions,
        names=names,
        names_from=names_from,
        workers=workers,
    )
    failed = {case for case, _ in failures}
    scored = [pair for pair in pairs if pair[0] not in failed]
    return Evaluation(scored, rows, summarize(rows), failures, names, names_from)


def add_calibration(
    evaluation: Evaluation,
    probabilities: Path,
    bins: int = DEFAULT_BINS,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Counts the reliability of each scored case's probability file (in the folder
    ``probabilities``, or that file) against its truth into
    ``evaluation.calibration``. A case whose file is missing or does not fit its
    truth is left out of the calibration and added to the failures (its scores
    stay)."""
    total, names, per_case = None, None, {}
    for case, _, truth in evaluation.pairs:
        try:
            counts, names = case_reliability(
                probabilities_file(probabilities, case), truth, bins
            )
            if total is not None and counts.classes != total.classes:
                raise InputFileError(
                    probabilities_file(probabilities, case),
                    f"probabilities of {counts.classes} classes, other cases "
                    f"{total.classes}",
                )
        except InputFileError as exc:
            evaluation.failures.append((case, str(exc)))
        else:
            per_case[case] = round(counts.ece(), 6)
            if total is None:
                total = counts
            else:
                total += counts
        if progress is not None:
            progress(case)
    if total is not None:
        evaluation.calibration = {
            **total.summary(names),
            "cases": len(per_case),
            "ece_per_case": per_case,
        }


def format_calibration(calibration: dict) -> str:
    """Two lines: the top-class ECE over the voxels, and each label's."""
    labels = ", ".join(
        f"{name} {'-' if value is None else f'{value:.4f}'}"
        for name, value in calibration["ece_per_label"].items()
    )
    return (
        f"calibration over {calibration['voxels']} voxels of {calibration['cases']} "
        f"case(s), {calibration['bins']} bins: ECE (top class) "
        f"{calibration['ece']:.4f}\n  ECE per label: {labels}"
    )


def write_summary(
    evaluation: Evaluation,
    path: Path,
    tolerance_mm: float,
    lesions: float | None = None,
) -> None:
    """The summary JSON: the settings, the cases scored and failed, the label names
    and each label's metrics."""
    record = {
        "tolerance_mm": tolerance_mm,
        **({"min_lesion_mm3": lesions} if lesions is not None else {}),
        "cases": len(evaluation.pairs),
        "failed": dict(evaluation.failures),
        "label_names": {str(k): v for k, v in sorted(evaluation.names.items())},
        "labels": evaluation.summary,
        **(
            {"calibration": evaluation.calibration}
            if evaluation.calibration is not None
            else {}
        ),
    }
    atomic_write_text(path, json_text(record))


def write_table(evaluation: Evaluation, path: Path) -> None:
    """The per case and label CSV."""
    atomic_write_text(path, to_csv(evaluation.rows))


def write_pictures(
    evaluation: Evaluation, folder: Path, images: Path | None
) -> list[Path]:
    """Overlays of the best, median and worst cases (on their scans, where
    ``images`` has them) and a box plot of Dice per label."""
    from medseg.figures import write_reliability, write_report

    written = write_report(
        folder,
        evaluation.rows,
        evaluation.pairs,
        image_files(images, evaluation.pairs),
        evaluation.names,
    )
    if evaluation.calibration is not None:
        path = folder / "reliability.png"
        write_reliability(path, evaluation.calibration)
        written.append(path)
    return written


def image_files(images: Path | None, pairs) -> dict[str, Path]:
    """Case -> scan file for the overlays (a case without one is drawn without)."""
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
