"""Label maps: their values checked, and whether two files share a grid (the same
voxels in another order, or a box of the other's grid; no resampling)."""

from __future__ import annotations

import numpy as np

from medseg.errors import InputFileError
from medseg.io.volume import ScanInfo, Volume


def in_voxel_order_of(
    volume: Volume, reference: Volume | ScanInfo, tolerance_mm: float = 1e-3
) -> Volume | None:
    """``volume`` on ``reference``'s grid: itself when it is on it already, its voxel
    axes permuted and flipped into ``reference``'s order when it samples the same points
    stored in another order (a label map saved LPS beside a scan saved RAS, a DICOM
    series beside its dcm2niix copy: exact, nothing interpolated), ``None`` when it is
    on another grid. 2D images are only ever on the grid or not. ``reference`` may be
    a header read alone."""
    from medseg.io.volume import off_grid

    if off_grid(volume, reference, "", tolerance_mm) is None:
        return volume
    if volume.spatial_dims != 3 or len(reference.spatial_shape) != 3:
        return None
    from nibabel import orientations

    ornt = orientations.ornt_transform(
        orientations.io_orientation(volume.affine),
        orientations.io_orientation(reference.affine),
    )
    array = orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ orientations.inv_ornt_aff(ornt, volume.spatial_shape)
    moved = volume.with_array(array, affine)
    return moved if off_grid(moved, reference, "", tolerance_mm) is None else None


def in_box_of(
    volume: Volume, reference: Volume | ScanInfo, tolerance_mm: float = 1e-3
) -> tuple[Volume, tuple[int, ...]] | None:
    """A label map saved on a box of ``reference``'s grid (cropped to its labels, as
    3D Slicer may save segmentations, or reaching past the grid with background only),
    in any voxel order, placed on that grid: exactly, zero outside the box. Returns
    it with the reference voxel of the box's first voxel, or ``None`` when it lies on
    another grid (other axes or spacing, a shift of a fraction of a voxel) or holds
    non-zero voxels outside the reference's."""
    if volume.spatial_dims != 3 or len(reference.spatial_shape) != 3:
        return None
    from nibabel import orientations

    ornt = orientations.ornt_transform(
        orientations.io_orientation(volume.affine),
        orientations.io_orientation(reference.affine),
    )
    array = orientations.apply_orientation(np.asarray(volume.array), ornt)
    affine = volume.affine @ orientations.inv_ornt_aff(ornt, volume.spatial_shape)
    matrix = np.asarray(reference.affine, float)
    if np.max(np.abs(affine[:3, :3] - matrix[:3, :3])) > tolerance_mm:
        return None
    shift = np.linalg.solve(matrix[:3, :3], affine[:3, 3] - matrix[:3, 3])
    offset = np.rint(shift).astype(int)
    if np.max(np.abs(matrix[:3, :3] @ offset + matrix[:3, 3] - affine[:3, 3])) > (
        tolerance_mm
    ):
        return None
    shape = tuple(reference.spatial_shape)
    placed = np.zeros((*shape, array.shape[-1]), array.dtype)
    source, target = [], []
    for start, n, total in zip(offset, array.shape[:3], shape, strict=True):
        first = max(0, -start)
        last = max(first, min(n, total - start))  # first: no voxel on the grid
        source.append(slice(first, last))
        target.append(slice(first + start, last + start))
    inside = array[tuple(source)]
    if np.count_nonzero(inside) != np.count_nonzero(array):
        return None  # labels outside the reference's grid
    placed[tuple(target)] = inside
    return volume.with_array(placed, matrix.copy()), tuple(int(v) for v in offset)


def declares_a_box(volume: Volume) -> bool:
    """Whether the file ``volume`` was read from says that it is saved on a box of
    its reference image's grid: a 3D Slicer segmentation (``.seg.nrrd``) does. A file
    that does not say so is not taken for a crop (a label map of fewer slices than
    its scan may be another scan's)."""
    from medseg.io.itk import SLICER_CROP_KEY

    return isinstance(volume.header, dict) and SLICER_CROP_KEY in volume.header


def label_on_grid_of(
    volume: Volume, reference: Volume | ScanInfo, tolerance_mm: float = 1e-3
) -> Volume | None:
    """A label map on ``reference``'s grid: :func:`in_voxel_order_of`, or else, for a
    file that :func:`declares_a_box`, :func:`in_box_of`; ``None`` when it is on
    neither."""
    ordered = in_voxel_order_of(volume, reference, tolerance_mm)
    if ordered is not None or not declares_a_box(volume):
        return ordered
    boxed = in_box_of(volume, reference, tolerance_mm)
    return None if boxed is None else boxed[0]


def label_array(volume) -> np.ndarray:
    """A label map's values, refused when they cannot be one: several channels (a
    one-hot or probability volume) or values that are not whole numbers (a soft or
    resampled prediction, whose every distinct value would be scored as a label) or
    below 0.
    Whole numbers stored as floats are read as integers, and a 2D mask saved as a
    greyscale picture with colour or alpha channels as its grey."""
    array = np.asarray(volume.array)
    if volume.spatial_dims == 2 and volume.num_channels > 1:
        from medseg.io.pictures import grey_channel

        grey = grey_channel(array)
        if grey is None:
            raise InputFileError(
                volume.path, "a colour picture (its channels differ): not a label map"
            )
        array = grey
    if array.shape[-1] != 1:
        from medseg.io.itk import overlapping_segments

        raise InputFileError(
            volume.path,
            overlapping_segments(array, volume.header)
            or f"{array.shape[-1]} channels: a label map has one value per voxel",
        )
    array = array[..., 0]
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputFileError(volume.path, "NaN or Inf values: not a label map")
        whole = np.round(array)
        if not np.array_equal(whole, array):
            odd = array[array != whole]
            raise InputFileError(
                volume.path,
                f"{odd.size:,} voxels hold values that are not whole numbers (such as "
                f"{odd.flat[0]:g}): not a label map",
            )
        array = whole.astype(np.int64)
    elif array.dtype.kind not in "iub":
        raise InputFileError(volume.path, f"{array.dtype} values: not a label map")
    if array.dtype.kind != "u" and array.size and array.min() < 0:
        negative = np.unique(array[array < 0])
        raise InputFileError(
            volume.path,
            f"negative values ({', '.join(map(str, negative[:5].tolist()))}): label "
            "values are 0 (background) and up",
        )
    return array
