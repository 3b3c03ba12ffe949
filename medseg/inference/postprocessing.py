"""Connected-component clean-up of label maps (after prediction, on the scan's grid).

Components are fully connected (26-neighbours in 3D, 8 in 2D), as
``skimage.measure.label``'s default and MONAI's ``KeepLargestConnectedComponent``.
Removed voxels become background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def checked_min_size(min_size_mm3: float) -> float:
    """``min_size_mm3`` as a float, refused unless finite and not negative.

    Raises:
        ValueError: naming the value.
    """
    size = float(min_size_mm3)
    if not (math.isfinite(size) and size >= 0):
        raise ValueError(
            f"min_size_mm3 must be a finite size >= 0, got {min_size_mm3!r}"
        )
    return size


def clean_labels(
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    background=0,
    keep_largest: bool = False,
    min_size_mm3: float = 0.0,
) -> np.ndarray:
    """Removes small or secondary components of each label value.

    Args:
        labels: a label map (any integer dtype), without a channel axis.
        spacing: voxel size in mm per axis (sizes are measured in mm^3, mm^2 in 2D).
        background: the value removed voxels get; it is never cleaned itself.
        keep_largest: per label value, keep only the largest component.
        min_size_mm3: per label value, remove components smaller than this.

    Returns:
        A new label map; ``labels`` is not modified.
    """
    out = np.array(labels, copy=True)
    if not keep_largest and min_size_mm3 <= 0:
        return out
    voxel = float(np.prod(spacing[: labels.ndim]))
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value in np.unique(labels):
        if value == background:
            continue
        components, count = ndimage.label(labels == value, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:] * voxel
        keep = np.ones(count, bool)
        if keep_largest:
            keep[:] = False
            keep[int(np.argmax(sizes))] = True
        if min_size_mm3 > 0:
            keep &= sizes >= min_size_mm3
        drop = np.concatenate([[False], ~keep])[components]
        out[drop] = background
    return out
