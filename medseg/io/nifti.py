"""NIfTI-1 and NIfTI-2 scans: their affine in millimetres, the header's fixes, and the
source id written into a result."""

from __future__ import annotations

import contextlib
import gzip
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.volume import Volume, _check_size, _read_problem

logger = logging.getLogger(__name__)


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


#: NIfTI's spatial unit codes (the low three bits of ``xyzt_units``)
_SPATIAL_UNITS = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}


def _mm_per_unit(header) -> tuple[float, str]:
    # read the code itself: nibabel raises KeyError on a code it does not know
    unit = _SPATIAL_UNITS.get(int(header["xyzt_units"]) % 8, "unknown")
    return _MM_PER_UNIT[unit], unit


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
    try:
        affine = nifti_affine_mm(header)
    except ValueError as exc:  # nibabel's: a qform quaternion of norm above 1
        raise InputFileError(
            path, f"degenerate geometry: the header's qform is not a rotation ({exc})"
        ) from None
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
    try:
        qform, qform_code = header.get_qform(coded=True)
    except ValueError:  # not a rotation; read by the sform (else refused earlier)
        return (
            "its qform is not a rotation (a quaternion of norm above 1): ignored, "
            "read by the sform"
        )
    if not sform_code or not qform_code:
        return None
    corners = np.array(
        [[*c, 1.0] for c in np.ndindex(*(2,) * 3)], dtype=float
    ) * np.array([*(max(n - 1, 0) for n in spatial), 1.0])
    apart = float(np.max(np.linalg.norm((corners @ (sform - qform).T)[:, :3], axis=1)))
    apart *= _mm_per_unit(header)[0]
    if apart <= TRANSFORMS_AGREE_MM:
        return None
    from medseg.io.volume import orientation_codes

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
    from medseg.io.volume import orientation_codes

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


#: how a written file names the input it was made from (see :func:`read_source_id`)
SOURCE_ID_KEY = "medseg-source"


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
