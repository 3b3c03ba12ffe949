"""Sliding-window inference over whole scans, and segmenting scans with a bundle.

:func:`window_starts` places windows (a pure function); :func:`sliding_window_predict`
runs a predictor over them and blends the overlapping outputs with Gaussian importance
weights (sigma = 1/8 of the patch, as nnU-Net) or constant weights. NumPy outside the
predictor, so any callable mapping a batch of patches to per-class outputs works.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

BLENDS = ("gaussian", "constant")


def window_starts(size: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start positions of windows of ``patch`` covering ``size`` with at least
    ``overlap`` between neighbours, spread evenly, first at 0 and last at the end.

    Example: size 110, patch 64, overlap 0.5: step at most 32, so ceil(46 / 32) + 1 = 3
    windows spread over 46 voxels: starts 0, 23, 46.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if patch >= size:
        return [0]
    target_step = patch * (1 - overlap)
    count = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


def gaussian_importance(
    patch_size: Sequence[int], sigma_scale: float = 1 / 8
) -> np.ndarray:
    """Gaussian weights peaking at the patch centre (sigma = ``sigma_scale`` x size),
    scaled to a maximum of 1 and floored at the smallest non-zero value (no zeros)."""
    axes = []
    for n in patch_size:
        x = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weights = axes[0]
    for a in axes[1:]:
        weights = np.multiply.outer(weights, a)
    weights = weights / weights.max()
    return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)


def sliding_window_predict(
    image: np.ndarray,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
) -> np.ndarray:
    """Predicts a whole channels-last image window by window and blends the outputs.

    Args:
        image: ``(*S, C)``.
        predict_fn: maps a batch ``(B, *patch_size, C)`` to ``(B, *patch_size, K)``.
        patch_size: window size; images smaller than it are zero-padded, and the
            output cropped back.
        overlap: fraction of a window shared with its neighbour (0 to <1).
        blend: ``"gaussian"`` or ``"constant"`` weighting of overlapping outputs.
        batch_size: windows per ``predict_fn`` call.

    Returns:
        ``(*S, K)`` float32: the weighted mean of the window outputs at each voxel.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    patch_size = tuple(int(p) for p in patch_size)
    spatial = image.shape[:-1]
    if len(patch_size) != len(spatial):
        raise ValueError(
            f"patch_size {patch_size} does not match image shape {image.shape}"
        )
    padded_shape = tuple(max(s, p) for s, p in zip(spatial, patch_size, strict=True))
    pads = [
        ((p - s) // 2, p - s - (p - s) // 2)
        for s, p in zip(spatial, padded_shape, strict=True)
    ]
    padded = np.pad(image, [*pads, (0, 0)]) if any(sum(p) for p in pads) else image
    weights = (
        gaussian_importance(patch_size)
        if blend == "gaussian"
        else np.ones(patch_size, np.float32)
    )
    starts = [
        window_starts(n, p, overlap)
        for n, p in zip(padded_shape, patch_size, strict=True)
    ]
    windows = list(itertools.product(*starts))
    accumulator = None
    weight_sum = np.zeros(padded_shape, np.float32)
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        boxes = [
            tuple(slice(s, s + p) for s, p in zip(w, patch_size, strict=True))
            for w in chunk
        ]
        batch = np.stack([padded[box] for box in boxes]).astype(np.float32)
        outputs = np.asarray(predict_fn(batch), dtype=np.float32)
        if accumulator is None:
            accumulator = np.zeros((*padded_shape, outputs.shape[-1]), np.float32)
        for box, output in zip(boxes, outputs, strict=True):
            accumulator[box] += output * weights[..., None]
            weight_sum[box] += weights
    accumulator /= weight_sum[..., None]
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial, strict=True))
    return accumulator[crop]


# bundles on whole scans


class Segmenter:
    """A segmentation bundle ready to segment scans: the training-time preprocessing,
    sliding-window prediction, and the way back to each scan's own grid.

    Args:
        bundle: bundle folder (``model.keras`` + ``medseg.json``).
        overlap: sliding-window overlap.
        mirror_axes: test-time augmentation: also predict on the scan mirrored along
            these axes of the RAS-reoriented scan and average; ``()`` for none.
        batch_size: windows per forward pass.
    """

    def __init__(
        self, bundle, *, overlap: float = 0.5, mirror_axes=(), batch_size: int = 4
    ):
        from medseg import bundle as bundles
        from medseg.models import load_model
        from medseg.preprocessing import Preprocessor

        self.metadata = bundles.verify(bundle)
        if self.metadata.get("task") != "segmentation":
            from medseg.errors import InputFileError

            raise InputFileError(
                bundle,
                f"a {self.metadata.get('task')} bundle, not a segmentation bundle",
            )
        self.model = load_model(bundle)
        self.preprocessor = Preprocessor.from_dict(self.metadata["preprocessing"])
        self.patch_size = tuple(self.metadata["patch_size"])
        labels = self.metadata["labels"]
        self.values = np.array([labels[str(k)]["value"] for k in range(len(labels))])
        self.overlap = overlap
        self.mirror_axes = tuple(mirror_axes)
        self.batch_size = batch_size
        self._forward = None

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        import keras
        import tensorflow as tf

        if self._forward is None:
            model = self.model

            @tf.function(reduce_retracing=True)
            def forward(x):
                return keras.ops.softmax(model(x, training=False), axis=-1)

            self._forward = forward
        return np.asarray(self._forward(batch), dtype=np.float32)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities ``(*S, K)`` of a preprocessed image, mirroring TTA."""
        total = sliding_window_predict(
            image,
            self._predict_batch,
            patch_size=self.patch_size,
            overlap=self.overlap,
            batch_size=self.batch_size,
        )
        flips = [
            combo
            for r in range(1, len(self.mirror_axes) + 1)
            for combo in itertools.combinations(self.mirror_axes, r)
        ]
        for axes in flips:
            flipped = np.flip(image, axes)
            out = sliding_window_predict(
                flipped,
                self._predict_batch,
                patch_size=self.patch_size,
                overlap=self.overlap,
                batch_size=self.batch_size,
            )
            total += np.flip(out, axes)
        return total / (1 + len(flips))

    def segment(self, volume):
        """Label map (declared label values) on ``volume``'s own grid and header."""
        from medseg import geometry
        from medseg.errors import InputFileError

        dims, channels = self.metadata["spatial_dims"], self.metadata["in_channels"]
        if volume.spatial_dims != dims or volume.num_channels != channels:
            raise InputFileError(
                volume.path or "input",
                f"{volume.spatial_dims}D scan with {volume.num_channels} channel(s), "
                f"but the model segments {dims}D scans with {channels} channel(s)",
            )
        image, records = self.preprocessor.image(volume)
        scores = self.probabilities(image)
        work = volume.with_array(scores)  # geometry is taken from the records
        resample = [r for r in records if isinstance(r, geometry.ResampleRecord)]
        for record in resample:  # back to the grid before resampling, per class
            work = record.undo(work, order=1)
        classes = np.argmax(np.asarray(work.array), axis=-1)[..., None]
        labels = work.with_array(self.values[classes])
        for record in reversed(
            [r for r in records if not isinstance(r, geometry.ResampleRecord)]
        ):
            labels = record.undo(labels, fill=0)
        return labels
