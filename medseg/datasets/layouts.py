"""Dataset layouts: where each case's image channels and label live.

:func:`load_dataset` recognises, from a folder (or its ``dataset.json``):

* Medical Segmentation Decathlon: ``dataset.json`` with a ``training`` list of
  ``{"image": ..., "label": ...}`` paths (multi-channel cases are 4D files), ``labels``
  as ``{"0": "background", ...}`` and ``modality`` as channel names.
* nnU-Net v2: ``dataset.json`` with ``channel_names``, ``labels`` (name -> value) and
  ``file_ending``; images ``imagesTr/CASE_0000<ending>`` (one file per channel), labels
  ``labelsTr/CASE<ending>``; or an explicit ``dataset`` mapping of case ids to files.
* A plain folder pair: ``images/`` and ``labels/`` (also ``image/``+``label/`` or
  ``imagesTr/``+``labelsTr/``), matched by file name without its suffix; PNG works too.
  An optional ``dataset.json`` there may declare ``labels``.

An image may also be a folder holding one DICOM series (``images/CASE/`` beside
``labels/CASE.nii.gz``, or such a folder named in a manifest), read as
``medseg predict`` reads it.

:func:`load_npz_dataset` reads a MedMNIST-style ``.npz`` for classification.

Manifest paths must stay inside the dataset folder: absolute paths and paths that climb
out with ``..`` are refused (checked on the path as written, so a dataset whose
``imagesTr`` is a symlink to other storage still works). Files whose names start with a
dot (``._case.nii.gz`` from macOS) are ignored when folders are scanned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.dicom import is_series_folder
from medseg.io.volume import SCAN_SUFFIXES, case_name, split_suffix

#: :attr:`Dataset.labels_from` of labels named by 3D Slicer segmentations' segments
LABELS_FROM_SEGMENTS = "the other label files"

FOLDER_PAIRS = (("images", "labels"), ("image", "label"), ("imagesTr", "labelsTr"))


@dataclass(frozen=True)
class Case:
    """One case: its image files (one per channel, or one multi-channel file) and
    label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class CaseProblem:
    """Something wrong with one case, naming the file."""

    case_id: str
    path: Path | None
    problem: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{self.case_id}: {where}{self.problem}"


@dataclass(frozen=True)
class Dataset:
    """A segmentation dataset on disk.

    Attributes:
        root: the dataset folder.
        layout: ``"msd"``, ``"nnunet"`` or ``"folder"``.
        cases: every case found, in manifest (or sorted file-name) order.
        labels: declared label values and names (``{0: "background", ...}``), or
            ``None`` when the layout declares none.
        labels_from: where ``labels`` come from, in words.
        channel_names: declared channel names, or ``None``.
        name: the dataset's name.
        problems: manifest-level problems (paths outside the folder, missing files).
    """

    root: Path
    layout: str
    cases: tuple[Case, ...]
    labels: dict[int, str] | None = None
    channel_names: tuple[str, ...] | None = None
    name: str = ""
    problems: tuple[CaseProblem, ...] = field(default=())
    labels_from: str = "the dataset's labels"

    @property
    def num_channels(self) -> int | None:
        return None if self.channel_names is None else len(self.channel_names)


def load_dataset(path: str | Path, *, strict: bool = True) -> Dataset:
    """Loads a dataset folder (or the folder of a ``dataset.json``) in any known layout.

    Args:
        path: the folder, or its ``dataset.json``.
        strict: raise on the first manifest problem; with ``False`` problems are
            collected in ``Dataset.problems`` (what ``medseg data check`` reports).

    Raises:
        InputFileError: no dataset there, an unreadable manifest, or (strict) a case
            whose files are missing or outside the folder.
    """
    path = Path(path)
    if path.is_file() and path.name == "dataset.json":
        path = path.parent
    if not path.exists():
        raise InputFileError(path, "dataset folder not found")
    if not path.is_dir():
        scan = split_suffix(path)[1] in SCAN_SUFFIXES
        raise InputFileError(
            path,
            "not a dataset folder (expected a folder or dataset.json"
            + ("; medseg info SCAN describes one scan)" if scan else ")"),
        )
    manifest = _read_manifest(path / "dataset.json")
    if manifest is not None and "channel_names" in manifest:
        dataset = _load_nnunet(path, manifest)
    elif manifest is not None and "training" in manifest:
        dataset = _load_msd(path, manifest)
    else:
        dataset = _load_folder_pair(path, manifest)
    if strict and dataset.problems:
        first = dataset.problems[0]
        more = len(dataset.problems) - 1
        suffix = (
            f" (and {more} more problem(s); run 'medseg data check')" if more else ""
        )
        raise InputFileError(
            first.path or path, f"case {first.case_id}: {first.problem}{suffix}"
        )
    return dataset


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"unreadable dataset.json ({exc})") from None
    if not isinstance(manifest, dict):
        raise InputFileError(path, "dataset.json must hold a JSON object")
    return manifest


class _CaseBuilder:
    """Resolves manifest paths inside the root and collects problems."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[CaseProblem] = []

    def resolve(self, case_id: str, relative: str) -> Path | None:
        if not isinstance(relative, str) or not relative:
            self.problems.append(
                CaseProblem(case_id, None, f"bad path entry {relative!r}")
            )
            return None
        normal = os.path.normpath(relative)
        if (
            os.path.isabs(relative)
            or normal == ".."
            or normal.startswith(".." + os.sep)
        ):
            self.problems.append(
                CaseProblem(
                    case_id, Path(relative), "path points outside the dataset folder"
                )
            )
            return None
        resolved = self.root / normal
        if not (resolved.is_file() or is_series_folder(resolved)):
            self.problems.append(CaseProblem(case_id, resolved, "file not found"))
        return resolved


def _case_id_from(path: str) -> str:
    return split_suffix(path)[0]


def read_label_names(manifest_path: str | Path) -> dict[int, str]:
    """Label values and names declared by a ``dataset.json`` (MSD's ``{"1": name}``
    or nnU-Net v2's ``{name: 1}``); empty when it declares none.

    Raises:
        InputFileError: unreadable, or labels that are not integer values.
    """
    manifest_path = Path(manifest_path)
    manifest = _read_manifest(manifest_path)
    if manifest is None:
        raise InputFileError(manifest_path, "file not found")
    raw = manifest.get("labels")
    if not isinstance(raw, dict):
        return {}
    if "channel_names" in manifest:  # nnU-Net v2: names to values
        return _labels_from_nnunet(raw, manifest_path)
    return _labels_from_msd(raw, manifest_path)


def _labels_from_nnunet(raw: dict, manifest_path: Path) -> dict[int, str]:
    labels = {}
    for name, value in raw.items():
        if not isinstance(value, int):
            raise InputFileError(
                manifest_path,
                f"label {name!r} has value {value!r}; region-based labels are not "
                "supported",
            )
        labels[value] = str(name)
    return labels


def _labels_from_msd(raw: dict, manifest_path: Path) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError):
        raise InputFileError(
            manifest_path, f"labels must map integer values to names, got {raw!r}"
        ) from None


def _load_msd(root: Path, manifest: dict) -> Dataset:
    manifest_path = root / "dataset.json"
    entries = manifest.get("training")
    if not isinstance(entries, list):
        raise InputFileError(
            manifest_path, "'training' must be a list of image/label entries"
        )
    builder = _CaseBuilder(root)
    cases = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            builder.problems.append(
                CaseProblem(
                    f"entry {index}", manifest_path, "training entry without 'image'"
                )
            )
            continue
        case_id = _case_id_from(str(entry["image"]))
        image = builder.resolve(case_id, entry["image"])
        label = builder.resolve(case_id, entry["label"]) if "label" in entry else None
        if image is not None:
            cases.append(Case(case_id, (image,), label))
    modality = manifest.get("modality")
    channels = None
    if isinstance(modality, dict):
        channels = tuple(str(modality[k]) for k in sorted(modality, key=int))
    labels = manifest.get("labels")
    return Dataset(
        root,
        "msd",
        tuple(cases),
        labels=_labels_from_msd(labels, manifest_path)
        if isinstance(labels, dict)
        else None,
        channel_names=channels,
        name=str(manifest.get("name", root.name)),
        problems=tuple(builder.problems),
    )


def _load_nnunet(root: Path, manifest: dict) -> Dataset:
    manifest_path = root / "dataset.json"
    channel_raw = manifest["channel_names"]
    if not isinstance(channel_raw, dict) or not channel_raw:
        raise InputFileError(
            manifest_path, "channel_names must map '0', '1', ... to names"
        )
    channels = tuple(str(channel_raw[k]) for k in sorted(channel_raw, key=int))
    labels = _labels_from_nnunet(dict(manifest.get("labels", {})), manifest_path)
    ending = str(manifest.get("file_ending", ".nii.gz"))
    builder = _CaseBuilder(root)
    cases = []
    explicit = manifest.get("dataset")
    if isinstance(explicit, dict):
        for case_id, entry in explicit.items():
            images = [builder.resolve(case_id, p) for p in entry.get("images", [])]
            label = (
                builder.resolve(case_id, entry["label"]) if "label" in entry else None
            )
            cases.append(
                Case(case_id, tuple(p for p in images if p is not None), label)
            )
    else:
        ids = sorted(
            {_strip_channel(n, ending) for n in _scan_names(root / "imagesTr", ending)}
            | {n[: -len(ending)] for n in _scan_names(root / "labelsTr", ending)}
        )
        for case_id in ids:
            images = [
                builder.resolve(case_id, f"imagesTr/{case_id}_{c:04d}{ending}")
                for c in range(len(channels))
            ]
            label = builder.resolve(case_id, f"labelsTr/{case_id}{ending}")
            cases.append(Case(case_id, tuple(images), label))
    return Dataset(
        root,
        "nnunet",
        tuple(cases),
        labels=labels or None,
        channel_names=channels,
        name=str(manifest.get("name", root.name)),
        problems=tuple(builder.problems),
    )


def _strip_channel(name: str, ending: str) -> str:
    stem = name[: -len(ending)]
    head, _, tail = stem.rpartition("_")
    return head if head and len(tail) == 4 and tail.isdigit() else stem


def _scan_names(
    folder: Path, ending: str | None = None, series: bool = False
) -> list[str]:
    """The scan files in ``folder`` (of ``ending``, else of any scan suffix), and with
    ``series`` its DICOM series folders."""
    if not folder.is_dir():
        return []
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if series and ending is None and is_series_folder(Path(entry.path)):
            names.append(entry.name)
            continue
        if not entry.is_file():
            continue
        if ending is not None and not entry.name.endswith(ending):
            continue
        if ending is None and split_suffix(entry.name)[1] not in SCAN_SUFFIXES:
            continue
        names.append(entry.name)
    return names


def _load_folder_pair(root: Path, manifest: dict | None) -> Dataset:
    for image_dir, label_dir in FOLDER_PAIRS:  # noqa: B007 (both used after the loop)
        if (root / image_dir).is_dir():
            break
    else:
        raise InputFileError(
            root,
            "no dataset found: expected dataset.json (MSD or nnU-Net v2) or an "
            "images/ + labels/ folder pair",
        )
    label_names = _scan_names(root / label_dir)
    labels_by_stem = {split_suffix(n)[0]: n for n in label_names}
    for name in label_names:  # CASE.seg.nrrd, a 3D Slicer segmentation
        labels_by_stem.setdefault(case_name(name), name)
    builder = _CaseBuilder(root)
    cases = []
    for name in _scan_names(root / image_dir, series=True):
        case_id = split_suffix(name)[0]
        image = builder.resolve(case_id, f"{image_dir}/{name}")
        label_name = labels_by_stem.get(case_id)
        label = None
        if label_name is not None:
            label = builder.resolve(case_id, f"{label_dir}/{label_name}")
        elif (root / label_dir).is_dir():
            builder.problems.append(
                CaseProblem(case_id, root / label_dir, f"no label file for {name}")
            )
        cases.append(Case(case_id, (image,), label))
    if not cases:
        raise InputFileError(root / image_dir, "no scan files found")
    labels, labels_from = None, "the dataset's labels"
    if manifest is not None and isinstance(manifest.get("labels"), dict):
        labels = _labels_from_msd(manifest["labels"], root / "dataset.json")
    else:  # 3D Slicer segmentations as the labels name their segments
        from medseg.io.itk import segment_names

        named = segment_names([case.label for case in cases if case.label])
        if named:
            labels, labels_from = {0: "background", **named}, LABELS_FROM_SEGMENTS
    return Dataset(
        root,
        "folder",
        tuple(cases),
        labels=labels,
        name=root.name,
        problems=tuple(builder.problems),
        labels_from=labels_from,
    )


# MedMNIST-style arrays

NPZ_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ArrayDataset:
    """A classification dataset held in arrays, split by name.

    Attributes:
        path: the ``.npz`` file.
        splits: ``{"train": (images, labels), ...}``; images channels-last
            ``(N, *spatial, C)``, labels ``(N,)`` integer classes.
        spatial_dims: 2 or 3.
        num_classes: ``max(label) + 1`` over all splits.
    """

    path: Path
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    spatial_dims: int
    num_classes: int


def load_npz_dataset(
    path: str | Path, *, spatial_dims: int | None = None
) -> ArrayDataset:
    """Reads a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, ``val_*``,
    ``test_*``).

    Images ``(N, H, W)``/``(N, H, W, 3)`` are 2D and ``(N, D, H, W)`` 3D unless
    ``spatial_dims`` says otherwise; a channel axis is added where there is none.

    Raises:
        InputFileError: not an ``.npz``, pickled objects, missing ``train_*`` arrays,
            image and label counts that differ, or labels that are not classes.
    """
    path = Path(path)
    arrays = read_npz_arrays(path)
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise InputFileError(
            path, f"needs train_images and train_labels, has {sorted(arrays)}"
        )
    splits = {}
    for split in NPZ_SPLITS:
        if f"{split}_images" not in arrays:
            continue
        images, labels = arrays[f"{split}_images"], arrays.get(f"{split}_labels")
        if labels is None:
            raise InputFileError(path, f"{split}_images without {split}_labels")
        splits[split] = _validated_split(path, split, images, labels, spatial_dims)
    dims = _npz_spatial_dims(splits["train"][0].shape, spatial_dims)
    num_classes = int(max(int(lab.max()) for _, lab in splits.values() if lab.size)) + 1
    return ArrayDataset(path, splits, dims, num_classes)


def read_npz_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, loaded without pickle.

    Raises:
        InputFileError: missing, not an ``.npz``, or holding pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        problem = (
            "holds Python objects (pickled); refused for safety"
            if "pickle" in str(exc)
            else f"not a valid .npz ({exc})"
        )
        raise InputFileError(path, problem) from None
    except Exception as exc:
        raise InputFileError(path, f"not a valid .npz ({exc})") from None


def load_npz_images(
    path: str | Path, split: str, spatial_dims: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``{split}_images`` of a MedMNIST-style ``.npz`` (channel axis added where there
    is none) and ``{split}_labels`` as ``(N,)`` classes, ``None`` when absent: the
    input of a classification bundle's prediction.

    Raises:
        InputFileError: unreadable, pickled, no such split, or malformed labels.
    """
    arrays = read_npz_arrays(path)
    key = f"{split}_images"
    if key not in arrays:
        have = sorted(k[: -len("_images")] for k in arrays if k.endswith("_images"))
        raise InputFileError(
            path, f"no {key} (splits here: {', '.join(have) or 'none'})"
        )
    labels = arrays.get(f"{split}_labels")
    if labels is None:
        images = arrays[key]
        if images.ndim == spatial_dims + 1:
            images = images[..., None]
        return images, None
    return _validated_split(path, split, arrays[key], labels, spatial_dims)


def _npz_spatial_dims(images_shape: tuple[int, ...], spatial_dims: int | None) -> int:
    if spatial_dims is not None:
        return spatial_dims
    if len(images_shape) == 5:
        return 3
    if len(images_shape) == 4 and images_shape[-1] in (1, 3):
        return 2
    return 3 if len(images_shape) == 4 else 2


def _validated_split(path, split, images, labels, spatial_dims):
    if images.ndim not in (3, 4, 5):
        raise InputFileError(
            path, f"{split}_images has shape {images.shape}; expected (N, ...)"
        )
    if len(images) != len(labels):
        raise InputFileError(
            path, f"{split}: {len(images)} images but {len(labels)} labels"
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if (
        labels.ndim != 1
        or labels.dtype.kind not in "iu"
        or (labels.size and labels.min() < 0)
    ):
        raise InputFileError(
            path,
            f"{split}_labels must be non-negative integer classes of shape (N,) or "
            "(N, 1), "
            f"got {labels.dtype} {labels.shape}",
        )
    dims = _npz_spatial_dims(images.shape, spatial_dims)
    if images.ndim == dims + 1:
        images = images[..., None]
    return images, labels.astype(np.int64)
