"""The volumes table (label volumes and intensities per case) and the run's report,
kept across re-runs and shards."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.inference.jobs.outputs import _measured, is_done
from medseg.io.files import atomic_write_text, hold_folder
from medseg.io.formats import (
    read_volume,
)
from medseg.io.volume import split_suffix

logger = logging.getLogger(__name__)


@dataclass
class CaseResult:
    """What happened to one input scan."""

    input: str
    output: str
    status: str  # "done", "skipped" (output existed) or "failed"
    seconds: float = 0.0
    error: str | None = None
    input_shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    nonfinite_replaced: int = 0  # NaN/Inf voxels filled (``--nonfinite replace``)
    warnings: list[str] = field(default_factory=list)  # header fixes, field of view
    #: distances from the training scans over their thresholds (ood.Verdict.scores)
    ood: dict | None = None
    sizes: dict | None = None  # per label name: see label_sizes
    earlier_run: bool = False  # skipped: the details are an earlier run's report's


#: the table of label sizes beside the report: ``medseg_volumes[-K-of-N].csv``
SIZES_FILE = "medseg_volumes"


#: every such table in a folder (a shard's too)
SIZES_PATTERN = SIZES_FILE + "*.csv"


def label_sizes(
    labels: np.ndarray,
    spacing,
    values,
    names,
    image: np.ndarray | None = None,
    entropy: np.ndarray | None = None,
) -> dict[str, dict]:
    """Per declared label, by name: its value, its voxels and their volume in ml
    (``area_mm2`` for 2D label maps, from the pixel spacing, 1 mm where a picture has
    none), and with ``image`` (the scan, ``(*S, C)`` on the label map's grid) the mean
    and standard deviation of each channel's values in the label (``intensity_mean``,
    ``intensity_sd``: lists, ``None`` for an empty label; Hounsfield units for CT),
    NaN voxels left out; with ``entropy`` (the prediction's uncertainty map, on the
    label map's grid) its mean in the label (``entropy_mean``) and on the label's
    boundary (``entropy_boundary``: its voxels with a face neighbour outside it or
    outside the map), ``None`` for an empty label. The first label is left out when
    it is named background (as nnU-Net names label 0), not otherwise (the membranes'
    0 is the membrane)."""
    from medseg.metrics import volume_ml

    labels = np.asarray(labels)
    if labels.ndim == len(spacing) + 1:  # a label volume's one channel
        labels = labels[..., 0]
    measured = _measured(values, names)
    if image is not None:
        image = np.asarray(image)
        image = image[..., None] if image.ndim == labels.ndim else image
        moments = _moments(labels, image, max(int(v) for v, _ in measured))
    unit, scale = ("volume_ml", 1.0) if len(spacing) == 3 else ("area_mm2", 1000.0)
    sizes = {}
    for value, name in measured:
        mask = labels == value
        size = sizes[str(name)] = {
            "label": int(value),
            "voxels": int(np.count_nonzero(mask)),
            unit: round(volume_ml(mask, spacing) * scale, 6),
        }
        if image is not None:
            count, total, squares = moments[:, int(value)]  # each (channels,)
            size["intensity_mean"], size["intensity_sd"] = [], []
            for n, s, q in zip(count, total, squares, strict=True):
                mean = s / n if n else None
                sd = math.sqrt(max(q / n - mean**2, 0.0)) if n else None
                size["intensity_mean"].append(_rounded(mean))
                size["intensity_sd"].append(_rounded(sd))
        if entropy is not None:
            size.update(_entropy_scores(mask, np.asarray(entropy)))
    return sizes


#: the uncertainty columns of the volumes table (``medseg predict --uncertainty``)
ENTROPIES = ("entropy_mean", "entropy_boundary")


def _entropy_scores(mask: np.ndarray, entropy: np.ndarray) -> dict:
    """The mean entropy in ``mask`` and on its boundary (see :func:`label_sizes`)."""
    from scipy import ndimage

    entropy = entropy.reshape(mask.shape)
    inner = ndimage.binary_erosion(
        mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0
    )
    boundary = mask & ~inner
    return {
        key: _rounded(float(entropy[where].mean())) if where.any() else None
        for key, where in zip(ENTROPIES, (mask, boundary), strict=True)
    }


#: voxels a pass when the moments of a scan's values per label are summed
MOMENT_CHUNK = 1 << 22


def _moments(labels: np.ndarray, image: np.ndarray, top: int) -> np.ndarray:
    """``(3, top + 1, channels)``: per label value and channel, the count, sum and
    sum of squares of the scan's values that are numbers, summed a chunk at a time
    (memory: a few float64 copies of a chunk, never of the scan)."""
    flat = labels.reshape(-1)
    values = image.reshape(flat.size, -1)
    moments = np.zeros((3, top + 1, values.shape[1]))
    for start in range(0, flat.size, MOMENT_CHUNK):
        which = flat[start : start + MOMENT_CHUNK].astype(np.intp)
        keep = which <= top
        for channel in range(values.shape[1]):
            x = values[start : start + MOMENT_CHUNK, channel].astype(np.float64)
            ok = keep & ~np.isnan(x)
            at, x = which[ok], x[ok]
            for row, weights in enumerate((None, x, x * x)):
                moments[row, :, channel] += np.bincount(
                    at, weights=weights, minlength=top + 1
                )
    return moments


def _rounded(value: float | None) -> float | None:
    """``value`` to 4 decimals, ``None`` kept."""
    return None if value is None else round(float(value), 4)


#: the Dice the averaged probabilities expect of a label (``--uncertainty``)
DICE_ESTIMATE = "dice_estimate"


#: the out-of-distribution columns of the volumes table: the case's (on each of its
#: rows) distances from the training scans over their thresholds
OOD_SCORES = ("ood_intensity", "ood_features")


#: the intensity columns of the volumes table, each a list over channels
INTENSITIES = ("intensity_mean", "intensity_sd")


def _intensity_columns(channels: int) -> list[str]:
    """``intensity_mean``, ``intensity_sd`` for a one-channel scan, else one of each
    per channel (``intensity_mean_0``, ...)."""
    if channels == 1:
        return list(INTENSITIES)
    return [f"{key}_{c}" for key in INTENSITIES for c in range(channels)]


def sizes_table(
    results: list[CaseResult],
    previous: Path | None,
    values,
    names,
    reader: Callable[[Path], object] | None = None,
    others=(),
) -> str | None:
    """The CSV of the label maps in the output folder, by case name: case, label, name,
    voxels, volume_ml (or area_mm2), and the scan's mean and standard deviation in
    the label (:func:`label_sizes`; one column of each per channel for scans of
    several). This run's (done or skipped) are measured, a skipped case's rows taken
    from ``previous`` (this table as an earlier run wrote it) or from ``others``
    (other tables in the folder: the shards', say; the most recently written table
    that has the case counts) when they have them, and kept in its result's
    ``sizes``; the rows ``previous`` has of other cases (earlier runs into the
    folder, one scan at a time, say) are kept as they are while a label map of that
    case is still beside it. A skipped case is measured again from its label map and
    its scan (read by ``reader``; without one, no intensities) when no table has its
    rows or their intensities. ``None`` when there is no row."""
    earlier = _read_sizes(previous)
    known: dict[str, dict] = {}
    tables = [t for t in (*others, previous) if t is not None]
    for table in sorted(tables, key=_modified):
        known.update(earlier if table == previous else _read_sizes(table))
    rows, covered = [], set()
    stems = Counter(
        split_suffix(Path(r.output))[0] for r in results if r.status != "failed"
    )
    for result in results:
        if result.status == "failed":
            continue
        case = split_suffix(Path(result.output))[0]
        if stems[case] > 1:  # case.nii and case.nii.gz: named by file, told apart
            case = Path(result.output).name
        covered.add(case)
        if result.sizes is None:
            wanted = [str(name) for _, name in _measured(values, names)]
            kept = known.get(case, {})
            if sorted(kept) == sorted(wanted) and (
                reader is None or all(INTENSITIES[0] in size for size in kept.values())
            ):
                result.sizes = kept
            else:
                try:
                    labels = read_volume(result.output)
                except InputFileError:
                    continue
                try:
                    image = reader(Path(result.input)).array if reader else None
                except InputFileError:  # the scan is gone: sizes alone
                    image = None
                result.sizes = label_sizes(
                    labels.array, labels.spacing, values, names, image
                )
                for size in result.sizes.values():  # an earlier report's scores
                    size.update(result.ood or {})
        for name, size in result.sizes.items():
            rows.append({"case": case, "name": name, **size})
    if earlier.keys() - covered:  # kept while their label map is there
        try:
            files = [split_suffix(p) for p in previous.parent.iterdir()]
            present = {stem for stem, suffix in files if suffix}
        except OSError:
            present = set()
        covered |= earlier.keys() - present
    for case, sizes in earlier.items():
        if case not in covered:
            rows += [
                {"case": case, "name": name, **size} for name, size in sizes.items()
            ]
    if not rows:
        return None
    unit = "volume_ml" if "volume_ml" in rows[0] else "area_mm2"
    rows = [row for row in rows if unit in row]  # not another model's 2D/3D rows
    rows.sort(key=lambda row: row["case"])  # stable: each case's labels in order
    channels = max(len(row.get(INTENSITIES[0]) or ()) for row in rows)
    columns = _intensity_columns(channels) if channels else []
    if any(ENTROPIES[0] in row for row in rows):
        columns += list(ENTROPIES)
    if any(DICE_ESTIMATE in row for row in rows):
        columns.append(DICE_ESTIMATE)
    if any(OOD_SCORES[0] in row for row in rows):
        columns += list(OOD_SCORES)
    for row in rows:  # lists over channels into columns
        for key in INTENSITIES:
            per_channel = row.pop(key, None) or ()
            keys = [key] if channels == 1 else [f"{key}_{c}" for c in range(channels)]
            row.update(zip(keys, per_channel, strict=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        ["case", "label", "name", "voxels", unit, *columns],
        lineterminator="\n",
        restval="",
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_sizes(
    results: list[CaseResult],
    path: Path,
    values,
    names,
    reader: Callable[[Path], object] | None = None,
    others=(),
) -> Path | None:
    """Writes the volumes table ``path`` of :func:`sizes_table` (the table there before
    as ``previous``; ``others`` as it takes them), atomically, and returns it; ``None``
    when there is no row. Two
    runs into one folder that end together take turns (a lock file beside it, held
    while it is read, measured and written), so neither writes over the other's rows
    with a table read before the other wrote it."""
    held = hold_folder(path.parent, f".{path.name}.lock", wait=True)
    try:
        table = sizes_table(results, path, values, names, reader, others)
        if table is not None:
            atomic_write_text(path, table)
    finally:
        held.release()
    return None if table is None else path


def _read_sizes(previous: Path | None) -> dict[str, dict]:
    """The rows of a volumes table as :func:`label_sizes` gives them, by case and
    label name; empty when it cannot be read."""
    earlier: dict[str, dict] = {}
    try:
        with open(
            previous, newline="", encoding="utf-8", errors="surrogateescape"
        ) as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            for row in reader:
                unit = "volume_ml" if "volume_ml" in row else "area_mm2"
                size = {
                    "label": int(row["label"]),
                    "voxels": int(row["voxels"]),
                    unit: float(row[unit]),
                }
                for key in INTENSITIES:
                    found = [f for f in fields if f == key or f.startswith(key + "_")]
                    if found:
                        size[key] = [float(row[f]) if row[f] else None for f in found]
                for key in (*ENTROPIES, DICE_ESTIMATE, *OOD_SCORES):
                    if key in fields:
                        size[key] = float(row[key]) if row[key] else None
                earlier.setdefault(row["case"], {})[row["name"]] = size
    except (OSError, TypeError, KeyError, ValueError, csv.Error):
        earlier = {}
    return earlier


#: the reports ``medseg predict`` writes into its output folder (one a shard)
REPORT_PATTERN = "medseg_predict_report*.json"


def carry_earlier_records(results: list[CaseResult], reports) -> int:
    """Gives each case skipped because its label map exists the details that the
    report of the run that made it has of it: its warnings (a header fixed, a field
    of view unlike the training scans', a blank scan), the NaN/Inf voxels replaced,
    its shape, spacing and seconds, its out-of-distribution scores, and
    ``earlier_run``; so that the report of a job run again after it was stopped
    still says what the first run found in each scan.

    Args:
        results: this run's; changed in place.
        reports: earlier reports' paths (a later one's record of a case counts over
            an earlier's); unreadable ones are passed over.

    Returns:
        How many cases were given an earlier record.
    """
    records = {}
    for path in sorted(reports, key=_modified):
        try:
            cases = json.loads(Path(path).read_text(encoding="utf-8"))["cases"]
            for case in cases:
                if case["status"] == "done" or case.get("earlier_run"):
                    records[_case_key(case["input"], case["output"])] = case
        except (OSError, ValueError, KeyError, TypeError):
            continue
    given = 0
    for result in results:
        case = records.get(_case_key(result.input, result.output))
        if (
            result.status != "skipped"
            or case is None
            or not is_done(Path(result.output))
        ):
            continue  # (skipped, its label map not there: left to another run)
        try:
            result.seconds = float(case["seconds"])
            result.input_shape = case["input_shape"]
            result.spacing_mm = case["spacing_mm"]
            result.nonfinite_replaced = int(case["nonfinite_replaced"])
            earlier = [w for w in case["warnings"] if w not in result.warnings]
        except (KeyError, TypeError, ValueError):
            continue
        result.ood = case.get("ood") if isinstance(case.get("ood"), dict) else None
        result.warnings[:0] = earlier
        result.earlier_run = True
        given += 1
    return given


def _modified(path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def _case_key(source: str, target: str) -> tuple[str, str]:
    """A case in reports of runs started from other folders: its input's and
    label map's names."""
    return Path(source).name, Path(target).name


def report(results: list[CaseResult]) -> dict:
    """Counts and per-case records, JSON-ready."""
    counts = {
        s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")
    }
    return {"counts": counts, "cases": [asdict(r) for r in results]}
