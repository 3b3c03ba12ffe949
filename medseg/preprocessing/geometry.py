"""Geometric preprocessing steps, each with an exact record of how to undo it.

Three forward steps, each returning ``(volume, record)``:

* :func:`reorient_to_canonical`: permute and flip voxel axes so that they run as close
  as possible to RAS+ (nibabel's closest canonical orientation). Lossless.
* :func:`resample_to_spacing`: resample to a target voxel size, with nnU-Net's treatment
  of anisotropic scans (in-plane spline, separate low-order interpolation along the
  thick axis).
* :func:`crop_to_nonzero`: crop to the bounding box of the non-zero region. Lossless for
  the voxels outside the box, which are zero.

:func:`undo` applies the inverses of a list of records in reverse order, so a prediction
made on the preprocessed grid comes back on the original grid with the original affine,
exactly. Records are frozen dataclasses with ``to_dict``/:func:`record_from_dict` so
they can travel in JSON. 2D volumes (``(H, W, C)``) pass through reorientation
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from medseg.io.volume import Volume

#: nnU-Net's threshold: a spacing ratio above this marks an axis as out-of-plane.
ANISOTROPY_THRESHOLD = 3.0


def _affine_tuple(affine: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(affine))


def _shape_tuple(shape) -> tuple[int, ...]:
    return tuple(int(n) for n in shape)


@dataclass(frozen=True)
class _Record:
    """Common serialisation for geometry records."""

    original_shape: tuple[int, ...]
    original_affine: tuple[tuple[float, ...], ...]

    step = ""

    def to_dict(self) -> dict:
        return {"step": self.step, **asdict(self)}

    def _restore(self, volume: Volume, array: np.ndarray) -> Volume:
        if tuple(array.shape[:-1]) != tuple(self.original_shape):
            raise ValueError(
                f"undo {self.step}: got spatial shape {array.shape[:-1]}, "
                f"expected {self.original_shape}"
            )
        return volume.with_array(array, np.array(self.original_affine))


@dataclass(frozen=True)
class OrientationRecord(_Record):
    """How :func:`reorient_to_canonical` permuted and flipped the voxel axes.

    ``transform[i] = (axis, flip)``: nibabel orientation rows from the original to RAS.
    """

    transform: tuple[tuple[int, int], ...] = ()
    step = "reorient"

    def undo(self, volume: Volume, **_) -> Volume:
        from nibabel import orientations

        if not self.transform:
            return self._restore(volume, volume.array)
        forward = np.array(self.transform, dtype=float)
        identity = np.array([[i, 1] for i in range(len(forward))], dtype=float)
        inverse = orientations.ornt_transform(identity, forward)
        array = orientations.apply_orientation(volume.array, inverse)
        return self._restore(volume, array)


def reorient_to_canonical(volume: Volume) -> tuple[Volume, OrientationRecord]:
    """Reorders and flips voxel axes to the closest RAS+ orientation (no resampling).

    The data is only permuted, so the step is lossless; the new affine maps every voxel
    to the same world position it had. 2D volumes are returned unchanged.

    Returns:
        The reoriented volume and the record :meth:`OrientationRecord.undo` needs.
    """
    record_base = (_shape_tuple(volume.spatial_shape), _affine_tuple(volume.affine))
    if volume.spatial_dims != 3:
        return volume, OrientationRecord(*record_base, transform=())
    from nibabel import orientations

    ornt = orientations.io_orientation(volume.affine)
    array = orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ orientations.inv_ornt_aff(ornt, volume.spatial_shape)
    transform = tuple((int(axis), int(flip)) for axis, flip in ornt)
    return volume.with_array(array, affine), OrientationRecord(*record_base, transform)


def resampled_shape(
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float],
) -> tuple[int, ...]:
    """Voxels along each axis after resampling: ``round(n * spacing / target)``, at
    least 1."""
    if len(shape) != len(spacing_mm) or len(shape) != len(target_spacing_mm):
        raise ValueError(
            f"shape {tuple(shape)}, spacing {tuple(spacing_mm)} and target spacing "
            f"{tuple(target_spacing_mm)} must have the same length"
        )
    if any(t <= 0 for t in target_spacing_mm):
        raise ValueError(
            f"target spacing must be positive, got {tuple(target_spacing_mm)}"
        )
    return tuple(
        max(1, int(round(n * s / t)))
        for n, s, t in zip(shape, spacing_mm, target_spacing_mm, strict=True)
    )


def out_of_plane_axis(
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float] | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """The thick axis to resample separately, as nnU-Net decides it, or ``None``.

    A spacing is anisotropic when its largest/smallest ratio exceeds ``threshold``; the
    axis is the one with the largest spacing, taken from the original spacing if that is
    anisotropic, else from the target. With several equally thick axes there is none.
    """
    for candidate in (spacing_mm, target_spacing_mm):
        if candidate is None or len(candidate) != 3:
            continue
        spacing = np.asarray(candidate, dtype=float)
        if spacing.max() / spacing.min() > threshold:
            thick = np.flatnonzero(spacing == spacing.max())
            return int(thick[0]) if len(thick) == 1 else None
    return None


@dataclass(frozen=True)
class ResampleRecord(_Record):
    """What :func:`resample_to_spacing` did: enough to resample back to the original
    grid."""

    separate_axis: int | None = None
    order_out_of_plane: int = 0
    step = "resample"

    def undo(self, volume: Volume, *, is_label: bool = False, order: int = 1) -> Volume:
        """Resamples back to the original shape; restores the original affine exactly.

        Args:
            is_label: per-class linear interpolation and argmax instead of a spline.
            order: spline order for images and probability maps (1 keeps them in range).
        """
        array = resample_array(
            volume.array,
            self.original_shape,
            is_label=is_label,
            order=order,
            separate_axis=self.separate_axis,
            order_out_of_plane=self.order_out_of_plane,
        )
        return self._restore(volume, array)


def resample_array(
    array: np.ndarray,
    new_shape: Sequence[int],
    *,
    is_label: bool = False,
    order: int = 3,
    separate_axis: int | None = None,
    order_out_of_plane: int = 0,
    label_mode: str = "linear",
) -> np.ndarray:
    """Resamples a channels-last array to ``new_shape`` (spatial), voxel edges aligned.

    Voxel ``i`` of the output samples the input at ``(i + 0.5) * n_in / n_out - 0.5``
    (the whole field of view is kept, as ``skimage.transform.resize`` does).

    Args:
        array: ``(*spatial, C)``.
        new_shape: the spatial output shape.
        is_label: integer label maps: ``label_mode`` ``"linear"`` interpolates each
            class's mask linearly and takes the argmax (nnU-Net's way, smoother than
            nearest), ``"nearest"`` picks the nearest voxel.
        order: spline order for images (3 cubic, 1 linear, 0 nearest).
        separate_axis: an axis resampled on its own with ``order_out_of_plane``.

    Returns:
        float32 for images, the input dtype for labels.
    """
    new_shape = _shape_tuple(new_shape)
    spatial = array.shape[:-1]
    if len(new_shape) != len(spatial):
        raise ValueError(
            f"new_shape {new_shape} does not match array shape {array.shape}"
        )
    if label_mode not in ("linear", "nearest"):
        raise ValueError(
            f"label_mode must be 'linear' or 'nearest', got {label_mode!r}"
        )
    if new_shape == spatial:
        return array if is_label else np.asarray(array, dtype=np.float32)
    orders = [order] * len(spatial)
    if is_label:
        orders = [1 if label_mode == "linear" else 0] * len(spatial)
    if separate_axis is not None:
        orders[separate_axis] = order_out_of_plane
    channels = []
    for c in range(array.shape[-1]):
        channel = array[..., c]
        if is_label and label_mode == "linear":
            channels.append(_resample_labels_linear(channel, new_shape, orders))
        elif is_label:
            channels.append(_zoom(channel, new_shape, orders).astype(array.dtype))
        else:
            channels.append(_zoom(np.asarray(channel, np.float32), new_shape, orders))
    return np.stack(channels, axis=-1)


def _zoom(
    array: np.ndarray, new_shape: tuple[int, ...], orders: list[int]
) -> np.ndarray:
    """Zooms with per-axis spline orders (one pass per distinct order)."""
    current = array
    for order in sorted(set(orders), reverse=True):
        target = tuple(
            n_new if o == order else n_cur
            for n_new, n_cur, o in zip(new_shape, current.shape, orders, strict=True)
        )
        if target == current.shape:
            continue
        factors = [t / n for t, n in zip(target, current.shape, strict=True)]
        current = ndimage.zoom(
            current,
            factors,
            order=order,
            mode="nearest",
            grid_mode=True,
            prefilter=order > 1,
        )
    return current


def _resample_labels_linear(
    labels: np.ndarray, new_shape: tuple[int, ...], orders: list[int]
) -> np.ndarray:
    classes = np.unique(labels)
    best = np.full(new_shape, -1.0, dtype=np.float32)
    out = np.zeros(new_shape, dtype=labels.dtype)
    for value in classes:
        score = _zoom((labels == value).astype(np.float32), new_shape, orders)
        better = score > best
        out[better] = value
        best[better] = score[better]
    return out


def resample_to_spacing(
    volume: Volume,
    target_spacing_mm: Sequence[float],
    *,
    is_label: bool = False,
    order: int = 3,
    order_out_of_plane: int = 0,
    label_mode: str = "linear",
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> tuple[Volume, ResampleRecord]:
    """Resamples a volume to a target voxel size.

    The output shape is :func:`resampled_shape`; the output spacing is the original
    extent divided by it (within half a voxel of the target), and the affine is updated
    so that the field of view stays where it was. Anisotropic scans (spacing ratio above
    ``anisotropy_threshold``) get spline interpolation in-plane and
    ``order_out_of_plane`` (default nearest) along the thick axis, as nnU-Net does.

    Returns:
        The resampled volume (float32 for images) and its :class:`ResampleRecord`.
    """
    spacing = volume.spacing
    new_shape = resampled_shape(volume.spatial_shape, spacing, target_spacing_mm)
    separate = out_of_plane_axis(spacing, target_spacing_mm, anisotropy_threshold)
    array = resample_array(
        volume.array,
        new_shape,
        is_label=is_label,
        order=order,
        separate_axis=separate,
        order_out_of_plane=order_out_of_plane,
        label_mode=label_mode,
    )
    record = ResampleRecord(
        _shape_tuple(volume.spatial_shape),
        _affine_tuple(volume.affine),
        separate_axis=separate,
        order_out_of_plane=order_out_of_plane,
    )
    return volume.with_array(
        array, resampled_affine(volume.affine, volume.spatial_shape, new_shape)
    ), record


def resampled_affine(
    affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
    """The affine of a grid resampled from ``old_shape`` to ``new_shape`` over the same
    extent."""
    scale = np.eye(4)
    for axis, (n_old, n_new) in enumerate(zip(old_shape, new_shape, strict=True)):
        step = n_old / n_new
        scale[axis, axis] = step
        scale[axis, 3] = 0.5 * step - 0.5
    return np.asarray(affine, dtype=np.float64) @ scale


@dataclass(frozen=True)
class CropRecord(_Record):
    """The box :func:`crop_to_nonzero` kept: ``start`` inclusive, ``stop`` exclusive."""

    start: tuple[int, ...] = ()
    stop: tuple[int, ...] = ()
    step = "crop"

    def apply(self, volume: Volume) -> Volume:
        """Crops another volume on the same grid (a label map) with this record's
        box."""
        if volume.spatial_shape != tuple(self.original_shape):
            raise ValueError(
                f"crop: volume shape {volume.spatial_shape} differs from the cropped "
                f"image's {self.original_shape}"
            )
        return _crop(volume, self.start, self.stop)

    def undo(self, volume: Volume, *, fill: float = 0, **_) -> Volume:
        """Pads back to the original shape with ``fill`` and restores the original
        affine."""
        expected = tuple(b - a for a, b in zip(self.start, self.stop, strict=True))
        if volume.spatial_shape != expected:
            raise ValueError(
                f"undo crop: got shape {volume.spatial_shape}, expected {expected}"
            )
        if expected == tuple(self.original_shape):  # nothing was cropped: no copy
            return self._restore(volume, volume.array)
        array = np.full(
            (*self.original_shape, volume.num_channels), fill, dtype=volume.array.dtype
        )
        box = tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))
        array[box] = volume.array
        return self._restore(volume, array)


def nonzero_bbox(array: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box of voxels non-zero in any channel of a channels-last array.

    Returns:
        ``(start, stop)``; the whole array when nothing is non-zero.
    """
    mask = np.any(array != 0, axis=-1)
    if not mask.any():
        return (0,) * mask.ndim, _shape_tuple(mask.shape)
    start, stop = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return tuple(start), tuple(stop)


def _crop(volume: Volume, start, stop) -> Volume:
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    shift = np.eye(4)
    shift[: len(start), 3] = start
    return volume.with_array(volume.array[box], volume.affine @ shift)


def crop_to_nonzero(volume: Volume) -> tuple[Volume, CropRecord]:
    """Crops to the bounding box of the non-zero voxels (any channel), as nnU-Net does.

    The affine is shifted so every kept voxel stays at its world position. Crop the
    label map of the same case with ``record.apply(label)``.
    """
    start, stop = nonzero_bbox(volume.array)
    record = CropRecord(
        _shape_tuple(volume.spatial_shape), _affine_tuple(volume.affine), start, stop
    )
    return _crop(volume, start, stop), record


_RECORD_TYPES = {
    cls.step: cls for cls in (OrientationRecord, ResampleRecord, CropRecord)
}


def record_from_dict(data: dict) -> _Record:
    """Rebuilds a record from :meth:`to_dict` output (e.g. read back from JSON)."""
    data = dict(data)
    step = data.pop("step", None)
    if step not in _RECORD_TYPES:
        raise ValueError(
            f"unknown geometry step {step!r}; expected one of {list(_RECORD_TYPES)}"
        )
    cls = _RECORD_TYPES[step]
    converted = {}
    for key, value in data.items():
        if key == "original_affine":
            value = _affine_tuple(np.asarray(value, dtype=float))
        elif key == "transform":
            value = tuple(tuple(int(v) for v in row) for row in value)
        elif isinstance(value, list):
            value = tuple(int(v) for v in value)
        converted[key] = value
    return cls(**converted)


def undo(
    volume: Volume, records: Sequence[_Record], *, is_label: bool = False
) -> Volume:
    """Undoes a chain of forward steps, last first, returning to the first step's grid.

    Args:
        volume: data on the grid the last step produced (a prediction, say).
        records: the records of the forward steps, in the order they were applied.
        is_label: resampling interpolates labels per class instead of by spline.
    """
    for record in reversed(records):
        volume = record.undo(volume, is_label=is_label)
    return volume
