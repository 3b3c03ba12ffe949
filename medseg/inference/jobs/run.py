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

import glob
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import InputFileError
from medseg.inference.jobs.claims import (
    IN_HAND_ELSEWHERE,
    _after_a_dead_run,
    _found_done,
    _held_elsewhere,
    _in_hand_marker,
    _left_to_another_run,
    _Marks,
    _signals_held,
    _wait_for_mark,
)
from medseg.inference.jobs.inputs import _input_id
from medseg.inference.jobs.outputs import (
    EVERYTHING_BESIDE,
    Beside,
    _write,
    is_done,
    make_output_dir,
    masks_folder,
    output_for,
)
from medseg.inference.jobs.settings import check_folder
from medseg.inference.jobs.tables import DICE_ESTIMATE, CaseResult, label_sizes
from medseg.io.files import hidden_stem
from medseg.io.formats import (
    read_volume,
)

logger = logging.getLogger(__name__)


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
    distribute: Callable | None = None,
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
        distribute: segments the cases to do elsewhere (a cluster's workers: see
            :func:`medseg.inference.jobs.cluster.on_cluster`): called with them,
            ``[(input, label map)]``, it yields their results; ``None``: here.

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
    job = _Job(
        segment=segment,
        output_dir=output_dir,
        overwrite=overwrite,
        progress=progress,
        rename=rename,
        beside=beside,
        reader=reader,
        groups=groups,
        wait_for_others=wait_for_others,
    )
    todo = job.not_done(inputs)
    todo = job.without_those_held_elsewhere(todo)
    _remove_partial_files(todo)
    todo, suspects, refused = _after_a_dead_run(todo)
    for path, target in refused:  # a scan a run died on, alone: named, not tried
        result = CaseResult(str(path), str(target), "failed")
        result.error = (
            f"{path}: a run died while segmenting it alone (killed for memory, or a "
            "crash?); not tried again: delete "
            f"{_in_hand_marker(target)} to try it again"
        )
        job.record(result)
    if distribute is None:
        job.segment_each(todo, suspects)
    else:  # a cluster's workers: each task one case, alone
        order = {path: index for index, path in enumerate(inputs)}
        for result in distribute(todo):
            job.record(result)
        job.results.sort(key=lambda r: order.get(Path(r.input), len(order)))
    if job.busy:  # the other run's: when it lets them go, done by it, or dead on them
        for path in job.busy:
            _wait_for_mark(output_for(path, output_dir, rename))
        job.results += segment_all(
            segment,
            job.busy,
            output_dir,
            progress=progress,
            rename=rename,
            beside=beside,
            reader=reader,
            groups=groups,
            wait_for_others=False,
        )
    return job.results


def _remove_partial_files(todo: list[tuple[Path, Path]]) -> None:
    """Leftovers of a killed run beside the cases still to do (each shard cleans its
    own)."""
    for _, target in todo:
        for name in (target, *EVERYTHING_BESIDE.files(target)):
            stem = glob.escape(hidden_stem(name))
            for stale in name.parent.glob(f"{stem}.*.partial*"):
                stale.unlink(missing_ok=True)
        for stale in masks_folder(target).glob(".*.partial*"):
            stale.unlink(missing_ok=True)


@dataclass
class _Job:
    """One :func:`segment_all` run over its cases: what it was asked, and the results
    and the cases left to another living run so far."""

    segment: Callable
    output_dir: Path
    overwrite: bool
    progress: Callable[[CaseResult], None] | None
    rename: dict | None
    beside: Beside
    reader: Callable[[Path], object]
    groups: dict | None
    wait_for_others: bool
    results: list[CaseResult] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)  # waited for at the end

    def record(self, result: CaseResult) -> None:
        self.results.append(result)
        if self.progress:
            self.progress(result)

    def not_done(self, inputs: list[Path]) -> list[tuple[Path, Path]]:
        """``(input, label map)`` of the inputs still to segment; the others are
        recorded as skipped."""
        todo = []
        for path in inputs:
            target = output_for(path, self.output_dir, self.rename)
            if is_done(target, self.beside) and not self.overwrite:
                _in_hand_marker(target).unlink(missing_ok=True)  # done as it was killed
                self.record(_found_done(path, target, self.groups))
            else:
                todo.append((path, target))
        return todo

    def without_those_held_elsewhere(self, todo):
        """``todo`` less the cases another living run has in hand: waited for at the
        end, or left to it."""
        free = []
        for path, target in todo:
            holder = _held_elsewhere(target)
            if holder is None:
                free.append((path, target))
            elif self.wait_for_others:
                logger.warning(
                    "%s: %s (%s); waited for after the others",
                    path,
                    IN_HAND_ELSEWHERE,
                    holder,
                )
                self.busy.append(path)
            else:
                self.record(_left_to_another_run(path, target, holder))
        return free

    def load(self, path: Path):
        """``(volume, content id, error)`` of an input: the error of an unreadable
        one instead of raising it."""
        try:  # before reading: a file changed meanwhile is redone by a re-run
            content = _input_id(path, self.groups)
        except OSError:  # unreadable: the reader says why
            content = None
        try:
            return self.reader(path), content, None
        except InputFileError as exc:
            return None, None, exc
        except Exception as exc:  # a reader's bug must not end the batch
            return None, None, InputFileError(path, f"unreadable ({exc})")

    def segment_each(self, todo, suspects: set[Path]) -> None:
        """Segments ``todo`` in order, each marked in hand till it is recorded, the
        next one read while the current one is predicted (not beside a case a run
        died with: ``suspects`` are done alone)."""
        in_hand: set[Path] = set()  # marked (see _after_a_dead_run), till recorded
        marks = _Marks()
        theirs: set[Path] = set()  # taken by another run since planned

        def start(index: int):
            path, target = todo[index]
            if not marks.mark(target, alone=target in suspects):
                theirs.add(target)
            in_hand.add(target)
            return pool.submit(self.load, path)

        def done_with(target: Path) -> None:
            marks.unmark(target)
            in_hand.discard(target)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            try:
                for index, (path, target) in enumerate(todo):
                    started = time.perf_counter()
                    if pending is None:
                        pending = start(index)
                    loaded = pending.result()
                    pending = None
                    after = todo[index + 1][1] if index + 1 < len(todo) else None
                    if after is not None and not {target, after} & suspects:
                        pending = start(index + 1)  # read while this one is predicted
                    elif target not in suspects and in_hand == {target}:
                        marks.mark(target, alone=True)  # a death now is its doing
                    if target in theirs:  # another run took it since: its to do
                        in_hand.discard(target)
                        self.leave_to_another_run(path, target)
                        continue
                    if not self.overwrite and is_done(target, self.beside):
                        # written meanwhile by another run into the folder
                        self.record(_found_done(path, target, self.groups))
                        done_with(target)
                        continue
                    suspect = target in suspects
                    result, prediction = self.segment_one(path, target, loaded, suspect)
                    with _signals_held():  # a label map written is a result recorded
                        if result.status == "done":
                            self.write(result, prediction, path, target, loaded)
                        result.seconds = round(time.perf_counter() - started, 3)
                        self.record(result)
                        done_with(target)
            finally:  # stopped (Ctrl-C, SIGTERM) or an error: not the scans' doing
                for target in in_hand:
                    marks.unmark(target)

    def leave_to_another_run(self, path: Path, target: Path) -> None:
        if self.wait_for_others:  # at the end
            self.busy.append(path)
            return
        holder = _held_elsewhere(target) or "a run"
        self.record(_left_to_another_run(path, target, holder))

    def segment_one(self, path, target, loaded, suspect: bool):
        """``(result, prediction)`` of one loaded case; a failure fails that case
        only (its prediction ``None``)."""
        volume, _, error = loaded
        result, prediction = CaseResult(str(path), str(target), "done"), None
        if suspect:
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
            prediction = self.segment(volume)
            result.nonfinite_replaced = getattr(prediction, "nonfinite_replaced", 0)
            result.warnings += getattr(prediction, "notes", ())
            verdict = getattr(prediction, "ood", None)
            result.ood = verdict.scores() if verdict is not None else None
        except Exception as exc:  # even a bug met on one scan: that scan only
            _fail(result, path, exc)
        return result, prediction

    def write(self, result: CaseResult, prediction, path, target, loaded) -> None:
        """Writes a segmented case's files, measuring its labels first."""
        volume, content, _ = loaded
        try:
            if getattr(prediction, "values", ()):
                labels = prediction.labels
                result.sizes = label_sizes(
                    labels.array,
                    labels.spacing,
                    prediction.values,
                    prediction.names,
                    volume.array,
                    getattr(prediction, "entropy", None),
                )
                estimates = getattr(prediction, "dice_estimate", None) or {}
                for size in result.sizes.values():
                    size.update(result.ood or {})
                    if size["label"] in estimates:
                        size[DICE_ESTIMATE] = round(estimates[size["label"]], 4)
            _write(prediction, target, content, self.beside, path, volume, result.sizes)
        except Exception as exc:  # a full disk, say: that scan only
            _fail(result, path, exc)


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
    if isinstance(exc, MemoryError) or "array is too big" in str(exc):
        return (
            f"{case}: not enough memory to segment it ({exc}); 'medseg info SCAN "
            "--model BUNDLE' estimates what it needs"
        )
    if isinstance(exc, (ValueError, OSError)):
        return f"{case}: {exc}"
    return (
        f"{case}: unexpected error ({type(exc).__name__}: {exc}; --debug shows where)"
    )


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
