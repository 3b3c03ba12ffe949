"""Reading and writing scans with their geometry.

Arrays are channels-last everywhere in medseg: a 3D scan is ``(X, Y, Z, C)`` in NIfTI
voxel order, a 2D image is ``(H, W, C)`` (rows, columns, channels). A single-channel
scan still has its channel axis, so ``array[..., c]`` always picks channel ``c``.

Supported formats:

* NIfTI-1/2 (``.nii``, ``.nii.gz``): 3D, 4D (last axis = channels) and 5D with a
  singleton time axis (``(X, Y, Z, 1, C)``, NIfTI's vector intent). The header is kept,
  and writing restores the affine, the sform/qform codes and the units.
* 2D images (``.png``, ``.tif``/``.tiff``, ``.jpg``/``.jpeg``): greyscale as ``(H, W,
  1)``, RGB(A) as ``(H, W, 3|4)``; palette PNGs read as their palette indices (label
  masks). The affine is a pixel-spacing affine (1 mm unless given).
* NumPy (``.npy``): no geometry (identity affine); loaded with ``allow_pickle=False``.

Every read checks the declared size against ``max_voxels`` before touching the data, so
a damaged header or a decompression bomb is refused instead of exhausting memory. Every
write goes to a temporary name in the destination folder and is renamed into place, so
an interrupted job never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.dicom import is_dicom_file
from medseg.errors import InputFileError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
NUMPY_SUFFIXES = (".npy",)
#: MetaImage and NRRD, read and written with SimpleITK (:mod:`medseg.itkio`)
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


def scan_format(path: str | Path) -> str:
    """Returns ``"nifti"``, ``"image2d"``, ``"numpy"`` or ``"itk"`` (MetaImage, NRRD)
    for a path, from its suffix.

    Raises:
        InputFileError: the suffix is not one medseg reads.
    """
    _, suffix = split_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in IMAGE_SUFFIXES:
        return "image2d"
    if suffix in NUMPY_SUFFIXES:
        return "numpy"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if Path(path).suffix.lower() == ".dcm" or is_dicom_file(Path(path)):
        raise InputFileError(
            path,
            "one DICOM file: medseg reads a DICOM series as the folder that holds "
            "its files, and only those (medseg data sort-dicom sorts an export into "
            "one folder per series)",
        )
    raise InputFileError(
        path,
        "unsupported file type; expected one of " + ", ".join(SCAN_SUFFIXES),
    )


@dataclass(eq=False)
class Volume:
    """A scan: a channels-last array with the affine that places it in the world.

    Attributes:
        array: ``(X, Y, Z, C)`` for 3D or ``(H, W, C)`` for 2D, any dtype.
        affine: 4x4 voxel-to-world matrix (millimetres, NIfTI RAS+ world). For 2D images
            the first two columns carry the pixel spacing of rows and columns.
        header: the source NIfTI header (kept so that writing restores its codes, units
            and descriptions), a MetaImage's or NRRD's fields
            (:class:`medseg.itkio.Metadata`), or ``None``.
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


#
# reading


def read_info(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ScanInfo:
    """Reads a scan's header only: shape, channels, dtype and affine.

    Raises:
        InputFileError: missing, unreadable, wrong format, or absurd dimensions.
    """
    if _is_series(path):
        from medseg.dicom import series_geometry

        shape, affine = series_geometry(path)
        _check_size(path, shape, 1, max_voxels)
        return ScanInfo(Path(path), "dicom", shape, 1, np.dtype(np.float64), affine)
    path = _existing_file(path)
    fmt = scan_format(path)
    if fmt == "nifti":
        with _header_fixes(path):
            img = _load_nifti(path)
        spatial, channels = _nifti_layout(path, img.shape)
        dtype = np.dtype(img.get_data_dtype())
        if _nifti_is_scaled(img):
            dtype = np.dtype(np.float64)
        affine = _nifti_affine(path, img.header)
    elif fmt == "image2d":
        spatial, channels, dtype = _image2d_layout(path)
        affine = np.eye(4)
    elif fmt == "itk":
        from medseg import itkio

        spatial, channels, dtype, affine = itkio.read_info(path)
    else:
        arr = _load_npy(path, mmap=True)
        spatial, channels = _npy_layout(path, arr.shape, None)
        dtype, affine = arr.dtype, np.eye(4)
    _check_size(path, spatial, channels, max_voxels)
    return ScanInfo(path, fmt, spatial, channels, dtype, np.asarray(affine, float))


def read_volume(
    path: str | Path,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    spatial_dims: int | None = None,
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0),
) -> Volume:
    """Reads a scan as a channels-last :class:`Volume` with its affine and header.

    Values are returned as stored (NaN and Inf included; see
    :func:`medseg.preprocessing.replace_nonfinite`). Uncompressed NIfTI and ``.npy``
    data are memory-mapped, not copied, until something writes to or converts them.

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.png``, ``.tif``, ``.tiff``, ``.jpg``,
            ``.jpeg`` or ``.npy`` file, or a folder holding the DICOM files of one
            series (:mod:`medseg.dicom`; values after their rescaling, affine in RAS).
        max_voxels: refuse files that declare more voxels than this (times channels).
        spatial_dims: only for ``.npy``: 2 reads a 3-axis array as ``(H, W, C)``; by
            default a 2-axis array is 2D, a 3-axis array is 3D single-channel and a
            4-axis array is ``(X, Y, Z, C)``.
        pixel_spacing_mm: spacing of rows and columns for 2D image files.

    Raises:
        InputFileError: missing file, unreadable or truncated file, wrong format,
            zero-size or absurd dimensions.
    """
    if _is_series(path):
        from medseg.dicom import read_series

        array, affine = read_series(path, max_voxels=max_voxels)
        return Volume(array[..., None], affine, None, Path(path))
    path = _existing_file(path)
    fmt = scan_format(path)
    if fmt == "nifti":
        return _read_nifti(path, max_voxels)
    if fmt == "image2d":
        spatial, channels, _ = _image2d_layout(path)
        _check_size(path, spatial, channels, max_voxels)
        array, notes = _read_image2d(path)
        for note in notes:
            logger.warning("%s", note)
        affine = np.diag([*map(float, pixel_spacing_mm), 1.0, 1.0])
        return Volume(array, affine, None, path, notes)
    if fmt == "itk":
        from medseg import itkio

        array, affine, fields = itkio.read(
            path, lambda shape, channels: _check_size(path, shape, channels, max_voxels)
        )
        return Volume(array, affine, fields, path)
    arr = _load_npy(path, mmap=True)
    spatial, channels = _npy_layout(path, arr.shape, spatial_dims)
    _check_size(path, spatial, channels, max_voxels)
    return Volume(arr.reshape(*spatial, channels), np.eye(4), None, path)


def read_channels(
    files: list[Path], channels: int, *, tolerance_mm: float = 1e-3
) -> Volume:
    """One case stored one file per channel (nnU-Net's ``CASE_0000``, ``CASE_0001``,
    ...; ``files`` in channel order) read as one multi-channel volume, on the first
    file's grid and with its header.

    Raises:
        InputFileError: naming the file: channel files missing or extra (the model
            takes ``channels``), a file holding several channels, a file on another grid
            than the first (shape, or affine beyond ``tolerance_mm``), or any read
            problem.
    """
    numbers = [split_suffix(path)[0][-4:] for path in files]
    if numbers != [f"{c:04d}" for c in range(channels)]:
        raise InputFileError(
            files[0],
            f"channel files _{', _'.join(numbers)}, but the model takes {channels} "
            f"channels, _0000 to _{channels - 1:04d}",
        )
    volumes: list[Volume] = []
    for path in files:
        volume = read_volume(path)
        if volume.num_channels != 1:
            raise InputFileError(
                path, f"{volume.num_channels} channels in one channel's file"
            )
        volumes.append(volume)
    return stack_channels(volumes, files, tolerance_mm)


def stack_channels(
    volumes: Sequence[Volume], files: Sequence[Path], tolerance_mm: float = 1e-3
) -> Volume:
    """The volumes of one case's channel files (in channel order) as one volume on the
    first's grid, with its header; a file holding the first's voxels stored in another
    order is read in the first's order (exactly: see
    :func:`medseg.geometry.in_voxel_order_of`).

    Raises:
        InputFileError: naming the first file on another grid (shape or affine).
    """
    from medseg.geometry import in_voxel_order_of

    first = volumes[0]
    if len(volumes) == 1:
        return first
    arrays = [np.asarray(first.array)]
    for path, volume in zip(files[1:], volumes[1:], strict=True):
        ordered = in_voxel_order_of(volume, first, tolerance_mm)
        if ordered is None:
            whose = f"{Path(files[0]).name}'s"
            raise InputFileError(path, off_grid(volume, first, whose, tolerance_mm))
        arrays.append(np.asarray(ordered.array))
    return Volume(
        np.concatenate(arrays, axis=-1),
        first.affine,
        first.header,
        first.path,
        tuple(note for v in volumes for note in v.notes),
    )


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


def _is_series(path: str | Path) -> bool:
    """A folder holding DICOM files: one series, read as one scan."""
    from medseg.dicom import is_series_folder

    return Path(path).is_dir() and is_series_folder(Path(path))


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            try:
                path.resolve(strict=True)
            except RuntimeError:  # Python < 3.13
                raise InputFileError(path, "symlink loop") from None
            except OSError as exc:
                problem = (
                    "symlink loop"
                    if "loop" in str(exc).lower()
                    else ("broken symlink (its target does not exist)")
                )
                raise InputFileError(path, problem) from None
            raise InputFileError(path, "broken symlink (its target does not exist)")
        raise InputFileError(path, "file not found")
    if not path.is_file():
        raise InputFileError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise InputFileError(path, "empty file (0 bytes)")
    return path


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


# NIfTI


@contextlib.contextmanager
def _header_fixes(path: Path) -> Iterator[list[str]]:
    """Collects what nibabel logs while this thread reads ``path`` (the fixes it makes
    to a damaged header, such as a zero voxel size read as 1 mm), which it logs without
    naming the file, and logs each once as a warning that names it. Yields the list of
    those lines ("PATH: header fixed on reading: ...")."""
    thread, seen, lines = threading.get_ident(), set(), []

    def keep(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        message = record.getMessage()
        if message not in seen:
            seen.add(message)
            lines.append(f"{path}: header fixed on reading: {message}")
        return False

    nibabel_logger = logging.getLogger("nibabel.global")
    nibabel_logger.addFilter(keep)
    try:
        yield lines
    finally:
        nibabel_logger.removeFilter(keep)
        for line in lines:
            logger.warning("%s", line)


def _load_nifti(path: Path):
    import nibabel as nib

    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    if path.name.lower().endswith(".gz") and not compressed:
        raise InputFileError(
            path, "not gzip-compressed data (corrupt, or misnamed file)"
        )
    if compressed and not path.name.lower().endswith(".gz"):
        raise InputFileError(
            path, "gzip-compressed data in a file not named .gz (name it .nii.gz)"
        )
    try:
        img = nib.load(path)
    except nib.filebasedimages.ImageFileError:
        raise InputFileError(path, "not a NIfTI file (no valid NIfTI header)") from None
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputFileError(path, _read_problem(exc)) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputFileError(path, f"not a NIfTI file ({type(img).__name__})")
    return img


def _nifti_layout(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Maps a NIfTI data shape onto (spatial shape, channels)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 2:  # a single slice: one voxel deep
        return (*shape, 1), 1
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4:
        return shape[:3], shape[3]
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3], shape[4]
    raise InputFileError(path, f"unsupported NIfTI shape {shape} (expected 3D or 4D)")


#: millimetres per unit of a NIfTI header's spatial units (``xyzt_units``); unknown
#: units are millimetres by convention, as ITK and nibabel take them
_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def _mm_per_unit(header) -> tuple[float, str]:
    unit = header.get_xyzt_units()[0]
    return _MM_PER_UNIT.get(unit, 1.0), unit


def nifti_affine_mm(header) -> np.ndarray:
    """A NIfTI header's affine (nibabel's choice: the sform, else the qform, else the
    voxel sizes) in millimetres: positions and voxel sizes stored in metres or
    microns (``xyzt_units``) are scaled, as ITK reads them; nibabel does not."""
    affine = np.array(header.get_best_affine(), dtype=np.float64)
    factor = _mm_per_unit(header)[0]
    if factor != 1.0:
        affine[:3] *= factor
    return affine


def _nifti_affine(path: Path, header) -> np.ndarray:
    """:func:`nifti_affine_mm`, refused when it places no scan: values that are not
    numbers, or a singular matrix (a voxel size of 0 in the sform, two voxel axes
    alike), which would otherwise fail far from here, or silently, later."""
    affine = nifti_affine_mm(header)
    if np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-12:
        return affine
    if header.get_sform(coded=True)[1]:
        which = "sform"
    elif header.get_qform(coded=True)[1]:
        which = "qform and voxel sizes"
    else:
        which = "voxel sizes"
    if not np.all(np.isfinite(affine)):
        problem = (
            f"values that are not numbers (NaN or infinite) in the header's {which}"
        )
    else:
        problem = (
            f"a singular affine from the header's {which} (a voxel axis of length 0, "
            "or two voxel axes alike)"
        )
    raise InputFileError(path, f"degenerate geometry: {problem}")


#: sform and qform placing a voxel this far apart (mm) disagree; float32 rounding of
#: one transform written twice stays far below it
TRANSFORMS_AGREE_MM = 1e-2


def _units_note(header) -> str | None:
    factor, unit = _mm_per_unit(header)
    if factor == 1.0:
        return None
    return (
        f"positions and voxel sizes stored in {unit}s: read in mm (x {factor:g}), as "
        "ITK reads them (nibabel-based tools take them for mm)"
    )


def _transforms_disagree(header, spatial: tuple[int, ...]) -> str | None:
    """What a NIfTI header's sform and qform disagree on, when both are set (codes
    above 0) and place some voxel of the scan more than :data:`TRANSFORMS_AGREE_MM`
    apart; else ``None``. nibabel (so medseg), FSL and SPM read the sform; ITK-based
    tools read the qform in some cases (a sform that is not rigid, say; older
    versions always): a scan whose two disagree is in two places."""
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not sform_code or not qform_code:
        return None
    corners = np.array(
        [[*c, 1.0] for c in np.ndindex(*(2,) * 3)], dtype=float
    ) * np.array([*(max(n - 1, 0) for n in spatial), 1.0])
    apart = float(np.max(np.linalg.norm((corners @ (sform - qform).T)[:, :3], axis=1)))
    apart *= _mm_per_unit(header)[0]
    if apart <= TRANSFORMS_AGREE_MM:
        return None
    from medseg.geometry import orientation_codes

    orders = ""
    if orientation_codes(sform) != orientation_codes(qform):
        orders = (
            f", voxel order {orientation_codes(sform)} by the sform and "
            f"{orientation_codes(qform)} by the qform"
        )
    return (
        f"its sform and qform disagree (voxels up to {apart:.3g} mm apart{orders}): "
        "read by the sform, as nibabel and FSL read it; a tool that reads the qform "
        "sees the scan elsewhere (outputs keep both)"
    )


def _orientation_unknown(header) -> str | None:
    """What to say of a NIfTI header that stores no orientation (sform and qform
    codes both 0, as ``nib.Nifti1Image(data, None)`` and some converters write): its
    voxels are placed by their sizes alone, and tools place them differently
    (nibabel: voxel order LAS centred on the scan; ITK: LPS from the origin), so its
    left-right and front-back are not known."""
    if int(header["sform_code"]) or int(header["qform_code"]):
        return None
    from medseg.geometry import orientation_codes

    order = orientation_codes(header.get_best_affine())
    return (
        "stores no orientation (sform and qform codes 0): placed by its voxel sizes "
        f"alone, voxel order {order} as nibabel reads it (ITK-based tools read LPS); "
        "its left-right and front-back are not known"
    )


def _nifti_is_scaled(img) -> bool:
    slope, inter = img.header.get_slope_inter()
    return (slope is not None and slope != 1.0) or (inter is not None and inter != 0.0)


def _read_nifti(path: Path, max_voxels: int) -> Volume:
    with _header_fixes(path) as notes:
        return _read_nifti_data(path, max_voxels, notes)


def _read_nifti_data(path: Path, max_voxels: int, notes: list[str]) -> Volume:
    img = _load_nifti(path)  # header only
    spatial, channels = _nifti_layout(path, img.shape)
    _check_size(path, spatial, channels, max_voxels)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "c":
        raise InputFileError(path, f"unsupported NIfTI voxel type {dtype}")
    try:
        if path.name.lower().endswith(".gz"):
            # Decompress the whole stream so that gzip verifies its CRC at the end: a
            # corrupt block that still inflates would otherwise be read as silent
            # garbage.
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
            img = type(img).from_bytes(raw)
            del raw
        else:
            offset = int(img.dataobj.offset)
            needed = offset + int(np.prod(img.shape)) * dtype.itemsize
            size = path.stat().st_size
            if size < needed:
                raise InputFileError(
                    path,
                    f"truncated file: header declares {needed:,} bytes, "
                    f"file has {size:,}",
                )
        data = np.asanyarray(img.dataobj)
    except InputFileError:
        raise
    except Exception as exc:
        raise InputFileError(path, _read_problem(exc)) from None
    affine = _nifti_affine(path, img.header)  # before the notes, which use it
    for note in (
        _units_note(img.header),
        _transforms_disagree(img.header, spatial),
        _orientation_unknown(img.header),
    ):
        if note:
            notes.append(f"{path}: {note}")
    return Volume(
        data.reshape(*spatial, channels),
        affine,
        img.header.copy(),
        path,
        tuple(notes),
    )


# 2D images


def _image2d_layout(path: Path) -> tuple[tuple[int, int], int, np.dtype]:
    """Reads only the header of a 2D image: ((H, W), channels, dtype)."""
    if split_suffix(path)[1] in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        except Exception as exc:
            raise InputFileError(path, f"not a readable TIFF ({exc})") from None
        spatial, channels = _image_shape_layout(path, shape)
        return spatial, channels, dtype
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            bands = len(im.getbands())
            mode = im.mode
    except Exception as exc:
        raise InputFileError(path, f"not a readable image ({exc})") from None
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32, "1": np.bool_}.get(
        mode, np.uint8
    )
    channels = 1 if mode == "P" else bands
    return (height, width), channels, np.dtype(dtype)


def _image_shape_layout(
    path: Path, shape: tuple[int, ...]
) -> tuple[tuple[int, int], int]:
    if len(shape) == 2:
        return (shape[0], shape[1]), 1
    if len(shape) == 3 and shape[2] in (1, 2, 3, 4):
        return (shape[0], shape[1]), shape[2]
    raise InputFileError(
        path,
        f"image of shape {shape} is not a 2D greyscale or RGB(A) image "
        "(multi-page stacks are not read as 2D images; store 3D scans as NIfTI)",
    )


def _read_image2d(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """The picture ``(H, W, C)`` and notes about it (:func:`_palette_note`)."""
    notes = ()
    try:
        if split_suffix(path)[1] in (".tif", ".tiff"):
            import skimage.io

            array = np.asarray(skimage.io.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                # palette images keep their indices (label masks), not the palette
                # colours
                array = np.array(im)
                if im.mode == "P":
                    notes = _palette_note(path, array, im.getpalette() or [])
    except Exception as exc:
        raise InputFileError(path, _read_problem(exc)) from None
    spatial, channels = _image_shape_layout(path, array.shape)
    return array.reshape(*spatial, channels), notes


def _palette_note(path: Path, indices: np.ndarray, palette: list[int]) -> tuple:
    """A note when a palette picture's indices, which are read, differ from the greys
    its palette shows them as (a greyscale picture saved with a palette, or a mask of
    0 and 1 shown as black and white): read as indices, a mask's values are right and
    a scan's intensities wrong. Nothing for a palette of colours (label masks drawn in
    colours) or one whose greys are the indices."""
    used = np.unique(indices).tolist()
    colours = [tuple(palette[3 * i : 3 * i + 3]) for i in used]
    if any(len(c) != 3 or len(set(c)) != 1 for c in colours):
        return ()
    greys = [c[0] for c in colours]
    if greys == used:
        return ()

    def listed(values):
        return ", ".join(map(str, values[:4])) + (", ..." if len(values) > 4 else "")

    return (
        f"{path}: a palette picture, read as its palette indices ({listed(used)}), "
        f"which it shows as the greys {listed(greys)}: a mask's values, but not a "
        "scan's intensities (save scans as greyscale pictures)",
    )


# NumPy


def _load_npy(path: Path, *, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputFileError(
                path, "holds Python objects (pickled); refused for safety"
            ) from None
        raise InputFileError(path, f"not a valid .npy file ({exc})") from None
    except Exception as exc:
        raise InputFileError(
            path, f"not a valid .npy file ({_read_problem(exc)})"
        ) from None


def _npy_layout(
    path: Path, shape: tuple[int, ...], spatial_dims: int | None
) -> tuple[tuple[int, ...], int]:
    shape = tuple(int(n) for n in shape)
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims}")
    if len(shape) == 2 and spatial_dims in (None, 2):
        return shape, 1
    if len(shape) == 3:
        return (shape[:2], shape[2]) if spatial_dims == 2 else (shape, 1)
    if len(shape) == 4 and spatial_dims in (None, 3):
        return shape[:3], shape[3]
    raise InputFileError(
        path,
        f"array of shape {shape} is not a 2D or 3D scan (spatial_dims={spatial_dims})",
    )


#
# writing


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


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``, renamed onto ``path`` on success.

    The temporary name keeps the suffix (writers choose formats by it) and starts with a
    dot. On any error it is deleted, so ``path`` either keeps its old content or gets
    the complete new one, never a partial file.
    """
    path = Path(path)
    suffix = split_suffix(path)[1] or path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class HeldFolder:
    """A folder's lock held by :func:`hold_folder`; :meth:`release` lets it go and
    removes its file (first, while still held: no one is left holding a removed
    file)."""

    path: Path | None
    handle: object = None

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.handle.close()
        self.handle = None


def hold_folder(
    folder: Path, name: str, *, what: str = "", advice: str = "", wait: bool = False
) -> HeldFolder:
    """Takes the lock file ``name`` in ``folder`` for this process (the operating
    system's ``flock``; with ``wait``, once the process holding it lets it go: Ctrl-C
    and SIGTERM end the wait) and writes the holder's pid, host and start
    in it, so that another run refused while this one lives says who holds it. A
    process that dies, however (SIGKILL, the out-of-memory killer), holds nothing;
    processes on other hosts see it where the shared file system keeps ``flock``
    locks (NFSv4 does). Where there are none (another system, a file system without
    locks, a folder that cannot be written: named when written) nothing is held.

    Raises:
        InputFileError: without ``wait``, another living process holds it (``what``
            is that process, ``advice`` what to do).
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return HeldFolder(None)
    import socket
    import time

    path = folder / name
    # the file may be removed by a holder that ends (while several wait, each time)
    for _attempt in range(100 if wait else 3):
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held)
        except OSError:
            return HeldFolder(None)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another process"
            handle.close()
            problem = f"another {what} is writing this folder ({other})"
            raise InputFileError(folder, f"{problem}; {advice}") from None
        except OSError:  # a file system without locks
            handle.close()
            return HeldFolder(None)
        except BaseException:  # Ctrl-C or SIGTERM while waiting
            handle.close()
            raise
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except OSError:  # removed meanwhile
            same = False
        if same:
            break
        handle.close()
    else:
        return HeldFolder(None)
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    return HeldFolder(path, handle)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes a text file atomically (see :func:`atomic_output`), UTF-8; file names
    that are not (read into ``text`` with Python's surrogate escapes) keep their
    bytes."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None
    return path


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


#: how a written file names the input it was made from (see :func:`read_source_id`)
SOURCE_ID_KEY = "medseg-source"


def write_volume(
    volume: Volume,
    path: str | Path,
    *,
    dtype=None,
    is_label: bool = False,
    source_id: str | None = None,
) -> Path:
    """Writes a volume, restoring its geometry, atomically.

    NIfTI output keeps the source header (descriptions, units, intent, sform/qform
    codes) with the volume's affine; single-channel volumes are written 3D,
    multi-channel 4D. The file appears under its final name only once it is complete.

    Args:
        volume: what to write.
        path: destination; the suffix picks the format. JPEG is refused (lossy).
        dtype: voxel type on disk. By default labels get :func:`output_dtype`
            (uint8/uint16), and images the source NIfTI header's integer type when it
            holds the values (an int16 CT stays int16), else :func:`output_dtype`.
        is_label: the volume is a label map (see ``dtype``).
        source_id: an identifier of the input this file was made from, kept in the
            file where its format has room (a NIfTI comment extension, a PNG text
            chunk, a TIFF description; not ``.npy``) and read by
            :func:`read_source_id`.

    Returns:
        The path written.

    Raises:
        InputFileError: the folder does not exist or is not writable, or the data does
            not fit the format (float data to PNG, values beyond uint16 in an image).
    """
    path = Path(path)
    fmt = scan_format(path)
    if dtype is None:
        dtype = output_dtype(volume.array) if is_label else _preferred_dtype(volume)
    dtype = np.dtype(dtype)
    if not path.parent.is_dir():
        raise InputFileError(path.parent, "output folder does not exist")
    if fmt == "itk":
        from medseg import itkio

        suffix = split_suffix(path)[1]
        if suffix in itkio.DETACHED:
            raise InputFileError(
                path,
                f"{suffix} keeps its voxels in another file; write "
                f"{itkio.DETACHED[suffix]}",
            )
    try:
        with atomic_output(path) as tmp:
            if fmt == "nifti":
                _write_nifti(volume, tmp, dtype, source_id)
            elif fmt == "image2d":
                _write_image2d(volume, tmp, dtype, path, source_id)
            elif fmt == "itk":
                array = np.asarray(volume.array).astype(dtype, copy=False)
                if volume.spatial_dims == 2:  # (H, W, C): one slice
                    array = array[:, :, None, :]
                itkio.write(array, volume.affine, tmp, source_id)
            else:
                _write_npy(volume, tmp, dtype)
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None
    return path


def read_source_id(path: str | Path) -> str | None:
    """The ``source_id`` that :func:`write_volume` kept in ``path``, or ``None`` (none
    kept, a format without room for it, or an unreadable file)."""
    path = Path(path)
    try:
        fmt = scan_format(path)
        if fmt == "nifti":
            for extension in _load_nifti(path).header.extensions:
                if _is_source_id(extension):
                    content = bytes(extension.get_content())
                    return content[len(SOURCE_ID_KEY) + 1 :].decode("ascii")
            return None
        if fmt == "itk":
            from medseg import itkio

            return itkio.read_source_id(path)
        if fmt == "image2d":
            suffix = split_suffix(path)[1]
            if suffix in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(path) as tiff:
                    text = tiff.pages[0].description or ""
                prefix = f"{SOURCE_ID_KEY} "
                return text[len(prefix) :] if text.startswith(prefix) else None
            from PIL import Image

            with Image.open(path) as picture:
                return getattr(picture, "text", {}).get(SOURCE_ID_KEY)
    except (OSError, ValueError, InputFileError, UnicodeDecodeError):
        return None
    return None


def _is_source_id(extension) -> bool:
    """A NIfTI comment extension (code 6) holding a :func:`read_source_id` record."""
    return extension.get_code() == 6 and bytes(extension.get_content()).startswith(
        f"{SOURCE_ID_KEY} ".encode()
    )


def _write_nifti(
    volume: Volume, path: Path, dtype: np.dtype, source_id: str | None = None
) -> None:
    import nibabel as nib

    data = volume.array
    if volume.spatial_dims == 2:  # (H, W, C) -> (H, W, 1, C): NIfTI is 3D
        data = data[:, :, None, :]
    if data.shape[-1] == 1:
        data = data[..., 0]
    data = np.asarray(data).astype(dtype, copy=False)
    header = volume.header if isinstance(volume.header, nib.Nifti1Header) else None
    image_class = (
        nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    )
    # on its source's grid (a label map of the scan), the source's sform and qform are
    # kept as they are (no affine given), so that a reader taking either one
    # (ITK-based tools may take the qform) lays it where it lays the source
    own_grid = header is not None and np.allclose(
        nifti_affine_mm(header), volume.affine, rtol=0.0, atol=1e-5
    )
    img = image_class(
        data,
        None if own_grid else volume.affine,
        header=header.copy() if header else None,
    )
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(np.nan, np.nan)
    if own_grid:
        _write_nifti_image(img, path, source_id)
        return
    sform_code, qform_code = 1, 1  # scanner-anatomical when there is no source header
    if header is not None:
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        if sform_code == 0 and qform_code == 0:
            # without codes readers fall back to pixdim only; keep that only if it is
            # exact
            if not np.allclose(img.header.get_base_affine(), volume.affine):
                sform_code = 1
        if _mm_per_unit(header)[0] != 1.0:  # the affine written is in mm
            img.header.set_xyzt_units("mm", header.get_xyzt_units()[1])
    else:
        img.header.set_xyzt_units("mm", "sec")
    img.set_sform(volume.affine, code=sform_code)
    img.set_qform(volume.affine, code=qform_code)
    _write_nifti_image(img, path, source_id)


def _write_nifti_image(img, path: Path, source_id: str | None) -> None:
    import nibabel as nib

    extensions = img.header.extensions
    for extension in [e for e in extensions if _is_source_id(e)]:
        extensions.remove(extension)  # a label map segmented again: not this file's
    if source_id is not None:
        extensions.append(
            nib.nifti1.Nifti1Extension(
                "comment", f"{SOURCE_ID_KEY} {source_id}".encode("ascii")
            )
        )
    nib.save(img, path)


def _write_image2d(
    volume: Volume, tmp: Path, dtype: np.dtype, final: Path, source_id=None
) -> None:
    if volume.spatial_dims != 2:
        raise InputFileError(
            final,
            f"a 3D volume cannot be written as a 2D image "
            f"(shape {volume.array.shape}); use .nii.gz",
        )
    suffix = split_suffix(final)[1]
    array = np.asarray(volume.array)
    if array.shape[-1] == 1:
        array = array[..., 0]
    if suffix in (".jpg", ".jpeg"):
        raise InputFileError(
            final, "JPEG is lossy and would alter the values; use .png or .tif"
        )
    if suffix in (".tif", ".tiff"):
        import tifffile

        described = {"description": f"{SOURCE_ID_KEY} {source_id}"} if source_id else {}
        tifffile.imwrite(tmp, array.astype(dtype, copy=False), **described)
        return
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise InputFileError(
            final,
            f"PNG holds only uint8/uint16 values, not {dtype}; use .tif or .nii.gz",
        )
    if dtype == np.uint16 and array.ndim == 3:
        raise InputFileError(final, "16-bit PNG must be single-channel; use .tif")
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if source_id:
        info.add_text(SOURCE_ID_KEY, source_id)
    Image.fromarray(np.ascontiguousarray(array.astype(dtype, copy=False))).save(
        tmp, format="PNG", pnginfo=info
    )


def _write_npy(volume: Volume, path: Path, dtype: np.dtype) -> None:
    array = np.asarray(volume.array).astype(dtype, copy=False)
    if array.shape[-1] == 1:
        array = array[..., 0]
    if not np.allclose(volume.affine, np.eye(4)):
        logger.warning("%s: .npy stores no geometry; the affine is not written", path)
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
