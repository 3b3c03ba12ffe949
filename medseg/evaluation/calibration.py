"""How far predicted probabilities can be taken at their word: reliability counts,
the expected calibration error (ECE), and the softmax temperature that makes a
network's probabilities honest on cases it did not train on.

A voxel given probability 0.8 for a class should have that class 8 times in 10. The
probabilities fall into equal-width bins; in each, the mean probability is set
against how often the class was there. The ECE is the mean gap, each bin weighed
by its voxels (Guo et al. 2017). It is counted per class (the probability of each
class against its presence, as MONAI's ``CalibrationErrorMetric`` does) and for the
top class (the largest probability against the argmax being right).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

#: Equal-width probability bins of the reliability counts.
DEFAULT_BINS = 15
#: The temperatures searched (a network sure of everything, to one sure of nothing).
TEMPERATURE_RANGE = (0.05, 20.0)
#: Voxels the temperature is fitted on, at most (a random sample of each case's).
FIT_VOXELS = 4_000_000


@dataclass
class Reliability:
    """Voxel counts in equal-width probability bins, summed over cases.

    Row ``k < K`` counts the probabilities of class ``k`` against its presence; row
    ``K`` the top class's probability against the argmax being right.

    Attributes:
        count: ``(K + 1, bins)`` voxels per bin.
        confidence: the sum of their predicted probabilities.
        hits: how many of them had the class (were right).
    """

    classes: int
    bins: int = DEFAULT_BINS
    count: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)

    def __post_init__(self):
        shape = (self.classes + 1, self.bins)
        self.count = np.zeros(shape, np.int64)
        self.confidence = np.zeros(shape)
        self.hits = np.zeros(shape)

    @classmethod
    def of(
        cls, probabilities: np.ndarray, truth: np.ndarray, bins: int = DEFAULT_BINS
    ) -> Reliability:
        """The counts of one case: ``probabilities`` ``(*S, K)``, ``truth`` ``(*S)``
        class indices."""
        reliability = cls(probabilities.shape[-1], bins)
        reliability.add(probabilities, truth)
        return reliability

    def add(self, probabilities: np.ndarray, truth: np.ndarray) -> None:
        """Counts one more case (class by class, so a large scan is not copied
        whole)."""
        classes = probabilities.shape[-1]
        if classes != self.classes:
            raise ValueError(f"{classes} classes, not {self.classes}")
        truth = np.asarray(truth).reshape(-1)
        top = np.zeros(truth.shape, np.float32)
        predicted = np.zeros(truth.shape, np.int64)
        for k in range(classes):
            p = np.asarray(probabilities[..., k], np.float32).reshape(-1)
            self._count(k, p, truth == k)
            larger = p > top
            top[larger], predicted[larger] = p[larger], k
        self._count(classes, top, predicted == truth)

    def _count(self, row: int, p: np.ndarray, hit: np.ndarray) -> None:
        index = np.clip((p * self.bins).astype(np.int64), 0, self.bins - 1)
        self.count[row] += np.bincount(index, minlength=self.bins)
        self.confidence[row] += np.bincount(index, p, minlength=self.bins)
        self.hits[row] += np.bincount(index, hit, minlength=self.bins)

    def __iadd__(self, other: Reliability) -> Reliability:
        if (other.classes, other.bins) != (self.classes, self.bins):
            raise ValueError("reliability counts of other classes or bins")
        self.count += other.count
        self.confidence += other.confidence
        self.hits += other.hits
        return self

    @property
    def voxels(self) -> int:
        return int(self.count[-1].sum())

    def ece(self, row: int = -1) -> float:
        """The expected calibration error of a class (``row``), or of the top
        class (the default); NaN before any voxel."""
        total = self.count[row].sum()
        if not total:
            return math.nan
        return float(np.abs(self.hits[row] - self.confidence[row]).sum() / total)

    def classwise(self) -> list[float]:
        """The ECE of each class."""
        return [self.ece(k) for k in range(self.classes)]

    def curve(self, row: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The reliability diagram's points: mean probability, observed frequency and
        voxels of each non-empty bin."""
        filled = self.count[row] > 0
        n = self.count[row][filled]
        return self.confidence[row][filled] / n, self.hits[row][filled] / n, n

    def summary(self, names: Sequence[str]) -> dict:
        """The ECEs and the diagram's points as JSON holds them, classes by name."""

        def points(row):
            mean, frequency, n = self.curve(row)
            return {
                "mean_probability": [round(float(v), 6) for v in mean],
                "frequency": [round(float(v), 6) for v in frequency],
                "voxels": [int(v) for v in n],
            }

        return {
            "bins": self.bins,
            "voxels": self.voxels,
            "ece": _rounded(self.ece()),
            "ece_per_label": {
                name: _rounded(value)
                for name, value in zip(names, self.classwise(), strict=True)
            },
            "reliability": {
                "top class": points(-1),
                **{name: points(k) for k, name in enumerate(names)},
            },
        }


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The softmax over the last axis of ``logits / temperature``, in float32."""
    z = np.asarray(logits, np.float32) / np.float32(temperature)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def negative_log_likelihood(
    logits: np.ndarray, truth: np.ndarray, temperature: float = 1.0
) -> float:
    """The mean of ``-log softmax(logits / temperature)[truth]`` over voxels;
    ``logits`` ``(N, K)``, ``truth`` ``(N,)`` class indices."""
    from scipy.special import logsumexp

    z = np.asarray(logits, np.float64) / temperature
    chosen = np.take_along_axis(z, np.asarray(truth)[:, None], axis=1)[:, 0]
    return float(np.mean(logsumexp(z, axis=1) - chosen))


def fit_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature ``T`` minimising :func:`negative_log_likelihood` of
    ``softmax(logits / T)`` (Guo et al. 2017's temperature scaling): ``T > 1``
    softens an over-confident network, ``T < 1`` sharpens a timid one. The argmax,
    and so every label, stays the same.

    Args:
        logits: ``(N, K)``, the network's blended logits of held-out voxels.
        truth: ``(N,)`` their class indices.
    """
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, truth, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def sample_voxels(
    logits: np.ndarray, truth: np.ndarray, limit: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, K)`` logits and ``(N,)`` truth of a case's voxels: all of them, or a
    random ``limit`` of them."""
    flat = logits.reshape(-1, logits.shape[-1])
    truth = truth.reshape(-1)
    if len(truth) > limit:
        chosen = np.sort(rng.choice(len(truth), limit, replace=False))
        flat, truth = flat[chosen], truth[chosen]
    return np.asarray(flat, np.float32), np.asarray(truth, np.int64)


def probabilities_file(folder_or_file: Path, case: str) -> Path:
    """A case's probability file: ``folder/CASE_probabilities.npz`` (as ``medseg
    predict --probabilities`` writes it), ``folder/CASE.npz``, or the file given."""
    if not folder_or_file.is_dir():
        return folder_or_file
    for name in (f"{case}_probabilities.npz", f"{case}.npz"):
        if (folder_or_file / name).is_file():
            return folder_or_file / name
    raise InputFileError(
        folder_or_file / f"{case}_probabilities.npz",
        "no probability file for this case",
    )


def read_probabilities(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(probabilities (*S, K), label values (K,), label names)`` of a probability
    file written by ``medseg predict --probabilities``."""
    try:
        with np.load(path) as data:
            probabilities = data["probabilities"]
            values = data["label_values"]
            names = (
                [str(n) for n in data["label_names"]] if "label_names" in data else []
            )
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(path, f"not a medseg probability file ({exc})") from None
    if probabilities.ndim < 2 or probabilities.shape[-1] != len(values):
        raise InputFileError(
            path,
            f"probabilities of shape {probabilities.shape} for {len(values)} labels",
        )
    return probabilities, values, names or [str(v) for v in values]


def case_reliability(
    probability_path: Path, truth_path: Path, bins: int = DEFAULT_BINS
) -> tuple[Reliability, list[str]]:
    """The reliability counts of one case's probability file against its truth
    label map (same grid); the label names.

    Raises:
        InputFileError: unreadable files, other grids, or truth values the
            probabilities have no class for.
    """
    from medseg.io import read_volume

    probabilities, values, names = read_probabilities(probability_path)
    truth = np.asarray(read_volume(truth_path).array)
    if truth.ndim == probabilities.ndim and truth.shape[-1] == 1:
        truth = truth[..., 0]
    if truth.shape != probabilities.shape[:-1]:
        raise InputFileError(
            probability_path,
            f"probabilities on a grid of {probabilities.shape[:-1]}, the truth "
            f"{truth_path.name} on {truth.shape}",
        )
    index = np.full(truth.shape, -1, np.int64)
    for k, value in enumerate(values):
        index[truth == value] = k
    if (index < 0).any():
        unknown = sorted(set(np.unique(truth[index < 0]).tolist()))
        raise InputFileError(
            truth_path,
            f"label values {unknown} that the probabilities (of values "
            f"{[int(v) for v in values]}) have no class for",
        )
    return Reliability.of(probabilities, index, bins), names
