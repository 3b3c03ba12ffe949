"""``medseg predict``: segment a scan, a folder, a glob or a dataset with a bundle."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow
from medseg_cli.options import FiniteFloatRange, overlap_option, tta_option


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
@tta_option()
@overlap_option()
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
    "--uncertainty",
    is_flag=True,
    help="Also write OUTPUT/uncertainty/CASE_entropy.nii.gz (the entropy of the "
    "probabilities averaged over the test-time mirrors and models, 0 to 1) and, "
    "with more than one pass, CASE_mutual_information.nii.gz (their disagreement), "
    "on the scan's grid; the volumes table and report get each label's mean "
    "entropy inside it and on its boundary.",
)
@click.option(
    "--ood",
    type=click.Choice(["warn", "error", "off"]),
    default="warn",
    show_default=True,
    help="A scan unlike the bundle's training scans (its normalised intensities or "
    "the network's features further from them than any training scan was from the "
    "others): warn (a warning naming what is off, in the report, and ood_intensity "
    "and ood_features in the volumes table, above 1 when flagged), error (the case "
    "fails, nothing written) or off.",
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
    type=FiniteFloatRange(min=0),
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
    "--scheduler",
    help="Segment on a Dask cluster: a scheduler's address (tcp://host:8786), or "
    "local:N for N worker processes on this machine; the report and tables are "
    "this process's. Needs pip install 'medseg[dask]'.",
)
@click.option(
    "--devices",
    callback=lambda ctx, param, value: (
        tuple(d for d in value.split(",") if d.strip()) if value else ()
    ),
    help="GPU numbers (0,1): one worker process a GPU, each with its own copy of the "
    "model, the cases spread over them. Needs pip install 'medseg[dask]'.",
)
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
    uncertainty: bool,
    ood: str,
    dicom_seg: bool,
    preview: bool,
    seg_nrrd: bool,
    masks: bool,
    keep_largest: bool,
    min_size_mm3: float,
    split: str,
    shard: str | None,
    scheduler: str | None,
    devices: tuple[str, ...],
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
    from medseg.inference.jobs import predict as prediction
    from medseg.inference.jobs.inputs import parse_shard

    try:
        shard_value = parse_shard(shard) if shard else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None
    options = prediction.PredictOptions(
        tta=tta,
        overlap=overlap,
        batch_size=batch_size,
        keep_largest=keep_largest,
        min_size_mm3=min_size_mm3,
        probabilities=probabilities,
        uncertainty=uncertainty,
        ood=ood,
        allow_modified=allow_modified_model,
        precision=precision,
        nonfinite=nonfinite,
        overwrite=overwrite,
        dicom_seg=dicom_seg,
        preview=preview,
        seg_nrrd=seg_nrrd,
        masks=masks,
        shard=shard_value,
        split=split,
        report=report_path,
    )
    found = prediction.find_models(models)
    if len(found.bundles) > 1:
        named = ", ".join(map(str, found.bundles))
        click.echo(f"an ensemble of {len(found.bundles)} models: {named}", err=True)
    if problem := prediction.unavailable_output(found, options):
        raise click.UsageError(problem)
    debug = click.get_current_context().meta.get("medseg.debug", False)
    if scheduler and devices:
        raise click.UsageError("--devices is for this machine; not with --scheduler")
    if (scheduler or devices) and found.first.task == "classification":
        raise click.UsageError(
            "--scheduler and --devices segment; classify in one process"
        )
    if found.first.task == "classification":
        items, target = prediction.classification_items(
            found, input_path, output, options
        )
        start_tensorflow(debug)
        with click.progressbar(
            length=len(items), label="classifying", file=sys.stderr, show_pos=True
        ) as bar:
            summary = prediction.classify(
                found, items, target, options, progress=lambda _: bar.update(1)
            )
        click.echo(f"predictions written to {target}")
        _finish(summary, "classified")
        return
    plan = prediction.plan_segmentation(found, input_path, output, options)
    start_tensorflow(debug)
    run = prediction.start_segmentation(plan, prediction.load_segmenter(plan))
    if scheduler or devices:
        from medseg.inference.jobs.cluster import connect, on_cluster

        with connect(scheduler, devices) as client:
            results, stopped = _segment_showing_progress(run, on_cluster(client, run))
    else:
        results, stopped = _segment_showing_progress(run)
    summary = prediction.finish_segmentation(
        run, results, stopped.name if stopped else None
    )
    _finish(summary, "segmented", stopped)


def _segment_showing_progress(run, distribute=None):
    """Runs ``run``: a bar where a person watches, a line a scan in a batch job's
    log (which a bar leaves empty until the end). Returns the results and the signal
    that stopped the run before its end, if one did (the scan in hand dropped)."""
    count = len(run.plan.inputs)
    logged = not sys.stderr.isatty()
    with (
        _stopped_by_signals() as stop,
        click.progressbar(
            length=count,
            label="segmenting",
            file=sys.stderr,
            show_pos=True,
            show_eta=True,
            item_show_func=lambda line: line,
        ) as bar,
    ):
        if logged:  # and a line a minute while one scan takes long
            run.segmenter.on_windows = _Pace(
                lambda line: click.echo(
                    f"[{len(run.results) + 1}/{count}] {line}", err=True
                )
            )
        else:  # the scan in hand's windows beside the bar, every second
            pace = _Pace(partial(_beside, bar), every=TERMINAL_EVERY_S)
            run.segmenter.on_windows = lambda scan, done, total: pace(
                Path(scan).name, done, total
            )

        def progress(result):
            bar.update(1, "")  # the windows of the scan done no longer
            where = f"[{len(run.results)}/{count}]"
            if logged and result.status == "done":  # skipped: counted at the end
                click.echo(
                    f"{where} {result.input}: segmented in {result.seconds:.1f} s",
                    err=True,
                )
            if result.status == "failed":
                prefix = f"{where} " if logged else "\n"
                click.echo(f"{prefix}FAILED {result.error}", err=True)
            elif result.nonfinite_replaced:
                click.echo(
                    f"\n{result.input}: {result.nonfinite_replaced:,} NaN/Inf voxels "
                    "replaced by the channel minimum",
                    err=True,
                )

        try:
            return run.segment_all(progress, distribute), None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's time limit)
            return run.results, stop.signal


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


def _finish(summary, verb: str, stopped=None) -> None:
    """Prints the counts (and where the label volumes are) and the failures; exit 1
    on any, or 128 + the signal that ``stopped`` the run before its end."""
    counts = summary.counts
    elsewhere = summary.left_to_others
    click.echo(
        f"{counts['done']} {verb}, {counts['skipped']} skipped (output existed"
        + (f"; {elsewhere} in hand by another run, left to it" if elsewhere else "")
        + f"), {counts['failed']} failed; report: {summary.report_path}"
        + (f"; label volumes: {summary.sizes_path}" if summary.sizes_path else "")
    )
    if counts["failed"]:
        for error in summary.failures:
            click.echo(f"  FAILED {error}", err=True)
    if stopped is not None:  # the scan in hand was dropped: no file of it written
        done = counts["done"] + counts["skipped"] + counts["failed"]
        click.echo(
            f"stopped by {stopped.name} after {done} scans, "
            f"{summary.report['settings']['not_done']} not done; the label maps "
            "written are complete, and the same command does the rest",
            err=True,
        )
        sys.exit(128 + stopped.value)
    if counts["failed"]:
        sys.exit(1)
