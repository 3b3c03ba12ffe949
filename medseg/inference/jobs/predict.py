"""``medseg predict`` as library calls: the models, the cases and where they go, the
segmenter, the folder's settings record, the run, and its tables and report.

The command line parses options into :class:`PredictOptions` and calls, in order,
:func:`find_models`, :func:`plan_segmentation` (no network loaded yet: every problem
with the inputs or the output folder is found first), :func:`load_segmenter`,
:func:`start_segmentation` (the settings record, checked before any scan is read),
:func:`segment_all`, and :func:`finish_segmentation`. A classifier goes through
:func:`classify`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medseg import __version__
from medseg.bundle import BundleMetadata
from medseg.errors import InputFileError
from medseg.inference.jobs import inputs as job_inputs
from medseg.inference.jobs import outputs as job_outputs
from medseg.inference.jobs import run as jobs
from medseg.inference.jobs import settings as job_settings
from medseg.inference.jobs import tables
from medseg.inference.jobs.claims import IN_HAND_ELSEWHERE
from medseg.io.files import atomic_write_text, json_text


@dataclass(frozen=True)
class PredictOptions:
    """What ``medseg predict``'s options ask for (see its ``--help``)."""

    tta: bool = True
    overlap: float = 0.5
    batch_size: int | None = None
    keep_largest: bool = False
    min_size_mm3: float = 0.0
    probabilities: bool = False
    uncertainty: bool = False
    allow_modified: bool = False
    precision: str = "auto"
    nonfinite: str | None = None
    ood: str = "warn"
    overwrite: bool = False
    dicom_seg: bool = False
    preview: bool = False
    seg_nrrd: bool = False
    masks: bool = False
    shard: tuple[int, int] | None = None
    split: str = "test"
    report: Path | None = None

    @property
    def label_map_extras(self) -> bool:
        return (
            self.dicom_seg
            or self.preview
            or self.seg_nrrd
            or self.masks
            or self.uncertainty
        )


@dataclass
class Models:
    """The bundles a prediction uses (several: an ensemble) and their metadata."""

    bundles: list[Path]
    metadatas: list[BundleMetadata]

    @property
    def first(self) -> BundleMetadata:
        return self.metadatas[0]

    def each(self, values: list):
        """One model's setting, or every member's for an ensemble."""
        return values[0] if len(values) == 1 else values


def find_models(models: Sequence[str | Path]) -> Models:
    """The bundles that ``--model`` names: folders, shipped names, or folders of
    bundles (a cross-validation's runs), checked to make one ensemble.

    Raises:
        InputFileError: no such bundle, one given twice, or bundles that do not
            predict alike (:func:`~medseg.inference.ensemble.ensemble_problem`).
    """
    from medseg.bundle import bundles_in, read_metadata, resolve
    from medseg.inference.ensemble import ensemble_problem

    bundles = [found for model in models for found in bundles_in(resolve(model))]
    metadatas = [read_metadata(bundle) for bundle in bundles]
    if len(bundles) > 1:
        resolved = [b.resolve() for b in bundles]
        twice = next((b for b in bundles if resolved.count(b.resolve()) > 1), None)
        if twice:
            raise InputFileError(twice, "given twice as --model")
        problem = ensemble_problem(bundles, metadatas)
        if problem:
            raise InputFileError(*problem)
    return Models(bundles, metadatas)


def unavailable_output(models: Models, options: PredictOptions) -> str | None:
    """Why an asked-for kind of output cannot be written, or ``None``."""
    from medseg.io import itk
    from medseg.io.dicom import INSTALL
    from medseg.io.dicom_seg import has_seg_writer

    if options.label_map_extras and models.first.task == "classification":
        return (
            "--dicom-seg, --preview, --seg-nrrd, --masks and --uncertainty are of "
            "label maps; this is a classifier"
        )
    if options.seg_nrrd and not itk.available():
        return '--seg-nrrd needs SimpleITK: pip install "medseg[itk]"'
    if options.dicom_seg and not has_seg_writer():
        return f"--dicom-seg needs highdicom: {INSTALL}"
    return None


@dataclass
class SegmentationPlan:
    """The cases of a segmentation run and where their files go, found before any
    network is loaded.

    Attributes:
        everything: every case's first file, before sharding (so that every shard
            groups and names alike).
        inputs: this shard's cases.
        groups: a case's channel files by its first, where cases are stored one
            file per channel.
        names: output file names of some cases.
        output_dir: where label maps go.
    """

    models: Models
    options: PredictOptions
    everything: list[Path]
    inputs: list[Path]
    groups: dict
    names: dict
    output_dir: Path
    channels: int

    def reader(self):
        return job_inputs.channel_reader(self.groups, self.channels)


def plan_segmentation(
    models: Models, input_path: str, output: Path, options: PredictOptions
) -> SegmentationPlan:
    """The cases ``input_path`` names, this shard's share of them, and the output
    folder (made): one scan and an ``output`` with a scan suffix is one file.

    Raises:
        InputFileError: no scan found, a case whose channel files are missing, a
            non-series input with ``dicom_seg``, or an output folder that cannot be
            written or lies inside a DICOM series.
    """
    from medseg.io.dicom import is_series_folder

    channels = models.first.in_channels
    everything = job_inputs.collect_inputs(input_path)
    if Path(input_path).is_file():  # one channel's file names its whole case
        everything = job_inputs.with_sibling_channels(everything, channels)
    groups = job_inputs.channel_groups(everything, channels)
    if groups:  # nnU-Net's one file per channel: a case is read from all of them
        everything = sorted(groups)
    names = job_inputs.case_names(everything, grouped=bool(groups))
    inputs = job_inputs.take_shard(everything, options.shard)
    if options.dicom_seg:
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
    if single:
        _check_output_format(output, inputs[0])
    folder = output.parent if single else output
    job_outputs.check_outside_series(inputs, folder)
    output_dir = job_outputs.make_output_dir(
        folder,
        " (for one scan, give a file name with a scan suffix such as .nii.gz)"
        if one and not single
        else "",
    )
    if single:
        names = {inputs[0]: output.name}
    return SegmentationPlan(
        models, options, everything, inputs, groups, names, output_dir, channels
    )


def _check_output_format(output: Path, scan: Path) -> None:
    """Refuses, before any network is loaded, an output file whose format cannot
    hold the label map of ``scan``: a picture for a 3D scan, a lossy JPEG, or an ITK
    format without SimpleITK.

    Raises:
        InputFileError: naming ``output`` and what to name it instead.
    """
    from medseg.io import itk
    from medseg.io.formats import read_info
    from medseg.io.volume import IMAGE_SUFFIXES, ITK_SUFFIXES, split_suffix

    suffix = split_suffix(output)[1]
    if suffix in (".jpg", ".jpeg"):
        raise InputFileError(
            output, "JPEG is lossy and would change label values; name it .png"
        )
    if suffix in ITK_SUFFIXES and not itk.available():
        raise InputFileError(
            output, f'writing {suffix} needs SimpleITK: pip install "medseg[itk]"'
        )
    if suffix in IMAGE_SUFFIXES:
        try:
            dims = len(read_info(scan).spatial_shape)
        except InputFileError:
            return  # the scan's own run names its problem
        if dims == 3:
            raise InputFileError(
                output,
                f"a {suffix} picture cannot hold the 3D label map of {scan}; name "
                "it .nii.gz",
            )


def load_segmenter(plan: SegmentationPlan):
    """The plan's models loaded: a :class:`~medseg.inference.segmenter.Segmenter`,
    or an :class:`~medseg.inference.ensemble.Ensemble` of several."""
    from medseg.inference.ensemble import Ensemble
    from medseg.inference.segmenter import Segmenter

    options = plan.options
    members = [
        Segmenter(
            bundle,
            overlap=options.overlap,
            batch_size=options.batch_size,
            mirror_axes=metadata.mirror_axes if options.tta else (),
            keep_largest=options.keep_largest,
            min_size_mm3=options.min_size_mm3,
            probabilities=options.probabilities,
            allow_modified=options.allow_modified,
            precision=options.precision,
            nonfinite=options.nonfinite,
            uncertainty=options.uncertainty,
            ood=options.ood,
        )
        for bundle, metadata in zip(
            plan.models.bundles, plan.models.metadatas, strict=True
        )
    ]
    if len(members) == 1:
        return members[0]
    return Ensemble(
        members,
        keep_largest=options.keep_largest,
        min_size_mm3=options.min_size_mm3,
        probabilities=options.probabilities,
        uncertainty=options.uncertainty,
    )


def _members(segmenter) -> list:
    return list(getattr(segmenter, "members", [segmenter]))


@dataclass
class SegmentationRun:
    """A planned run with its segmenter, ready for :func:`segment_all`."""

    plan: SegmentationPlan
    segmenter: object
    beside: job_outputs.Beside
    results: list = field(default_factory=list)

    def segment_all(
        self, progress: Callable | None = None, distribute: Callable | None = None
    ) -> list:
        """Segments this shard's cases (see
        :func:`medseg.inference.jobs.run.segment_all`, with ``distribute``);
        ``progress`` is called with each result."""
        plan = self.plan

        def each_result(result):
            self.results.append(result)  # kept for a report when stopped
            if progress:
                progress(result)

        return jobs.segment_all(
            self.segmenter.predict,
            plan.inputs,
            plan.output_dir,
            overwrite=plan.options.overwrite,
            progress=each_result,
            rename=plan.names,
            beside=self.beside,
            reader=plan.reader(),
            groups=plan.groups,
            distribute=distribute,
        )


def start_segmentation(plan: SegmentationPlan, segmenter) -> SegmentationRun:
    """The run of ``plan`` with ``segmenter``: its output names checked across every
    shard, and the folder's record of settings checked (or written) before any scan
    is read.

    Raises:
        InputFileError: two cases would write one file, or the folder holds label
            maps made with other settings (see
            :func:`~medseg.inference.jobs.settings.check_settings`).
    """
    from medseg.bundle import MODEL_FILE, sha256

    options, models = plan.options, plan.models
    members = _members(segmenter)
    beside = job_outputs.Beside(
        probabilities=options.probabilities,
        dicom_seg="+".join(b.name for b in models.bundles)
        if options.dicom_seg
        else None,
        preview=options.preview,
        seg_nrrd=options.seg_nrrd,
        masks=job_outputs.mask_names(segmenter.values, segmenter.names)
        if options.masks
        else (),
        uncertainty=job_outputs.UNCERTAINTY_MAPS[: 2 if segmenter.passes > 1 else 1]
        if options.uncertainty
        else (),
    )
    job_outputs.check_unique_outputs(plan.everything, plan.output_dir, plan.names)
    settings = {
        "model_sha256": models.each([sha256(b / MODEL_FILE) for b in models.bundles]),
        "preprocessing": models.each([m.preprocessing for m in models.metadatas]),
        "label_values": sorted(models.first.label_values),
        "patch_size": models.each([list(m.patch_size) for m in models.metadatas]),
        "tta": models.each([list(m.mirror_axes) for m in members]),
        "overlap": options.overlap,
        "keep_largest": options.keep_largest,
        "min_size_mm3": options.min_size_mm3,
        "precision": members[0].precision,
        "model": models.each([str(b) for b in models.bundles]),
        "medseg": __version__,
    }
    job_settings.check_folder(
        plan.inputs,
        plan.output_dir,
        settings,
        overwrite=options.overwrite,
        rename=plan.names,
        beside=beside,
    )
    return SegmentationRun(plan, segmenter, beside)


def shard_suffix(shard: tuple[int, int] | None) -> str:
    return f"-{shard[0]}-of-{shard[1]}" if shard else ""


@dataclass
class Summary:
    """What a finished (or stopped) run did: its report, and where it is."""

    report: dict
    report_path: Path
    sizes_path: Path | None
    left_to_others: int  # skipped: in hand by another living run
    failures: list[str]  # each failed case's error line

    @property
    def counts(self) -> dict:
        return self.report["counts"]


def finish_segmentation(
    run: SegmentationRun, results: list, stopped: str | None = None
) -> Summary:
    """Writes the volumes table and the run report of ``results`` (a re-run's
    skipped cases keep what the run that made them recorded). ``stopped``: the
    signal's name, when one ended the run before its end."""
    plan, members = run.plan, _members(run.segmenter)
    options = plan.options
    settings = {
        "precision": members[0].precision,
        "tta": plan.models.each([list(m.mirror_axes) for m in members]),
        "nonfinite": plan.models.each([m.preprocessor.nonfinite for m in members]),
    }
    table = plan.output_dir / (tables.SIZES_FILE + shard_suffix(options.shard) + ".csv")
    sizes = tables.write_sizes(
        results,
        table,
        run.segmenter.values,
        run.segmenter.names,
        plan.reader(),
        # a skipped case's rows from any table in the folder (a shard's), so that a
        # run over a sharded job's whole input measures no scan again
        [t for t in plan.output_dir.glob(tables.SIZES_PATTERN) if t != table],
    )
    if stopped is not None:
        settings["stopped_by"] = stopped
        settings["not_done"] = len(plan.inputs) - len(results)
    return write_report(
        results, plan.output_dir, options, settings, sizes, carry_earlier=True
    )


def write_report(
    results: list,
    output_dir: Path,
    options: PredictOptions,
    settings: dict | None = None,
    sizes: Path | None = None,
    *,
    carry_earlier: bool = False,
) -> Summary:
    """Writes the run report (``options.report``, else
    ``medseg_predict_report[-K-of-N].json`` in ``output_dir``)."""
    report_path = options.report or (
        output_dir / f"medseg_predict_report{shard_suffix(options.shard)}.json"
    )
    if carry_earlier:  # a re-run's skipped scans: what the first run found
        tables.carry_earlier_records(
            results, {*output_dir.glob(tables.REPORT_PATTERN), report_path}
        )
    report = tables.report(results)
    if settings:
        report["settings"] = settings
    atomic_write_text(report_path, json_text(report))
    elsewhere = sum(
        r.status == "skipped" and any(IN_HAND_ELSEWHERE in w for w in r.warnings)
        for r in results
    )
    failures = [r.error for r in results if r.status == "failed"]
    return Summary(report, report_path, sizes, elsewhere, failures)


def classification_items(
    models: Models, input_path: str, output: Path, options: PredictOptions
) -> tuple[list[tuple[str, Callable]], Path]:
    """The images a classifier run takes (image files, or a .npz split), each as
    ``(case, read)``, this shard's share, and the predictions CSV they go to
    (``output`` if it ends in .csv, else ``output/predictions.csv``; its folder is
    made)."""
    from medseg.datasets.layouts import load_npz_images
    from medseg.io.formats import read_volume
    from medseg.io.volume import split_suffix

    target = output if output.suffix == ".csv" else output / "predictions.csv"
    job_outputs.make_output_dir(target.parent)  # before any work
    if Path(input_path).suffix == ".npz":
        split = options.split
        images, _ = load_npz_images(Path(input_path), split, models.first.spatial_dims)
        indices = job_inputs.take_shard(list(range(len(images))), options.shard)
        return [(f"{split}_{i}", lambda i=i: images[i]) for i in indices], target
    files = job_inputs.take_shard(job_inputs.collect_inputs(input_path), options.shard)
    return [
        (split_suffix(p)[0], lambda p=p: read_volume(p).array) for p in files
    ], target


def classify(
    models: Models,
    items: list[tuple[str, Callable]],
    target: Path,
    options: PredictOptions,
    progress: Callable | None = None,
) -> Summary:
    """Classifies ``items`` with the bundles (several: their ensemble), writes the
    predictions CSV ``target`` (case, predicted class, one probability per class)
    and the run report."""
    from medseg.inference.classifier import Classifier, ClassifierEnsemble

    members = [
        Classifier(
            bundle, allow_modified=options.allow_modified, nonfinite=options.nonfinite
        )
        for bundle in models.bundles
    ]
    classifier = members[0] if len(members) == 1 else ClassifierEnsemble(members)
    results, scores = jobs.classify_all(classifier, items, progress=progress)
    for result in results:
        result.output = str(target)
    atomic_write_text(target, jobs.classification_csv(scores, classifier.names))
    return write_report(results, target.parent, options)
