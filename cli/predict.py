"""``medseg predict``: segment a scan, a folder, a glob or a dataset with a bundle."""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow


@click.command("predict")
@click.option(
    "--model",
    "models",
    required=True,
    multiple=True,
    help="Model bundle folder (a training run folder), or a shipped model's name. "
    "Given more than once: an ensemble, each scan segmented by the mean of the "
    "models' class probabilities (the folds of a cross-validation, say). A folder "
    "of bundles (a cross-validation's runs) is the ensemble of them all.",
)
@click.option(
    "--input",
    "input_path",
    required=True,
    help="A scan, a folder, a glob pattern (quote it), a dataset.json or a .txt "
    "list of scans (a path a line, relative to the list's folder); for "
    "classification models also a MedMNIST-style .npz.",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (or a file name for a single input scan).",
)
@click.option(
    "--tta/--no-tta",
    default=True,
    show_default=True,
    help="Average over mirrored copies along the axes the model was trained "
    "to be mirrored on.",
)
@click.option(
    "--overlap",
    type=click.FloatRange(0, 0.95),
    default=0.5,
    show_default=True,
    help="Sliding-window overlap.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Windows per forward pass (more is faster on a GPU, and takes more memory). "
    "Default: 4, and more of small windows (a 2D network's slices of volumes), up "
    "to 64 and about 2^18 voxels a pass.",
)
@click.option(
    "--probabilities",
    is_flag=True,
    help="Also write CASE_probabilities.npz: float16 class probabilities on the "
    "scan's grid.",
)
@click.option(
    "--dicom-seg",
    is_flag=True,
    help="Also write CASE_seg.dcm beside each DICOM series' label map: a DICOM "
    "Segmentation object of the series (one segment per label but a first named "
    "background), for PACS and viewers. Every input must be a DICOM series; needs "
    "highdicom (the dicom extra).",
)
@click.option(
    "--preview",
    is_flag=True,
    help="Also write OUTPUT/previews/CASE.png: the scan with its labels in colour, in "
    "the axial, coronal and sagittal planes through the most labelled slices (a 2D "
    "picture as it is), titled with the labels' volumes.",
)
@click.option(
    "--seg-nrrd",
    is_flag=True,
    help="Also write OUTPUT/slicer/CASE.seg.nrrd: the label map as a 3D Slicer "
    "segmentation, one segment per label but a first named background, with the "
    "labels' names and the previews' colours; needs SimpleITK (the itk extra).",
)
@click.option(
    "--masks",
    is_flag=True,
    help="Also write OUTPUT/masks/CASE/NAME.nii.gz (the label map's format): a 0/1 "
    "mask of each label but a first named background, named after the label, for "
    "tools that take one structure a file.",
)
@click.option(
    "--keep-largest",
    is_flag=True,
    help="Keep only the largest connected component of each label.",
)
@click.option(
    "--min-size-mm3",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Remove components of a label smaller than this (mm^3; mm^2 in 2D).",
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    help="Split of a .npz input to classify.",
)
@click.option("--shard", help="K/N: only every N-th scan from the K-th (array jobs).")
@click.option(
    "--allow-modified-model",
    is_flag=True,
    help="Use a bundle whose model.keras no longer matches the sha256 in its "
    "medseg.json (still loaded in safe mode).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Forward-pass precision. auto: bfloat16 on a CPU with AMX bfloat16 units "
    "and no GPU (about 2x faster there), float32 otherwise; the environment "
    "variable MEDSEG_AUTO_PRECISION=float32|bfloat16 sets what auto means.",
)
@click.option(
    "--nonfinite",
    type=click.Choice(["error", "replace"]),
    help="NaN/Inf voxels in a scan: error refuses the scan, replace fills them with "
    "the channel's minimum (noted in the report). Default: the bundle's policy "
    "(error for the shipped models).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Redo scans whose output exists; needed to write into a folder of label maps "
    "made with another model or options.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run report JSON (default: OUTPUT/medseg_predict_report[-K-of-N].json).",
)
def predict(
    models: tuple[str, ...],
    input_path: str,
    output: Path,
    tta: bool,
    overlap: float,
    batch_size: int | None,
    probabilities: bool,
    dicom_seg: bool,
    preview: bool,
    seg_nrrd: bool,
    masks: bool,
    keep_largest: bool,
    min_size_mm3: float,
    split: str,
    shard: str | None,
    allow_modified_model: bool,
    precision: str,
    nonfinite: str | None,
    overwrite: bool,
    report_path: Path | None,
) -> None:
    """Segment scans with a bundle; labels are written on each scan's own grid.

    The bundle's preprocessing is repeated exactly (orientation, crop, resampling,
    normalisation), windows are blended with Gaussian weights, and the label map goes
    back to the input's shape, affine and header codes. Existing outputs are skipped
    (re-running a killed job does only what is missing); OUTPUT's
    medseg_predict_settings.json records the model and options, and a run with others
    is refused there unless --overwrite. A scan that cannot be read is named with the
    reason and the others still finish. Exit status 1 if any failed; 128 + the
    signal (143, 130) when SIGTERM or Ctrl-C stopped the run, which drops the scan in
    hand and reports the others. OUTPUT/medseg_volumes.csv lists each label's volume.

    Several --model: their ensemble (same labels and inputs; each model keeps its own
    preprocessing, windows and mirroring, and the mean of their class probabilities
    labels each voxel, or classifies each image).

    Classification models write one CSV (OUTPUT if it ends in .csv, else
    OUTPUT/predictions.csv): case, predicted class, one probability per class.
    """
    from medseg import __version__
    from medseg.bundle import MODEL_FILE, bundles_in, read_metadata, resolve, sha256
    from medseg.errors import InputFileError
    from medseg.inference import ensemble_problem
    from medseg.inference.jobs import inputs as job_inputs
    from medseg.inference.jobs import outputs as job_outputs
    from medseg.inference.jobs import run as jobs
    from medseg.inference.jobs import settings as job_settings
    from medseg.inference.jobs import tables
    from medseg.io import itk as itkio
    from medseg.io.dicom import INSTALL, is_series_folder
    from medseg.io.dicom_seg import has_seg_writer

    ctx = click.get_current_context()
    try:
        shard_value = job_inputs.parse_shard(shard) if shard else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None
    bundles = [found for model in models for found in bundles_in(resolve(model))]
    metadatas = [read_metadata(bundle) for bundle in bundles]
    metadata = metadatas[0]
    if len(bundles) > 1:
        resolved = [b.resolve() for b in bundles]
        twice = next((b for b in bundles if resolved.count(b.resolve()) > 1), None)
        if twice:
            raise InputFileError(twice, "given twice as --model")
        problem = ensemble_problem(bundles, metadatas)
        if problem:
            raise InputFileError(*problem)
        click.echo(
            f"an ensemble of {len(bundles)} models: {', '.join(map(str, bundles))}",
            err=True,
        )
    if (dicom_seg or preview or seg_nrrd or masks) and metadata.get(
        "task"
    ) == "classification":
        raise click.UsageError(
            "--dicom-seg, --preview, --seg-nrrd and --masks are of label maps; this is "
            "a classifier"
        )
    if seg_nrrd and not itkio.available():
        raise click.UsageError('--seg-nrrd needs SimpleITK: pip install "medseg[itk]"')
    if dicom_seg and not has_seg_writer():
        raise click.UsageError(f"--dicom-seg needs highdicom: {INSTALL}")
    if metadata.task == "classification":
        start_tensorflow(ctx.meta.get("medseg.debug", False))
        _classify(
            bundles,
            metadata,
            input_path,
            output,
            split,
            shard_value,
            report_path,
            allow_modified_model,
            nonfinite,
        )
        return
    channels = metadata.in_channels
    everything = job_inputs.collect_inputs(input_path)
    if Path(input_path).is_file():  # one channel's file names its whole case
        everything = job_inputs.with_sibling_channels(everything, channels)
    # on every input, before sharding, so that every shard groups and names alike
    groups = job_inputs.channel_groups(everything, channels)
    if groups:  # nnU-Net's one file per channel: a case is read from all of them
        everything = sorted(groups)
    inputs_named = job_inputs.case_names(everything, grouped=bool(groups))
    inputs = job_inputs.take_shard(everything, shard_value)
    if dicom_seg:
        other = next((p for p in everything if not is_series_folder(p)), None)
        if other is not None:
            raise InputFileError(
                other,
                "not a DICOM series, and --dicom-seg writes a DICOM SEG of each input "
                "series; segment other scans in a run without it",
            )
    one = len(inputs) == 1 and (
        Path(input_path).is_file() or is_series_folder(Path(input_path))
    )
    single = one and output.suffix and not output.is_dir()
    job_outputs.check_outside_series(inputs, output.parent if single else output)
    output_dir = job_outputs.make_output_dir(
        output.parent if single else output,
        " (for one scan, give a file name with a scan suffix such as .nii.gz)"
        if one and not single
        else "",
    )
    start_tensorflow(ctx.meta.get("medseg.debug", False))
    from medseg.inference import Ensemble, Segmenter, bundle_mirror_axes

    members = [
        Segmenter(
            member,
            overlap=overlap,
            batch_size=batch_size,
            mirror_axes=bundle_mirror_axes(member_metadata) if tta else (),
            keep_largest=keep_largest,
            min_size_mm3=min_size_mm3,
            probabilities=probabilities,
            allow_modified=allow_modified_model,
            precision=precision,
            nonfinite=nonfinite,
        )
        for member, member_metadata in zip(bundles, metadatas, strict=True)
    ]
    segmenter = members[0]
    if len(members) > 1:
        segmenter = Ensemble(
            members,
            keep_largest=keep_largest,
            min_size_mm3=min_size_mm3,
            probabilities=probabilities,
        )

    def each(values):  # one model's setting, or every member's for an ensemble
        return values[0] if len(values) == 1 else values

    beside = job_outputs.Beside(
        probabilities=probabilities,
        dicom_seg="+".join(b.name for b in bundles) if dicom_seg else None,
        preview=preview,
        seg_nrrd=seg_nrrd,
        masks=job_outputs.mask_names(segmenter.values, segmenter.names)
        if masks
        else (),
    )
    if single:
        inputs_named = {inputs[0]: output.name}
    job_outputs.check_unique_outputs(
        everything, output_dir, inputs_named
    )  # every shard's
    job_settings.check_folder(  # before any scan is read
        inputs,
        output_dir,
        {
            "model_sha256": each([sha256(b / MODEL_FILE) for b in bundles]),
            "preprocessing": each([m.get("preprocessing") for m in metadatas]),
            "label_values": sorted(metadata.label_values),
            "patch_size": each([m.get("patch_size") for m in metadatas]),
            "tta": each([list(m.mirror_axes) for m in members]),
            "overlap": overlap,
            "keep_largest": keep_largest,
            "min_size_mm3": min_size_mm3,
            "precision": members[0].precision,
            "model": each([str(b) for b in bundles]),
            "medseg": __version__,
        },
        overwrite=overwrite,
        rename=inputs_named,
        beside=beside,
    )
    finished = []  # every result as it comes, for a report when stopped
    stopped = None
    # a bar where a person watches; a line a scan in a batch job's log, which a bar
    # leaves empty until the end
    logged = not sys.stderr.isatty()
    with (
        _stopped_by_signals() as stop,
        click.progressbar(
            length=len(inputs),
            label="segmenting",
            file=sys.stderr,
            show_pos=True,
            show_eta=True,
            item_show_func=lambda line: line,
        ) as bar,
    ):
        if logged:  # and a line a minute while one scan takes long
            segmenter.on_windows = _Pace(
                lambda line: click.echo(
                    f"[{len(finished) + 1}/{len(inputs)}] {line}", err=True
                )
            )
        else:  # the scan in hand's windows beside the bar, every second
            pace = _Pace(partial(_beside, bar), every=TERMINAL_EVERY_S)
            segmenter.on_windows = lambda scan, done, total: pace(
                Path(scan).name, done, total
            )

        def progress(result):
            finished.append(result)
            bar.update(1, "")  # the windows of the scan done no longer
            if logged and result.status == "done":  # skipped: counted at the end
                click.echo(
                    f"[{len(finished)}/{len(inputs)}] {result.input}: segmented "
                    f"in {result.seconds:.1f} s",
                    err=True,
                )
            if result.status == "failed":
                prefix = f"[{len(finished)}/{len(inputs)}] " if logged else "\n"
                click.echo(f"{prefix}FAILED {result.error}", err=True)
            elif result.nonfinite_replaced:
                click.echo(
                    f"\n{result.input}: {result.nonfinite_replaced:,} NaN/Inf voxels "
                    "replaced by the channel minimum",
                    err=True,
                )

        try:
            results = jobs.segment_all(
                segmenter.predict,
                inputs,
                output_dir,
                overwrite=overwrite,
                progress=progress,
                rename=inputs_named,
                beside=beside,
                reader=job_inputs.channel_reader(groups, channels),
                groups=groups,
            )
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's time limit)
            results, stopped = finished, stop.signal
    settings = {
        "precision": members[0].precision,
        "tta": each([list(m.mirror_axes) for m in members]),
        "nonfinite": each([m.preprocessor.nonfinite for m in members]),
    }
    sizes = output_dir / (tables.SIZES_FILE + _shard_suffix(shard_value) + ".csv")
    sizes = tables.write_sizes(
        results,
        sizes,
        segmenter.values,
        segmenter.names,
        job_inputs.channel_reader(groups, channels),
        # a skipped case's rows from any table in the folder (a shard's), so that a
        # run over a sharded job's whole input measures no scan again
        [t for t in output_dir.glob(tables.SIZES_PATTERN) if t != sizes],
    )
    if stopped is not None:
        settings["stopped_by"] = stopped.name
        settings["not_done"] = len(inputs) - len(results)
    _finish(
        results,
        output_dir,
        report_path,
        shard_value,
        "segmented",
        settings,
        sizes,
        stopped,
    )


def _beside(bar, line: str) -> None:
    """Shows ``line`` beside a progress bar (``update(0)`` would not draw it)."""
    bar.current_item = line
    bar.render_progress()


#: seconds between the lines of a scan in hand in a batch job's log
PACE_EVERY_S = 60.0
#: ... and between its updates beside a terminal's progress bar
TERMINAL_EVERY_S = 1.0


class _Pace:
    """Lines in a batch job's log while one scan takes long (a whole-body CT given to
    a model of one organ takes hours on a CPU): every :data:`PACE_EVERY_S` seconds
    of one scan's windows, those done and the time left for the rest at the pace
    so far (``in/ct.nii.gz: 1,200 of 4,640 windows, about 3 min left``); ``every``
    other seconds where given. Called as :attr:`medseg.inference.Segmenter.on_windows`;
    ``say`` writes a line."""

    def __init__(self, say, clock=None, every: float | None = None):
        import time

        self.say, self.clock = say, clock or time.monotonic
        self.every = every
        self.scan = None

    def __call__(self, scan: str, done: int, total: int) -> None:
        now = self.clock()
        if scan != self.scan:  # its first forward pass: the pace is timed from here
            self.scan, self.first, self.since, self.said = scan, done, now, now
            return
        every = PACE_EVERY_S if self.every is None else self.every
        if now - self.said < every or done <= self.first or done >= total:
            return
        left = (total - done) * (now - self.since) / (done - self.first)
        self.said = now
        self.say(f"{scan}: {done:,} of {total:,} windows, about {_minutes(left)} left")


def _minutes(seconds: float) -> str:
    """``45 s``, ``3 min``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{max(round(seconds), 1)} s"
    minutes = round(seconds / 60)
    return (
        f"{minutes} min"
        if minutes < 60
        else f"{minutes // 60} h {minutes % 60:02d} min"
    )


class _Stop:
    signal = signal.SIGINT


@contextmanager
def _stopped_by_signals():
    """SIGTERM (a scheduler ending a job) raises KeyboardInterrupt as Ctrl-C does, so
    the scan in hand is dropped with its temporary files and the run report is
    written; ``.signal`` says which came. The handlers before are put back after."""
    stop = _Stop()

    def terminate(number, frame):
        stop.signal = signal.Signals(number)
        raise KeyboardInterrupt

    try:
        earlier = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        earlier = None
    try:
        yield stop
    finally:
        if earlier is not None:
            signal.signal(signal.SIGTERM, earlier)


def _shard_suffix(shard_value) -> str:
    return f"-{shard_value[0]}-of-{shard_value[1]}" if shard_value else ""


def _finish(
    results,
    output_dir,
    report_path,
    shard_value,
    verb: str,
    settings=None,
    sizes=None,
    stopped=None,
) -> None:
    """Writes the run report, prints the counts (and where the label volumes are,
    ``sizes``) and the failures; exit 1 on any, or 128 + the signal that ``stopped``
    the run before its end."""
    from medseg.inference.jobs import claims, tables
    from medseg.io import atomic_write_text

    if report_path is None:
        report_path = (
            output_dir / f"medseg_predict_report{_shard_suffix(shard_value)}.json"
        )
    if verb == "segmented":  # a re-run's skipped scans: what the first run found
        tables.carry_earlier_records(
            results, {*output_dir.glob(tables.REPORT_PATTERN), report_path}
        )
    summary = tables.report(results)
    if settings:
        summary["settings"] = settings
    atomic_write_text(report_path, json.dumps(summary, indent=2) + "\n")
    counts = summary["counts"]
    elsewhere = sum(
        r.status == "skipped" and any(claims.IN_HAND_ELSEWHERE in w for w in r.warnings)
        for r in results
    )
    click.echo(
        f"{counts['done']} {verb}, {counts['skipped']} skipped (output existed"
        + (f"; {elsewhere} in hand by another run, left to it" if elsewhere else "")
        + f"), {counts['failed']} failed; report: {report_path}"
        + (f"; label volumes: {sizes}" if sizes else "")
    )
    if counts["failed"]:
        for result in results:
            if result.status == "failed":
                click.echo(f"  FAILED {result.error}", err=True)
    if stopped is not None:  # the scan in hand was dropped: no file of it written
        click.echo(
            f"stopped by {stopped.name} after {len(results)} scans, "
            f"{summary['settings']['not_done']} not done; the label maps written "
            "are complete, and the same command does the rest",
            err=True,
        )
        sys.exit(128 + stopped.value)
    if counts["failed"]:
        sys.exit(1)


def _classify(
    bundles,
    metadata,
    input_path,
    output,
    split,
    shard_value,
    report_path,
    allowed,
    nonfinite,
):
    """Classification bundles (several: their ensemble): image files or a .npz split
    -> one predictions CSV."""
    from medseg.datasets.layouts import load_npz_images
    from medseg.inference import Classifier, ClassifierEnsemble
    from medseg.inference.jobs import inputs as job_inputs
    from medseg.inference.jobs import outputs as job_outputs
    from medseg.inference.jobs import run as jobs
    from medseg.io import atomic_write_text, read_volume, split_suffix

    target = output if output.suffix == ".csv" else output / "predictions.csv"
    job_outputs.make_output_dir(target.parent)  # before any work
    source = Path(input_path)
    if source.suffix == ".npz":
        images, _ = load_npz_images(source, split, metadata.spatial_dims)
        indices = job_inputs.take_shard(list(range(len(images))), shard_value)
        items = [(f"{split}_{i}", lambda i=i: images[i]) for i in indices]
    else:
        files = job_inputs.take_shard(
            job_inputs.collect_inputs(input_path), shard_value
        )
        items = [(split_suffix(p)[0], lambda p=p: read_volume(p).array) for p in files]
    members = [
        Classifier(bundle, allow_modified=allowed, nonfinite=nonfinite)
        for bundle in bundles
    ]
    classifier = members[0] if len(members) == 1 else ClassifierEnsemble(members)
    with click.progressbar(
        length=len(items), label="classifying", file=sys.stderr, show_pos=True
    ) as bar:
        results, scores = jobs.classify_all(
            classifier, items, progress=lambda _result: bar.update(1)
        )
    for result in results:
        result.output = str(target)
    atomic_write_text(target, jobs.classification_csv(scores, classifier.names))
    click.echo(f"predictions written to {target}")
    _finish(results, target.parent, report_path, shard_value, "classified")
