"""``medseg data``: dataset integrity checks and fingerprints; DICOM exports sorted
into one folder per series; DICOM Segmentation objects read as NIfTI label maps, and
label maps written as them."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click

from medseg_cli.options import FiniteFloatRange


@click.group()
def data() -> None:
    """Inspect datasets; sort DICOM exports into series; convert DICOM SEG labels."""


@contextlib.contextmanager
def _read_notes_as_notes():
    """What reading a file notes (a header fixed, positions in metres, two transforms
    that disagree) comes as a NOTE line of the check, not also as the reader's
    warning."""
    reader = logging.getLogger("medseg.io")
    level = reader.level
    reader.setLevel(logging.ERROR)
    try:
        yield
    finally:
        reader.setLevel(level)


@data.command("check")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report and fingerprint to this JSON file.",
)
@click.option(
    "--max-voxels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse files declaring more voxels than this (default 2**30).",
)
@click.option(
    "--tolerance-mm",
    type=FiniteFloatRange(min=0),
    default=1e-3,
    show_default=True,
    help="Allowed image/label affine difference.",
)
def check(
    dataset: Path, json_path: Path | None, max_voxels: int | None, tolerance_mm: float
) -> None:
    """Check every case of DATASET and print its fingerprint.

    DATASET is a Decathlon or nnU-Net v2 folder (or its dataset.json), a folder with
    images/ and labels/, or a MedMNIST-style .npz. Each broken case is named with its
    problem. Exit status 0 when the dataset is clean, 2 when it is not.
    """
    from medseg.datasets.checks import check_array_dataset, check_dataset
    from medseg.datasets.layouts import (
        LABELS_FROM_SEGMENTS,
        load_dataset,
        load_npz_dataset,
    )
    from medseg.io import atomic_write_text
    from medseg.io.files import json_text
    from medseg.io.volume import DEFAULT_MAX_VOXELS

    notes = []
    if dataset.suffix.lower() == ".npz":
        report = check_array_dataset(load_npz_dataset(dataset))
        total = len(report.fingerprint["splits"])
    else:
        loaded = load_dataset(dataset, strict=False)
        total = len(loaded.cases)
        if loaded.labels_from == LABELS_FROM_SEGMENTS:
            notes.append(
                "labels named by the label files' 3D Slicer segments (each name at "
                "the value most files hold it at)"
            )
        with (
            _read_notes_as_notes(),
            click.progressbar(
                length=total,
                label="checking cases",
                file=sys.stderr,
                show_pos=True,
                show_eta=True,
            ) as bar,
        ):
            report = check_dataset(
                loaded,
                max_voxels=max_voxels or DEFAULT_MAX_VOXELS,
                affine_tolerance_mm=tolerance_mm,
                progress=lambda _case: bar.update(1),
            )
    click.echo(format_fingerprint(report.fingerprint))
    for note in notes + list(report.notes):
        click.echo(f"  NOTE {note}")
    if json_path is not None:
        atomic_write_text(json_path, json_text(report.to_dict()))
        click.echo(f"report written to {json_path}")
    if report.ok:
        click.echo(f"OK: no problems found in {dataset}")
        return
    click.echo(
        f"{len(report.problems)} problem(s) in {len(report.broken_cases)} case(s):",
        err=True,
    )
    for problem in report.problems:
        click.echo(f"  BROKEN {problem}", err=True)
    sys.exit(2)


def format_fingerprint(fp: dict) -> str:
    """A short human-readable summary of a fingerprint."""
    lines = [f"dataset: {fp.get('name')} ({fp.get('layout')})"]
    if fp.get("layout") == "npz":
        lines.append(f"spatial dims {fp['spatial_dims']}, {fp['num_classes']} classes")
        for split, info in fp["splits"].items():
            lines.append(
                f"  {split:5s} {info['num_samples']:6d} samples of "
                f"{tuple(info['image_shape'])} {info['dtype']}, classes "
                f"{info['class_counts']}"
            )
        return "\n".join(lines)
    lines.append(
        f"cases: {fp['num_cases']} ({fp['num_readable_cases']} readable and clean)"
    )
    if fp.get("labels"):
        lines.append(
            "labels: " + ", ".join(f"{k}={v}" for k, v in fp["labels"].items())
        )
    if "spacing_mm" not in fp:
        return "\n".join(lines)

    def fmt(values, spec):
        return " x ".join(format(v, spec) for v in values)

    sp, sh = fp["spacing_mm"], fp["shape"]
    lines.append(
        f"spacing mm: median {fmt(sp['median'], '.3g')}  "
        f"range {fmt(sp['min'], '.3g')} .. {fmt(sp['max'], '.3g')}"
    )
    lines.append(
        f"shape:      median {fmt(sh['median'], 'd')}  "
        f"range {fmt(sh['min'], 'd')} .. {fmt(sh['max'], 'd')}"
    )
    lines.append(
        "orientations: " + ", ".join(f"{k} {v}" for k, v in fp["orientations"].items())
    )
    for c, stats in enumerate(fp["foreground_intensity"]):
        if stats["mean"] is None:
            lines.append(f"channel {c} foreground intensity: no foreground voxel")
            continue
        lines.append(
            f"channel {c} foreground intensity: mean {stats['mean']:.4g} std "
            f"{stats['std']:.4g} p0.5 {stats['percentile_0.5']:.4g} median "
            f"{stats['percentile_50']:.4g} p99.5 {stats['percentile_99.5']:.4g}"
        )
    for value, frac in fp["label_fraction"].items():
        lines.append(
            f"label {value}: {100 * frac['mean']:.2f}% of voxels on average, "
            f"present in {frac['cases_present']} case(s)"
        )
    return "\n".join(lines)


@data.command("sort-dicom")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--by-patient",
    is_flag=True,
    help="Name each folder PATIENTID_STUDYDATE_NNNN_description: for an export of "
    "several patients or studies (the names then carry the PatientID).",
)
def sort_dicom(source: Path, target: Path, by_patient: bool) -> None:
    """Sort the DICOM files under SOURCE into one folder per series under TARGET.

    SOURCE is searched at any depth (a PACS export that mixes a study's series in
    one folder, say). Each series gets TARGET/NNNN_description (series number and
    description; --by-patient puts the PatientID and StudyDate before it), each
    file named by its SOPInstanceUID; files are hard-linked where
    TARGET is on the same file system, else copied, and SOURCE is left as it is. A
    re-run places only what is missing. Then `medseg predict --input TARGET`
    segments each series as one scan. Exit status 1 if a file could not be placed.
    """
    from medseg.io.dicom import sort_series

    done = sort_series(source, target, by_patient=by_patient)
    for name, count in sorted(done.series.items()):
        click.echo(f"{target / name}: {count} file{'s' * (count != 1)}")
    click.echo(
        f"{len(done.series)} series; {done.placed} files placed, {done.present} "
        f"already there, {done.not_dicom} not DICOM (left), {len(done.problems)} "
        "not placed"
    )
    for problem in done.problems:
        click.echo(f"  NOT PLACED {problem}", err=True)
    if done.problems:
        sys.exit(1)


@data.command("nifti-to-seg")
@click.argument("labels", type=click.Path(path_type=Path))
@click.argument("series", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--label-names",
    "names_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="dataset.json whose labels name the segments (default: a dataset.json beside "
    "LABELS or in its parent, when there is one; else 'label N').",
)
@click.option(
    "--algorithm",
    help="The model that made LABELS: its segments are recorded as automatic, made "
    "by it (default: manual segments, drawn by hand).",
)
def nifti_to_seg(
    labels: Path, series: Path, output: Path, names_file: Path | None, algorithm
) -> None:
    """Write the label map LABELS (a NIfTI, say one corrected in a viewer) as a DICOM
    Segmentation object OUTPUT of the DICOM series in the folder SERIES, for a PACS.

    One binary segment per label value present (0 is background), each frame
    referring to its slice. LABELS must be on the series' grid as `medseg predict`
    reads it, or hold the same voxels stored in another order (a dcm2niix
    conversion's, say); anything else is refused. OUTPUT ends in .dcm; `medseg data
    seg-to-nifti` reads it back as LABELS.
    """
    from medseg import __version__
    from medseg.errors import InputFileError
    from medseg.evaluation.folders import label_names
    from medseg.io.dicom_seg import label_map_to_segmentation

    if output.suffix.lower() != ".dcm":
        raise InputFileError(output, "a DICOM SEG is written as a .dcm file")
    if not output.parent.is_dir():
        raise InputFileError(output.parent, "output folder does not exist")
    written = label_map_to_segmentation(
        labels,
        series,
        output,
        label_names(names_file, labels),
        algorithm=algorithm,
        version=__version__,
    )
    described = ", ".join(f"{v} {name} {n:,} voxels" for v, name, n in written)
    click.echo(
        f"{output}: {len(written)} segment{'s' * (len(written) != 1)} of {series}: "
        + described
    )


@data.command("seg-to-nifti")
@click.argument("seg", type=click.Path(path_type=Path))
@click.argument("series", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def seg_to_nifti(seg: Path, series: Path, output: Path) -> None:
    """Write the DICOM Segmentation object SEG as a NIfTI label map on the grid of
    the DICOM series in the folder SERIES, as `medseg predict` reads the series.

    Each segment's voxels take its label value: the value `medseg predict
    --dicom-seg` wrote it from, else its segment number. Binary and fractional
    segments (from one half up) and label map SEGs are read; overlapping segments,
    frames off the series' grid, a SEG of another series and a malformed one are
    refused. OUTPUT ends in .nii.gz
    or .nii; the label maps and series then pair as a dataset's labels and images.
    """
    from medseg.errors import InputFileError
    from medseg.io import write_volume
    from medseg.io.dicom_seg import read_segmentation
    from medseg.io.volume import NIFTI_SUFFIXES, Volume, split_suffix

    if split_suffix(output)[1] not in NIFTI_SUFFIXES:
        raise InputFileError(
            output, "the label map is written as NIfTI: .nii.gz or .nii"
        )
    read = read_segmentation(seg, series)
    write_volume(Volume(read.labels[..., None], read.affine), output, is_label=True)
    shape = " x ".join(map(str, read.labels.shape))
    described = ", ".join(
        f"{value} {name} {count:,} voxels" for value, name, count in read.segments
    )
    click.echo(
        f"{output}: {len(read.segments)} segment{'s' * (len(read.segments) != 1)} on "
        f"{series}'s grid ({shape}): " + described
    )
