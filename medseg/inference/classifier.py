"""Classification bundles: a class per scan, alone or as an ensemble."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from medseg.errors import InputFileError
from medseg.inference.scan_plan import _colour_note, _one_grey
from medseg.preprocessing import geometry

logger = logging.getLogger(__name__)


class Classifier:
    """A classification bundle ready to classify images: per-image normalisation as in
    training, one forward pass, softmax probabilities.

    Images whose shape differs from the training images are resized to it (linear
    interpolation), as MedMNIST images were made. ``nonfinite`` overrides the
    bundle's NaN/Inf policy as in :class:`Segmenter`.
    """

    def __init__(
        self,
        bundle,
        *,
        batch_size: int = 64,
        allow_modified: bool = False,
        nonfinite: str | None = None,
    ):
        from medseg import bundle as bundles
        from medseg.models import load_model

        self.metadata = bundles.verify(bundle, allow_modified=allow_modified)
        if self.metadata.task != "classification":
            raise InputFileError(
                bundle, f"a {self.metadata.task} bundle, not a classification bundle"
            )
        self.model = load_model(bundle)
        self.preprocessor = self.metadata.preprocessor
        if nonfinite is not None:
            self.preprocessor = replace(self.preprocessor, nonfinite=nonfinite)
        self.shape = self.metadata.patch_size
        self.names = list(self.metadata.label_names)
        self.batch_size = batch_size

    def prepare(self, image: np.ndarray, source) -> np.ndarray:
        """One image ``(*S, C)`` -> the normalised network input ``(*shape, C)``.

        Raises:
            InputFileError: wrong number of spatial axes or channels, or NaN/Inf.
        """
        from medseg.preprocessing.intensity import handle_nonfinite, normalize

        dims, channels = self.metadata.spatial_dims, self.metadata.in_channels
        image = _one_grey(image, image.ndim - 1, channels)
        if image.ndim - 1 != dims or image.shape[-1] != channels:
            raise InputFileError(
                source,
                f"{image.ndim - 1}D image with {image.shape[-1]} channel(s)"
                f"{_colour_note(image, image.ndim - 1, channels)}, but the "
                f"model classifies {dims}D images with {channels} channel(s)",
            )
        image = handle_nonfinite(
            np.asarray(image, np.float32), source, self.preprocessor.nonfinite
        )
        if tuple(image.shape[:-1]) != self.shape:
            image = geometry.resample_array(image, self.shape, order=1)
        return normalize(image, self.preprocessor.normalizers).astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax ``(N, K)`` of prepared images ``(N, *shape, C)``."""
        import keras

        logits = self.model.predict(images, batch_size=self.batch_size, verbose=0)
        return np.asarray(keras.ops.softmax(logits, axis=-1), dtype=np.float64)

    def probabilities_of(self, prepared: list[np.ndarray]) -> np.ndarray:
        """:meth:`probabilities` of images each :meth:`prepare` gave."""
        return self.probabilities(np.stack(prepared))


class ClassifierEnsemble:
    """Classification bundles of one task as one classifier: each image is prepared
    as each member's training images were, and classified by the mean of the members'
    softmax probabilities."""

    def __init__(self, members: Sequence[Classifier]):
        self.members = list(members)
        self.names = self.members[0].names
        self.batch_size = min(member.batch_size for member in self.members)

    def prepare(self, image: np.ndarray, source) -> tuple[np.ndarray, ...]:
        """Each member's input (see :meth:`Classifier.prepare`)."""
        return tuple(member.prepare(image, source) for member in self.members)

    def probabilities_of(self, prepared: list[tuple]) -> np.ndarray:
        """The mean of the members' softmax ``(N, K)``."""
        return np.mean(
            [
                member.probabilities(np.stack([inputs[i] for inputs in prepared]))
                for i, member in enumerate(self.members)
            ],
            axis=0,
        )
