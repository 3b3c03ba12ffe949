"""Dataset integrity check and fingerprint (``medseg data check``).

Like nnU-Net's ``--verify_dataset_integrity``, every file is read and each case is
checked:
readable files; channel files that agree with each other; a label with the image's shape
and (within a tolerance) affine; integer label values among the declared labels (and
a 3D Slicer segment named as a declared label holding that label's value); the same
channel count in every case; no NaN/Inf voxels. Every problem is reported with its
case and file, and the check goes on to the next case.

The fingerprint summarises what training will plan from: counts, spacing and shape
(median and range), orientations, intensities inside the foreground (label > 0) per
channel, and the fraction of voxels each label occupies.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.datasets.layouts import ArrayDataset, Case, CaseProblem, Dataset
from medseg.errors import InputFileError
from medseg.io.formats import read_volume, stack_channels
from medseg.io.grid import (
    declares_a_box,
    in_box_of,
    in_voxel_order_of,
)
from medseg.io.itk import overlapping_segments, segments_against_labels
from medseg.io.volume import DEFAULT_MAX_VOXELS, Volume, off_grid, orientation_codes
from medseg.preprocessing.intensity import count_nonfinite

#: Foreground intensities sampled per case for the fingerprint (nnU-Net uses 10,000).
FOREGROUND_SAMPLES_PER_CASE = 10_000
#: Intensity percentiles recorded per channel.
PERCENTILES = (0.5, 50.0, 99.5)


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`.

    Attributes:
        problems: one entry per problem found, naming case and file.
        fingerprint: JSON-ready summary of the readable cases.
        notes: what was read as it was meant but is worth knowing (a file stored in
            another voxel order than its image), naming case and file.
    """

    problems: list[CaseProblem] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)
    notes: list[CaseProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken_cases(self) -> list[str]:
        return sorted({p.case_id for p in self.problems})

    def to_dict(self) -> dict:
        def entry(p: CaseProblem) -> dict:
            path = None if p.path is None else str(p.path)
            return {"case": p.case_id, "path": path, "problem": p.problem}

        return {
            "ok": self.ok,
            "problems": [entry(p) for p in self.problems],
            "notes": [entry(p) for p in self.notes],
            "fingerprint": self.fingerprint,
        }


@dataclass
class _Accumulator:
    """What the fingerprint gathers from the good cases."""

    spacings: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    orientations: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    foreground: dict = field(default_factory=dict)
    label_fractions: dict = field(default_factory=dict)


def check_dataset(
    dataset: Dataset,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    affine_tolerance_mm: float = 1e-3,
    seed: int = 0,
    progress: Callable[[Case], None] | None = None,
) -> CheckReport:
    """Reads every case of a dataset and reports each problem, then fingerprints it.

    Args:
        dataset: from :func:`medseg.datasets.load_dataset` (``strict=False`` so that its
            manifest problems are reported here too).
        max_voxels: per-file ceiling passed to :func:`medseg.io.read_volume`.
        affine_tolerance_mm: largest allowed difference between image and label affines.
        seed: for sampling foreground intensities.
        progress: called after each case (for a progress bar).
    """
    report = CheckReport(problems=list(dataset.problems))
    rng = np.random.default_rng(seed)
    acc = _Accumulator()
    expected_channels = dataset.num_channels  # None: the first readable case decides
    repeats = _listed_twice(dataset.cases)
    for index, case in enumerate(dataset.cases):
        if index in repeats:
            report.problems.append(repeats[index])
            continue
        problems, image, label = _check_case(
            dataset, case, max_voxels, affine_tolerance_mm, report.notes
        )
        if image is not None and expected_channels is None:
            expected_channels = image.num_channels
        if image is not None and image.num_channels != expected_channels:
            problems.append(
                CaseProblem(
                    case.case_id,
                    case.images[0],
                    f"{image.num_channels} channel(s), "
                    f"the dataset has {expected_channels}",
                )
            )
        report.problems.extend(problems)
        if not problems and image is not None:
            _accumulate(acc, image, label, dataset.labels, rng)
        if progress is not None:
            progress(case)
    report.fingerprint = _fingerprint(dataset, acc)
    labelled = [c for c in dataset.cases if c.label is not None]
    scored = report.fingerprint.get("foreground_intensity") or []
    if labelled and scored and all(s["mean"] is None for s in scored):
        report.problems.append(
            CaseProblem(
                "(every case)",
                dataset.root,
                "no label map has a foreground voxel (all 0): nothing to learn from",
            )
        )
    return report


def _listed_twice(cases) -> dict[int, CaseProblem]:
    """The problem of each case (by position) that repeats an earlier one: the same
    case id, or an image or label file an earlier case already uses (by its resolved
    path, so ``imagesTr/../imagesTr/a.nii.gz`` is ``imagesTr/a.nii.gz``). Training
    would count it twice, and two folds would validate on it."""
    first_of: dict = {}
    repeats: dict[int, CaseProblem] = {}
    for index, case in enumerate(cases):
        files = [
            Path(os.path.realpath(path))
            for path in (*case.images, case.label)
            if path is not None
        ]
        keys = [("id", case.case_id)] + [("file", f) for f in files]
        earlier = next((first_of[k] for k in keys if k in first_of), None)
        if earlier is not None:
            what = (
                "the same case id"
                if first_of.get(("id", case.case_id)) == earlier
                else "a file it uses too"
            )
            repeats[index] = CaseProblem(
                case.case_id,
                case.images[0] if case.images else None,
                f"listed twice: entry {index + 1} repeats entry {earlier + 1} "
                f"({what}); training would count it twice",
            )
            continue
        for key in keys:
            first_of.setdefault(key, index)
    return repeats


def _read(case: Case, path, max_voxels, problems, notes) -> Volume | None:
    try:
        volume = read_volume(path, max_voxels=max_voxels)
    except InputFileError as exc:
        problems.append(CaseProblem(case.case_id, exc.path, exc.problem))
        return None
    # what the reader fixed or chose (a zero voxel size, the sform over the qform)
    prefix = f"{path}: "
    notes.extend(
        CaseProblem(case.case_id, path, note.removeprefix(prefix))
        for note in volume.notes
    )
    return volume


def _check_case(
    dataset: Dataset, case: Case, max_voxels: int, tolerance: float, notes: list
):
    problems: list[CaseProblem] = []
    if any(p.case_id == case.case_id for p in dataset.problems):
        return problems, None, None  # already reported (missing or outside the folder)
    channels = [_read(case, path, max_voxels, problems, notes) for path in case.images]
    label = None
    if case.label is not None:
        label = _read(case, case.label, max_voxels, problems, notes)
    if any(c is None for c in channels) or not channels:
        return problems, None, None
    whose = f"{case.images[0].name}'s"
    for path, channel in zip(case.images[1:], channels[1:], strict=True):
        # each channel file on the first's grid (or in another voxel order of it)
        if in_voxel_order_of(channel, channels[0], tolerance) is None:
            problem = off_grid(channel, channels[0], whose, tolerance)
            problems.append(CaseProblem(case.case_id, path, problem))
    if problems:
        return problems, None, None
    image = stack_channels(channels, case.images, tolerance)
    for path, channel in zip(case.images[1:], channels[1:], strict=True):
        notes.extend(_another_order(case, path, channel, channels[0], "the first's"))
    bad = count_nonfinite(np.asarray(image.array))
    if bad:
        problems.append(
            CaseProblem(case.case_id, case.images[0], f"{bad:,} NaN/Inf voxels")
        )
    if label is not None:
        # the same voxels stored in another order (LPS beside RAS): read in the image's,
        # as training's preprocessing reorients both
        ordered = in_voxel_order_of(label, image, tolerance)
        if ordered is not None:
            notes.extend(_another_order(case, case.label, label, image, "its image's"))
            label = ordered
        elif declares_a_box(label):  # a 3D Slicer segmentation cropped to its labels
            boxed = in_box_of(label, image, tolerance)
            if boxed is not None:
                shape = " x ".join(map(str, label.spatial_shape))
                notes.append(
                    CaseProblem(
                        case.case_id,
                        case.label,
                        f"saved on a box of its image's grid ({shape} voxels from "
                        f"voxel {boxed[1]}): placed in it, background elsewhere",
                    )
                )
                label = boxed[0]
        problems.extend(_check_label(dataset, case, image, label, tolerance))
    return problems, image, label


def _another_order(case, path, volume, reference, whose: str) -> list[CaseProblem]:
    """A note when ``volume`` (on ``reference``'s grid) is stored in another voxel
    order."""
    stored, wanted = (
        orientation_codes(volume.affine),
        orientation_codes(reference.affine),
    )
    if stored == wanted:
        return []
    return [
        CaseProblem(
            case.case_id,
            path,
            f"stored in {stored} voxel order, {whose} in {wanted}: read in {whose}",
        )
    ]


def _affines_agree(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    return bool(np.max(np.abs(a - b)) <= tolerance)


def _check_label(
    dataset, case, image: Volume, label: Volume, tolerance
) -> list[CaseProblem]:
    path = case.label
    out = []
    if label.spatial_shape != image.spatial_shape:
        return [
            CaseProblem(
                case.case_id,
                path,
                f"label shape {label.spatial_shape} differs "
                f"from image shape {image.spatial_shape}",
            )
        ]
    if label.num_channels != 1:
        overlap = overlapping_segments(np.asarray(label.array), label.header)
        out.append(
            CaseProblem(
                case.case_id,
                path,
                overlap
                or f"label has {label.num_channels} channels; expected one label map",
            )
        )
    if not _affines_agree(label.affine, image.affine, tolerance):
        diff = float(np.max(np.abs(label.affine - image.affine)))
        out.append(
            CaseProblem(
                case.case_id,
                path,
                f"label affine differs from the image's "
                f"by up to {diff:.4g} mm (tolerance {tolerance:g})",
            )
        )
    values = np.asarray(label.array)
    if values.dtype.kind == "f":
        if count_nonfinite(values):
            out.append(CaseProblem(case.case_id, path, "NaN/Inf in label map"))
            return out
        if not np.all(values == np.round(values)):
            out.append(
                CaseProblem(case.case_id, path, "label map has non-integer values")
            )
            return out
    found = set(np.unique(values).astype(np.int64).tolist())
    out.extend(
        CaseProblem(case.case_id, path, problem)
        for problem in segments_against_labels(
            label.header, dataset.labels, dataset.labels_from
        )
    )
    if dataset.labels is not None:
        undeclared = sorted(found - set(dataset.labels))
        if undeclared:
            out.append(
                CaseProblem(
                    case.case_id,
                    path,
                    f"label values {undeclared} not "
                    f"among declared labels {sorted(dataset.labels)}",
                )
            )
    return out


def _accumulate(acc: _Accumulator, image: Volume, label: Volume | None, declared, rng):
    from medseg.io.volume import orientation_codes

    acc.spacings.append(image.spacing)
    acc.shapes.append(image.spatial_shape)
    acc.orientations[orientation_codes(image.affine)] += 1
    acc.dtypes[str(image.array.dtype)] += 1
    acc.channels[image.num_channels] += 1
    array = np.asarray(image.array)
    if label is None:
        mask = np.ones(image.spatial_shape, dtype=bool)
    else:
        label_map = np.asarray(label.array)[..., 0].astype(np.int64)
        mask = label_map > 0
        values, counts = np.unique(label_map, return_counts=True)
        present = dict(zip(values.tolist(), counts.tolist(), strict=True))
        for value in sorted(set(declared or {}) | set(present)):
            acc.label_fractions.setdefault(value, []).append(
                present.get(value, 0) / label_map.size
            )
    index = np.flatnonzero(mask)
    if index.size > FOREGROUND_SAMPLES_PER_CASE:
        index = rng.choice(index, FOREGROUND_SAMPLES_PER_CASE, replace=False)
    for c in range(image.num_channels):
        acc.foreground.setdefault(c, []).append(array[..., c].reshape(-1)[index])


def _summary(values: np.ndarray) -> dict:
    return {
        "median": np.median(values, axis=0).tolist(),
        "min": np.min(values, axis=0).tolist(),
        "max": np.max(values, axis=0).tolist(),
    }


def _fingerprint(dataset: Dataset, acc: _Accumulator) -> dict:
    fingerprint = {
        "name": dataset.name,
        "layout": dataset.layout,
        "num_cases": len(dataset.cases)
        + len(
            {p.case_id for p in dataset.problems} - {c.case_id for c in dataset.cases}
        ),
        "num_readable_cases": len(acc.shapes),
        "labels": None
        if dataset.labels is None
        else {str(k): v for k, v in sorted(dataset.labels.items())},
        "channel_names": None
        if dataset.channel_names is None
        else list(dataset.channel_names),
    }
    if not acc.shapes:
        return fingerprint
    fingerprint.update(
        {
            "spacing_mm": _summary(np.array(acc.spacings)),
            "shape": {
                k: [int(round(v)) for v in vs]
                for k, vs in _summary(np.array(acc.shapes, dtype=float)).items()
            },
            "orientations": dict(acc.orientations),
            "dtypes": dict(acc.dtypes),
            "num_channels": dict((str(k), v) for k, v in acc.channels.items()),
            "foreground_intensity": [
                intensity_stats(np.concatenate(samples))
                for _, samples in sorted(acc.foreground.items())
            ],
            "label_fraction": {
                str(value): {
                    "mean": float(np.mean(fr)),
                    "min": float(np.min(fr)),
                    "max": float(np.max(fr)),
                    "cases_present": int(np.count_nonzero(np.array(fr) > 0)),
                }
                for value, fr in sorted(acc.label_fractions.items())
            },
        }
    )
    return fingerprint


def intensity_stats(values: np.ndarray) -> dict:
    """Mean, std, min, max and :data:`PERCENTILES` of an intensity sample (each
    ``None`` for an empty one)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:  # no foreground voxel anywhere: nothing to describe
        return dict.fromkeys(
            ["mean", "std", "min", "max", *(f"percentile_{q:g}" for q in PERCENTILES)]
        )
    stats = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
        stats[f"percentile_{q:g}"] = float(v)
    return stats


def check_array_dataset(dataset: ArrayDataset) -> CheckReport:
    """Integrity and fingerprint of a MedMNIST-style array dataset."""
    report = CheckReport()
    fingerprint = {
        "name": dataset.path.stem,
        "layout": "npz",
        "spatial_dims": dataset.spatial_dims,
        "num_classes": dataset.num_classes,
        "splits": {},
    }
    for split, (images, labels) in dataset.splits.items():
        bad = count_nonfinite(images)
        if bad:
            report.problems.append(
                CaseProblem(
                    split, dataset.path, f"{bad:,} NaN/Inf values in {split}_images"
                )
            )
        fingerprint["splits"][split] = {
            "num_samples": int(len(images)),
            "image_shape": [int(n) for n in images.shape[1:]],
            "dtype": str(images.dtype),
            "class_counts": {
                str(k): int(v)
                for k, v in zip(*np.unique(labels, return_counts=True), strict=True)
            },
        }
    report.fingerprint = fingerprint
    return report
