"""DICOM series: a folder holding the slices of one series, read as one volume with
its geometry, and its label map written as a DICOM Segmentation object (the optional
extra ``pip install "medseg[dicom]"``, which brings pydicom and highdicom).

The geometry follows the DICOM standard (PS3.3 C.7.6.2): the pixel in row ``r`` and
column ``c`` of a slice lies at ``ImagePositionPatient + c * dc * row_cosine + r * dr *
col_cosine`` in LPS patient coordinates, where ``PixelSpacing`` is ``(dr, dc)`` and
``ImageOrientationPatient`` holds the two cosines. Slices are ordered along the normal
``row_cosine x col_cosine``. The volume is stored as ``(column, row, slice)``, as NIfTI
converters do, with its affine in RAS (LPS with the first two axes negated).
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

#: The extra that reads DICOM.
INSTALL = 'pip install "medseg[dicom]"'


#: Tags without which a file is not a slice of a volume.
GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


#: Largest spread of the gaps between neighbouring slices, in mm, read as one spacing.
GAP_TOLERANCE_MM = 0.01


#: characters not kept in the names :func:`sort_series` gives
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


#: Patient and study attributes a Segmentation copies from its series. DICOM lets
#: them be empty (type 2), and anonymised exports often leave them out: written empty.
_MAY_BE_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def named_scan(path: Path) -> Path:
    """The scan ``path`` names: a DICOM slice in a folder of its series' files names
    the series (that folder); any other path itself."""
    path = Path(path)
    if path.is_file() and is_dicom_file(path) and is_series_folder(path.parent):
        return path.parent
    return path


def _candidate(path: Path) -> bool:
    """A file that may be a slice: not hidden, not a media directory (DICOMDIR)."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.name.upper() != "DICOMDIR"
    )


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` (any name), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _candidate(p) and is_dicom_file(p))


def is_series_folder(path: Path) -> bool:
    """A folder holding DICOM files and no other scan files: one series, one scan.
    (Names are checked first; files are opened only until one is DICOM.)"""
    from medseg.io.volume import split_suffix

    path = Path(path)
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(split_suffix(p)[1] for p in entries):  # a NIfTI or picture: scans
        return False
    return any(_candidate(p) and is_dicom_file(p) for p in entries)


def _pydicom(folder: Path):
    try:
        import pydicom
    except ImportError:
        raise InputFileError(
            folder, f"a DICOM series; reading DICOM needs pydicom ({INSTALL})"
        ) from None
    return pydicom


def _read(pydicom, path: Path, *, pixels: bool):
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputFileError(path, f"unreadable DICOM ({exc})") from None


def _vector(ds, tag: str, path: Path) -> np.ndarray:
    try:
        return np.asarray([float(v) for v in ds[tag].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise InputFileError(path, f"no usable {tag}") from None


class _Slice:
    """One file's geometry, from its header (kept: a SEG refers to it), or one frame's
    of a multi-frame file (``frame``: its index there; ``ds`` its geometry and
    rescaling gathered from the functional groups, see :func:`_frames`)."""

    def __init__(self, ds, path: Path, frame: int | None = None):
        self.name = path.name if frame is None else f"{path.name} frame {frame + 1}"
        missing = [tag for tag in (*GEOMETRY_TAGS, "Rows", "Columns") if tag not in ds]
        if missing:
            raise InputFileError(
                path,
                f"{'' if frame is None else self.name + ': '}no {', '.join(missing)}: "
                "not a slice of a volume (a localiser, a report or a secondary "
                "capture?)",
            )
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputFileError(
                path,
                "a multi-frame DICOM file without per-frame geometry (functional "
                "groups), which is not read",
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputFileError(path, "a colour DICOM image, not a scan's slice")
        self.path = path
        self.frame = frame
        self.header = ds
        self.series = str(ds.get("SeriesInstanceUID", ""))
        self.description = str(ds.get("SeriesDescription", "") or "")
        self.position = _vector(ds, "ImagePositionPatient", path)
        self.orientation = _vector(ds, "ImageOrientationPatient", path)
        self.spacing = _vector(ds, "PixelSpacing", path)  # (between rows, columns)
        self.shape = (int(ds.Rows), int(ds.Columns))
        self.thickness = float(
            ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        )
        self.slope = float(ds.get("RescaleSlope", 1) or 1)
        self.intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if self.orientation.shape != (6,) or self.spacing.shape != (2,):
            raise InputFileError(path, "malformed ImageOrientationPatient/PixelSpacing")
        if np.any(self.spacing <= 0):
            raise InputFileError(path, f"PixelSpacing {list(self.spacing)} is not > 0")

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


#: Functional groups that hold a frame's geometry and rescaling (PS3.3 C.7.6.16).
_FRAME_GROUPS = (
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
)


#: What a frame keeps of its file's own attributes.
_FRAME_KEEPS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "SeriesInstanceUID",
    "SeriesDescription",
)


def _frames(ds, path: Path) -> list[_Slice]:
    """The frames of a multi-frame image (an enhanced or legacy-converted enhanced CT
    or MR: a whole series in one file) as slices, each with the position, orientation,
    pixel spacing and rescaling of its functional groups (its own over the shared
    ones)."""
    from pydicom.dataset import Dataset

    count = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != count:
        raise InputFileError(
            path,
            f"{count} frames, {len(per_frame)} per-frame functional groups: a "
            "multi-frame file whose frames cannot be placed",
        )
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    slices = []
    for index, own in enumerate(per_frame):
        frame = Dataset()
        for tag in _FRAME_KEEPS:
            if tag in ds:
                frame.add(ds[tag])
        for groups in (shared, own):  # a frame's own groups over the shared ones
            for name in _FRAME_GROUPS:
                if groups is not None and groups.get(name):
                    for element in groups[name][0]:
                        frame.add(element)
        slices.append(_Slice(frame, path, frame=index))
    return slices


def _geometry(folder: Path, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """The slices in order along their normal, and the volume's RAS affine."""
    series = sorted({s.series for s in slices})
    if len(series) > 1:
        counts = []
        for uid in series:
            members = [s for s in slices if s.series == uid]
            name = members[0].description or f"UID {uid}"
            counts.append(f"{name}: {len(members)} file{'s' * (len(members) > 1)}")
        raise InputFileError(
            folder,
            f"holds {len(series)} DICOM series ({'; '.join(counts)}); give each "
            "series a folder of its own (medseg data sort-dicom does)",
        )
    first = slices[0]
    for s in slices[1:]:
        for what, mine, theirs in (
            ("orientation", s.orientation, first.orientation),
            ("pixel spacing", s.spacing, first.spacing),
            ("size", np.array(s.shape), np.array(first.shape)),
        ):
            if not np.allclose(mine, theirs, atol=1e-4):
                raise InputFileError(
                    s.path, f"{what} differs from {first.name}'s in one series"
                )
    normal = first.normal
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    where = np.array([float(s.position @ normal) for s in ordered])
    gaps = np.diff(where)
    if len(gaps) and gaps.min() < GAP_TOLERANCE_MM:
        i = int(np.argmin(gaps))
        raise InputFileError(
            folder,
            f"two slices at one position ({ordered[i].name}, {ordered[i + 1].name})",
        )
    if len(gaps) and gaps.max() - gaps.min() > GAP_TOLERANCE_MM:
        raise InputFileError(
            folder,
            f"slices unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm apart; "
            "a slice missing?)",
        )
    if len(ordered) > 1:
        # the slices' own step: along the normal, or across it under a tilted gantry
        step = (ordered[-1].position - ordered[0].position) / (len(ordered) - 1)
        positions = np.array([s.position for s in ordered])
        line = ordered[0].position + np.arange(len(ordered))[:, None] * step
        off = np.linalg.norm(positions - line, axis=1)
        # a tenth of a pixel off is placed on it (positions are written rounded)
        if off.max() > max(GAP_TOLERANCE_MM, 0.1 * float(np.min(first.spacing))):
            i = int(np.argmax(off))
            raise InputFileError(
                folder,
                f"slice positions are not on one line ({ordered[i].name} lies "
                f"{off[i]:.3g} mm off the line from the first slice to the last): "
                "not one volume",
            )
    else:
        step = normal * first.thickness
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * first.spacing[1]  # along a row: columns
    lps[:3, 1] = first.orientation[3:] * first.spacing[0]  # down a column: rows
    lps[:3, 2] = step
    lps[:3, 3] = ordered[0].position
    return ordered, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def series_geometry(folder: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """The series' shape ``(columns, rows, slices)`` and RAS affine, from headers only.

    Raises:
        InputFileError: no DICOM files, pydicom missing, or slices that do not make
            one volume (several series, missing geometry, uneven or repeated slices).
    """
    ordered, affine = _ordered(Path(folder))
    return _shape(ordered), affine


def _shape(ordered: list[_Slice]) -> tuple[int, int, int]:
    """The volume's shape ``(columns, rows, slices)`` of its ordered slices."""
    rows, columns = ordered[0].shape
    return (columns, rows, len(ordered))


def _ordered(folder: Path) -> tuple[list[_Slice], np.ndarray]:
    """Every slice's header read (no pixels) and checked; the slices in order and the
    volume's RAS affine."""
    pydicom = _pydicom(folder)
    files = dicom_files(folder)
    if not files:
        raise InputFileError(folder, "no DICOM files found")
    slices = []
    for path in files:
        ds = _read(pydicom, path, pixels=False)
        if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
            raise InputFileError(
                path,
                "a DICOM Segmentation, not a scan's slice (medseg data seg-to-nifti "
                "reads it onto its series)",
            )
        if ds.get("PerFrameFunctionalGroupsSequence"):  # an enhanced image
            slices.extend(_frames(ds, path))
        else:
            slices.append(_Slice(ds, path))
    return _geometry(folder, slices)


def _pixels(ds, path: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # a compressed syntax without its decoder, say
        raise InputFileError(path, f"pixel data not readable ({exc})") from None


def read_series(
    folder: str | Path, *, max_voxels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The series' voxels ``(columns, rows, slices)`` in their stored units after
    ``RescaleSlope``/``RescaleIntercept`` (Hounsfield units for CT), and its RAS affine.

    Whole numbers stay integers (int16 when they fit, else int32); a series whose
    rescaling gives fractions is float32.
    """
    folder = Path(folder)
    ordered, affine = _ordered(folder)  # every header checked before any pixel
    rows, columns = ordered[0].shape
    shape = (columns, rows, len(ordered))
    from medseg.io.volume import _check_size

    _check_size(folder, shape, 1, max_voxels)  # as for any scan file
    whole = all(
        float(s.slope).is_integer() and float(s.intercept).is_integer() for s in ordered
    )
    volume = np.empty(shape, np.int32 if whole else np.float32)
    pydicom = _pydicom(folder)
    frames: dict[Path, np.ndarray] = {}  # a multi-frame file's, decoded once
    for k, s in enumerate(ordered):  # one slice file's pixels in memory at a time
        if s.frame is None:
            pixels = _pixels(_read(pydicom, s.path, pixels=True), s.path)
        else:
            if s.path not in frames:
                stack = _pixels(_read(pydicom, s.path, pixels=True), s.path)
                count = sum(t.path == s.path for t in ordered)
                if stack.shape[-2:] != s.shape or stack.size != count * rows * columns:
                    raise InputFileError(
                        s.path,
                        f"pixel data of shape {stack.shape}, header says {count} "
                        f"frames of {s.shape}",
                    )
                frames[s.path] = stack.reshape(count, *s.shape)  # one frame too
            pixels = frames[s.path][s.frame]
        if pixels.shape != s.shape:
            raise InputFileError(
                s.path, f"pixel data of shape {pixels.shape}, header says {s.shape}"
            )
        if whole:
            plane = pixels.T.astype(np.float64) * s.slope + s.intercept
            if pixels.dtype.kind not in "iub" or not (
                np.iinfo(np.int32).min <= plane.min() <= plane.max() < 2**31
            ):
                volume = volume.astype(np.float32)  # no longer whole int32 values
                whole = False
        else:
            plane = pixels.T.astype(np.float32) * np.float32(s.slope)
            plane += np.float32(s.intercept)
        volume[:, :, k] = plane
    if whole:
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= volume.min() and volume.max() <= info.max:
                return volume.astype(dtype), affine
    return volume.astype(np.float32, copy=False), affine


#: SOP classes of DICOM Segmentation objects: Segmentation, Label Map Segmentation
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


@dataclass
class Sorted:
    """What :func:`sort_series` did: file count per series folder, files placed now and
    found placed by an earlier run, files that are not DICOM (left where they are),
    and one line per file that could not be placed."""

    series: dict[str, int] = field(default_factory=dict)
    placed: int = 0
    present: int = 0
    not_dicom: int = 0
    problems: list[str] = field(default_factory=list)


def series_folder_name(
    number, description: str, uid: str, patient: str | None = None, date=None
) -> str:
    """``NNNN_description`` (the series number, 4 digits; its description with any
    character but letters, digits, ``.``, ``_`` and ``-`` made ``_``), or
    ``series_`` and 8 hex digits of the UID's hash where both are missing; with
    ``patient`` (an ID) and ``date`` (the study's), ``PATIENT_DATE_`` before it (each
    left out where missing)."""
    label = _UNSAFE.sub("_", str(description or "")).strip("_.")
    try:
        prefix = f"{int(number):04d}"
    except (TypeError, ValueError):
        prefix = ""
    name = "_".join(part for part in (prefix, label) if part)
    if not name:
        name = "series_" + hashlib.sha1(uid.encode()).hexdigest()[:8]
    study = [_UNSAFE.sub("_", str(part or "")).strip("_.") for part in (patient, date)]
    return "_".join([*(part for part in study if part), name])


def sort_series(
    source: str | Path, target: str | Path, *, by_patient: bool = False
) -> Sorted:
    """Every DICOM file under ``source`` (any depth; a PACS export that mixes the
    series of a study in one folder, say) placed in a folder of its series under
    ``target``, named by :func:`series_folder_name` (with ``by_patient``, after the
    PatientID and StudyDate: a cohort's export, whose patients' series share names and
    whose names say whose scan it is; two series of one name get 8 hex
    digits of their UID's hash appended, but for one that an earlier run gave the
    plain name, which keeps it), each file as ``SOPInstanceUID.dcm``. Files
    are hard-linked where ``target`` is on the same file system, else copied under a
    temporary name and renamed, so an interrupted run leaves no partial file and a
    re-run places only what is missing. A file already there with other bytes, or
    without a SeriesInstanceUID or SOPInstanceUID, is a problem named and left.

    Raises:
        InputFileError: pydicom missing, ``source`` not a folder, or ``target`` inside
            ``source`` (a re-run would sort the sorted files again).
    """
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise InputFileError(source, "not a folder")
    if target.resolve().is_relative_to(source.resolve()):
        raise InputFileError(target, f"inside the folder being sorted ({source})")
    pydicom = _pydicom(source)
    result = Sorted()
    found: dict[str, list[tuple[Path, str]]] = {}
    names: dict[str, str] = {}
    for path in sorted(source.rglob("*")):
        hidden = any(p.startswith(".") for p in path.relative_to(source).parts)
        if hidden or not _candidate(path):
            continue
        if not is_dicom_file(path):
            result.not_dicom += 1
            continue
        try:
            ds = _read(pydicom, path, pixels=False)
        except InputFileError as exc:
            result.problems.append(str(exc))
            continue
        uid, instance = ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
        if not uid or not instance:
            result.problems.append(f"{path}: no SeriesInstanceUID or SOPInstanceUID")
            continue
        uid = str(uid)
        if uid not in names:
            names[uid] = series_folder_name(
                ds.get("SeriesNumber"),
                ds.get("SeriesDescription", ""),
                uid,
                *((ds.get("PatientID"), ds.get("StudyDate")) if by_patient else ()),
            )
        found.setdefault(uid, []).append((path, _UNSAFE.sub("_", str(instance))))
    taken = {}
    for uid, name in names.items():
        taken.setdefault(name, []).append(uid)
    for uid, files in found.items():
        name = names[uid]
        owner = _series_of(pydicom, target / name)  # an earlier run's, say
        if owner != uid and (owner is not None or len(taken[name]) > 1):
            name += "_" + hashlib.sha1(uid.encode()).hexdigest()[:8]
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        for path, instance in files:
            destination = folder / f"{instance}.dcm"
            if destination.exists():
                if filecmp.cmp(destination, path, shallow=False):  # a link, or a copy
                    result.present += 1
                else:
                    result.problems.append(
                        f"{path}: {destination} exists with other bytes (another "
                        "file of the same SOPInstanceUID)"
                    )
                continue
            _place(path, destination)
            result.placed += 1
        result.series[name] = len(files)
    return result


def _series_of(pydicom, folder: Path) -> str | None:
    """The SeriesInstanceUID of the first DICOM file in ``folder``, if any."""
    for path in dicom_files(folder):
        try:
            return str(_read(pydicom, path, pixels=False).get("SeriesInstanceUID", ""))
        except InputFileError:
            continue
    return None


def _place(path: Path, destination: Path) -> None:
    """``path`` at ``destination``: a hard link, or a copy renamed into place."""
    try:
        os.link(path, destination)
        return
    except OSError:
        pass
    from medseg.io.files import atomic_output

    with atomic_output(destination) as tmp:
        shutil.copyfile(path, tmp)
