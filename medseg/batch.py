"""Batch segmentation that loses nothing: many scans, one bundle, a report.

Each output is written under a temporary name and renamed, so a killed job leaves no
partial file; a re-run skips scans whose output exists (unless ``overwrite``); a scan
that fails is reported with its file and reason and the others go on; ``shard=(k, n)``
takes every n-th scan of the sorted list, for array jobs on a scheduler; the next scan
is read while the current one is predicted. With ``settings`` (the model's sha256 and
the options that change a label map), the output folder keeps a record of them
(:data:`SETTINGS_FILE`), and a run with other settings is refused before it would skip
outputs made otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg.dicom import dicom_files, is_series_folder, named_scan
from medseg.errors import InputFileError
from medseg.io import (
    SCAN_SUFFIXES,
    atomic_output,
    atomic_write_text,
    hold_folder,
    off_grid,
    read_channels,
    read_info,
    read_source_id,
    read_volume,
    split_suffix,
    write_volume,
)
from medseg.itkio import DETACHED, data_files

logger = logging.getLogger(__name__)


@dataclass
class CaseResult:
    """What happened to one input scan."""

    input: str
    output: str
    status: str  # "done", "skipped" (output existed) or "failed"
    seconds: float = 0.0
    error: str | None = None
    input_shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    nonfinite_replaced: int = 0  # NaN/Inf voxels filled (``--nonfinite replace``)
    warnings: list[str] = field(default_factory=list)  # header fixes, field of view
    sizes: dict | None = None  # per label name: see label_sizes
    earlier_run: bool = False  # skipped: the details are an earlier run's report's


def collect_inputs(path: str | Path) -> list[Path]:
    """Scans named by ``path``: a file, a folder (its scan files, else its DICOM series
    folders), a DICOM series folder, a glob pattern, a ``dataset.json`` (its ``test``
    list, else its training images), or a list of scans (:data:`LIST_SUFFIXES`: a
    path a line, relative to the list's folder, blank lines and ``#`` comments
    aside; a path not there is kept, to fail by name). Sorted.

    Raises:
        InputFileError: nothing matches.
    """
    text = str(path)
    path = Path(path)
    if path.is_file() and path.name == "dataset.json":
        from medseg.datasets import load_dataset

        manifest = json.loads(path.read_text(encoding="utf-8"))
        tests = manifest.get("test") or []
        if tests:
            files = [
                (path.parent / (t if isinstance(t, str) else t["image"])).resolve()
                for t in tests
            ]
        else:  # every channel file of a case stored one file per channel
            cases = load_dataset(path, strict=False).cases
            files = [image for case in cases for image in case.images]
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files = _listed(path)
    elif named_scan(path) != path:
        files = [named_scan(path)]  # one slice names its series
    elif path.is_file():
        files = [path]
    elif is_series_folder(path):  # one DICOM series: one scan
        files = [path]
    elif path.is_dir():
        files = [  # broken links and loops too, to be named when they fail
            p
            for p in path.iterdir()
            if (p.is_file() or p.is_symlink())
            and not p.name.startswith(".")
            and split_suffix(p)[1] in SCAN_SUFFIXES
        ]
        if not files:  # a folder of DICOM series folders: one scan each
            files = [p for p in path.iterdir() if is_series_folder(p)]
    else:
        files = [
            Path(p)
            for p in glob.glob(text, recursive=True)
            if Path(p).is_file() or is_series_folder(Path(p))
        ]
        if not files and not any(c in text for c in "*?["):
            raise InputFileError(path, "not found")
    if not files and path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        pattern = shlex.quote(str(path / "**" / "*.nii.gz"))
        raise InputFileError(
            path,
            "no scan files found (its subfolders are not searched; a pattern such as "
            f"{pattern} takes the scans in every subfolder)",
        )
    if not files:
        raise InputFileError(path, "no scan files found")
    return sorted(files)


#: the suffixes of a text file that lists scans, a path a line
LIST_SUFFIXES = (".txt", ".list", ".lst")


def _listed(path: Path) -> list[Path]:
    """The scans a list file names (see :func:`collect_inputs`), each once."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot read the list ({exc})") from None
    files = {}  # by where they are, however written
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            listed = path.parent / Path(line).expanduser()
            files.setdefault(os.path.abspath(listed), listed)
    return list(files.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1-based) -> ``(K, N)``; ``ValueError`` when malformed."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like K/N, e.g. 2/8, got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def take_shard(files: list[Path], shard: tuple[int, int] | None) -> list[Path]:
    """Every N-th file starting at the K-th: shards are disjoint and cover all files."""
    if shard is None:
        return files
    k, n = shard
    return files[k - 1 :: n]


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


#: nnU-Net's name for one channel of a case: CASE_0000, CASE_0001, ...
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def channel_groups(files: list[Path], channels: int) -> dict[Path, tuple[Path, ...]]:
    """nnU-Net's one file per channel grouped into cases, for a model that takes
    ``channels`` > 1: ``{a case's first file: its files in name (channel) order}``.
    Empty, each file then being a case (a multi-channel 4D NIfTI, say), when the model
    takes one channel, a file is not named ``CASE_dddd``, or the first file holds
    more than one channel. A case's files are checked when it is read
    (:func:`medseg.io.read_channels`), so a case with a channel missing fails alone."""
    if channels < 2 or not files:
        return {}
    groups: dict[tuple, list[Path]] = {}
    for path in files:
        stem, suffix = split_suffix(path)
        match = CHANNEL_FILE.match(stem)
        if match is None:
            return {}
        groups.setdefault((path.parent, match["case"], suffix), []).append(path)
    try:
        if read_info(files[0]).num_channels != 1:
            return {}
    except InputFileError:
        return {}
    return {min(group): tuple(sorted(group)) for group in groups.values()}


def with_sibling_channels(files: list[Path], channels: int) -> list[Path]:
    """One file named ``CASE_dddd`` given to a model that takes ``channels`` > 1: with
    the case's other channel files beside it (``CASE_0000``, ``CASE_0001``, ... in its
    folder), so that one channel's file names the whole case; anything else as it
    is."""
    if channels < 2 or len(files) != 1:
        return files
    stem, suffix = split_suffix(files[0])
    match = CHANNEL_FILE.match(stem)
    if match is None:
        return files
    pattern = glob.escape(match["case"]) + "_" + "[0-9]" * 4 + glob.escape(suffix)
    return sorted(files[0].parent.glob(pattern)) or files


def case_names(inputs: list[Path], grouped: bool = False) -> dict[Path, str]:
    """Output names without nnU-Net's channel suffix (``CASE_0000.nii.gz`` ->
    ``CASE.nii.gz``, as nnU-Net names its predictions and its ``labelsTr``) when every
    input carries one: ``_0000``, or with ``grouped`` (the inputs are each case's first
    file, see :func:`channel_groups`) any; else none (a folder that merely holds a
    ``scan_0000`` among other names keeps its names)."""
    names = {}
    for path in inputs:
        stem, suffix = split_suffix(path)
        match = CHANNEL_FILE.match(stem)
        if match is None or (not grouped and match["channel"] != "0000"):
            return {}
        names[path] = match["case"] + suffix
    return names


def channel_reader(
    groups: dict[Path, tuple[Path, ...]], channels: int
) -> Callable[[Path], object]:
    """Reads a case by its first file: all its channel files when ``groups`` has it
    (see :func:`channel_groups`), else the file itself."""

    def read(path: Path):
        if path in groups:
            return read_channels(list(groups[path]), channels)
        return read_volume(path)

    return read


#: files up to this size are hashed whole by :func:`source_id`; larger ones sampled
WHOLE_FILE_BYTES = 1 << 20
SAMPLED_BLOCKS, BLOCK_BYTES = 32, 4096


def input_files(path: Path, groups: dict | None = None) -> tuple[Path, ...]:
    """The files an input is read from: a case's channel files (``groups``, see
    :func:`channel_groups`), the DICOM files of a series folder, or the file (with
    the voxels' file of a detached MetaImage or NRRD header)."""
    if groups and path in groups:
        return tuple(groups[path])
    if path.is_dir():
        return tuple(dicom_files(path))
    return (path, *data_files(path))  # a detached header's voxels too


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
        else:
            step = (size - BLOCK_BYTES) / (SAMPLED_BLOCKS - 1)
            for i in range(SAMPLED_BLOCKS):
                handle.seek(round(i * step))
                digest.update(handle.read(BLOCK_BYTES))
    return digest.digest()


def source_id(files: tuple[Path, ...], ordered: bool = True) -> str:
    """An identifier of an input's content, kept in its label map so that a re-run
    tells another scan of the same name and grid from it: SHA-256 over each file's
    size and bytes (whole up to 1 MiB; else 32 blocks of 4 KiB spread evenly from its
    start to its end, so that checking a folder of large scans stays cheap). The
    files' names do not count, their order does where ``ordered`` (a case's channels;
    not a DICOM series' files). 32 hex digits."""
    digests = [_file_digest(path) for path in files]
    if not ordered:
        digests.sort()
    return hashlib.sha256(b"".join(digests)).hexdigest()[:32]


def _input_id(path: Path, groups: dict | None) -> str:
    return source_id(input_files(path, groups), ordered=not path.is_dir())


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
    names :func:`mask_names` gives). They are written before the label map, so a case
    is done when its label map and these exist."""

    probabilities: bool = False
    dicom_seg: str | None = None
    preview: bool = False
    seg_nrrd: bool = False
    masks: tuple[tuple[int, str], ...] = ()  # (label value, file name) each

    def files(self, target: Path) -> list[Path]:
        """Those beside the label map ``target``."""
        return [
            name(target)
            for name, wanted in (
                (probabilities_for, self.probabilities),
                (segmentation_for, self.dicom_seg is not None),
                (preview_for, self.preview),
                (slicer_for, self.seg_nrrd),
            )
            if wanted
        ] + [mask_for(target, name) for _, name in self.masks]


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


SETTINGS_FILE = "medseg_predict_settings.json"
# what makes one label map differ from another of the same scan
COMPARED_SETTINGS = (
    "model_sha256",
    "preprocessing",
    "label_values",
    "patch_size",
    "tta",
    "overlap",
    "keep_largest",
    "min_size_mm3",
    "precision",
)


def check_settings(
    output_dir: Path,
    settings: dict,
    *,
    skipping: int,
    overwrite: bool,
    others: int = 0,
) -> None:
    """Records in ``output_dir`` the settings its label maps are made with, and refuses
    to add to outputs made with others, so a re-run cannot keep another model's labels.

    Args:
        output_dir: the output folder (exists).
        settings: JSON-ready; the keys of :data:`COMPARED_SETTINGS` are compared with
            the folder's record, the others (the bundle's path, say) only recorded.
        skipping: how many of this run's outputs exist and would be skipped.
        overwrite: this run redoes its outputs; its settings become the record.
        others: label files in the folder that this run does not write
            (:func:`label_files`). An ``overwrite`` run with other settings keeps
            them as they are, so the record then counts them (:data:`KEPT`), and no
            later run may skip outputs there until an ``overwrite`` run covers them.

    Raises:
        InputFileError: without ``overwrite``, the record differs, cannot be read, or
            is missing or counts kept label maps while outputs would be skipped.
    """
    record = Path(output_dir) / SETTINGS_FILE
    redo = _REDO
    if overwrite:
        kept = 0
        if others:
            try:
                recorded = _read_record(record)
            except InputFileError:
                recorded = None
            if recorded is None or _changes(recorded, settings) or recorded.get(KEPT):
                kept = others
        atomic_write_text(record, _record_text(settings, kept))
        return
    if not record.exists():
        if skipping:
            raise InputFileError(
                output_dir,
                f"{skipping} of this run's outputs exist, but no {SETTINGS_FILE} "
                f"says which model made them; {redo}",
            )
        if _create_once(record, _record_text(settings)):
            return
        # another job (a shard of the same batch) wrote it first: compare with theirs
    recorded = _read_record(record)
    changed = _changes(recorded, settings)
    if changed:
        raise InputFileError(
            record,
            "the label maps here were made with other settings "
            f"({'; '.join(changed)}); {redo}",
        )
    kept = recorded.get(KEPT, 0)
    if kept and skipping:
        raise InputFileError(
            record,
            f"{kept} label maps here were made with earlier settings and kept by a run "
            "with --overwrite that redid only its own scans, so existing outputs "
            f"cannot be told apart; {redo}",
        )
    text = _record_text(settings, kept)
    if json.loads(text) != recorded:  # the same label maps; the bundle moved, say
        atomic_write_text(record, text)


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


def check_folder(
    inputs: list[Path],
    output_dir: Path,
    settings: dict,
    *,
    overwrite: bool = False,
    rename: dict | None = None,
    beside: Beside = Beside(),
) -> None:
    """:func:`check_settings` for a run that writes ``inputs``' outputs (named as
    :func:`segment_all` names them) into ``output_dir``.

    Raises:
        InputFileError: an output would be written over one of the inputs (the output
            folder is the input folder, or an output file is the input file), even
            with ``overwrite``; the output folder is in a DICOM series folder given
            as input; two inputs would have one output (scans of one name in two
            folders); or see :func:`check_settings`.
    """
    check_unique_outputs(inputs, output_dir, rename)
    clashes = [
        path
        for path in inputs
        if _same_file(output_for(path, output_dir, rename), path)
    ]
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise InputFileError(
            output_for(clashes[0], output_dir, rename),
            f"an input scan, which its label map would be written over{more}; "
            "choose another output folder or file name",
        )
    check_outside_series(inputs, output_dir)
    targets = {output_for(path, output_dir, rename) for path in inputs}
    check_settings(
        output_dir,
        settings,
        skipping=0 if overwrite else sum(is_done(t, beside) for t in targets),
        overwrite=overwrite,
        others=len(set(label_files(output_dir)) - targets),
    )


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


#: key of the record: label maps left from other settings by an ``overwrite`` run
KEPT = "label_maps_kept_from_other_settings"
_REDO = "--overwrite redoes this run's scans, or choose another output folder"


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


def _read_record(record: Path) -> dict | None:
    if not record.exists():
        return None
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise InputFileError(record, f"unreadable record ({exc}); {_REDO}") from None
    return recorded


def _changes(recorded: dict, settings: dict) -> list[str]:
    was, now = recorded.get, settings.get
    return [
        f"{key} {json.dumps(was(key))}, now {json.dumps(now(key))}"
        for key in COMPARED_SETTINGS
        if was(key) != now(key)
    ]


def _record_text(settings: dict, kept: int = 0) -> str:
    record = {k: v for k, v in settings.items() if k != KEPT}
    return json.dumps({**record, **({KEPT: kept} if kept else {})}, indent=2) + "\n"


def _create_once(path: Path, text: str) -> bool:
    """Writes ``path`` complete, only if no other process has created it: the text goes
    to a temporary file that is then hard-linked to ``path`` (atomic, and refused when
    ``path`` exists). False when it exists. Where hard links are not supported, a plain
    atomic write."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            os.replace(tmp, path)
        return True
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def segment_all(
    segment: Callable,
    inputs: list[Path],
    output_dir: Path,
    *,
    overwrite: bool = False,
    progress: Callable[[CaseResult], None] | None = None,
    rename: dict | None = None,
    beside: Beside = Beside(),
    settings: dict | None = None,
    reader: Callable[[Path], object] = read_volume,
    groups: dict | None = None,
    wait_for_others: bool = True,
) -> list[CaseResult]:
    """Segments every input into ``output_dir``; never stops at a bad scan.

    Args:
        segment: maps a :class:`medseg.io.Volume` to a label :class:`Volume`, or to a
            :class:`medseg.inference.Prediction`.
        inputs: scans to segment.
        output_dir: where label files go (created).
        overwrite: redo scans whose output exists.
        progress: called with each result.
        rename: output file names for some inputs (by default the input's name).
        beside: the files to write beside each label map (:class:`Beside`); a
            case counts as done when they all exist.
        settings: what the label maps depend on (see :func:`check_settings`), checked
            against the folder's record before any scan is read; ``None``: no record.
        reader: reads an input as a :class:`medseg.io.Volume` (one case stored one
            file per channel: see :func:`channel_reader`).
        groups: a case's channel files by its first (:func:`channel_groups`), for the
            :func:`source_id` each label map keeps of its input.
        wait_for_others: a scan another living run has in hand (a run started
            again while the first still runs) is left to it till the others are
            done, then waited for: skipped when that run wrote it, else done here
            (see :func:`_after_a_dead_run`). ``False``: left to it, skipped with a
            warning.

    Raises:
        InputFileError: the output folder cannot be written, or its record of settings
            differs (see :func:`check_settings`).
    """
    make_output_dir(output_dir)
    if settings is not None:
        check_folder(
            inputs,
            output_dir,
            settings,
            overwrite=overwrite,
            rename=rename,
            beside=beside,
        )
    todo, results = [], []
    for path in inputs:
        target = output_for(path, output_dir, rename)
        if is_done(target, beside) and not overwrite:
            _in_hand_marker(target).unlink(missing_ok=True)  # done as it was killed
            result = _found_done(path, target, groups)
            results.append(result)
            if progress:
                progress(result)
        else:
            todo.append((path, target))

    def load(path):
        try:  # before reading: a file changed meanwhile is redone by a re-run
            content = _input_id(path, groups)
        except OSError:  # unreadable: the reader says why
            content = None
        try:
            return reader(path), content, None
        except InputFileError as exc:
            return None, None, exc
        except Exception as exc:  # a reader's bug must not end the batch
            return None, None, InputFileError(path, f"unreadable ({exc})")

    free, busy = [], []
    for path, target in todo:  # another living run has it in hand: its to do
        holder = _held_elsewhere(target)
        if holder is None:
            free.append((path, target))
            continue
        if wait_for_others:
            logger.warning(
                "%s: %s (%s); waited for after the others",
                path,
                IN_HAND_ELSEWHERE,
                holder,
            )
            busy.append(path)
            continue
        results.append(_left_to_another_run(path, target, holder))
        if progress:
            progress(results[-1])
    todo = free
    for _, target in todo:  # leftovers of a killed run (each shard cleans its own)
        for name in (target, *EVERYTHING_BESIDE.files(target)):
            for stale in name.parent.glob(f".{glob.escape(name.name)}.*.partial*"):
                stale.unlink(missing_ok=True)
        for stale in masks_folder(target).glob(".*.partial*"):
            stale.unlink(missing_ok=True)
    todo, suspects, refused = _after_a_dead_run(todo)
    for path, target in refused:  # a scan a run died on, alone: named, not tried
        result = CaseResult(str(path), str(target), "failed")
        result.error = (
            f"{path}: a run died while segmenting it alone (killed for memory, or a "
            "crash?); not tried again: delete "
            f"{_in_hand_marker(target)} to try it again"
        )
        results.append(result)
        if progress:
            progress(result)
    in_hand: set[Path] = set()  # marked (see _after_a_dead_run), till recorded
    marks = _Marks()
    theirs: set[Path] = set()  # taken by another run since planned

    def start(index: int):
        path, target = todo[index]
        if not marks.mark(target, alone=target in suspects):
            theirs.add(target)
        in_hand.add(target)
        return pool.submit(load, path)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        try:
            for index, (path, target) in enumerate(todo):
                started = time.perf_counter()
                if pending is None:
                    pending = start(index)
                volume, content, error = pending.result()
                pending = None
                after = todo[index + 1][1] if index + 1 < len(todo) else None
                if after is not None and not {target, after} & suspects:
                    pending = start(index + 1)  # read it while this one is predicted
                elif target not in suspects and in_hand == {target}:
                    marks.mark(target, alone=True)  # a death now is its doing
                if target in theirs:  # another run took it since: its to do
                    in_hand.discard(target)
                    if wait_for_others:  # at the end
                        busy.append(path)
                        continue
                    holder = _held_elsewhere(target) or "a run"
                    results.append(_left_to_another_run(path, target, holder))
                    if progress:
                        progress(results[-1])
                    continue
                if not overwrite and is_done(target, beside):
                    # written meanwhile by another run into the folder
                    result = _found_done(path, target, groups)
                    results.append(result)
                    marks.unmark(target)
                    in_hand.discard(target)
                    if progress:
                        progress(result)
                    continue
                result = CaseResult(str(path), str(target), "done")
                if target in suspects:
                    note = (
                        f"{path}: a run died while it or the scan read beside it was "
                        "in hand; segmented alone"
                    )
                    logger.warning("%s", note)
                    result.warnings.append(note)
                try:
                    if error is not None:
                        raise error
                    result.input_shape = list(volume.array.shape)
                    result.spacing_mm = [round(s, 6) for s in volume.spacing]
                    result.warnings += volume.notes
                    prediction = segment(volume)
                    result.nonfinite_replaced = getattr(
                        prediction, "nonfinite_replaced", 0
                    )
                    result.warnings += getattr(prediction, "notes", ())
                except Exception as exc:  # even a bug met on one scan: that scan only
                    _fail(result, path, exc)
                with _signals_held():  # a label map written is a result recorded
                    if result.status == "done":
                        try:
                            if getattr(prediction, "values", ()):
                                labels = prediction.labels
                                result.sizes = label_sizes(
                                    labels.array,
                                    labels.spacing,
                                    prediction.values,
                                    prediction.names,
                                    volume.array,
                                )
                            _write(
                                prediction,
                                target,
                                content,
                                beside,
                                path,
                                volume,
                                result.sizes,
                            )
                        except Exception as exc:  # a full disk, say: that scan only
                            _fail(result, path, exc)
                    result.seconds = round(time.perf_counter() - started, 3)
                    results.append(result)
                    marks.unmark(target)
                    in_hand.discard(target)
                    if progress:
                        progress(result)
        finally:  # stopped (Ctrl-C, SIGTERM) or an error: not the scans' doing
            for target in in_hand:
                marks.unmark(target)
    if busy:  # the other run's: when it lets them go, done by it, or dead on them
        for path in busy:
            _wait_for_mark(output_for(path, output_dir, rename))
        results += segment_all(
            segment,
            busy,
            output_dir,
            progress=progress,
            rename=rename,
            beside=beside,
            reader=reader,
            groups=groups,
            wait_for_others=False,
        )
    return results


def _left_to_another_run(path: Path, target: Path, holder: str) -> CaseResult:
    """The result of a scan another living run (``holder``) has in hand: skipped,
    with a warning."""
    note = f"{path}: {IN_HAND_ELSEWHERE} ({holder}); left to it"
    logger.warning("%s", note)
    result = CaseResult(str(path), str(target), "skipped")
    result.warnings.append(note)
    return result


def _found_done(path: Path, target: Path, groups) -> CaseResult:
    """The result of a scan whose label map ``target`` exists: skipped, or failed
    when that label map is another input's."""
    result = CaseResult(str(path), str(target), "skipped")
    problem = not_its_output(target, path, groups)
    if problem:
        result.status, result.error = "failed", problem
    return result


def _in_hand_marker(target: Path) -> Path:
    """The hidden file that says a run has the scan of label map ``target`` in hand
    (reading or segmenting it); a run that dies unannounced (killed for memory, a
    crash in a reader) leaves it."""
    return target.with_name(f".{target.name}.in-hand")


#: the warning of a scan left to another run that has it in hand
IN_HAND_ELSEWHERE = "in hand by another living run"


def _lock(handle) -> bool | None:
    """Locks an open file for this process (``flock``, without waiting): ``True``;
    ``False`` where another living process holds it; ``None`` where there are no
    locks (another system, a file system without them)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


class _Marks:
    """The in-hand marks of this run (:func:`_in_hand_marker`), each file locked while
    its scan is in hand, so that another run tells a living run's marks (whose scans
    it leaves to it: :func:`_held_elsewhere`) from a dead one's, whatever killed
    it."""

    def __init__(self) -> None:
        self.handles: dict[Path, object] = {}

    def mark(self, target: Path, *, alone: bool) -> bool:
        """Marks ``target``'s scan in hand (``alone``: nothing else in hand);
        ``False`` when another living run has it in hand (it took it since this run
        planned)."""
        marker = _in_hand_marker(target)
        host = socket.gethostname()
        text = json.dumps({"alone": alone, "pid": os.getpid(), "host": host}) + "\n"
        try:
            if target not in self.handles:
                handle = open(marker, "a+", encoding="utf-8")  # noqa: SIM115 (held)
                locked = _lock(handle)
                if not locked:
                    handle.close()
                if locked is False:  # another run took it meanwhile: its mark
                    return False
                self.handles[target] = handle if locked else None
            handle = self.handles[target]
            if handle is None:  # no locks here: a plain mark
                marker.write_text(text, encoding="utf-8")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(text)
                handle.flush()
        except OSError:  # a full disk, say: the scan is still done, unmarked
            logger.debug("cannot mark %s in hand", target, exc_info=True)
        return True

    def unmark(self, target: Path) -> None:
        """Removes this run's mark of ``target`` (while still locked)."""
        if target not in self.handles:
            return
        _in_hand_marker(target).unlink(missing_ok=True)
        handle = self.handles.pop(target)
        if handle is not None:
            handle.close()


def _wait_for_mark(target: Path) -> None:
    """Returns when no living run has ``target``'s scan in hand."""
    try:
        import fcntl

        # for writing: NFS emulates flock with POSIX locks, whose exclusive kind
        # needs it
        handle = open(_in_hand_marker(target), "r+", encoding="utf-8")  # noqa: SIM115
    except (ImportError, OSError):  # no locks, or no mark
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # Ctrl-C and SIGTERM end the wait
        except OSError:
            pass


def _held_elsewhere(target: Path) -> str | None:
    """Who has the scan of ``target`` in hand (``"pid N on HOST"``) when its mark is
    locked by another living run; else ``None`` (no mark, or a dead run's)."""
    try:
        handle = open(  # noqa: SIM115 (for writing, as _wait_for_mark says why)
            _in_hand_marker(target), "r+", encoding="utf-8", errors="replace"
        )
    except OSError:
        return None
    with handle:
        if _lock(handle) is not False:
            return None
        try:
            holder = json.loads(handle.read())
            return f"pid {holder['pid']} on {holder['host']}"
        except (ValueError, KeyError, TypeError):
            return "a run"


def _after_a_dead_run(
    todo: list[tuple[Path, Path]],
) -> tuple[list[tuple[Path, Path]], set[Path], list[tuple[Path, Path]]]:
    """What a run that died unannounced leaves to do, so that one scan that kills
    every run (memory, a reader's crash) costs no other: the scans it had in hand go
    last, each alone (no scan read beside it); one it had in hand alone (so the one
    it died on) is refused by name. Returns ``(todo in order, the suspects' label
    maps, (input, label map) refused)``."""
    fresh, suspects, refused = [], [], []
    for path, target in todo:
        marker = _in_hand_marker(target)
        if not marker.exists():
            fresh.append((path, target))
            continue
        try:
            alone = json.loads(marker.read_text(encoding="utf-8")).get("alone") is True
        except (OSError, ValueError, AttributeError):  # cut short as it was written
            alone = False
        (refused if alone else suspects).append((path, target))
    return fresh + suspects, {target for _, target in suspects}, refused


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that come while inside are delivered at its end (in the main
    thread; elsewhere signals are the main thread's anyway), so that a run stopped
    by one (Ctrl-C, a scheduler's time limit) has recorded every label map it wrote
    and left none half-written."""
    held = []

    def hold(number, frame):
        held.append(number)

    numbers = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(
        signal.getsignal(s) is None
        for s in numbers  # a handler set outside Python
    ):
        yield
        return
    earlier = {s: signal.signal(s, hold) for s in numbers}
    try:
        yield
    finally:
        for number, handler in earlier.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])


def _fail(result: CaseResult, case, exc: Exception) -> None:
    """Marks ``result`` failed with :func:`failure_message` (no sizes: nothing was
    written), and logs where (``--debug``)."""
    result.status, result.sizes = "failed", None
    result.error = failure_message(case, exc)
    logger.debug("case %s failed", case, exc_info=True)


def failure_message(case, exc: Exception) -> str:
    """One line for a case that failed: an input problem as it names itself, a
    system error (a full disk, memory) after the case, and anything else as an
    unexpected error, so that a bug met on one scan fails that scan only."""
    if isinstance(exc, InputFileError):
        return str(exc)
    if isinstance(exc, (ValueError, OSError, MemoryError)):
        return f"{case}: {exc}"
    return (
        f"{case}: unexpected error ({type(exc).__name__}: {exc}; --debug shows where)"
    )


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
        from medseg.dicom import write_segmentation

        write_segmentation(
            source,
            labels.array,
            _measured(prediction.values, prediction.names),
            segmentation_for(target),
            algorithm=beside.dicom_seg,
            version=__version__,
        )
    if beside.preview:
        from medseg.report import write_preview

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
    if beside.probabilities:
        from medseg.inference import write_probabilities

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

    from medseg import itkio
    from medseg.report import COLOURS

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
            itkio.write(
                array,
                labels.affine,
                tmp,
                content,
                itkio.slicer_fields(array[..., 0], segments),
            )
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None


#: the table of label sizes beside the report: ``medseg_volumes[-K-of-N].csv``
SIZES_FILE = "medseg_volumes"
#: every such table in a folder (a shard's too)
SIZES_PATTERN = SIZES_FILE + "*.csv"


def label_sizes(
    labels: np.ndarray, spacing, values, names, image: np.ndarray | None = None
) -> dict[str, dict]:
    """Per declared label, by name: its value, its voxels and their volume in ml
    (``area_mm2`` for 2D label maps, from the pixel spacing, 1 mm where a picture has
    none), and with ``image`` (the scan, ``(*S, C)`` on the label map's grid) the mean
    and standard deviation of each channel's values in the label (``intensity_mean``,
    ``intensity_sd``: lists, ``None`` for an empty label; Hounsfield units for CT),
    NaN voxels left out. The first label is left out when it is named background (as
    nnU-Net names label 0), not otherwise (the membranes' 0 is the membrane)."""
    from medseg.metrics import volume_ml

    labels = np.asarray(labels)
    if labels.ndim == len(spacing) + 1:  # a label volume's one channel
        labels = labels[..., 0]
    measured = _measured(values, names)
    if image is not None:
        image = np.asarray(image)
        image = image[..., None] if image.ndim == labels.ndim else image
        moments = _moments(labels, image, max(int(v) for v, _ in measured))
    unit, scale = ("volume_ml", 1.0) if len(spacing) == 3 else ("area_mm2", 1000.0)
    sizes = {}
    for value, name in measured:
        mask = labels == value
        size = sizes[str(name)] = {
            "label": int(value),
            "voxels": int(np.count_nonzero(mask)),
            unit: round(volume_ml(mask, spacing) * scale, 6),
        }
        if image is not None:
            count, total, squares = moments[:, int(value)]  # each (channels,)
            size["intensity_mean"], size["intensity_sd"] = [], []
            for n, s, q in zip(count, total, squares, strict=True):
                mean = s / n if n else None
                sd = math.sqrt(max(q / n - mean**2, 0.0)) if n else None
                size["intensity_mean"].append(_rounded(mean))
                size["intensity_sd"].append(_rounded(sd))
    return sizes


#: voxels a pass when the moments of a scan's values per label are summed
MOMENT_CHUNK = 1 << 22


def _moments(labels: np.ndarray, image: np.ndarray, top: int) -> np.ndarray:
    """``(3, top + 1, channels)``: per label value and channel, the count, sum and
    sum of squares of the scan's values that are numbers, summed a chunk at a time
    (memory: a few float64 copies of a chunk, never of the scan)."""
    flat = labels.reshape(-1)
    values = image.reshape(flat.size, -1)
    moments = np.zeros((3, top + 1, values.shape[1]))
    for start in range(0, flat.size, MOMENT_CHUNK):
        which = flat[start : start + MOMENT_CHUNK].astype(np.intp)
        keep = which <= top
        for channel in range(values.shape[1]):
            x = values[start : start + MOMENT_CHUNK, channel].astype(np.float64)
            ok = keep & ~np.isnan(x)
            at, x = which[ok], x[ok]
            for row, weights in enumerate((None, x, x * x)):
                moments[row, :, channel] += np.bincount(
                    at, weights=weights, minlength=top + 1
                )
    return moments


def _rounded(value: float | None) -> float | None:
    """``value`` to 4 decimals, ``None`` kept."""
    return None if value is None else round(float(value), 4)


#: the intensity columns of the volumes table, each a list over channels
INTENSITIES = ("intensity_mean", "intensity_sd")


def _intensity_columns(channels: int) -> list[str]:
    """``intensity_mean``, ``intensity_sd`` for a one-channel scan, else one of each
    per channel (``intensity_mean_0``, ...)."""
    if channels == 1:
        return list(INTENSITIES)
    return [f"{key}_{c}" for key in INTENSITIES for c in range(channels)]


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


def sizes_table(
    results: list[CaseResult],
    previous: Path | None,
    values,
    names,
    reader: Callable[[Path], object] | None = None,
    others=(),
) -> str | None:
    """The CSV of the label maps in the output folder, by case name: case, label, name,
    voxels, volume_ml (or area_mm2), and the scan's mean and standard deviation in
    the label (:func:`label_sizes`; one column of each per channel for scans of
    several). This run's (done or skipped) are measured, a skipped case's rows taken
    from ``previous`` (this table as an earlier run wrote it) or from ``others``
    (other tables in the folder: the shards', say; the most recently written table
    that has the case counts) when they have them, and kept in its result's
    ``sizes``; the rows ``previous`` has of other cases (earlier runs into the
    folder, one scan at a time, say) are kept as they are while a label map of that
    case is still beside it. A skipped case is measured again from its label map and
    its scan (read by ``reader``; without one, no intensities) when no table has its
    rows or their intensities. ``None`` when there is no row."""
    earlier = _read_sizes(previous)
    known: dict[str, dict] = {}
    tables = [t for t in (*others, previous) if t is not None]
    for table in sorted(tables, key=_modified):
        known.update(earlier if table == previous else _read_sizes(table))
    rows, covered = [], set()
    for result in results:
        if result.status == "failed":
            continue
        case = split_suffix(Path(result.output))[0]
        covered.add(case)
        if result.sizes is None:
            wanted = [str(name) for _, name in _measured(values, names)]
            kept = known.get(case, {})
            if sorted(kept) == sorted(wanted) and (
                reader is None or all(INTENSITIES[0] in size for size in kept.values())
            ):
                result.sizes = kept
            else:
                try:
                    labels = read_volume(result.output)
                except InputFileError:
                    continue
                try:
                    image = reader(Path(result.input)).array if reader else None
                except InputFileError:  # the scan is gone: sizes alone
                    image = None
                result.sizes = label_sizes(
                    labels.array, labels.spacing, values, names, image
                )
        for name, size in result.sizes.items():
            rows.append({"case": case, "name": name, **size})
    if earlier.keys() - covered:  # kept while their label map is there
        try:
            files = [split_suffix(p) for p in previous.parent.iterdir()]
            present = {stem for stem, suffix in files if suffix}
        except OSError:
            present = set()
        covered |= earlier.keys() - present
    for case, sizes in earlier.items():
        if case not in covered:
            rows += [
                {"case": case, "name": name, **size} for name, size in sizes.items()
            ]
    if not rows:
        return None
    unit = "volume_ml" if "volume_ml" in rows[0] else "area_mm2"
    rows = [row for row in rows if unit in row]  # not another model's 2D/3D rows
    rows.sort(key=lambda row: row["case"])  # stable: each case's labels in order
    channels = max(len(row.get(INTENSITIES[0]) or ()) for row in rows)
    columns = _intensity_columns(channels) if channels else []
    for row in rows:  # lists over channels into columns
        for key in INTENSITIES:
            per_channel = row.pop(key, None) or ()
            keys = [key] if channels == 1 else [f"{key}_{c}" for c in range(channels)]
            row.update(zip(keys, per_channel, strict=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        ["case", "label", "name", "voxels", unit, *columns],
        lineterminator="\n",
        restval="",
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_sizes(
    results: list[CaseResult],
    path: Path,
    values,
    names,
    reader: Callable[[Path], object] | None = None,
    others=(),
) -> Path | None:
    """Writes the volumes table ``path`` of :func:`sizes_table` (the table there before
    as ``previous``; ``others`` as it takes them), atomically, and returns it; ``None``
    when there is no row. Two
    runs into one folder that end together take turns (a lock file beside it, held
    while it is read, measured and written), so neither writes over the other's rows
    with a table read before the other wrote it."""
    held = hold_folder(path.parent, f".{path.name}.lock", wait=True)
    try:
        table = sizes_table(results, path, values, names, reader, others)
        if table is not None:
            atomic_write_text(path, table)
    finally:
        held.release()
    return None if table is None else path


def _read_sizes(previous: Path | None) -> dict[str, dict]:
    """The rows of a volumes table as :func:`label_sizes` gives them, by case and
    label name; empty when it cannot be read."""
    earlier: dict[str, dict] = {}
    try:
        with open(
            previous, newline="", encoding="utf-8", errors="surrogateescape"
        ) as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            for row in reader:
                unit = "volume_ml" if "volume_ml" in row else "area_mm2"
                size = {
                    "label": int(row["label"]),
                    "voxels": int(row["voxels"]),
                    unit: float(row[unit]),
                }
                for key in INTENSITIES:
                    found = [f for f in fields if f == key or f.startswith(key + "_")]
                    if found:
                        size[key] = [float(row[f]) if row[f] else None for f in found]
                earlier.setdefault(row["case"], {})[row["name"]] = size
    except (OSError, TypeError, KeyError, ValueError, csv.Error):
        earlier = {}
    return earlier


#: the reports ``medseg predict`` writes into its output folder (one a shard)
REPORT_PATTERN = "medseg_predict_report*.json"


def carry_earlier_records(results: list[CaseResult], reports) -> int:
    """Gives each case skipped because its label map exists the details that the
    report of the run that made it has of it: its warnings (a header fixed, a field
    of view unlike the training scans', a blank scan), the NaN/Inf voxels replaced,
    its shape, spacing and seconds, and ``earlier_run``; so that the report of a job
    run again after it was stopped still says what the first run found in each scan.

    Args:
        results: this run's; changed in place.
        reports: earlier reports' paths (a later one's record of a case counts over
            an earlier's); unreadable ones are passed over.

    Returns:
        How many cases were given an earlier record.
    """
    records = {}
    for path in sorted(reports, key=_modified):
        try:
            cases = json.loads(Path(path).read_text(encoding="utf-8"))["cases"]
            for case in cases:
                if case["status"] == "done" or case.get("earlier_run"):
                    records[_case_key(case["input"], case["output"])] = case
        except (OSError, ValueError, KeyError, TypeError):
            continue
    given = 0
    for result in results:
        case = records.get(_case_key(result.input, result.output))
        if (
            result.status != "skipped"
            or case is None
            or not is_done(Path(result.output))
        ):
            continue  # (skipped, its label map not there: left to another run)
        try:
            result.seconds = float(case["seconds"])
            result.input_shape = case["input_shape"]
            result.spacing_mm = case["spacing_mm"]
            result.nonfinite_replaced = int(case["nonfinite_replaced"])
            earlier = [w for w in case["warnings"] if w not in result.warnings]
        except (KeyError, TypeError, ValueError):
            continue
        result.warnings[:0] = earlier
        result.earlier_run = True
        given += 1
    return given


def _modified(path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def _case_key(source: str, target: str) -> tuple[str, str]:
    """A case in reports of runs started from other folders: its input's and
    label map's names."""
    return Path(source).name, Path(target).name


def report(results: list[CaseResult]) -> dict:
    """Counts and per-case records, JSON-ready."""
    counts = {
        s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")
    }
    return {"counts": counts, "cases": [asdict(r) for r in results]}


def classify_all(
    classifier,
    items: list[tuple[str, Callable]],
    *,
    progress: Callable[[CaseResult], None] | None = None,
) -> tuple[list[CaseResult], dict[str, list[float]]]:
    """Classifies images one batch at a time; a bad image fails alone.

    Args:
        classifier: a :class:`medseg.inference.Classifier`.
        items: ``(case name, loader)`` pairs; a loader returns the image ``(*S, C)``
            or raises :class:`InputFileError`.
        progress: called with each case's result.

    Returns:
        The per-case results and the probabilities of each classified case.
    """
    results, probabilities = [], {}
    ready: list[tuple[CaseResult, object]] = []

    def flush():
        if not ready:
            return
        started = time.perf_counter()
        scores = classifier.probabilities_of([x for _, x in ready])
        share = (time.perf_counter() - started) / len(ready)
        for (result, _), row in zip(ready, scores, strict=True):
            probabilities[result.input] = [float(v) for v in row]
            result.seconds = round(result.seconds + share, 3)
            results.append(result)
            if progress:
                progress(result)
        ready.clear()

    for case, loader in items:
        started = time.perf_counter()
        result = CaseResult(case, "", "done")
        try:
            image = loader()
            result.input_shape = list(image.shape)
            prepared = classifier.prepare(image, case)
        except Exception as exc:
            _fail(result, case, exc)
            result.seconds = round(time.perf_counter() - started, 3)
            results.append(result)
            if progress:
                progress(result)
            continue
        result.seconds = time.perf_counter() - started
        ready.append((result, prepared))
        if len(ready) >= classifier.batch_size:
            flush()
    flush()
    return results, probabilities


def classification_csv(probabilities: dict[str, list[float]], names) -> str:
    """``case,predicted,prob_<name>...``: the predicted class index and one probability
    per class, in the order the cases were given."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "predicted", *(f"prob_{n}" for n in names)])
    for case, row in probabilities.items():
        predicted = max(range(len(row)), key=row.__getitem__)
        writer.writerow([case, predicted, *(f"{v:.6g}" for v in row)])
    return buffer.getvalue()
