"""Does a scan look like the scans a bundle was trained on?

Training leaves in the bundle (``medseg.json``, ``ood``) two profiles of its
training scans, each a cloud of one point per scan:

* intensity: percentiles of each channel of the preprocessed (normalised) scan, so
  the shape of its intensity distribution after normalisation;
* features: the network's bottleneck features, averaged over the scan (over every
  window the sliding window runs and every voxel of the bottleneck).

A new scan's point is measured against each cloud as a Mahalanobis distance in the
leading principal components plus the rest (:class:`Profile`). Its threshold is the
largest distance any training scan had from a profile fitted without it (5 folds of
the training scans), so a scan past it is further from the training scans than any
of them was from the others. The distances are reported divided by their threshold:
above 1 is flagged.

Bundles without these records get a check of the raw intensities of channels
normalised in absolute units (CT): a scan with no voxel in the range its training
scans' foreground had (an MRI given to a CT model) is flagged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: The percentiles of each normalised channel in the intensity profile.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: Voxels a channel's percentiles are taken from, at most (a regular subsample).
PERCENTILE_VOXELS = 1 << 21
#: Folds of the training scans the thresholds are set from.
FOLDS = 5
#: Training scans a profile is made of, at most (an even subsample of them).
MAX_PROFILE_SCANS = 200
#: Principal components a profile keeps, at most.
MAX_COMPONENTS = 16
#: The variance (in standardised units) below which a direction is not measured
#: on its own: features that barely vary in training do not make a scan strange.
VARIANCE_FLOOR = 1e-2
#: What ``--ood`` does with a flagged scan.
OOD_ACTIONS = ("warn", "error", "off")

INTENSITY_NOTE = "intensity range unlike training"
FEATURE_NOTE = "features unlike any training scan"


def intensity_point(image: np.ndarray) -> np.ndarray:
    """The intensity profile's point of a preprocessed image ``(*S, C)``: the
    :data:`PERCENTILES` of each channel, channel after channel."""
    image = np.asarray(image)
    step = max(1, math.ceil((image[..., 0].size / PERCENTILE_VOXELS) ** (1 / 3)))
    spatial = image.ndim - 1
    sample = image[(slice(None, None, step),) * spatial]
    points = []
    for c in range(image.shape[-1]):
        values = sample[..., c].reshape(-1).astype(np.float64)
        values = values[np.isfinite(values)]
        points.append(
            np.percentile(values, PERCENTILES)
            if values.size
            else np.zeros(len(PERCENTILES))
        )
    return np.concatenate(points)


@dataclass(frozen=True)
class Profile:
    """A cloud of training points and how far a new point lies from it.

    Each coordinate is standardised by the training mean and standard deviation;
    the distance is the root mean square over coordinates of the standardised point
    whitened along the cloud's leading principal components (each divided by its
    standard deviation there) and, in the remaining directions, divided by their
    mean standard deviation: a Mahalanobis distance that a few dozen points can
    estimate in hundreds of dimensions (probabilistic PCA).

    Attributes:
        threshold: the largest distance of a training point from the profile fitted
            without its fold; NaN when not set.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (k, d), orthonormal rows
    variances: np.ndarray  # (k,)
    residual: float  # variance per remaining direction
    threshold: float = math.nan

    @classmethod
    def fit(cls, points: np.ndarray) -> Profile:
        """The profile of ``points`` ``(n, d)`` (no threshold)."""
        points = np.asarray(points, np.float64)
        n, d = points.shape
        mean = points.mean(0)
        scale = points.std(0)
        scale = np.where(scale > 1e-8 * (np.abs(mean) + 1), scale, 1.0)
        z = (points - mean) / scale
        _, singular, rows = np.linalg.svd(z, full_matrices=False)
        variances = singular**2 / max(n - 1, 1)
        k = int(min(MAX_COMPONENTS, max(1, n // 5), d, len(variances)))
        kept = np.maximum(variances[:k], VARIANCE_FLOOR)
        rest = d - k
        residual = (
            max(float(variances[k:].sum()) / rest, VARIANCE_FLOOR) if rest else 1.0
        )
        return cls(mean, scale, rows[:k], kept, residual)

    def distance(self, point: np.ndarray) -> float:
        z = (np.asarray(point, np.float64) - self.mean) / self.scale
        along = self.components @ z
        rest = z - self.components.T @ along
        total = float(np.sum(along**2 / self.variances) + rest @ rest / self.residual)
        return math.sqrt(total / len(z))

    def relative(self, point: np.ndarray) -> float:
        """The distance in units of the threshold (above 1: flagged)."""
        return self.distance(point) / self.threshold

    def to_record(self) -> dict:
        def listed(a):
            return [float(f"{v:.6g}") for v in np.asarray(a).reshape(-1)]

        return {
            "mean": listed(self.mean),
            "scale": listed(self.scale),
            "components": [listed(row) for row in self.components],
            "variances": listed(self.variances),
            "residual": float(f"{self.residual:.6g}"),
            "threshold": float(f"{self.threshold:.6g}"),
        }

    @classmethod
    def from_record(cls, record: dict) -> Profile:
        """The profile a bundle records.

        Raises:
            ValueError: a record of the wrong shape or with values that are not
                positive where they must be.
        """
        mean = np.asarray(record["mean"], np.float64)
        scale = np.asarray(record["scale"], np.float64)
        components = np.asarray(record["components"], np.float64).reshape(-1, len(mean))
        variances = np.asarray(record["variances"], np.float64)
        residual, threshold = float(record["residual"]), float(record["threshold"])
        if (
            mean.ndim != 1
            or scale.shape != mean.shape
            or len(variances) != len(components)
            or not np.all(np.isfinite(mean))
            or not np.all(scale > 0)
            or not np.all(variances > 0)
            or not residual > 0
            or not threshold > 0
        ):
            raise ValueError("an out-of-distribution profile of the wrong shape")
        return cls(mean, scale, components, variances, residual, threshold)


def held_out_profile(points: np.ndarray, folds: int = FOLDS, seed: int = 0) -> Profile:
    """The profile of all ``points`` with its threshold: the largest distance of a
    point from the profile of the other folds' points."""
    points = np.asarray(points, np.float64)
    order = np.random.default_rng(seed).permutation(len(points))
    parts = [
        part for part in np.array_split(order, min(folds, len(points))) if len(part)
    ]
    largest = 0.0
    for part in parts:
        rest = np.setdiff1d(order, part)
        if len(rest) < 2:
            continue
        profile = Profile.fit(points[rest])
        largest = max(largest, *(profile.distance(points[i]) for i in part))
    whole = Profile.fit(points)
    return Profile(
        whole.mean,
        whole.scale,
        whole.components,
        whole.variances,
        whole.residual,
        largest if largest > 0 else math.inf,
    )


def bottleneck_layer(model) -> str | None:
    """The name of the layer whose output is a U-Net's bottleneck (the last of its
    ``bottleneck`` block); ``None`` for a network without one."""
    names = [
        layer.name for layer in model.layers if layer.name.startswith("bottleneck")
    ]
    return names[-1] if names else None


def profile_record(
    intensity_points: Sequence[np.ndarray],
    feature_points: Sequence[np.ndarray] | None,
    layer: str | None,
    seed: int = 0,
) -> dict:
    """The ``ood`` record of a bundle from its training scans' points."""
    record = {
        "scans": len(intensity_points),
        "percentiles": list(PERCENTILES),
        "intensity": held_out_profile(
            np.stack(intensity_points), seed=seed
        ).to_record(),
    }
    if feature_points is not None and layer is not None:
        features = held_out_profile(np.stack(feature_points), seed=seed)
        record["features"] = {"layer": layer, **features.to_record()}
    return record


@dataclass(frozen=True)
class Verdict:
    """How a scan compares with the training scans: each distance over its
    threshold (``None`` where the bundle records no such profile), and the notes of
    what is off."""

    intensity: float | None
    features: float | None
    notes: tuple[str, ...]

    def scores(self) -> dict:
        """The volumes table's columns."""
        return {
            "ood_intensity": _rounded(self.intensity),
            "ood_features": _rounded(self.features),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


class ScanCheck:
    """A bundle's out-of-distribution check (see the module)."""

    def __init__(self, metadata):
        record = metadata.get("ood") or {}
        self.intensity = self.features = None
        self.layer = None
        try:
            if "intensity" in record:
                self.intensity = Profile.from_record(record["intensity"])
            if "features" in record:
                self.features = Profile.from_record(record["features"])
                self.layer = str(record["features"]["layer"])
        except (KeyError, TypeError, ValueError) as exc:
            from medseg.errors import InputFileError

            raise InputFileError(metadata.source, f"ood: {exc}") from None
        self.raw_ranges = _raw_ranges(metadata)

    def verdict(self, name, scan: np.ndarray, image: np.ndarray, features) -> Verdict:
        """The :class:`Verdict` on a scan named ``name``: its raw array ``scan``
        ``(*S, C)``, preprocessed ``image`` and pooled ``features`` (or ``None``)."""
        notes = []
        intensity = feature = None
        if self.intensity is not None:
            intensity = self.intensity.relative(intensity_point(image))
            if intensity > 1:
                notes.append(
                    f"{name}: {INTENSITY_NOTE} (distance {intensity:.1f} times the "
                    "largest a training scan had); check its labels"
                )
        for channel, (low, high) in self.raw_ranges.items():
            values = np.asarray(scan[..., channel], np.float64)
            lowest, highest = np.nanpercentile(values, (0.5, 99.5))
            if highest < low or lowest > high:
                notes.append(
                    f"{name}: {INTENSITY_NOTE} (channel {channel}: values "
                    f"{lowest:.4g} to {highest:.4g}, none within the training scans' "
                    f"foreground {low:.4g} to {high:.4g}); check its labels"
                )
        if self.features is not None and features is not None:
            feature = self.features.relative(features)
            if feature > 1:
                notes.append(
                    f"{name}: {FEATURE_NOTE} (distance {feature:.1f} times the "
                    "largest a training scan had); check its labels"
                )
        return Verdict(intensity, feature, tuple(notes))


def _raw_ranges(metadata) -> dict[int, tuple[float, float]]:
    """Per channel normalised in absolute units (CT), the 0.5 to 99.5 percentile
    range of the training scans' foreground from the dataset fingerprint."""
    ranges = {}
    normalizers = (metadata.get("preprocessing") or {}).get("normalizers") or []
    stats = (metadata.get("fingerprint") or {}).get("foreground_intensity") or []
    for channel, (normalizer, stat) in enumerate(zip(normalizers, stats, strict=False)):
        try:
            if normalizer.get("scheme") in ("ct", "window"):
                ranges[channel] = (
                    float(stat["percentile_0.5"]),
                    float(stat["percentile_99.5"]),
                )
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return ranges


def combined(volume, checked: Sequence[tuple]) -> Verdict:
    """One verdict on ``volume`` from each model's ``(segmenter, verdict)`` (an
    ensemble's members; ``None`` verdicts were not checked): the largest scores and
    every note, logged.

    Raises:
        InputFileError: a flagged scan that a model with ``ood="error"`` refuses.
    """
    from medseg.errors import InputFileError

    verdicts = [(segmenter, v) for segmenter, v in checked if v is not None]
    notes: list[str] = []
    for _, verdict in verdicts:
        notes += [note for note in verdict.notes if note not in notes]
    if notes and any(segmenter.ood == "error" for segmenter, _ in verdicts):
        what = "; ".join(note.split(": ", 1)[-1].removesuffix("; check its labels")
                         for note in notes)  # fmt: skip
        raise InputFileError(
            volume.path or "input", f"{what}; refused (--ood warn segments it anyway)"
        )
    for note in notes:
        logger.warning("%s", note)

    def largest(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    return Verdict(
        largest(v.intensity for _, v in verdicts),
        largest(v.features for _, v in verdicts),
        tuple(notes),
    )
