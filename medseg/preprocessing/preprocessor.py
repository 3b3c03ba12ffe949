"""The preprocessing a bundle records, applied to a scan and undone on its result: non-
finite voxels, orientation, crop, resampling and intensity normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
        from medseg.preprocessing import geometry

        volume, records = self._placed(volume)
        if self.target_spacing_mm is not None:
            volume, record = geometry.resample_to_spacing(
                volume, self.target_spacing_mm
            )
            records.append(record)
        image = normalize(np.asarray(volume.array), self.normalizers)
        check_normalised(image, volume.path or "image", self.normalizers)
        return image, records

    def grid(self, volume) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The spatial shape and spacing (mm) :meth:`image` gives ``volume``, found
        without resampling or normalising it.

        Raises:
            InputFileError: NaN/Inf voxels under the ``"error"`` policy.
        """
        from medseg.preprocessing import geometry

        volume, _ = self._placed(volume)
        shape, spacing = volume.spatial_shape, volume.spacing
        if self.target_spacing_mm is None:
            return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
        resampled = geometry.resampled_shape(shape, spacing, self.target_spacing_mm)
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
