"""Where a prediction job writes each case's files (label map, probabilities, masks,
previews, Slicer segmentation), and writing them."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.inference.jobs.inputs import _input_id
from medseg.io.dicom import is_series_folder
from medseg.io.files import atomic_output
from medseg.io.formats import (
    read_info,
    read_source_id,
    read_volume,
    write_volume,
)
from medseg.io.itk import DETACHED
from medseg.io.volume import SCAN_SUFFIXES, off_grid, split_suffix

logger = logging.getLogger(__name__)


def make_output_dir(folder: Path, hint: str = "") -> Path:
    """Creates the output folder (and parents).

    Raises:
        InputFileError: it cannot be created or written to (a file there: ``hint``
            follows the problem).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputFileError(
            folder, "a file is there, where the output folder should be" + hint
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(
            folder, f"cannot create the output folder ({exc.strerror or exc})"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputFileError(folder, "output folder is not writable")
    return folder


def output_for(input_path: Path, output_dir: Path, rename: dict | None = None) -> Path:
    """Same file name (and format) as the input in ``output_dir``, unless ``rename``
    gives the input another name; a DICOM series folder's is its name + ``.nii.gz``,
    and a detached-header MetaImage's or NRRD's (``.mhd``, ``.nhdr``) its one-file
    form's (``.mha``, ``.nrrd``)."""
    name = Path(input_path).name
    if is_series_folder(Path(input_path)):
        name += ".nii.gz"
    stem, suffix = split_suffix(name)
    if suffix in DETACHED:  # its voxels in another file: written as one file
        name = stem + DETACHED[suffix]
    return output_dir / (rename or {}).get(input_path, name)


@dataclass(frozen=True)
class Beside:
    """What a run writes beside each label map, when asked for: its probabilities
    (``CASE_probabilities.npz``), its DICOM Segmentation object (``CASE_seg.dcm``,
    ``dicom_seg`` being the algorithm's name it records; every input a DICOM series),
    a picture of it (``previews/CASE.png``), a 3D Slicer segmentation of it
    (``slicer/CASE.seg.nrrd``), one mask a label (``masks/CASE/NAME.nii.gz``, the
    names :func:`mask_names` gives), uncertainty maps (``uncertainty/CASE_MAP.nii.gz``
    of each map named in ``uncertainty``: ``entropy``, ``mutual_information``). They
    are written before the label map, so a case is done when its label map and these
    exist."""

    probabilities: bool = False
    dicom_seg: str | None = None
    preview: bool = False
    seg_nrrd: bool = False
    masks: tuple[tuple[int, str], ...] = ()  # (label value, file name) each
    uncertainty: tuple[str, ...] = ()

    def files(self, target: Path) -> list[Path]:
        """Those beside the label map ``target``."""
        return (
            [
                name(target)
                for name, wanted in (
                    (probabilities_for, self.probabilities),
                    (segmentation_for, self.dicom_seg is not None),
                    (preview_for, self.preview),
                    (slicer_for, self.seg_nrrd),
                )
                if wanted
            ]
            + [mask_for(target, name) for _, name in self.masks]
            + [uncertainty_for(target, name) for name in self.uncertainty]
        )


#: every file a run may write beside a label map
EVERYTHING_BESIDE = Beside(
    probabilities=True, dicom_seg="", preview=True, seg_nrrd=True
)


def is_done(target: Path, beside: Beside = Beside()) -> bool:
    """The label file exists, and the files asked for beside it."""
    return target.exists() and all(p.exists() for p in beside.files(target))


def not_its_output(
    target: Path, source: Path, groups: dict | None = None
) -> str | None:
    """Why an existing output cannot be ``source``'s label map: it is unreadable, on
    another grid, or made from other content (the :func:`source_id` it keeps differs
    from ``source``'s): another scan's of the same name, left by another job; ``None``
    when it can be (an output that keeps no source id, from a format without room for
    one, is judged by its grid), or when ``source`` cannot be read, which its own run
    would say. ``groups``: see :func:`input_files`."""
    try:
        scan = read_info(source)
    except InputFileError:
        return None
    try:
        made = read_info(target)
    except InputFileError as exc:
        return f"{exc}; --overwrite redoes it"
    another = "another scan's; --overwrite redoes it, or choose another output folder"
    off = off_grid(made, scan, "the scan's")
    if off is not None:
        return (
            f"{target}: an existing label map on another grid than {source} ({off}): "
            f"{another}"
        )
    kept = read_source_id(target)
    try:
        differs = kept is not None and kept != _input_id(source, groups)
    except OSError:
        return None
    if differs:
        return (
            f"{target}: an existing label map made from other content than {source} "
            f"(on the same grid): {another}"
        )
    try:  # the whole file, not its header alone: a truncated one is not done
        read_volume(target)
    except InputFileError as exc:
        return f"{exc}; --overwrite redoes it"
    return None


def probabilities_for(label_path: Path) -> Path:
    """``case.nii.gz`` -> ``case_probabilities.npz`` beside it."""
    stem = split_suffix(label_path)[0]
    return label_path.with_name(f"{stem}_probabilities.npz")


def segmentation_for(label_path: Path) -> Path:
    """``case.nii.gz`` -> ``case_seg.dcm`` beside it (a DICOM Segmentation object)."""
    stem = split_suffix(label_path)[0]
    return label_path.with_name(f"{stem}_seg.dcm")


#: the folder of pictures in an output folder (``medseg predict --preview``)
PREVIEWS = "previews"


#: the folder of 3D Slicer segmentations in an output folder (``--seg-nrrd``)
SLICER = "slicer"


def slicer_for(label_path: Path) -> Path:
    """``case.nii.gz`` -> ``slicer/case.seg.nrrd`` in its folder (a folder of their
    own: beside the label maps, ``medseg evaluate`` would take them for more)."""
    stem = split_suffix(label_path)[0]
    return label_path.parent / SLICER / f"{stem}.seg.nrrd"


#: the folder of uncertainty maps in an output folder (``--uncertainty``)
UNCERTAINTY = "uncertainty"

#: the uncertainty maps ``--uncertainty`` writes: with one forward pass a window,
#: the entropy alone
UNCERTAINTY_MAPS = ("entropy", "mutual_information")


def uncertainty_for(label_path: Path, name: str) -> Path:
    """``case.nii.gz`` and a map's name -> ``uncertainty/case_NAME.nii.gz`` in its
    folder (a folder of their own: beside the label maps they would read as more)."""
    stem = split_suffix(label_path)[0]
    return label_path.parent / UNCERTAINTY / f"{stem}_{name}.nii.gz"


#: the folder of one-label masks in an output folder (``--masks``)
MASKS = "masks"


def masks_folder(label_path: Path) -> Path:
    """``case.nii.gz`` -> ``masks/case/`` in its folder."""
    return label_path.parent / MASKS / split_suffix(label_path)[0]


def mask_for(label_path: Path, name: str) -> Path:
    """``case.nii.gz`` and a file name -> ``masks/case/NAME.nii.gz`` (the label map's
    format)."""
    return masks_folder(label_path) / f"{name}{split_suffix(label_path)[1]}"


def mask_names(values, names) -> tuple[tuple[int, str], ...]:
    """``(label value, file name)`` of each label a mask is written of (all but a first
    one named background): the label's name with characters other than letters,
    digits, ``.``, ``_`` and ``-`` as ``_``; a name that two labels would share, or
    none, gets the value before it (``2_left``)."""
    pairs = _measured(values, names)
    safe = [re.sub(r"[^\w.-]", "_", str(name)).strip("._") for _, name in pairs]
    return tuple(
        (int(value), name if name and safe.count(name) == 1 else f"{value}_{name}")
        for (value, _), name in zip(pairs, safe, strict=True)
    )


def preview_for(label_path: Path) -> Path:
    """``case.nii.gz`` -> ``previews/case.png`` in its folder (a folder of their own:
    pictures beside label maps would read as label maps)."""
    stem = split_suffix(label_path)[0]
    return label_path.parent / PREVIEWS / f"{stem}.png"


def check_unique_outputs(
    inputs: list[Path], output_dir: Path, rename: dict | None = None
) -> None:
    """Refuses inputs of which two would have one output (scans of one name in two
    folders): the second would overwrite the first's, or be skipped as done.

    Raises:
        InputFileError: naming the output and both inputs.
    """
    first_by_target: dict[Path, Path] = {}
    for path in inputs:
        target = output_for(path, output_dir, rename)
        if target in first_by_target:
            raise InputFileError(
                target,
                f"the label map of both {first_by_target[target]} and {path}; "
                "segment scans of one name into separate output folders",
            )
        first_by_target[target] = path


def check_outside_series(inputs: list[Path], output_dir: Path) -> None:
    """Refuses an output folder that is, or is in, a DICOM series folder given as
    input: files among its slices would make it a folder of other scans.

    Raises:
        InputFileError: naming the series folder.
    """
    for path in inputs:
        if path.is_dir() and _within(output_dir, path):
            raise InputFileError(
                path,
                "a DICOM series given as input, and the output folder would put "
                "files among its slices; choose another output folder",
            )


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or a folder below it (the same files, links resolved)."""
    inner, outer = Path(inner).resolve(), Path(outer).resolve()
    return inner == outer or outer in inner.parents


def _same_file(target: Path, source: Path) -> bool:
    try:
        return os.path.samefile(target, source)
    except OSError:  # the target does not exist (yet)
        return False


def label_files(folder: Path) -> list[Path]:
    """The label files in an output folder: its scan files (not hidden, not
    probabilities)."""
    return [
        p
        for p in Path(folder).iterdir()
        if not p.name.startswith(".")
        and split_suffix(p)[1] in SCAN_SUFFIXES
        and not p.name.endswith("_probabilities.npz")
        and p.is_file()
    ]


def _write(
    prediction,
    target: Path,
    content=None,
    beside: Beside = Beside(),
    source: Path | None = None,
    scan=None,
    sizes: dict | None = None,
) -> None:
    """Writes what ``beside`` asks for first and the labels last, so an existing label
    file means the case is complete; ``source`` is the input (the series folder a DICOM
    Segmentation refers to), ``scan`` the volume read from it and ``sizes`` its
    labels' (:func:`label_sizes`), which a preview shows."""
    labels = getattr(prediction, "labels", prediction)
    if beside.dicom_seg is not None:
        from medseg import __version__
        from medseg.io.dicom_seg import write_segmentation

        write_segmentation(
            source,
            labels.array,
            _measured(prediction.values, prediction.names),
            segmentation_for(target),
            algorithm=beside.dicom_seg,
            version=__version__,
        )
    if beside.preview:
        from medseg.figures import write_preview

        preview_for(target).parent.mkdir(exist_ok=True)
        shown = _measured(prediction.values, prediction.names)
        write_preview(
            preview_for(target),
            scan,
            labels,
            [value for value, _ in shown],
            [name for _, name in shown],
            preview_title(split_suffix(target)[0], sizes or {}),
        )
    if beside.seg_nrrd:
        _write_slicer(labels, slicer_for(target), prediction, content)
    if beside.masks:
        masks_folder(target).mkdir(parents=True, exist_ok=True)
        array = np.asarray(labels.array)
        for value, name in beside.masks:
            mask = labels.with_array((array == value).astype(np.uint8))
            write_volume(mask, mask_for(target, name), is_label=True)
    for name in beside.uncertainty:
        uncertainty_for(target, name).parent.mkdir(exist_ok=True)
        array = getattr(prediction, name)
        write_volume(
            labels.with_array(array[..., None]),
            uncertainty_for(target, name),
            dtype="float32",
        )
    if beside.probabilities:
        from medseg.inference.segmenter import write_probabilities

        write_probabilities(
            probabilities_for(target),
            prediction.probabilities,
            labels.affine,
            prediction.values,
            prediction.names,
        )
    write_volume(labels, target, is_label=True, source_id=content)


def _write_slicer(labels, path: Path, prediction, content) -> None:
    """The label map as a 3D Slicer segmentation, one segment a label (but a first
    named background) in the colours of the previews; a label of value 0 is none, as
    Slicer reads 0 as no segment."""
    from matplotlib.colors import to_rgb

    from medseg.figures import COLOURS
    from medseg.io import itk

    shown = _measured(prediction.values, prediction.names)
    segments = [
        (value, name, to_rgb(COLOURS[i % len(COLOURS)]))
        for i, (value, name) in enumerate(shown)
        if value != 0
    ]
    array = np.asarray(labels.array)
    if array.ndim == 3:  # a 2D label map (H, W, 1): one slice
        array = array[:, :, None, :]
    array = array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
    path.parent.mkdir(exist_ok=True)
    try:
        with atomic_output(path) as tmp:
            itk.write(
                array,
                labels.affine,
                tmp,
                content,
                itk.slicer_fields(array[..., 0], segments),
            )
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None


def preview_title(case: str, sizes: dict) -> str:
    """``case: name 1.75 ml, name 1.661 ml`` (mm^2 for 2D label maps)."""
    parts = []
    for name, size in sizes.items():
        if "volume_ml" in size:
            parts.append(f"{name} {size['volume_ml']:g} ml")
        else:
            parts.append(f"{name} {size['area_mm2']:g} mm^2")
    return f"{case}: {', '.join(parts)}" if parts else case


def _measured(values, names) -> list[tuple]:
    """The labels :func:`label_sizes` measures: all but a first one named background."""
    pairs = list(zip(values, names, strict=True))
    return pairs[1:] if str(names[0]).lower() == "background" else pairs
