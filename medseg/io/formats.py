"""Reading and writing scans of any format medseg knows, with their geometry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.arrays import _load_npy, _npy_layout, _write_npy
from medseg.io.dicom import is_dicom_file
from medseg.io.files import atomic_output
from medseg.io.nifti import (
    SOURCE_ID_KEY,
    _header_fixes,
    _is_source_id,
    _load_nifti,
    _nifti_affine,
    _nifti_is_scaled,
    _nifti_layout,
    _read_nifti,
    _write_nifti,
)
from medseg.io.pictures import _image2d_layout, _read_image2d, _write_image2d
from medseg.io.volume import (
    DEFAULT_MAX_VOXELS,
    IMAGE_SUFFIXES,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    NUMPY_SUFFIXES,
    SCAN_SUFFIXES,
    ScanInfo,
    Volume,
    _check_size,
    _preferred_dtype,
    off_grid,
    output_dtype,
    split_suffix,
)

logger = logging.getLogger(__name__)


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


def read_info(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ScanInfo:
    """Reads a scan's header only: shape, channels, dtype and affine.

    Raises:
        InputFileError: missing, unreadable, wrong format, or absurd dimensions.
    """
    if _is_series(path):
        from medseg.io.dicom import series_geometry

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
        from medseg.io import itk

        spatial, channels, dtype, affine = itk.read_info(path)
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
    :func:`medseg.preprocessing.intensity.replace_nonfinite`). Uncompressed NIfTI
    and ``.npy``
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
        from medseg.io.dicom import read_series

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
        from medseg.io import itk

        array, affine, fields = itk.read(
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
    :func:`medseg.io.grid.in_voxel_order_of`).

    Raises:
        InputFileError: naming the first file on another grid (shape or affine).
    """
    from medseg.io.grid import in_voxel_order_of

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


def _is_series(path: str | Path) -> bool:
    """A folder holding DICOM files: one series, read as one scan."""
    from medseg.io.dicom import is_series_folder

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


def write_volume(
    volume: Volume,
    path: str | Path,
    *,
    dtype: str | np.dtype | None = None,
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
        from medseg.io import itk

        suffix = split_suffix(path)[1]
        if suffix in itk.DETACHED:
            raise InputFileError(
                path,
                f"{suffix} keeps its voxels in another file; write "
                f"{itk.DETACHED[suffix]}",
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
                itk.write(array, volume.affine, tmp, source_id)
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
            from medseg.io import itk

            return itk.read_source_id(path)
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
