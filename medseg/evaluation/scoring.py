"""Evaluating label files against the truth: pairing, per-case metrics, summaries."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError, some_of
from medseg.figures import label_title
from medseg.io.formats import read_volume
from medseg.io.grid import label_array
from medseg.io.volume import SCAN_SUFFIXES, Volume, case_name, off_grid, split_suffix
from medseg.metrics import LESION_COLUMNS, METRIC_COLUMNS, label_metrics

CSV_COLUMNS = ("case", "label", *METRIC_COLUMNS)


def _columns(rows: list[dict]) -> tuple[str, ...]:
    """The metric columns of ``rows``: the lesion-wise ones too when scored."""
    lesions = bool(rows) and LESION_COLUMNS[0] in rows[0]
    return (*METRIC_COLUMNS, *(LESION_COLUMNS if lesions else ()))


def _scans(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and split_suffix(p)[1] in SCAN_SUFFIXES
    }


def pair_files(prediction: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """``(case, prediction file, truth file)`` for two files, or two folders matched by
    file name, or else by case (:func:`case_name`: ``CASE.nii.gz`` with
    ``CASE.seg.nrrd``) where that names one file on each side.

    Raises:
        InputFileError: a missing path, or files without a partner (all named).
    """
    prediction, truth = Path(prediction), Path(truth)
    for path in (prediction, truth):
        if not path.exists():
            raise InputFileError(path, "not found")
    if prediction.is_file() and truth.is_file():
        return [(case_name(truth), prediction, truth)]
    if not (prediction.is_dir() and truth.is_dir()):
        raise InputFileError(prediction, "give two files or two folders")
    predicted, truths = _scans(prediction), _scans(truth)
    missing = sorted(set(truths) - set(predicted))
    extra = sorted(set(predicted) - set(truths))
    others: dict[str, list[str]] = {}
    for name in extra:
        others.setdefault(case_name(name), []).append(name)
    for name in list(missing):  # the same case in another format
        partners = others.get(case_name(name), [])
        if (
            len(partners) == 1
            and sum(case_name(m) == case_name(name) for m in missing) == 1
        ):
            predicted[name] = predicted.pop(partners[0])
            missing.remove(name)
            extra.remove(partners[0])
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no prediction for {some_of(missing)}")
        if extra:
            parts.append(f"no truth for {some_of(extra)}")
        raise InputFileError(prediction, "; ".join(parts))
    if not truths:
        raise InputFileError(truth, "no scan files found")
    return [(case_name(name), predicted[name], truths[name]) for name in truths]


def evaluate_pairs(
    pairs,
    *,
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    progress: Callable[[str], None] | None = None,
    failures: list[tuple[str, str]] | None = None,
    lesions: float | None = None,
    names: dict[int, str] | None = None,
    names_from: str = "the dataset's labels",
    workers: int = 1,
) -> list[dict]:
    """One row per case and label (labels default to the non-zero values present).

    Args:
        workers: cases scored at once, each in a process of its own (rows and
            failures come in the cases' order all the same).
        lesions: also score lesion-wise (:func:`medseg.metrics.lesion_metrics`),
            leaving out components under this size (mm^3).
        names: label names (value -> name); a 3D Slicer segmentation whose segment
            named as one holds another value is refused, saying they come from
            ``names_from``.
        failures: when a list, a case whose files cannot be read or are on different
            grids is appended to it as ``(case, message)`` and the others are scored;
            when ``None`` the first such case raises.

    Raises:
        InputFileError: unreadable file, or prediction and truth on different grids
            (only when ``failures`` is ``None``).
    """
    score = partial(
        _score_case,
        labels=labels,
        tolerance_mm=tolerance_mm,
        lesions=lesions,
        names=names,
        names_from=names_from,
    )
    rows, pairs = [], list(pairs)
    if workers > 1 and len(pairs) > 1:
        scored = in_processes(score, pairs, workers)
    else:
        scored = (score(*pair) for pair in pairs)
    with contextlib.closing(scored):  # an error stops the processes' other work
        for (case, _, _), (case_rows, error) in zip(pairs, scored, strict=True):
            if error is not None:
                if failures is None:
                    raise error
                failures.append((case, str(error)))
            rows += case_rows
            if progress:
                progress(case)
    return rows


def in_processes(score: Callable, pairs: Sequence[tuple], workers: int):
    """``score(*pair)`` for each pair, in order, from ``workers`` processes at once. A
    pair whose process dies (killed for memory, say: the pool loses the work of the
    others too) is scored again alone in a process of its own, and if that one dies
    too it gives ``([], InputFileError)`` naming its last path; the pairs after it
    go on in a new pool."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    start = 0
    while start < len(pairs):
        pool = ProcessPoolExecutor(min(workers, len(pairs) - start))
        try:
            futures = [pool.submit(score, *pair) for pair in pairs[start:]]
            for future in futures:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    break
                yield result
                start += 1
            else:
                return
        finally:
            pool.shutdown(cancel_futures=True)
        alone = ProcessPoolExecutor(1)
        try:
            yield alone.submit(score, *pairs[start]).result()
        except BrokenProcessPool:
            yield (
                [],
                InputFileError(
                    pairs[start][-1],
                    "the process scoring it died (killed for lack of memory?), also "
                    "when scored alone",
                ),
            )
        finally:
            alone.shutdown(cancel_futures=True)
        start += 1


def _score_case(
    case, pred_path, truth_path, *, labels, tolerance_mm, lesions, names, names_from
) -> tuple[list[dict], InputFileError | None]:
    """One case's rows of :func:`evaluate_pairs`, or the reason it cannot be
    scored."""
    try:
        p, t, spacing = _read_pair(pred_path, truth_path, names, names_from)
    except InputFileError as exc:
        return [], exc
    rows = pair_metrics(p, t, spacing, labels, tolerance_mm, lesions)
    return [{"case": case, **row} for row in rows], None


def pair_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    lesions: float | None = None,
) -> list[dict]:
    """:func:`medseg.metrics.label_metrics` of two label arrays on one grid, for
    ``labels`` or by default every non-zero value present in either."""
    if labels is None:
        present = set(np.unique(prediction).tolist()) | set(np.unique(truth).tolist())
        labels = sorted(present - {0})
    return label_metrics(prediction, truth, labels, spacing, tolerance_mm, lesions)


def _read_pair(
    pred_path: Path,
    truth_path: Path,
    names: dict[int, str] | None = None,
    names_from: str = "the dataset's labels",
):
    """The prediction's and the truth's label arrays and the spacing, checked to be
    on one grid (a prediction stored in another voxel order is read in the truth's;
    one saved on a box of the other's grid, as 3D Slicer may crop segmentations, is
    placed in it) and, for 3D Slicer segmentations, to hold each label ``names``
    names at its value."""
    return label_arrays(
        read_volume(pred_path), read_volume(truth_path), names, names_from
    )


def label_arrays(
    prediction: Volume,
    truth: Volume,
    names: dict[int, str] | None = None,
    names_from: str = "the dataset's labels",
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The label arrays of a prediction and its truth on one grid, and its spacing:
    see :func:`_read_pair`.

    Raises:
        InputFileError: naming the prediction when the two are on different grids, or
            either file when it is not a label map.
    """
    from medseg.io.grid import label_on_grid_of
    from medseg.io.itk import segments_against_labels

    for volume in (prediction, truth):
        problems = segments_against_labels(volume.header, names, names_from)
        if problems:
            raise InputFileError(volume.path, "; ".join(problems))
    placed = label_on_grid_of(prediction, truth)
    if placed is not None:
        return label_array(placed), label_array(truth), truth.spacing
    placed = label_on_grid_of(truth, prediction)  # the truth on a box
    if placed is not None:
        return label_array(prediction), label_array(placed), prediction.spacing
    raise InputFileError(prediction.path, off_grid(prediction, truth, "the truth's"))


def summarize(rows: list[dict]) -> dict:
    """Per label and metric: mean, std and median over cases with a finite value, and
    the counts of NaN (both masks empty) and inf (one mask empty) values; lesion
    counts also their ``total``, and lesion-wise recall and precision their
    ``pooled`` value (over every case's lesions together)."""
    summary = {}
    columns = _columns(rows)
    for label in sorted({r["label"] for r in rows}):
        of_label = [r for r in rows if r["label"] == label]
        summary[str(label)] = {}
        for metric in columns:
            values = np.array([r[metric] for r in of_label], dtype=float)
            finite = values[np.isfinite(values)]
            summary[str(label)][metric] = {
                "mean": float(finite.mean()) if finite.size else math.nan,
                "std": float(finite.std()) if finite.size else math.nan,
                "median": float(np.median(finite)) if finite.size else math.nan,
                "n": int(finite.size),
                "n_nan": int(np.isnan(values).sum()),
                "n_inf": int(np.isinf(values).sum()),
            }
            if metric.startswith("lesions_"):
                summary[str(label)][metric]["total"] = int(values.sum())
        if LESION_COLUMNS[0] in columns:
            scores = summary[str(label)]
            truth, pred, found, false = (scores[m]["total"] for m in LESION_COLUMNS[:4])
            scores["lesion_recall"]["pooled"] = found / truth if truth else math.nan
            scores["lesion_precision"]["pooled"] = (
                (pred - false) / pred if pred else math.nan
            )
    return summary


def to_csv(rows: list[dict]) -> str:
    """Long-form CSV text: ``case,label,dice,iou,hd95_mm,assd_mm,nsd,volume_*``;
    NaN written as ``nan`` and infinity as ``inf``."""
    buffer = io.StringIO()
    columns = ("case", "label", *_columns(rows))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def format_summary(summary: dict, names: dict[int, str] | None = None) -> str:
    """The table ``medseg evaluate`` prints: mean (median) per label, with the labels'
    names where ``names`` gives them."""
    titles = {label: label_title(label, names) for label in summary}
    width = max([5, *map(len, titles.values())])
    lines = [
        f"{'label':<{width}}  {'dice':>15}  {'hd95_mm':>15}  {'assd_mm':>15}  "
        f"{'nsd':>15}  empty"
    ]
    for label, metrics in summary.items():
        cells = [
            f"{metrics[m]['mean']:.3f} ({metrics[m]['median']:.3f})"
            for m in ("dice", "hd95_mm", "assd_mm", "nsd")
        ]
        flags = f"{metrics['dice']['n_nan']} both, {metrics['hd95_mm']['n_inf']} one"
        lines.append(
            f"{titles[label]:<{width}}  "
            + "  ".join(f"{c:>15}" for c in cells)
            + f"  {flags}"
        )
    if any(LESION_COLUMNS[0] in metrics for metrics in summary.values()):
        lines.append(
            f"{'lesions':<{width}}  {'truth':>6}  {'found':>6}  {'recall':>6}  "
            f"{'pred':>6}  {'false':>6}  {'prec.':>6}  {'F1':>15}  "
            f"{'lesion Dice':>15}"
        )
        for label, metrics in summary.items():
            total = {m: metrics[m]["total"] for m in LESION_COLUMNS[:4]}
            pooled = [
                metrics[m]["pooled"] for m in ("lesion_recall", "lesion_precision")
            ]
            means = [
                f"{metrics[m]['mean']:.3f} ({metrics[m]['median']:.3f})"
                for m in ("lesion_f1", "lesion_dice")
            ]
            lines.append(
                f"{titles[label]:<{width}}  {total['lesions_truth']:>6}  "
                f"{total['lesions_detected']:>6}  {pooled[0]:>6.3f}  "
                f"{total['lesions_pred']:>6}  {total['lesions_false']:>6}  "
                f"{pooled[1]:>6.3f}  {means[0]:>15}  {means[1]:>15}"
            )
    return "\n".join(lines)


# classification


def read_prediction_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Cases and ``(N, K)`` probabilities from a ``medseg predict`` classification CSV
    (columns ``case,predicted,prob_<name>...``).

    Raises:
        InputFileError: unreadable, missing columns, or non-numeric probabilities.
    """
    rows, header = _read_csv(path, ("case",))
    columns = [c for c in header if c.startswith("prob_")]
    if not columns:
        raise InputFileError(path, "no prob_<class> columns (not a predictions CSV)")
    try:
        scores = np.array([[float(r[c]) for c in columns] for r in rows])
    except ValueError as exc:
        raise InputFileError(path, f"non-numeric probability ({exc})") from None
    return [r["case"] for r in rows], scores.reshape(len(rows), len(columns))


def read_class_truth(
    path: Path, split: str = "test", spatial_dims: int | None = None
) -> dict[str, int]:
    """Case -> class from a CSV (``case,label``) or a MedMNIST-style ``.npz`` split
    (cases named ``<split>_<index>``, as ``medseg predict`` names them)."""
    path = Path(path)
    if path.suffix == ".npz":
        from medseg.datasets.layouts import read_npz_arrays

        arrays = read_npz_arrays(path)
        if f"{split}_labels" not in arrays:
            raise InputFileError(path, f"no {split}_labels")
        labels = np.asarray(arrays[f"{split}_labels"]).reshape(-1)
        if labels.dtype.kind not in "iu":
            raise InputFileError(path, f"{split}_labels are not integer classes")
        return {f"{split}_{i}": int(v) for i, v in enumerate(labels)}
    rows, _ = _read_csv(path, ("case", "label"))
    try:
        return {r["case"]: int(r["label"]) for r in rows}
    except ValueError as exc:
        raise InputFileError(path, f"label is not an integer class ({exc})") from None


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[dict], list[str]]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), list(reader.fieldnames or [])
    except FileNotFoundError:
        raise InputFileError(path, "not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(path, f"unreadable CSV ({exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputFileError(path, f"missing column(s) {', '.join(missing)}")
    return rows, header


def evaluate_classification(
    prediction: Path, truth: Path, *, split: str = "test"
) -> dict:
    """Accuracy, balanced accuracy, macro AUC and one-vs-rest AUC per class of a
    predictions CSV against the true classes.

    Raises:
        InputFileError: cases on one side only (named), or classes outside the
            predicted columns.
    """
    from medseg.evaluation.classification import binary_auc, classification_scores

    cases, scores = read_prediction_csv(prediction)
    classes = read_class_truth(truth, split)
    missing = [c for c in classes if c not in set(cases)]
    extra = [c for c in cases if c not in classes]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no prediction for {', '.join(missing[:5])}")
        if extra:
            parts.append(f"no truth for {', '.join(extra[:5])}")
        raise InputFileError(prediction, "; ".join(parts))
    labels = np.array([classes[c] for c in cases])
    if labels.max(initial=0) >= scores.shape[1]:
        raise InputFileError(
            truth, f"class {labels.max()} but {scores.shape[1]} predicted classes"
        )
    result = {"cases": len(cases), **classification_scores(scores, labels)}
    result["auc_per_class"] = {
        str(k): binary_auc(scores[:, k], labels == k) for k in range(scores.shape[1])
    }
    return result
