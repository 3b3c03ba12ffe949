"""The Python API in a few calls, with the command line's defaults.

```python
import medseg

prediction = medseg.segment("scan.nii.gz", model="hippocampus")
medseg.write_volume(prediction.labels, "labels.nii.gz")
rows = medseg.evaluate("labels.nii.gz", "truth.nii.gz")
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg.inference.classifier import Classifier
    from medseg.inference.segmenter import Prediction, Segmenter
    from medseg.io.volume import Volume


def load_bundle(
    model: str | Path,
    *,
    tta: bool = True,
    allow_modified: bool = False,
    **options: Any,
) -> Segmenter | Classifier:
    """A bundle ready to predict, as ``medseg predict --model MODEL`` loads it.

    Args:
        model: a bundle folder, or the name of a shipped model (``medseg models``).
        tta: mirror test-time augmentation along the axes the bundle was trained to
            mirror (the command line's ``--tta``, on by default).
        allow_modified: accept a ``model.keras`` whose sha256 differs from the one
            ``medseg.json`` records (still loaded in Keras safe mode).
        **options: further :class:`~medseg.inference.segmenter.Segmenter` options
            (``overlap``, ``batch_size``, ``keep_largest``, ``min_size_mm3``,
            ``probabilities``, ``precision``, ``nonfinite``).

    Returns:
        A :class:`~medseg.inference.segmenter.Segmenter` for a segmentation bundle, a
        :class:`~medseg.inference.classifier.Classifier` for a classification one.

    Raises:
        InputFileError: no such bundle or shipped model, or a damaged one.
    """
    from medseg.bundle import read_metadata, resolve
    from medseg.inference.classifier import Classifier
    from medseg.inference.scan_plan import bundle_mirror_axes
    from medseg.inference.segmenter import Segmenter

    folder = resolve(model)
    metadata = read_metadata(folder)
    if metadata.task == "classification":
        return Classifier(folder, allow_modified=allow_modified, **options)
    mirror_axes = bundle_mirror_axes(metadata) if tta else ()
    return Segmenter(
        folder, mirror_axes=mirror_axes, allow_modified=allow_modified, **options
    )


def segment(
    scan: str | Path | Volume,
    model: str | Path = "hippocampus",
    *,
    probabilities: bool = False,
    **options: Any,
) -> Prediction:
    """One scan segmented, on its own grid, as ``medseg predict`` segments it.

    Args:
        scan: a scan's path (any format :func:`medseg.io.read_volume` reads) or a
            :class:`~medseg.io.volume.Volume`.
        model: a bundle folder or a shipped model's name.
        probabilities: also return the class probabilities.
        **options: as :func:`load_bundle` takes them (``tta``, ``overlap``, ...).

    Returns:
        A :class:`~medseg.inference.segmenter.Prediction`: ``labels`` (a Volume on
        the scan's grid and affine), ``probabilities`` ``(*S, K)`` when asked for,
        the label ``values`` and ``names``, and ``notes`` (warnings about the scan).

    Raises:
        InputFileError: an unreadable scan, or one the bundle refuses (naming it).
    """
    from medseg.io.formats import read_volume
    from medseg.io.volume import Volume

    segmenter = load_bundle(model, probabilities=probabilities, **options)
    volume = scan if isinstance(scan, Volume) else read_volume(scan)
    return segmenter.predict(volume)


def evaluate(
    prediction: str | Path | Volume,
    truth: str | Path | Volume,
    *,
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
) -> list[dict]:
    """A label map scored against the truth, as ``medseg evaluate`` scores a pair.

    Args:
        prediction: a label map (a path or a Volume).
        truth: the true label map, on the prediction's grid; one stored in another
            voxel order, or on a box of the other's grid, is placed on it.
        labels: the label values to score (default: the non-zero values in either).
        tolerance_mm: the surface Dice tolerance.

    Returns:
        One row per label: ``label``, ``dice``, ``iou``, ``hd95_mm``, ``assd_mm``,
        ``nsd`` (surface Dice at ``tolerance_mm``), ``volume_truth_ml`` and
        ``volume_pred_ml`` (:func:`medseg.evaluation.scoring.pair_metrics`).

    Raises:
        InputFileError: unreadable files, not label maps, or on different grids.
    """
    from medseg.evaluation.scoring import label_arrays, pair_metrics
    from medseg.io.formats import read_volume
    from medseg.io.volume import Volume

    pair = (prediction, truth)
    volumes = [v if isinstance(v, Volume) else read_volume(v) for v in pair]
    p, t, spacing = label_arrays(*volumes)
    return pair_metrics(p, t, spacing, labels, tolerance_mm)
