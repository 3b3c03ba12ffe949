"""What ``medseg info`` tells: what medseg reads in a scan (its grid, orientation,
voxel type and values, and what the reader had to fix or assume), which scans an
input names, the totals of what a model would do with them, and the network a
model, bundle or config describes.

The geometry is the one every command uses (the affine :func:`medseg.io.read_volume`
gives, in RAS millimetres), so a scan that is segmented or scored unexpectedly can be
looked at as medseg sees it, not as another viewer does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.io.dicom import is_dicom_file, is_series_folder
from medseg.io.formats import read_info, read_volume
from medseg.io.volume import SCAN_SUFFIXES, orientation_codes, split_suffix
from medseg.preprocessing.intensity import blank_note, count_nonfinite

#: integer-valued channels with at most this many distinct values list them (label
#: maps, masks)
MOST_VALUES_LISTED = 16

_FORMATS = {
    "nifti": "NIfTI",
    "image2d": "picture",
    "numpy": "NumPy array",
    "itk": "ITK (MetaImage or NRRD)",
    "dicom": "DICOM series",
}
_TOWARD = {
    "R": "right",
    "L": "left",
    "A": "anterior",
    "P": "posterior",
    "S": "superior",
    "I": "inferior",
}

if TYPE_CHECKING:
    from medseg.bundle import BundleMetadata


def is_scan_path(path: str | Path) -> bool:
    """A file with a scan's suffix, a DICOM file, or a DICOM series folder (not a
    model bundle)."""
    path = Path(path)
    if path.is_dir():
        return not (path / "medseg.json").is_file() and is_series_folder(path)
    suffix = split_suffix(path)[1] or path.suffix.lower()
    return suffix in (*SCAN_SUFFIXES, ".dcm") or (
        path.is_file() and is_dicom_file(path)
    )


def describe_scan(
    path: str | Path,
    model: tuple[str, dict] | None = None,
    *,
    overlap: float = 0.5,
    tta: bool = True,
    batch_size: int | None = None,
    read=None,
) -> dict:
    """The scan at ``path`` as medseg reads it, as plain JSON-ready values.

    Keys: ``path``, ``format``, ``spatial_dims``, ``channels``, ``shape``,
    ``spacing_mm``, ``field_of_view_mm``, ``orientation`` (axis codes, the direction
    each voxel axis points to, as nibabel's ``aff2axcodes``; ``None`` for pictures and
    arrays, which carry no orientation), ``origin_mm`` (the world position of the first
    voxel's centre), ``oblique_deg`` (the largest angle between a voxel axis and the
    world axis nearest it; 0 for a scan on the world axes), ``affine``, ``dtype`` (on
    disk; float64 where a NIfTI header scales the values), ``nifti_codes`` (sform and
    qform codes, NIfTI only), ``values`` (per channel: ``min``, ``max``, ``mean``,
    ``sd`` over finite voxels, ``nonfinite``, and ``counts`` of each value where the
    channel holds whole numbers of at most :data:`MOST_VALUES_LISTED` kinds, else
    ``None``) and ``notes``. With ``model`` (a segmentation bundle's name and its
    ``medseg.json``), also ``model``: its ``name`` and what ``medseg predict`` would
    do with the scan at ``overlap``, ``tta`` and ``batch_size``
    (:func:`medseg.inference.scan_plan`).
    ``read``: how the scan is read from ``path`` (a case's channel files, say; default
    :func:`medseg.io.read_volume`).

    Raises:
        InputFileError: the file cannot be read as a scan (the reason named).
    """
    info = read_info(path)
    volume = (read or read_volume)(path)
    array = np.asarray(volume.array)
    dims = volume.spatial_dims
    spacing = [float(s) for s in volume.spacing]
    geometric = info.format in ("nifti", "itk", "dicom")
    notes = list(volume.notes)
    if not geometric:
        notes.append(
            f"{path}: a {_FORMATS[info.format]} stores no spacing or orientation; "
            f"{' x '.join(f'{s:g}' for s in spacing)} mm "
            f"{'pixels' if dims == 2 else 'voxels'} are assumed"
        )
    if note := blank_note(volume):
        notes.append(note)
    header = volume.header
    codes = None
    if info.format == "nifti" and header is not None:
        codes = {
            "sform": int(header["sform_code"]),
            "qform": int(header["qform_code"]),
        }
    summary = {
        "path": str(path),
        "format": info.format,
        "spatial_dims": dims,
        "channels": int(array.shape[-1]),
        "shape": [int(n) for n in volume.spatial_shape],
        "spacing_mm": spacing,
        "field_of_view_mm": [
            n * s for n, s in zip(volume.spatial_shape, spacing, strict=True)
        ],
        "orientation": orientation_codes(volume.affine) if geometric else None,
        "origin_mm": [float(v) for v in np.asarray(volume.affine)[:3, 3]],
        "oblique_deg": _oblique_deg(volume.affine, dims) if geometric else 0.0,
        "affine": np.asarray(volume.affine, float).tolist(),
        "dtype": str(info.dtype),
        "nifti_codes": codes,
        "values": [_channel_values(array[..., c]) for c in range(array.shape[-1])],
        "notes": notes,
    }
    if model is not None:
        from medseg.inference.scan_plan import scan_plan

        name, metadata = model
        plan = scan_plan(
            volume, metadata, overlap=overlap, tta=tta, batch_size=batch_size
        )
        summary["model"] = {"name": name, **plan}
    return summary


def _oblique_deg(affine, spatial_dims: int) -> float:
    """The largest angle (degrees) between a voxel axis and its nearest world axis."""
    axes = np.asarray(affine, float)[:3, :spatial_dims]
    cosines = np.abs(axes).max(axis=0) / np.linalg.norm(axes, axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def _channel_values(values: np.ndarray) -> dict:
    """Range, mean and spread of one channel's finite voxels, its NaN/Inf count, and
    the count of each value where there are few whole ones."""
    bad = count_nonfinite(values)
    with warnings.catch_warnings():  # all NaN: nan, and a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
    finite = bool(np.isfinite(low) and np.isfinite(high))
    if bad:
        values = values[np.isfinite(values)]
    mean = float(np.mean(values, dtype=np.float64)) if values.size else None
    sd = float(np.std(values, dtype=np.float64)) if values.size else None
    counts = None
    if finite and high - low < 2**16 and _whole(values):
        bins = np.bincount((values.astype(np.int64) - int(low)).ravel())
        present = np.flatnonzero(bins)
        if len(present) <= MOST_VALUES_LISTED:
            counts = {_number(low + v): int(bins[v]) for v in present}
    return {
        "min": _number(low) if finite else None,
        "max": _number(high) if finite else None,
        "mean": mean,
        "sd": sd,
        "nonfinite": bad,
        "counts": counts,
    }


def _whole(values: np.ndarray) -> bool:
    if values.dtype.kind in "iub":
        return True
    return bool(np.all(np.mod(values, 1) == 0))


def _number(value) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def format_scan(summary: dict) -> str:
    """The text ``medseg info SCAN`` prints for :func:`describe_scan`'s summary."""
    channels = summary["channels"]
    lines = [
        f"{summary['path']}: {_FORMATS[summary['format']]}, "
        f"{summary['spatial_dims']}D, {channels} channel{'s' * (channels != 1)}"
    ]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name + ':' if name else '':<15} {text}")

    unit = " pixels" if summary["spatial_dims"] == 2 else " voxels"
    row("shape", " x ".join(str(n) for n in summary["shape"]) + unit)
    row("spacing", " x ".join(f"{s:.4g}" for s in summary["spacing_mm"]) + " mm")
    row(
        "field of view",
        " x ".join(f"{e:.4g}" for e in summary["field_of_view_mm"]) + " mm",
    )
    codes = summary["orientation"]
    if codes is not None:
        row(
            "orientation",
            f"{codes} (the voxel axes point "
            + ", ".join(_TOWARD.get(c, c) for c in codes)
            + ")",
        )
        if summary["oblique_deg"] > 0.01:
            row(
                "",
                f"oblique: an axis {summary['oblique_deg']:.3g} degrees off the world "
                "axis nearest it",
            )
        row(
            "first voxel",
            "at (" + ", ".join(f"{v:.4g}" for v in summary["origin_mm"]) + ") mm "
            "(x toward the right, y anterior, z superior)",
        )
        for k, values in enumerate(np.asarray(summary["affine"])[:3]):
            row("affine" if k == 0 else "", "  ".join(f"{v:10.4g}" for v in values))
    if summary["nifti_codes"] is not None:
        import nibabel as nib

        label = nib.nifti1.xform_codes.label
        row(
            "NIfTI codes",
            ", ".join(
                f"{name} {code} ({label[code]})"
                for name, code in summary["nifti_codes"].items()
            ),
        )
    row("voxel type", summary["dtype"])
    for c, values in enumerate(summary["values"]):
        name = "values" if channels == 1 else f"channel {c}"
        if values["min"] is None:
            row(name, "no finite value")
        else:
            row(
                name,
                f"{values['min']:g} to {values['max']:g}, mean {values['mean']:.4g}, "
                f"sd {values['sd']:.4g}",
            )
        if values["nonfinite"]:
            row("", f"{values['nonfinite']:,} NaN/Inf voxels")
        if values["counts"] is not None:
            row(
                "",
                ", ".join(
                    f"{value:g}: {count:,}" for value, count in values["counts"].items()
                )
                + unit,
            )
    for note in summary["notes"]:
        row("note", note)
    if "model" in summary:
        _format_plan(summary["model"], summary["notes"], row)
    return "\n".join(lines)


def _format_plan(plan: dict, notes, row) -> None:
    """The rows of ``medseg info SCAN --model``."""

    def sizes(values, digits: str = "d") -> str:
        return " x ".join(f"{v:{digits}}" for v in values)

    if plan["refused"] is not None:
        row("model", f"{plan['name']} would refuse it: {plan['refused']}")
    else:
        row("model", f"{plan['name']}, as medseg predict would segment it")
        row(
            "model grid",
            f"{sizes(plan['grid_shape'])} at {sizes(plan['grid_spacing_mm'], '.4g')} "
            "mm (reoriented, cropped and resampled as in training)",
        )
        windows = plan["windows"]
        mirrored = plan["mirrored"]
        row(
            "windows",
            f"{windows:,} of {sizes(plan['window'])} (overlap {plan['overlap']:g})"
            + (
                f", each also mirrored: {windows * mirrored:,} predicted"
                if mirrored > 1
                else ""
            )
            + f"; {plan['forward_passes']:,} forward passes of up to "
            f"{plan['batch_size']} windows",
        )
        row(
            "probabilities",
            f"{plan['probabilities_mib']:.3g} MiB (float32, while windows are blended)",
        )
    for warning in plan["warnings"]:
        if warning not in notes:
            row("warning", warning)


class InputShapeError(ValueError):
    """An input shape of another number of sizes than the network has."""


def bundle_for_scans(model: str) -> tuple[str, BundleMetadata]:
    """The name of the bundle ``medseg info SCAN --model`` names, and its metadata.

    Raises:
        InputFileError: no such bundle, or not a segmentation bundle.
    """
    from medseg.bundle import read_metadata, resolve
    from medseg.errors import InputFileError

    folder = resolve(model)
    metadata = read_metadata(folder)
    if metadata.task != "segmentation":
        raise InputFileError(
            folder,
            f"a {metadata.task} bundle; --model takes a segmentation bundle",
        )
    return model, metadata


def names_scans(path: Path, meant: bool = False) -> bool:
    """Whether ``path`` names scans as medseg predict's --input does (a scan, a
    folder of them, a list, a dataset.json, a glob pattern) rather than a model;
    ``meant`` (scans were asked for): any folder but a bundle, to be searched and
    named if it holds none."""
    from medseg.describe import is_scan_path
    from medseg.inference.jobs.inputs import LIST_SUFFIXES

    if is_scan_path(path):
        return True
    if path.is_file():
        return path.name == "dataset.json" or path.suffix.lower() in LIST_SUFFIXES
    if path.is_dir():
        return not (path / "medseg.json").is_file() and (meant or _holds_scans(path))
    return _pattern(path)


def _pattern(path: Path) -> bool:
    """A glob pattern (no file has the name)."""
    return not path.exists() and any(c in str(path) for c in "*?[")


def _holds_scans(folder: Path) -> bool:
    from medseg.errors import InputFileError
    from medseg.inference.jobs.inputs import collect_inputs

    try:
        return bool(collect_inputs(folder))
    except (InputFileError, OSError):
        return False


def expand_scans(path: Path, channels: int) -> tuple[list[Path], object]:
    """The scans ``path`` names for a model of ``channels`` input channels, and the
    reader of each, as medseg predict takes its --input: a case stored one file per
    channel is one scan, read from all its files."""
    from medseg.describe import is_scan_path
    from medseg.inference.jobs import inputs as job_inputs
    from medseg.io.dicom import named_scan

    if is_scan_path(path) and not path.is_dir() and not _pattern(path):
        files = [named_scan(path)]  # as given, to fail by name; a slice: its series
    else:
        files = job_inputs.collect_inputs(path)
    if path.is_file():  # one channel's file names its whole case
        files = job_inputs.with_sibling_channels(files, channels)
    groups = job_inputs.channel_groups(files, channels)
    return (sorted(groups) if groups else files), job_inputs.channel_reader(
        groups, channels
    )


def totals_line(summaries: list[dict]) -> str:
    """What ``medseg info SCAN... --model`` closes with: how many scans the model
    would segment (those with warnings named), refuse or could not read (named), and
    the windows and forward passes."""
    from medseg.errors import some_of

    def count(kind: str, paths: list[str]) -> str:
        return f"{len(paths)} {kind}" + (f" ({some_of(paths)})" if paths else "")

    plans = [s["model"] for s in summaries if "model" in s]
    taken = [p for p in plans if p["refused"] is None]
    warned = [s["path"] for s in summaries if "model" in s and s["model"]["warnings"]]
    parts = [
        f"{len(taken)} would be segmented"
        + (f", {count('with warnings', warned)}" if warned else ""),
        count(
            "refused",
            [s["path"] for s in summaries if (s.get("model") or {}).get("refused")],
        ),
        count("unreadable", [s["path"] for s in summaries if "error" in s]),
    ]
    windows = sum(p["windows"] * p["mirrored"] for p in taken)
    passes = sum(p["forward_passes"] for p in taken)
    return (
        f"{len(summaries)} scans: {'; '.join(parts)}; {windows:,} window predictions "
        f"in {passes:,} forward passes"
    )


def _with_classes(config, path: Path):
    """The config's model, its number of classes filled in from the config's labels
    or its dataset as training does, when the config leaves it out."""
    from dataclasses import replace

    from medseg.config import _CLASSIFYING, relative_to_config
    from medseg.errors import InputFileError

    model = config.model
    if model.num_classes is not None or model.name not in _CLASSIFYING:
        return model
    data = replace(config.data, dataset=relative_to_config(config.data.dataset, path))
    if data.task == "segmentation" and data.labels is not None:
        return replace(model, num_classes=len(data.labels))
    if not data.dataset:
        raise InputFileError(
            path, "model.num_classes is not set and there is no data.dataset to count"
        )
    from medseg.datasets.layouts import load_dataset, load_npz_dataset

    try:
        if data.task == "classification":
            classes = load_npz_dataset(data.dataset).num_classes
        else:
            classes = len(load_dataset(data.dataset).labels or ())
    except (OSError, ValueError) as exc:
        raise InputFileError(
            path, f"cannot count the classes of its dataset ({exc})"
        ) from None
    if not classes:
        raise InputFileError(
            path, "model.num_classes is not set and data has no labels"
        )
    return replace(model, num_classes=classes)


def model_to_describe(path: Path, suffix: str, shape):
    """The network ``medseg info`` describes: a YAML config's (its classes counted
    from its dataset where it leaves them out), or a .keras model's or a bundle's,
    at input ``shape`` where given.

    Raises:
        InputShapeError: ``shape`` has another number of sizes than the network.
        InputFileError: a config or model that cannot be built at that shape.
    """
    from medseg.errors import InputFileError

    if suffix in (".yaml", ".yml"):
        from medseg.config import ModelConfig, load_config
        from medseg.models import build_model

        config = _with_classes(load_config(path), path)
        if shape is not None:
            config = ModelConfig.from_dict({**config.to_dict(), "patch_size": shape})
        try:
            return build_model(config.name, **config.builder_kwargs())
        except ValueError as exc:
            raise InputFileError(path, str(exc)) from None
    from medseg.models import load_model
    from medseg.models.info import with_input_shape

    model = load_model(path)
    if shape is None:
        return model
    dims = len(model.inputs[0].shape) - 2
    if len(shape) != dims:
        raise InputShapeError(f"the model is {dims}D; give {dims} sizes")
    try:
        return with_input_shape(model, shape)
    except ValueError as exc:
        raise InputFileError(path, f"cannot use input shape {shape} ({exc})") from None
