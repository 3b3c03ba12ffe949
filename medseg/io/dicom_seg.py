"""DICOM Segmentation objects (SEG): a label map written as one over its series, and
one read back onto the series' grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.dicom import (
    _MAY_BE_EMPTY,
    SEG_SOP_CLASSES,
    _ordered,
    _pydicom,
    _read,
    _shape,
    _Slice,
)

#: Attributes without which a Segmentation cannot refer to its series (type 1).
_NEEDED_FOR_SEG = ("StudyInstanceUID", "FrameOfReferenceUID")


#: The coding scheme of the segments' property types: a label's value and name.
SEG_SCHEME = "99MEDSEG"


def has_seg_writer() -> bool:
    """highdicom, which writes DICOM Segmentation objects, is installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def write_segmentation(
    folder: str | Path,
    labels: np.ndarray,
    segments: list[tuple[int, str]],
    path: str | Path,
    *,
    algorithm: str | None,
    version: str,
) -> None:
    """Writes the label map of the series in ``folder`` as a DICOM Segmentation
    object (SEG, binary segments) at ``path``, atomically: one segment per ``(value,
    name)`` of ``segments``, numbered from 1 in their order, each frame referring to
    the slice it covers, in the series' study and frame of reference (new series and
    instance UIDs). Frames empty of every segment are left out, as highdicom does.

    Args:
        folder: the series (read as :func:`read_series` reads it).
        labels: its label map on the series' grid, ``(columns, rows, slices)`` (a last
            axis of one channel allowed).
        segments: the label values written, with their names (segment labels).
        path: the ``.dcm`` file to write.
        algorithm: the model's name, recorded as the segments' algorithm (automatic
            segments); ``None``: segments drawn by hand (manual).
        version: the writing software's version.

    Raises:
        InputFileError: the series no longer matches the label map's grid, or lacks
            what a Segmentation refers to (its study or frame of reference).
    """
    folder = Path(folder)
    _write_segmentation(
        folder, _ordered(folder)[0], labels, segments, path, algorithm, version
    )


def _write_segmentation(
    folder: Path, ordered: list[_Slice], labels, segments, path, algorithm, version
) -> None:
    """:func:`write_segmentation` of the series' slices ``ordered`` (headers read)."""
    import warnings

    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg.io.files import atomic_output

    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    rows, columns = ordered[0].shape
    if labels.shape != (columns, rows, len(ordered)):
        raise InputFileError(
            folder,
            f"the series is {columns} x {rows} x {len(ordered)} now, its label map "
            f"{' x '.join(map(str, labels.shape))}: changed while it was segmented?",
        )
    files = sorted({s.path for s in ordered if s.frame is not None})
    if len(files) > 1 or (files and any(s.frame is None for s in ordered)):
        raise InputFileError(
            folder,
            "a series of several multi-frame files, or of them and single slices: "
            "medseg writes a DICOM SEG of one multi-frame image or of single slices",
        )
    if files:  # one enhanced image: the SEG refers to its frames
        sources = [_read(_pydicom(folder), files[0], pixels=False)]
    else:
        sources = [s.header for s in ordered]
    missing = [tag for tag in _NEEDED_FOR_SEG if not sources[0].get(tag)]
    if missing:
        raise InputFileError(
            folder,
            f"no {', '.join(missing)}: a DICOM SEG cannot refer to this series",
        )
    for ds in sources:
        for tag in _MAY_BE_EMPTY:
            if tag not in ds:
                setattr(ds, tag, "")
    numbers = np.zeros(labels.shape, np.uint8 if len(segments) < 256 else np.uint16)
    for number, (value, _) in enumerate(segments, start=1):
        numbers[labels == value] = number
    automatic = {}
    if algorithm is not None:
        automatic["algorithm_identification"] = hd.AlgorithmIdentificationSequence(
            name=algorithm[:64],
            version=version,
            family=codes.DCM.ArtificialIntelligence,
        )
    kind = hd.seg.SegmentAlgorithmTypeValues
    software = "medseg data nifti-to-seg" if algorithm is None else algorithm
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name)[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=hd.sr.CodedConcept(
                str(value), SEG_SCHEME, str(name)[:64]
            ),
            algorithm_type=kind.MANUAL if algorithm is None else kind.AUTOMATIC,
            **automatic,
        )
        for number, (value, name) in enumerate(segments, start=1)
    ]
    try:
        number = int(sources[0].get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    try:
        with warnings.catch_warnings():  # highdicom's advice on the source's names
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=_by_source_frame(numbers, ordered),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=1000 + number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=software[:64],
                software_versions=version,
                device_serial_number="none",
                series_description=f"medseg {algorithm or 'labels'}"[:64],
            )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InputFileError(
            folder, f"its headers do not make a DICOM SEG ({exc})"
        ) from None
    try:
        with atomic_output(path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None


def label_map_to_segmentation(
    labels: str | Path,
    folder: str | Path,
    path: str | Path,
    names: dict[int, str],
    *,
    algorithm: str | None,
    version: str,
) -> list[tuple[int, str, int]]:
    """The label map in the file ``labels`` (a NIfTI, say, corrected in a viewer)
    written as a DICOM SEG of the series in ``folder`` at ``path``
    (:func:`write_segmentation`): one segment per non-zero value present, named from
    ``names`` (else ``label N``). The label map is on the series' grid as
    :func:`read_series` reads it, or holds its voxels in another order (a dcm2niix
    conversion's, say: read in the series' order, exactly).

    Returns:
        The segments written: ``(value, name, voxels)``.

    Raises:
        InputFileError: naming the file: not a label map (several channels, values
            that are not whole numbers, negative ones, none but 0), on another grid
            than the series, or the series' own problems.
    """
    from medseg.io.formats import read_volume
    from medseg.io.grid import label_array, label_on_grid_of
    from medseg.io.volume import ScanInfo, off_grid

    folder = Path(folder)
    slices, affine = _ordered(folder)  # the series' headers, read once
    series = ScanInfo(folder, "dicom", _shape(slices), 1, np.dtype(np.float64), affine)
    volume = read_volume(labels)
    ordered = label_on_grid_of(volume, series)
    if ordered is None:
        off = off_grid(volume, series, "the series'")
        raise InputFileError(labels, f"not on the grid of the series {folder}: {off}")
    array = label_array(ordered)
    values, counts = np.unique(array, return_counts=True)
    if values[0] < 0:
        raise InputFileError(labels, f"negative values ({values[0]}): not a label map")
    found = [(int(v), int(n)) for v, n in zip(values, counts, strict=True) if v != 0]
    if not found:
        raise InputFileError(labels, "no voxel labelled: a DICOM SEG needs a segment")
    segments = [(v, names.get(v, f"label {v}")) for v, _ in found]
    _write_segmentation(folder, slices, array, segments, path, algorithm, version)
    return [(v, name, n) for (v, name), (_, n) in zip(segments, found, strict=True)]


def _by_source_frame(numbers: np.ndarray, ordered: list[_Slice]) -> np.ndarray:
    """A label map ``(columns, rows, slices)`` as SEG frames ``(frames, rows,
    columns)``, in the order of the source's: slices, or one multi-frame image's
    frames."""
    frames = numbers.transpose(2, 1, 0)
    if ordered[0].frame is None:
        return frames
    stored = np.empty_like(frames)
    stored[[s.frame for s in ordered]] = frames
    return stored


#: How far a SEG frame's position may lie from its slice's, in mm (decimal strings).
SEG_POSITION_TOLERANCE_MM = 0.01


@dataclass
class SegLabels:
    """A DICOM Segmentation object read onto its series' grid: ``labels`` ``(columns,
    rows, slices)`` (uint8, or uint16 for values over 255), the series' RAS
    ``affine``, and per segment its label ``value``, ``name`` and voxel count."""

    labels: np.ndarray
    affine: np.ndarray
    segments: list[tuple[int, str, int]]


def _segment_values(seg, path: Path) -> dict[int, tuple[int, str]]:
    """Each segment's number -> (label value, name): a segment medseg wrote keeps
    its label value as its property type's code (scheme ``99MEDSEG``); any other
    segment's value is its number. A label map SEG's segment 0 (its background) is
    left out."""
    found = {}
    for segment in seg.get("SegmentSequence", []):
        number = int(segment.SegmentNumber)
        if number == 0:
            continue
        value = number
        codes = segment.get("SegmentedPropertyTypeCodeSequence") or []
        if codes and codes[0].get("CodingSchemeDesignator") == SEG_SCHEME:
            try:
                value = int(codes[0].CodeValue)
            except (TypeError, ValueError):
                raise InputFileError(
                    path, f"segment {number}: code {codes[0].CodeValue!r} is no label"
                ) from None
        found[number] = (value, str(segment.get("SegmentLabel", "") or number))
    if not found:
        raise InputFileError(path, "a DICOM SEG without segments")
    values = [value for value, _ in found.values()]
    if len(set(values)) < len(values) or min(values) < 1 or max(values) > 65535:
        raise InputFileError(
            path, f"segment label values {sorted(values)} are not distinct, 1 to 65535"
        )
    return found


def _frame_item(name: str, group, shared, path: Path, index: int):
    """A frame's functional group ``name`` (its own, else the shared one)."""
    for where in (group, shared):
        if where is not None and name in where:
            return where[name][0]
    raise InputFileError(path, f"frame {index + 1}: no {name}")


def read_segmentation(path: str | Path, folder: str | Path) -> SegLabels:
    """Reads a DICOM Segmentation object (binary or fractional segments, fractions
    from one half up, or a label map of segment numbers) as the label map of the
    series in ``folder``, on its grid as
    :func:`read_series` reads it: each frame is placed at the slice where it lies
    (its ``ImagePositionPatient``), in the series' orientation and pixel spacing.

    Raises:
        InputFileError: ``path`` is no DICOM SEG (or a malformed one), refers to
            another series, has a frame off the series' grid, or segments that
            overlap.
    """
    try:
        return _read_segmentation(Path(path), Path(folder))
    except InputFileError:
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise InputFileError(
            path, f"a malformed DICOM SEG ({type(exc).__name__}: {exc})"
        ) from None


def _read_segmentation(path: Path, folder: Path) -> SegLabels:
    pydicom = _pydicom(folder)
    seg = _read(pydicom, path, pixels=True)
    if str(seg.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise InputFileError(path, "not a DICOM Segmentation object (SEG)")
    ordered, affine = _ordered(folder)
    rows, columns = ordered[0].shape
    first = ordered[0]
    referenced = {
        str(item.get("SeriesInstanceUID", ""))
        for item in seg.get("ReferencedSeriesSequence", [])
    }
    if referenced and first.series not in referenced:
        raise InputFileError(
            path, f"refers to series {', '.join(sorted(referenced))}, not {folder}'s"
        )
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise InputFileError(
            path,
            f"frames of {seg.Rows} x {seg.Columns} pixels, the series' slices "
            f"{rows} x {columns}",
        )
    segments = _segment_values(seg, path)
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    try:
        frames = np.asarray(seg.pixel_array).reshape(-1, rows, columns)
    except Exception as exc:  # pydicom raises many types for damaged pixel data
        raise InputFileError(path, f"pixel data not readable ({exc})") from None
    kind = str(seg.get("SegmentationType", "BINARY"))
    if kind == "FRACTIONAL":
        frames = frames >= int(seg.get("MaximumFractionalValue", 255)) / 2
    positions = np.array([s.position for s in ordered])
    dtype = np.uint8 if max(v for v, _ in segments.values()) < 256 else np.uint16
    labels = np.zeros((columns, rows, len(ordered)), dtype)
    owner = np.zeros(labels.shape, np.uint16)  # the segment number of each voxel
    groups = seg.get("PerFrameFunctionalGroupsSequence", [])
    if len(groups) != len(frames):
        raise InputFileError(
            path, "frames and their functional groups differ in number"
        )
    for index, (frame, group) in enumerate(zip(frames, groups, strict=True)):

        def item(name, group=group, index=index):
            return _frame_item(name, group, shared, path, index)

        measures = item("PixelMeasuresSequence")
        orientation = item("PlaneOrientationSequence").ImageOrientationPatient
        if not (
            np.allclose([float(v) for v in orientation], first.orientation, atol=1e-4)
            and np.allclose(
                [float(v) for v in measures.PixelSpacing], first.spacing, atol=1e-4
            )
        ):
            raise InputFileError(
                path,
                f"frame {index + 1}: orientation or pixel spacing differs from the "
                "series' (a SEG on another grid)",
            )
        position = [
            float(v) for v in item("PlanePositionSequence").ImagePositionPatient
        ]
        distance = np.linalg.norm(positions - position, axis=1)
        k = int(np.argmin(distance))
        if distance[k] > SEG_POSITION_TOLERANCE_MM:
            raise InputFileError(
                path,
                f"frame {index + 1} lies at {np.round(position, 3).tolist()} mm, "
                f"{distance[k]:.3g} mm from the nearest slice of {folder}",
            )
        plane = np.asarray(frame).T  # (columns, rows)
        if kind == "LABELMAP":  # every segment in one frame, by its number
            unknown = set(np.unique(plane).tolist()) - set(segments) - {0}
            if unknown:
                raise InputFileError(
                    path, f"frame {index + 1}: no segment {min(unknown)}"
                )
            pieces = [(number, plane == number) for number in segments]
        else:
            number = int(item("SegmentIdentificationSequence").ReferencedSegmentNumber)
            if number not in segments:
                raise InputFileError(path, f"frame {index + 1}: no segment {number}")
            pieces = [(number, plane.astype(bool))]
        for number, mask in pieces:
            clash = mask & (owner[:, :, k] > 0) & (owner[:, :, k] != number)
            if clash.any():
                other = int(owner[:, :, k][clash][0])
                raise InputFileError(
                    path,
                    f"segments {other} and {number} overlap (slice {k + 1}); a label "
                    "map holds one label a voxel",
                )
            owner[:, :, k][mask] = number
            labels[:, :, k][mask] = segments[number][0]
    counts = [
        (value, name, int(np.count_nonzero(owner == number)))
        for number, (value, name) in sorted(segments.items())
    ]
    return SegLabels(labels, affine, counts)
