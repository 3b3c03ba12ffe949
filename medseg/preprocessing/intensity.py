"""Intensity normalisation per channel, and the policy for non-finite voxels.

Four schemes, chosen per channel in config (``{"scheme": "zscore", ...}``) and recorded
with their statistics by ``to_dict`` so that prediction reproduces training exactly:

* ``zscore``: per case, ``(x - mean) / std``; with ``nonzero_mask`` the statistics come
  from the non-zero voxels and the rest are set to 0 (nnU-Net, for skull-stripped MRI).
* ``ct``: clip to dataset-wide foreground percentiles (0.5, 99.5), then z-score with the
  dataset foreground mean and std (nnU-Net's CT scheme). Fitted with
  :meth:`CTNormalization.fit`.
* ``window``: clip to a fixed window (e.g. HU -1000..1000) and map it linearly to [0,
  1].
* ``percentile``: per case, clip to the given percentiles and map them to [0, 1].

All return float32. A zero (or near-zero) standard deviation or range is treated as 1,
so a constant image normalises to zeros rather than NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

_EPS = 1e-8


def _safe_scale(value: float) -> float:
    return float(value) if abs(value) > _EPS else 1.0


@dataclass(frozen=True)
class ZScoreNormalization:
    """Per-case z-score. Args: nonzero_mask: statistics and output inside ``x != 0``
    only."""

    nonzero_mask: bool = False
    scheme = "zscore"

    def __call__(self, channel: np.ndarray) -> np.ndarray:
        # statistics summed in float64: a float32 sum of squares overflows from
        # values of about 1e19 on, and the whole scan would become NaN
        channel = np.asarray(channel)
        if not self.nonzero_mask:
            mean, std = _moments(channel)
            return _scaled(channel, mean, std)
        mask = channel != 0
        out = np.zeros(channel.shape, np.float32)
        if mask.any():
            values = channel[mask]
            out[mask] = _scaled(values, *_moments(values))
        return out


def _moments(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))


def _scaled(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    if values.dtype == np.float64 or abs(mean) > 1e30:
        centred = np.asarray(values, np.float64) - mean
        return (centred / _safe_scale(std)).astype(np.float32)
    return (np.asarray(values, np.float32) - np.float32(mean)) / np.float32(
        _safe_scale(std)
    )


@dataclass(frozen=True)
class CTNormalization:
    """Dataset-wide CT scheme: clip to ``[lower, upper]``, then ``(x - mean) / std``."""

    lower: float
    upper: float
    mean: float
    std: float
    scheme = "ct"

    def __post_init__(self):
        if not self.lower <= self.upper:
            raise ValueError(
                f"ct: lower {self.lower} must not exceed upper {self.upper}"
            )

    @classmethod
    def fit(cls, foreground_values: np.ndarray) -> CTNormalization:
        """Statistics from foreground intensities pooled over the training cases."""
        values = np.asarray(foreground_values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError("ct normalisation needs foreground intensities, got none")
        lower, upper = np.percentile(values, [0.5, 99.5])
        return cls(
            float(lower), float(upper), float(values.mean()), float(values.std())
        )

    def __call__(self, channel: np.ndarray) -> np.ndarray:
        channel = np.clip(np.asarray(channel, dtype=np.float32), self.lower, self.upper)
        return (channel - np.float32(self.mean)) / np.float32(_safe_scale(self.std))


@dataclass(frozen=True)
class WindowNormalization:
    """Fixed window: clip to ``[lower, upper]`` and map linearly to [0, 1]."""

    lower: float = -1000.0
    upper: float = 1000.0
    scheme = "window"

    def __post_init__(self):
        if not self.lower < self.upper:
            raise ValueError(
                f"window: lower {self.lower} must be below upper {self.upper}"
            )

    def __call__(self, channel: np.ndarray) -> np.ndarray:
        channel = np.clip(np.asarray(channel, dtype=np.float32), self.lower, self.upper)
        return (channel - np.float32(self.lower)) / np.float32(self.upper - self.lower)


@dataclass(frozen=True)
class PercentileNormalization:
    """Per case: clip to the ``lower``/``upper`` percentiles and map them to [0, 1]."""

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    scheme = "percentile"

    def __post_init__(self):
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError(
                "percentile: need 0 <= lower_percentile < upper_percentile <= 100, got "
                f"{self.lower_percentile}, {self.upper_percentile}"
            )

    def __call__(self, channel: np.ndarray) -> np.ndarray:
        channel = np.asarray(channel, dtype=np.float32)
        low, high = np.percentile(
            channel, [self.lower_percentile, self.upper_percentile]
        ).astype(np.float32)
        clipped = np.clip(channel, low, high)
        return (clipped - np.float32(low)) / np.float32(_safe_scale(high - low))


Normalizer = (
    ZScoreNormalization
    | CTNormalization
    | WindowNormalization
    | PercentileNormalization
)


NORMALIZERS = {
    cls.scheme: cls
    for cls in (
        ZScoreNormalization,
        CTNormalization,
        WindowNormalization,
        PercentileNormalization,
    )
}


def normalizer_to_dict(normalizer: Normalizer) -> dict:
    """``{"scheme": ..., **parameters and statistics}``, JSON-ready."""
    return {"scheme": normalizer.scheme, **asdict(normalizer)}


def normalizer_from_dict(config: dict) -> Normalizer:
    """Builds a normaliser from config; unknown schemes or keys raise ``ValueError``."""
    config = dict(config)
    scheme = config.pop("scheme", None)
    if scheme not in NORMALIZERS:
        raise ValueError(
            f"unknown normalisation scheme {scheme!r}; "
            f"expected one of {sorted(NORMALIZERS)}"
        )
    cls = NORMALIZERS[scheme]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"{scheme}: unknown key(s) {unknown}; allowed: {allowed}")
    if cls is CTNormalization and set(config) != set(allowed):
        raise ValueError(
            f"ct normalisation needs fitted statistics {allowed}; fit it on the "
            "dataset "
            "fingerprint (CTNormalization.fit) before use"
        )
    return cls(**config)


def normalize(array: np.ndarray, normalizers: Sequence[Normalizer]) -> np.ndarray:
    """Normalises each channel of a channels-last array with its own scheme.

    Returns:
        float32 array of the same shape.
    """
    if len(normalizers) != array.shape[-1]:
        raise ValueError(
            f"{len(normalizers)} normaliser(s) for {array.shape[-1]} channel(s)"
        )
    out = np.empty(array.shape, dtype=np.float32)
    for c, normalizer in enumerate(normalizers):
        out[..., c] = normalizer(array[..., c])
    return out


NONFINITE_POLICIES = ("error", "replace")


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN or +-Inf values (0 for integer arrays)."""
    if np.asarray(array).dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def replace_nonfinite(array: np.ndarray, fill: float | None = None) -> np.ndarray:
    """Replaces NaN/Inf per channel with ``fill``, or with the channel's finite minimum.

    The minimum is the usual meaning of voxels outside a resampled field of view (air in
    CT, background in MRI). Returns the input itself when nothing is non-finite.
    """
    if count_nonfinite(array) == 0:
        return array
    out = np.array(
        array, dtype=np.float32 if array.dtype.itemsize <= 4 else array.dtype
    )
    for c in range(out.shape[-1]):
        channel = out[..., c]
        bad = ~np.isfinite(channel)
        if fill is not None:
            value = fill
        else:
            finite = channel[~bad]
            value = float(finite.min()) if finite.size else 0.0
        channel[bad] = value
    return out


def handle_nonfinite(
    array: np.ndarray,
    path: str | Path,
    policy: str = "error",
    fill: float | None = None,
) -> np.ndarray:
    """Applies the non-finite policy training and prediction share.

    Args:
        policy: ``"error"`` refuses the scan (the default); ``"replace"`` fills the
            voxels with :func:`replace_nonfinite`.

    Raises:
        InputFileError: the scan has NaN/Inf voxels and the policy is ``"error"``.
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite policy must be one of {NONFINITE_POLICIES}, got {policy!r}"
        )
    bad = count_nonfinite(array)
    if bad == 0:
        return array
    if policy == "error":
        raise InputFileError(
            path,
            f"{bad:,} NaN/Inf voxels; refused (medseg predict --nonfinite replace, "
            "or data.nonfinite: replace in a training config, fills them with the "
            "channel minimum)",
        )
    return replace_nonfinite(array, fill)


#: the largest magnitude the network's float32 input holds
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(array: np.ndarray, path: str | Path) -> None:
    """Refuses a scan with finite values beyond float32's range: the network computes
    in float32, and such a voxel would become Inf there.

    Raises:
        InputFileError: naming the largest magnitude.
    """
    array = np.asarray(array)
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4 or array.size == 0:
        return
    largest = float(np.max(np.abs(array)))
    if largest > FLOAT32_MAX:
        raise InputFileError(
            path,
            f"values up to {largest:.3g} do not fit float32 (at most "
            f"{FLOAT32_MAX:.3g}), in which the network computes; rescale the scan",
        )


def check_normalised(
    array: np.ndarray, path: str | Path, normalizers: Sequence[Normalizer] = ()
) -> None:
    """Refuses a normalised scan the network would label as background without a
    word: one not finite everywhere, or a z-scored channel that one voxel flattens
    (a z-score's squares sum to the voxel count, so a voxel whose square exceeds a
    quarter of it holds more of the variance than all the anatomy: an outlier such
    as 1e20 in a scan of hundreds, which leaves every other voxel at about 0).

    Raises:
        InputFileError: what is wrong.
    """
    bad = count_nonfinite(array)
    if bad:
        raise InputFileError(
            path,
            f"{bad:,} voxels are not finite after intensity normalisation (values "
            "too large for float32?); refused rather than segmented",
        )
    for c, normalizer in enumerate(normalizers):
        if not isinstance(normalizer, ZScoreNormalization):
            continue
        channel = array[..., c]
        if channel.size < 64:
            continue
        largest = float(np.max(np.abs(channel)))
        if largest**2 > channel.size / 4:
            raise InputFileError(
                path,
                f"channel {c}: a few extreme voxels hold most of its intensity "
                f"variance (one lies {largest:.0f} standard deviations from the "
                "mean), so the z-scored scan is flat everywhere else and would be "
                "segmented as background; refused (remove the outlier voxels)",
            )


def blank_note(volume) -> str | None:
    """A warning when a channel of the scan holds one value in every (finite) voxel: a
    blank export, or a file written before its data was; a network labels it
    anyway (as all background, or not), and a blank scan's label map says nothing of
    the patient (one blank channel of several: the labels stand on the others).
    ``None`` otherwise."""
    array = np.asarray(volume.array)
    blank = []
    for c in range(array.shape[-1]):
        with warnings.catch_warnings():  # all NaN: nan, and a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanmin(array[..., c]), np.nanmax(array[..., c])
        if low == high:  # (NaN is never equal)
            blank.append((c, low))
    if not blank:
        return None
    which = (
        f"every voxel is {blank[0][1]:g}"
        if array.shape[-1] == 1
        else "; ".join(f"every voxel of channel {c} is {v:g}" for c, v in blank)
    )
    what = (
        "a blank scan: its labels mean nothing"
        if len(blank) == array.shape[-1]
        else "a blank channel: check its file"
    )
    return f"{volume.path or 'input'}: {which}, {what}"
