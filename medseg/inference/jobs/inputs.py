"""A prediction job's inputs: scans named by a file, a folder, a pattern, a list or a
dataset, grouped into cases of channel files, shared out by shard, and identified by
content."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

from medseg.errors import InputFileError
from medseg.io.dicom import dicom_files, is_series_folder, named_scan
from medseg.io.formats import (
    read_channels,
    read_info,
    read_volume,
)
from medseg.io.itk import data_files
from medseg.io.volume import SCAN_SUFFIXES, split_suffix

logger = logging.getLogger(__name__)


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
        from medseg.datasets.layouts import load_dataset

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
