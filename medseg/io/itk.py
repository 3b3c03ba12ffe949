"""MetaImage (``.mha``, ``.mhd``) and NRRD (``.nrrd``, ``.nhdr``) scans, read and
written with SimpleITK (the ``itk`` extra): grand-challenge.org's algorithms take and
give ``.mha``, and 3D Slicer saves volumes and segmentations as ``.nrrd``.

ITK places voxels in LPS: ``origin + direction @ (spacing * index)``. medseg's affines
are RAS (NIfTI's world), so the first two rows change sign both ways; the voxel array
is ITK's ``(z, y, x)`` read back as ``(x, y, z)``, so that voxel ``(i, j, k)`` of the
array is ITK's index ``(i, j, k)``. A 2D image is read as one slice of a volume, as a
2D NIfTI is. Files with a detached header (``.mhd``, ``.nhdr``) are read; label maps
are written as single files (``.mha``, ``.nrrd``).

A 3D Slicer segmentation (``.seg.nrrd``) names its segments in its header
(``SegmentN_Name``, ``SegmentN_LabelValue``, ``SegmentN_Layer``); segments that overlap
are saved in layers (a list axis, read as channels). Layers no voxel of which is
labelled in two are read as the one label map they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

#: LPS to RAS and back
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
DETACHED = {".mhd": ".mha", ".nhdr": ".nrrd"}
#: the field by which a 3D Slicer segmentation (``.seg.nrrd``) says that it is saved
#: on a box of its reference image's grid (cropped to its segments)
SLICER_CROP_KEY = "Segmentation_ReferenceImageExtentOffset"


class Metadata(dict):
    """A MetaImage or NRRD header's fields (SimpleITK's metadata), kept as a
    :class:`medseg.io.Volume`'s ``header``."""


@dataclass(frozen=True)
class Segment:
    """A segment of a 3D Slicer segmentation: its name, the value its voxels hold and
    the layer (channel) they are in."""

    name: str
    value: int
    layer: int


_SEGMENT_NAME = re.compile(r"Segment(\d+)_Name")


def slicer_segments(header) -> list[Segment]:
    """The segments a 3D Slicer segmentation's header declares with their label
    values, in the file's order; none for another file (or an older Slicer file that
    stores no label values)."""
    if not isinstance(header, dict):
        return []
    found = []
    for key, name in header.items():
        match = _SEGMENT_NAME.fullmatch(key)
        if match is None:
            continue
        number = match.group(1)
        try:
            value = int(header[f"Segment{number}_LabelValue"])
            layer = int(header.get(f"Segment{number}_Layer", "0"))
        except (KeyError, ValueError):
            continue
        found.append((int(number), Segment(str(name).strip(), value, layer)))
    return [segment for _, segment in sorted(found, key=lambda pair: pair[0])]


def name_key(name: str) -> str:
    """A label name as names are compared: case, spaces, ``_`` and ``-`` aside."""
    return re.sub(r"[\s_-]+", "", name).casefold()


def segments_against_labels(
    header, labels: dict[int, str] | None, source: str = "the dataset's labels"
) -> list[str]:
    """Each 3D Slicer segment of ``header`` named as one of ``labels`` (value -> name;
    case, spaces, ``_`` and ``-`` aside) but holding another value, in words
    (``source`` is where ``labels`` come from): Slicer numbers segments in the order
    they were made, so one file may hold a label at another's value, and its voxels
    would be read as the other label."""
    if not labels:
        return []
    values = {name_key(name): value for value, name in labels.items()}
    problems = []
    for segment in slicer_segments(header):
        declared = values.get(name_key(segment.name))
        if declared is not None and declared != segment.value:
            problems.append(
                f"segment {segment.name!r} holds label value {segment.value}, but "
                f"{source} give {labels[declared]!r} the value {declared}"
            )
    return problems


def segment_names(paths) -> dict[int, str]:
    """Label names (value -> name) from the 3D Slicer segmentations among ``paths``
    (their headers), each name at the value most of them hold it at (the first
    file's in a tie), so that one whose segments are numbered otherwise (Slicer
    numbers them in the order they were made) is refused by
    :func:`segments_against_labels` given these names, rather than read as other
    labels; empty when none names its segments. Files that cannot be read are
    passed over here (named when they are read)."""
    from collections import Counter

    votes, shown = Counter(), {}
    for path in paths:
        if not str(path).lower().endswith((".nrrd", ".nhdr")):
            continue
        try:
            fields = read_fields(Path(path))
        except InputFileError:
            continue
        for segment in slicer_segments(fields):
            key = name_key(segment.name)
            votes[key, segment.value] += 1
            shown.setdefault(key, segment.name)
    names: dict[int, str] = {}
    for key, value in (pair for pair, _ in votes.most_common()):
        if value not in names and key not in map(name_key, names.values()):
            names[value] = shown[key]
    return dict(sorted(names.items()))


def _labelled_twice(array: np.ndarray) -> np.ndarray:
    """Voxels labelled in more than one layer (channel) of ``array``."""
    return np.count_nonzero(array, axis=-1) > 1


def _one_label_map(array: np.ndarray, fields: Metadata) -> np.ndarray | None:
    """A Slicer segmentation's layers ``(X, Y, Z, L)`` as one label map
    ``(X, Y, Z, 1)`` when its header declares segments in those layers and no voxel
    is labelled in two; else ``None``."""
    layers = array.shape[-1]
    segments = slicer_segments(fields)
    if layers < 2 or not segments:
        return None
    if any(not 0 <= s.layer < layers for s in segments) or _labelled_twice(array).any():
        return None
    return array.sum(axis=-1, keepdims=True, dtype=array.dtype)


def overlapping_segments(array: np.ndarray, header) -> str | None:
    """Which segments of a layered Slicer segmentation share voxels (the first two
    found, and in how many voxels), in words; ``None`` when none do or the file is
    not one."""
    segments = slicer_segments(header)
    if array.shape[-1] < 2 or not segments:
        return None
    twice = _labelled_twice(array)
    if not twice.any():
        return None
    names = {(s.layer, s.value): s.name for s in segments}
    at = np.argwhere(twice)[0]
    shared = [
        (layer, int(value))
        for layer, value in enumerate(array[tuple(at)])
        if value != 0
    ][:2]
    count = int(
        np.count_nonzero(
            np.logical_and.reduce([array[..., layer] == v for layer, v in shared])
        )
    )
    first, second = (names.get(key, f"value {key[1]}") for key in shared)
    return (
        f"segments {first!r} and {second!r} overlap in {count:,} voxels (saved in "
        f"{array.shape[-1]} layers); a label map holds one label a voxel"
    )


def available() -> bool:
    """SimpleITK (the ``itk`` extra) is installed (found, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("SimpleITK") is not None
    except (ImportError, ValueError):  # a module entry without a spec
        return False


def _sitk(path: Path):
    try:
        import SimpleITK
    except ImportError:
        raise InputFileError(
            path,
            "a MetaImage or NRRD file; reading and writing it needs SimpleITK "
            '(pip install "medseg[itk]")',
        ) from None
    SimpleITK.ProcessObject_SetGlobalWarningDisplay(False)  # problems come as errors
    return SimpleITK


def _problem(exc: Exception) -> str:
    """One line for an ITK reading error (whose own "Reason" is often a stale errno,
    "No such file or directory" for a truncated file)."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "not a MetaImage or NRRD file that ITK can read"
    if "File cannot be read" in text:
        return "unreadable (damaged or truncated)"
    teem = [line.split(": ", 1)[-1] for line in text.splitlines() if "[nrrd]" in line]
    if teem:  # NRRD's own reader says what went wrong last
        short = any(w in teem[-1] for w in ("got only", "but received", "expected"))
        kind = "damaged or truncated: " if short else ""
        return f"unreadable ({kind}{teem[-1].strip()[:200]})"
    errors = [line for line in text.splitlines() if "ERROR" in line]
    detail = errors[-1].split("): ", 1)[-1] if errors else type(exc).__name__
    return f"unreadable ({detail.strip()[:200]})"


def _reader(path: Path):
    sitk = _sitk(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputFileError(path, _problem(exc)) from None
    if reader.GetDimension() not in (2, 3):
        raise InputFileError(
            path,
            f"a {reader.GetDimension()}D image (expected 2D or 3D, channels as "
            "components)",
        )
    kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in kind or kind not in _DTYPES and "vector" not in kind:
        raise InputFileError(path, f"unsupported voxel type ({kind})")
    return reader


def _affine(path: Path, origin, spacing, direction, dimension: int) -> np.ndarray:
    """The RAS affine of ITK geometry, a 2D image's embedded as one slice."""
    lps = np.eye(4)
    matrix = np.asarray(direction, float).reshape(dimension, dimension)
    lps[:dimension, :dimension] = matrix * np.asarray(spacing, float)
    lps[:dimension, 3] = origin
    if not np.all(np.isfinite(lps)) or abs(np.linalg.det(lps[:3, :3])) < 1e-12:
        raise InputFileError(path, "degenerate geometry (spacing or direction)")
    return _FLIP @ lps


def _layout(reader) -> tuple[tuple[int, ...], int]:
    """``(spatial shape, channels)`` from a header, a 2D image's as one slice."""
    shape = tuple(int(n) for n in reader.GetSize())
    return shape + (1,) * (3 - len(shape)), int(reader.GetNumberOfComponents())


def read_fields(path: Path) -> Metadata:
    """The header's fields (a 3D Slicer segmentation's segments among them), from the
    header alone."""
    reader = _reader(path)
    return Metadata((key, reader.GetMetaData(key)) for key in reader.GetMetaDataKeys())


def read_info(path: Path) -> tuple[tuple[int, ...], int, np.dtype, np.ndarray]:
    """``(spatial shape, channels, dtype, affine)`` from the header alone (a Slicer
    segmentation's layers counted as channels, which :func:`read` may merge)."""
    sitk = _sitk(path)
    reader = _reader(path)
    dimension = reader.GetDimension()
    shape, channels = _layout(reader)
    affine = _affine(
        path,
        reader.GetOrigin(),
        reader.GetSpacing(),
        reader.GetDirection(),
        dimension,
    )
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    dtype = _DTYPES.get(name.replace("vector of ", ""), np.dtype(np.float64))
    return shape, channels, dtype, affine


_DTYPES = {
    "8-bit unsigned integer": np.dtype(np.uint8),
    "8-bit signed integer": np.dtype(np.int8),
    "16-bit unsigned integer": np.dtype(np.uint16),
    "16-bit signed integer": np.dtype(np.int16),
    "32-bit unsigned integer": np.dtype(np.uint32),
    "32-bit signed integer": np.dtype(np.int32),
    "64-bit unsigned integer": np.dtype(np.uint64),
    "64-bit signed integer": np.dtype(np.int64),
    "32-bit float": np.dtype(np.float32),
    "64-bit float": np.dtype(np.float64),
}


def read(path: Path, check=None) -> tuple[np.ndarray, np.ndarray, Metadata]:
    """The voxels ``(X, Y, Z, C)``, the RAS affine and the header's fields;
    ``check(spatial shape, channels)`` first sees the header (a size limit)."""
    sitk = _sitk(path)
    reader = _reader(path)
    if check is not None:
        check(*_layout(reader))
    short = _short_metaimage(path)
    if short is not None:  # found before MetaIO's reader prints it on stderr
        raise InputFileError(path, short)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputFileError(path, _problem(exc)) from None
    dimension = image.GetDimension()
    affine = _affine(
        path, image.GetOrigin(), image.GetSpacing(), image.GetDirection(), dimension
    )
    components = image.GetNumberOfComponentsPerPixel()
    fields = Metadata((key, image.GetMetaData(key)) for key in image.GetMetaDataKeys())
    array = sitk.GetArrayFromImage(image)  # a copy: (z, y, x[, c]) or (y, x[, c])
    del image
    if components == 1:
        array = array[..., None]
    axes = tuple(reversed(range(dimension)))
    array = np.transpose(array, (*axes, dimension))
    if dimension == 2:
        array = array[:, :, None, :]
    merged = _one_label_map(array, fields)
    if merged is not None:  # a Slicer segmentation's layers that do not overlap
        array = merged
    return array, affine, fields  # a view in medseg's axis order (NIfTI's F order)


def write(
    array: np.ndarray,
    affine: np.ndarray,
    path: Path,
    source_id: str | None,
    fields: dict[str, str] | None = None,
) -> None:
    """Writes ``(X, Y, Z, C)`` voxels on the RAS ``affine`` to ``path`` (compressed),
    keeping ``source_id`` under ``medseg-source`` in the header, with ``fields``."""
    sitk = _sitk(path)
    channels = array.shape[-1]
    zyx = np.transpose(array, (2, 1, 0, 3))
    if channels == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(zyx[..., 0]))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(zyx), isVector=True)
    lps = _FLIP @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    if source_id is not None:
        image.SetMetaData("medseg-source", source_id)
    for key, value in (fields or {}).items():
        image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.UseCompressionOn()
    try:
        writer.Execute(image)
    except RuntimeError as exc:  # a full disk, say; the caller names the file
        errors = [line for line in str(exc).splitlines() if "ERROR" in line]
        detail = errors[-1].split("): ", 1)[-1] if errors else ""
        # ITK names the file it wrote (a temporary one); the caller names the output
        detail = detail.replace(str(path), "").strip(" :")
        raise OSError(f"ITK's writer failed: {detail}"[:200].rstrip(": ")) from None


def slicer_fields(
    labels: np.ndarray, segments: list[tuple[int, str, tuple[float, float, float]]]
) -> dict[str, str]:
    """The header fields that make a label map ``(X, Y, Z)`` a 3D Slicer segmentation
    (``.seg.nrrd``) of ``segments`` ``(label value, name, colour as RGB in 0..1)``:
    one segment each, in one layer, with its voxels' extent (the box Slicer reads it
    in), so that Slicer opens it with the labels' names and colours."""
    from scipy import ndimage

    fields = {
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_SourceRepresentation": "Binary labelmap",
        SLICER_CROP_KEY: "0 0 0",
    }
    values = np.asarray(labels)
    if values.dtype.kind != "u":  # label maps are unsigned; find_objects skips 0
        values = np.clip(values, 0, None).astype(np.int64)
    boxes = ndimage.find_objects(values)
    for number, (value, name, colour) in enumerate(segments):
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        extent = (
            " ".join(f"{s.start} {s.stop - 1}" for s in box)
            if box is not None
            else "0 -1 0 -1 0 -1"  # an empty segment
        )
        key = f"Segment{number}_"
        fields |= {
            key + "ID": f"Segment_{value}",
            key + "Name": str(name),
            key + "NameAutoGenerated": "0",
            key + "Color": " ".join(f"{c:g}" for c in colour),
            key + "ColorAutoGenerated": "0",
            key + "LabelValue": str(int(value)),
            key + "Layer": "0",
            key + "Extent": extent,
        }
    return fields


#: bytes a voxel value of each MetaImage element type takes
_MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}  # fmt: skip


def _short_metaimage(path: Path) -> str | None:
    """The problem of a MetaImage (``.mha``, ``.mhd``) whose voxel data is shorter than
    its header says (a copy cut short) or whose data file is missing; ``None`` when it
    is not short, or the header is one this does not size (a header size given, a list
    or pattern of data files, compressed data of no stated size)."""
    if path.suffix.lower() not in (".mha", ".mhd"):
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        size = path.stat().st_size
    except OSError:
        return None
    fields, offset = {}, 0
    for line in head.splitlines(keepends=True):  # the voxels follow the last line
        key, _, value = line.decode("latin-1").partition("=")
        key, value = key.strip().lower(), value.strip()
        fields[key], offset = value, offset + len(line)
        if key == "elementdatafile":
            break
    try:
        if "elementdatafile" not in fields or int(fields.get("headersize", 0) or 0):
            return None
        if fields.get("compresseddata", "").lower() == "true":
            expected = int(fields["compresseddatasize"])
        else:
            values = int(np.prod([int(n) for n in fields["dimsize"].split()]))
            channels = int(fields.get("elementnumberofchannels", 1))
            expected = values * channels * _MET_BYTES[fields["elementtype"].upper()]
    except (KeyError, ValueError):
        return None
    source = fields["elementdatafile"]
    if source.upper() == "LOCAL":
        found = size - offset
    elif source.upper() == "LIST" or "%" in source or " " in source:
        return None
    else:
        try:
            found = (path.parent / source).stat().st_size
        except OSError:
            return f"its voxel data file {source} is missing"
    if found >= expected:
        return None
    return (
        f"unreadable (damaged or truncated: its voxel data is {found:,} of the "
        f"{expected:,} bytes its header gives)"
    )


def data_files(path: Path) -> list[Path]:
    """The file a detached header (``.mhd``, ``.nhdr``) keeps its voxels in, when it
    names one that exists beside it (not a list or a pattern of files); else none."""
    if path.suffix.lower() not in DETACHED:
        return []
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition("=" if path.suffix.lower() == ".mhd" else ":")
        key, value = key.strip().lower(), value.strip()
        if key in ("elementdatafile", "data file", "datafile"):
            if value.upper() in ("LOCAL", "LIST") or "%" in value:  # not one file
                return []
            data = path.parent / value
            return [data] if data.is_file() else []
    return []


def read_source_id(path: Path) -> str | None:
    """The ``medseg-source`` entry of the header, if any."""
    reader = _reader(path)
    key = "medseg-source"
    return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None
