"""Segmentation metrics on whole volumes, in millimetres (NumPy/SciPy).

All functions take two boolean masks of one label (prediction, truth) of the same
shape; distance metrics also take the voxel spacing in mm.

Surfaces are boundary voxels: voxels of a mask with a face neighbour (6-connected in
3D, 4 in 2D) outside it, the image border counting as outside (as MONAI and MedPy).
Distances are Euclidean in mm between boundary voxel centres, computed with distance
transforms on the bounding box of both masks only, so large volumes stay cheap.

Empty masks (the policy, the same for every function):

* both empty: every metric is NaN (undefined; excluded from means, counted apart);
* one empty: Dice, IoU and surface Dice are 0; Hausdorff and average surface distance
  are ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _masks(prediction, truth):
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from truth shape "
            f"{truth.shape}"
        )
    return prediction, truth


def dice(prediction, truth) -> float:
    """``2 |P & T| / (|P| + |T|)``; NaN when both are empty."""
    p, t = _masks(prediction, truth)
    total = int(p.sum()) + int(t.sum())
    return float("nan") if total == 0 else 2.0 * int((p & t).sum()) / total


def iou(prediction, truth) -> float:
    """``|P & T| / |P | T|`` (Jaccard); NaN when both are empty."""
    p, t = _masks(prediction, truth)
    union = int((p | t).sum())
    return float("nan") if union == 0 else int((p & t).sum()) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the border is outside)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _spacing(spacing, ndim) -> tuple[float, ...]:
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive values, got {spacing}")
    return spacing


def surface_distances(prediction, truth, spacing=None):
    """Directed distances (mm): from each boundary voxel of the prediction to the
    truth's boundary, and from the truth's to the prediction's.

    Returns:
        ``(pred_to_truth, truth_to_pred)`` 1D arrays; ``None`` for both when either mask
        is empty.
    """
    p, t = _masks(prediction, truth)
    spacing = _spacing(spacing, p.ndim)
    if not p.any() or not t.any():
        return None, None
    union = p | t
    box = tuple(
        slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(union)
    )
    bp, bt = boundary(p)[box], boundary(t)[box]
    to_truth = ndimage.distance_transform_edt(~bt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)
    return to_truth[bp], to_pred[bt]


def _empty_policy(prediction, truth, one_empty: float):
    p, t = _masks(prediction, truth)
    if not p.any() and not t.any():
        return float("nan")
    if not p.any() or not t.any():
        return one_empty
    return None


def hausdorff_distance(
    prediction, truth, spacing=None, percentile: float = 95
) -> float:
    """The larger of the two directed ``percentile``-th surface distances (mm); 100
    gives the classic Hausdorff distance. ``inf`` if one mask is empty, NaN if both."""
    special = _empty_policy(prediction, truth, float("inf"))
    if special is not None:
        return special
    a, b = surface_distances(prediction, truth, spacing)
    return float(max(np.percentile(a, percentile), np.percentile(b, percentile)))


def average_surface_distance(prediction, truth, spacing=None) -> float:
    """Average symmetric surface distance: the mean of the two directed mean distances
    (mm). ``inf`` if one mask is empty, NaN if both."""
    special = _empty_policy(prediction, truth, float("inf"))
    if special is not None:
        return special
    a, b = surface_distances(prediction, truth, spacing)
    return float((a.mean() + b.mean()) / 2)


def surface_dice(prediction, truth, spacing=None, tolerance_mm: float = 1.0) -> float:
    """Normalised surface Dice: the fraction of both boundaries lying within
    ``tolerance_mm`` of the other boundary. 0 if one mask is empty, NaN if both."""
    special = _empty_policy(prediction, truth, 0.0)
    if special is not None:
        return special
    a, b = surface_distances(prediction, truth, spacing)
    return float(
        ((a <= tolerance_mm).sum() + (b <= tolerance_mm).sum()) / (a.size + b.size)
    )


def surface_scores(
    prediction, truth, spacing=None, tolerance_mm: float = 1.0, percentile: float = 95
) -> tuple[float, float, float]:
    """:func:`hausdorff_distance` at ``percentile``, :func:`average_surface_distance`
    and :func:`surface_dice`, from one pair of distance transforms (each of the three
    alone computes the pair)."""
    special = _empty_policy(prediction, truth, float("inf"))
    if special is not None:
        return special, special, 0.0 if math.isinf(special) else special
    a, b = surface_distances(prediction, truth, spacing)
    return (
        float(max(np.percentile(a, percentile), np.percentile(b, percentile))),
        float((a.mean() + b.mean()) / 2),
        float(
            ((a <= tolerance_mm).sum() + (b <= tolerance_mm).sum()) / (a.size + b.size)
        ),
    )


def volume_ml(mask, spacing=None) -> float:
    """Volume in millilitres (1 ml = 1000 mm^3)."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.sum() * np.prod(_spacing(spacing, mask.ndim)) / 1000.0)


def lesion_metrics(prediction, truth, spacing=None, min_size_mm3: float = 0.0) -> dict:
    """Lesion-wise scores of one label: its connected components (fully connected: 26
    neighbours in 3D, 8 in 2D) are lesions, in the truth and in the prediction.

    A truth lesion is detected when a predicted component overlaps it by a voxel or
    more; a predicted component that overlaps no truth lesion is a false one. Each
    truth lesion's Dice is against the predicted components that overlap it (0 when
    missed); ``lesion_dice`` is their sum over the truth lesions and the false
    components together (a false component adds a 0), as BraTS' lesion-wise Dice
    counts them. Components under ``min_size_mm3`` (mm^2 in 2D) are left out on both
    sides.

    Returns:
        ``lesions_truth``, ``lesions_pred``, ``lesions_detected`` (truth lesions),
        ``lesions_false`` (predicted components), ``lesion_recall`` (detected /
        truth), ``lesion_precision`` (predicted components that overlap a truth
        lesion / predicted), ``lesion_f1`` and ``lesion_dice``. With no lesion on
        either side every rate is NaN; with none on one side, F1 and Dice are 0 and
        the rate that would divide by 0 is NaN.
    """
    p, t = _masks(prediction, truth)
    voxel = float(np.prod(_spacing(spacing, p.ndim)))
    structure = ndimage.generate_binary_structure(p.ndim, p.ndim)
    components = []
    for mask in (t, p):
        ids, count = ndimage.label(mask, structure)
        sizes = np.bincount(ids.ravel(), minlength=count + 1)
        small = sizes * voxel < min_size_mm3
        small[0] = False
        if small.any():  # left out: relabel the others 1..n
            keep = np.cumsum(~small) - 1
            keep[small] = 0
            ids = keep[ids]
            sizes = np.bincount(ids.ravel())
            count = len(sizes) - 1
        components.append((ids, count, sizes))
    (t_ids, n_t, t_sizes), (p_ids, n_p, p_sizes) = components
    both = (t_ids > 0) & (p_ids > 0)
    pairs, overlaps = np.unique(
        t_ids[both].astype(np.int64) * (n_p + 1) + p_ids[both], return_counts=True
    )
    pair_t, pair_p = pairs // (n_p + 1), pairs % (n_p + 1)
    shared = np.bincount(pair_t, weights=overlaps, minlength=n_t + 1)[1:]
    matched = np.bincount(pair_t, weights=p_sizes[pair_p], minlength=n_t + 1)[1:]
    dices = 2 * shared / (t_sizes[1:] + matched)  # 0 where missed
    detected = int(np.count_nonzero(shared))
    hits = len(np.unique(pair_p))
    false = n_p - hits
    recall = detected / n_t if n_t else math.nan
    precision = hits / n_p if n_p else math.nan
    if not n_t and not n_p:
        f1 = lesion_dice = math.nan
    else:
        f1 = 0.0
        if n_t and n_p and recall + precision > 0:
            f1 = 2 * recall * precision / (recall + precision)
        lesion_dice = float(dices.sum() / (n_t + false))
    return {
        "lesions_truth": int(n_t),
        "lesions_pred": int(n_p),
        "lesions_detected": detected,
        "lesions_false": int(false),
        "lesion_recall": recall,
        "lesion_precision": precision,
        "lesion_f1": f1,
        "lesion_dice": lesion_dice,
    }


LESION_COLUMNS = (
    "lesions_truth",
    "lesions_pred",
    "lesions_detected",
    "lesions_false",
    "lesion_recall",
    "lesion_precision",
    "lesion_f1",
    "lesion_dice",
)


def _label_boxes(prediction, truth, labels) -> dict:
    """Per label, the slices of the smallest box holding it in either map (an empty
    box where it is in neither); with :func:`scipy.ndimage.find_objects` in one pass
    over each map where the values allow (whole, from 0 to 65,535), else (and for
    label 0, which it does not box) label by label."""
    empty = (slice(0, 0),) * prediction.ndim
    whole = all(
        a.dtype.kind in "iub" and (a.size == 0 or (a.min() >= 0 and a.max() < 2**16))
        for a in (prediction, truth)
    )
    boxes = {}
    if whole and prediction.size:
        found = [
            ndimage.find_objects(a.astype(np.int32, copy=False))
            for a in (prediction, truth)
        ]
    for label in labels:
        if whole and prediction.size and label > 0:
            index = int(label) - 1
            parts = [
                f[index] for f in found if 0 <= index < len(f) and f[index] is not None
            ]
        else:
            parts = []
            for a in (prediction, truth):
                where = np.nonzero(a == label)
                if where[0].size:
                    parts.append(tuple(slice(i.min(), i.max() + 1) for i in where))
        boxes[label] = (
            tuple(
                slice(min(s.start for s in axis), max(s.stop for s in axis))
                for axis in zip(*parts, strict=True)
            )
            if parts
            else empty
        )
    return boxes


METRIC_COLUMNS = (
    "dice",
    "iou",
    "hd95_mm",
    "assd_mm",
    "nsd",
    "volume_truth_ml",
    "volume_pred_ml",
)


def label_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    lesions: float | None = None,
) -> list[dict]:
    """Every metric for each label of two label maps: one dict per label; with
    ``lesions`` (a minimum lesion size in mm^3) also :func:`lesion_metrics`. Each
    label is scored on the box that holds it in either map (every metric is the same
    there as on the whole maps), found for all labels in one pass."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        _masks(prediction, truth)  # the error
    boxes = _label_boxes(prediction, truth, labels)
    rows = []
    for label in labels:
        box = boxes[label]
        p, t = prediction[box] == label, truth[box] == label
        hd95, assd, nsd = surface_scores(p, t, spacing, tolerance_mm)
        rows.append(
            {
                "label": int(label),
                "dice": dice(p, t),
                "iou": iou(p, t),
                "hd95_mm": hd95,
                "assd_mm": assd,
                "nsd": nsd,
                "volume_truth_ml": volume_ml(t, spacing),
                "volume_pred_ml": volume_ml(p, spacing),
            }
        )
        if lesions is not None:
            rows[-1].update(lesion_metrics(p, t, spacing, lesions))
    return rows
