"""Several segmentation bundles as one: their probabilities averaged on each scan's
grid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from medseg.errors import InputFileError
from medseg.inference.ood import combined
from medseg.inference.postprocessing import checked_min_size
from medseg.inference.scan_plan import WindowCount, _scan_notes
from medseg.inference.segmenter import Prediction, Segmenter, _on_scan_grid
from medseg.io.volume import Volume

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from medseg.bundle import BundleMetadata


def ensemble_problem(
    bundles: Sequence, metadatas: Sequence[BundleMetadata]
) -> tuple | None:
    """Why bundles (with their ``medseg.json``) cannot be one ensemble, as ``(bundle,
    problem)``, or ``None``: each must segment (or each classify), with the same
    labels (values and names, in order), the same input channels and scans of the
    same dimensions as the first. Read before any model is loaded."""

    def task(metadata):
        labels = [(label.value, label.name) for label in metadata.labels]
        return labels, metadata.in_channels, len(metadata.window)

    def named(labels):
        return ", ".join(f"{value} {name}" for value, name in labels)

    kind = metadatas[0].task
    for bundle, metadata in zip(bundles, metadatas, strict=True):
        if metadata.task not in ("segmentation", "classification"):
            return bundle, (
                f"a {metadata.task} bundle; an ensemble of models takes "
                "segmentation or classification bundles"
            )
        if metadata.task != kind:
            return bundle, (
                f"a {metadata.task} bundle, but the first model "
                f"({bundles[0]}) is a {kind} bundle; an ensemble's models must do one "
                "task"
            )
    first = task(metadatas[0])
    for bundle, metadata in zip(bundles[1:], metadatas[1:], strict=True):
        labels, channels, dims = task(metadata)
        if labels != first[0]:
            return bundle, (
                f"labels {named(labels)}, but the first model ({bundles[0]}) has "
                f"{named(first[0])}; an ensemble's models must segment alike"
            )
        if (channels, dims) != first[1:]:
            return bundle, (
                f"segments {dims}D scans with {channels} channel(s), but the first "
                f"model ({bundles[0]}) {first[2]}D scans with {first[1]} channel(s)"
            )
    return None


class Ensemble:
    """Segmentation bundles of one task as one model: each scan is segmented by the
    mean of their class probabilities (nnU-Net's ensemble of cross-validation folds).

    Members that preprocess alike (the same :class:`~medseg.preprocessing.Preprocessor`,
    as folds of one dataset with per-scan normalisation) share one preprocessed scan
    and average there, before one way back to the scan's grid; the others' means are
    taken on the scan's grid (linear interpolation, one class at a time). Each member
    keeps its own patch, overlap, mirroring, batch size and precision; post-processing
    and probabilities are the ensemble's (the members' own are not used).

    Args:
        members: :class:`Segmenter` of each bundle.
        keep_largest, min_size_mm3, probabilities, uncertainty: as
            :class:`Segmenter`'s, applied to the mean (``uncertainty`` needs
            members made with it; each member's passes count as passes).

    Raises:
        InputFileError: the bundles cannot be one ensemble (:func:`ensemble_problem`),
            naming the bundle that differs from the first.
    """

    def __init__(
        self,
        members: Sequence[Segmenter],
        *,
        keep_largest: bool = False,
        min_size_mm3: float = 0.0,
        probabilities: bool = False,
        uncertainty: bool = False,
    ):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        problem = ensemble_problem(
            [m.bundle for m in members], [m.metadata for m in members]
        )
        if problem:
            raise InputFileError(*problem)
        self.members = tuple(members)
        self.values, self.names = members[0].values, members[0].names
        self.keep_largest = keep_largest
        self.min_size_mm3 = checked_min_size(min_size_mm3)
        self.want_probabilities = probabilities
        if any(m.want_uncertainty != uncertainty for m in members):
            raise ValueError("uncertainty needs members made with uncertainty=True")
        self.want_uncertainty = uncertainty
        self.passes = sum(m.passes for m in members)
        #: as :attr:`Segmenter.on_windows`, the windows of all members counted
        self.on_windows: Callable[[str, int, int], None] | None = None
        self._groups: list[tuple] = []  # (preprocessor, members)
        for member in self.members:
            for preprocessor, alike in self._groups:
                if preprocessor == member.preprocessor:
                    alike.append(member)
                    break
            else:
                self._groups.append((member.preprocessor, [member]))

    def predict(self, volume: Volume) -> Prediction:
        """Labels (and probabilities) of the mean, on ``volume``'s own grid."""
        volume = self.members[0].check(volume)
        notes = _scan_notes(volume, self.members)
        parts, verdicts = [], []
        windows = WindowCount(self.on_windows, volume, len(self.members))
        for preprocessor, alike in self._groups:
            image, records = preprocessor.image(volume)
            mean = None
            for member in alike:
                scores = member.probabilities(image, windows.member())
                verdicts.append((member, member.verdict(volume, image)))
                if mean is None:
                    mean = scores
                else:
                    mean += scores
            del image
            mean /= len(alike)
            parts.append((mean, records, len(alike) / len(self.members)))
        verdict = combined(volume, verdicts)
        prediction = _on_scan_grid(volume, parts, self, notes)
        checked = any(v is not None for _, v in verdicts)
        return replace(
            prediction,
            notes=prediction.notes + verdict.notes,
            ood=verdict if checked else None,
        )

    def segment(self, volume: Volume) -> Volume:
        """Label map (declared label values) on ``volume``'s own grid and header."""
        return self.predict(volume).labels
