"""The preprocessing a bundle records, applied to a scan and undone on its result: non-
finite voxels, orientation, crop, resampling and intensity normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medseg.errors import InputFileError
from medseg.preprocessing.intensity import (
    NONFINITE_POLICIES,
    check_float32_range,
    check_normalised,
    handle_nonfinite,
    normalize,
    normalizer_from_dict,
    normalizer_to_dict,
)


@dataclass(frozen=True)
class Preprocessor:
    """Everything done to a scan before the network sees it, reproducible from JSON.

    Order: refuse or replace NaN/Inf, reorient to RAS, crop to the non-zero region,
    resample to ``target_spacing_mm`` (cubic spline for images, per-class linear for
    labels, nnU-Net's handling of anisotropic scans), normalise each channel.

    Attributes:
        normalizers: one per channel.
        target_spacing_mm: ``None`` keeps each scan's own spacing.
        crop_nonzero: crop to the bounding box of non-zero voxels.
        nonfinite: ``"error"`` or ``"replace"`` (see :func:`handle_nonfinite`).
    """

    normalizers: tuple
    target_spacing_mm: tuple[float, ...] | None = None
    crop_nonzero: bool = True
    nonfinite: str = "error"

    def __post_init__(self):
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}"
            )
        object.__setattr__(self, "normalizers", tuple(self.normalizers))
        if self.target_spacing_mm is not None:
            object.__setattr__(
                self,
                "target_spacing_mm",
                tuple(float(s) for s in self.target_spacing_mm),
            )

    def _placed(self, volume):
        """``volume`` with NaN/Inf handled, reoriented and cropped, and the records of
        those steps: what :meth:`image` and :meth:`grid` start from."""
        from medseg.preprocessing import geometry

        path = volume.path or "image"
        array = handle_nonfinite(np.asarray(volume.array), path, self.nonfinite)
        check_float32_range(array, path)
        volume, record = geometry.reorient_to_canonical(volume.with_array(array))
        records = [record]
        if self.crop_nonzero:
            volume, record = geometry.crop_to_nonzero(volume)
            records.append(record)
        return volume, records

    def image(self, volume):
        """Returns ``(float32 array (*S', C), geometry records)`` for a scan volume."""
        volume, records = self.on_grid(volume)
        image = normalize(np.asarray(volume.array), self.normalizers)
        check_normalised(image, volume.path or "image", self.normalizers)
        return image, records

    def on_grid(self, volume):
        """``(volume, geometry records)``: the scan on the grid the network sees
        (NaN/Inf handled, reoriented, cropped and resampled), not yet normalised:
        what a served model's ``segment`` endpoint takes (:mod:`medseg.serving`)."""
        from medseg.preprocessing import geometry

        volume, records = self._placed(volume)
        if self.target_spacing_mm is not None:
            self._check_resampled_size(volume)
            volume, record = geometry.resample_to_spacing(
                volume, self.target_spacing_mm
            )
            records.append(record)
        return volume, records

    def _check_resampled_size(self, volume) -> tuple[int, ...]:
        """The shape resampling ``volume`` (placed) gives, refused past the voxels
        medseg reads in one scan (a bundle whose target spacing is far finer than
        the scan's would otherwise ask for hundreds of GiB).

        Raises:
            InputFileError: the shape and what makes it.
        """
        from medseg.io.volume import DEFAULT_MAX_VOXELS
        from medseg.preprocessing import geometry

        shape = geometry.resampled_shape(
            volume.spatial_shape, volume.spacing, self.target_spacing_mm
        )
        voxels = math.prod(shape) * volume.num_channels
        if voxels > DEFAULT_MAX_VOXELS:
            spacing = " x ".join(f"{s:.3g}" for s in self.target_spacing_mm)
            own = " x ".join(f"{s:.3g}" for s in volume.spacing)
            raise InputFileError(
                volume.path or "image",
                f"resampling its {own} mm voxels to the model's {spacing} mm would "
                f"make {' x '.join(map(str, shape))} voxels ({voxels:,}), more than "
                f"the {DEFAULT_MAX_VOXELS:,} medseg takes in one scan",
            )
        return tuple(int(n) for n in shape)

    def grid(self, volume) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The spatial shape and spacing (mm) :meth:`image` gives ``volume``, found
        without resampling or normalising it.

        Raises:
            InputFileError: NaN/Inf voxels under the ``"error"`` policy, or a
                resampled grid too large.
        """
        volume, _ = self._placed(volume)
        shape, spacing = volume.spatial_shape, volume.spacing
        if self.target_spacing_mm is None:
            return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
        resampled = self._check_resampled_size(volume)
        return resampled, tuple(
            float(n * s / m) for n, s, m in zip(shape, spacing, resampled, strict=True)
        )

    def label(self, volume, records) -> np.ndarray:
        """The label map of the same case, moved onto the preprocessed image's grid."""
        from medseg.preprocessing import geometry

        volume, _ = geometry.reorient_to_canonical(volume)
        for record in records[1:]:
            if isinstance(record, geometry.CropRecord):
                volume = record.apply(volume)
            else:
                volume, _ = geometry.resample_to_spacing(
                    volume, self.target_spacing_mm, is_label=True
                )
        return np.asarray(volume.array)

    def to_dict(self) -> dict:
        return {
            "normalizers": [normalizer_to_dict(n) for n in self.normalizers],
            "target_spacing_mm": None
            if self.target_spacing_mm is None
            else list(self.target_spacing_mm),
            "crop_nonzero": self.crop_nonzero,
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessor:
        data = dict(data)
        data["normalizers"] = tuple(
            normalizer_from_dict(n) for n in data["normalizers"]
        )
        return cls(**data)
