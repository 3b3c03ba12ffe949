"""The volume type (an array, channels last, with its affine) and the scan formats by
name."""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

logger = logging.getLogger(__name__)


NIFTI_SUFFIXES = (".nii.gz", ".nii")


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


NUMPY_SUFFIXES = (".npy",)


#: MetaImage and NRRD, read and written with SimpleITK (:mod:`medseg.io.itk`)
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


SCAN_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES + NUMPY_SUFFIXES + ITK_SUFFIXES


#: Default ceiling on voxels (spatial voxels times channels) a single file may declare.
#: 2**30 float32 voxels are 4 GiB: more than any CT (512 x 512 x 2000 is 0.5e9).
DEFAULT_MAX_VOXELS = 2**30


def split_suffix(path: str | Path) -> tuple[str, str]:
    """Splits a file name into stem and scan suffix, treating ``.nii.gz`` as one suffix.

    Returns:
        ``(stem, suffix)`` with the suffix lower-cased; ``("name", "")`` when unknown.
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in SCAN_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def case_name(path: str | Path) -> str:
    """A label file's case: its name without the suffix, and without the ``.seg`` of a
    3D Slicer segmentation (``CASE.seg.nrrd``)."""
    stem = split_suffix(path)[0]
    return stem[:-4] if stem.lower().endswith(".seg") and len(stem) > 4 else stem


@dataclass(eq=False)
class Volume:
    """A scan: a channels-last array with the affine that places it in the world.

    Attributes:
        array: ``(X, Y, Z, C)`` for 3D or ``(H, W, C)`` for 2D, any dtype.
        affine: 4x4 voxel-to-world matrix (millimetres, NIfTI RAS+ world). For 2D images
            the first two columns carry the pixel spacing of rows and columns.
        header: the source NIfTI header (kept so that writing restores its codes, units
            and descriptions), a MetaImage's or NRRD's fields
            (:class:`medseg.io.itk.Metadata`), or ``None``.
        path: where it was read from, if anywhere.
        notes: what the reader had to fix or assume to read the file (a NIfTI header
            with a zero voxel size, say), one line each; also logged as warnings.
    """

    array: np.ndarray
    affine: np.ndarray
    header: object | None = None
    path: Path | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.array.ndim not in (3, 4):
            raise ValueError(
                "Volume.array must be channels-last (H, W, C) or (X, Y, Z, C), "
                f"got shape {self.array.shape}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got {self.affine!r}")
        self.affine = affine

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape[:-1])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[-1])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in millimetres along each array axis (lengths of affine
        columns)."""
        return spacing_from_affine(self.affine, self.spatial_dims)

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None) -> Volume:
        """Returns a volume with a new array (and optionally affine), same header and
        path."""
        return Volume(
            array,
            self.affine if affine is None else affine,
            self.header,
            self.path,
            self.notes,
        )


def spacing_from_affine(affine: np.ndarray, spatial_dims: int = 3) -> tuple[float, ...]:
    """Voxel size along each of the first ``spatial_dims`` axes: the affine's column
    norms."""
    norms = np.linalg.norm(
        np.asarray(affine, dtype=np.float64)[:3, :spatial_dims], axis=0
    )
    return tuple(float(v) for v in norms)


def orientation_codes(affine: np.ndarray) -> str:
    """The axis codes of an affine, e.g. ``"RAS"`` or ``"LPS"`` (nibabel's
    convention)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))


@dataclass(frozen=True)
class ScanInfo:
    """What a file's header says, read without loading the voxel data.

    Attributes:
        path: the file.
        format: ``"nifti"``, ``"image2d"``, ``"numpy"``, ``"itk"`` (MetaImage, NRRD)
            or ``"dicom"`` (a series folder).
        spatial_shape: voxels along each spatial axis.
        num_channels: size of the channel axis medseg will give it.
        dtype: the on-disk voxel type (after NIfTI scaling, if the header has one).
        affine: 4x4 voxel-to-world matrix.
    """

    path: Path
    format: str
    spatial_shape: tuple[int, ...]
    num_channels: int
    dtype: np.dtype
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return spacing_from_affine(self.affine, len(self.spatial_shape))


def off_grid(
    volume: Volume | ScanInfo,
    reference: Volume | ScanInfo,
    whose: str,
    tolerance_mm: float = 1e-3,
) -> str | None:
    """Why ``volume`` is not on ``reference``'s grid (its shape, or its affine beyond
    ``tolerance_mm``), said of ``whose`` grid ("the truth's"); ``None`` when it is.
    Either may be a header read alone (:class:`ScanInfo`)."""
    if volume.spatial_shape != reference.spatial_shape:
        return (
            f"shape {volume.spatial_shape} differs from {whose} "
            f"{reference.spatial_shape}"
        )
    if np.max(np.abs(volume.affine - reference.affine)) > tolerance_mm:
        return f"affine differs from {whose} (not on the same grid)"
    return None


def _check_size(path, spatial: tuple[int, ...], channels: int, max_voxels: int) -> None:
    if any(n <= 0 for n in spatial) or channels <= 0:
        raise InputFileError(
            path, f"zero-size dimension in shape {(*spatial, channels)}"
        )
    total = int(np.prod(spatial, dtype=np.float64)) * channels
    if total > max_voxels:
        raise InputFileError(
            path,
            f"declares {total:,} voxels (shape {(*spatial, channels)}), above the "
            f"limit "
            f"of {max_voxels:,}: a damaged header or a decompression bomb "
            "(raise max_voxels if the scan is real)",
        )


def _read_problem(exc: BaseException) -> str:
    """One line saying what a low-level read error means for the user."""
    text = str(exc)
    if isinstance(exc, gzip.BadGzipFile) and "crc" in text.lower():
        return "corrupt compressed data (checksum mismatch)"
    if isinstance(exc, gzip.BadGzipFile):
        return "not gzip-compressed data (corrupt, or misnamed file)"
    if isinstance(exc, EOFError) or re.match(r"Expected \d+ bytes, got \d+", text):
        return "truncated file (data ends before the size its header declares)"
    if isinstance(exc, zlib.error):
        return f"corrupt compressed data ({exc})"
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return f"unreadable ({first_line})"


def output_dtype(array: np.ndarray) -> np.dtype:
    """The dtype medseg writes an array as.

    Booleans and non-negative integers become the smallest of uint8/uint16/uint32 that
    holds them (label maps); negative integers int16 or int32 (e.g. CT in HU); floats
    float32 (NIfTI has no float16, and float64 doubles the size for no gain).
    """
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype.kind in "iu":
        if array.size == 0:
            return np.dtype(np.uint8)
        low, high = int(array.min()), int(array.max())
        for candidate in (np.uint8, np.uint16, np.int16, np.uint32, np.int32):
            info = np.iinfo(candidate)
            if info.min <= low and high <= info.max:
                return np.dtype(candidate)
        return np.dtype(np.int64)
    if array.dtype.kind == "f":
        return np.dtype(np.float32)
    raise ValueError(f"cannot write arrays of dtype {array.dtype}")


def _preferred_dtype(volume: Volume) -> np.dtype:
    """The source header's integer dtype when it still holds the values, else
    :func:`output_dtype`."""
    chosen = output_dtype(volume.array)
    get_source = getattr(volume.header, "get_data_dtype", None)
    if get_source is None or chosen.kind not in "iu":
        return chosen
    source = np.dtype(get_source())
    if source.kind in "iu" and volume.array.size:
        info = np.iinfo(source)
        if info.min <= int(volume.array.min()) and int(volume.array.max()) <= info.max:
            return source
    return chosen
