"""A segmentation bundle's whole prediction on its own grid as one TensorFlow graph,
for servers (TF Serving, Triton) that run a SavedModel as it is: normalisation, the
sliding window with Gaussian blending and test-time mirroring, the softmax and the
label values. What stays outside is the geometry: reorienting, cropping and
resampling a scan onto the bundle's grid, and back (see
:meth:`medseg.preprocessing.Preprocessor.on_grid`)."""

from __future__ import annotations

import itertools

import numpy as np

from medseg.errors import InputFileError
from medseg.inference.sliding_window import gaussian_importance
from medseg.preprocessing.intensity import (
    CTNormalization,
    PercentileNormalization,
    WindowNormalization,
    ZScoreNormalization,
    _safe_scale,
)

#: The name of the SavedModel endpoint that segments a scan on the bundle's grid.
SEGMENT_ENDPOINT = "segment"


def serving_refusal(metadata) -> str | None:
    """Why a bundle cannot have the ``segment`` endpoint, or ``None``."""
    if metadata.task != "segmentation":
        return f"a {metadata.task} bundle, not a segmentation bundle"
    if metadata.slice_axis is not None:
        return "a 2D network on slices of volumes"
    return None


def segment_function(model, metadata, *, overlap: float = 0.5, batch_size: int = 4):
    """A ``tf.function`` from a scan on the bundle's grid, ``(*S, C)`` float32 (not
    normalised), to ``{"probabilities": (*S, K) float32, "labels": (*S,) int32}``,
    as :class:`~medseg.inference.Segmenter` computes them before going back to the
    scan's grid: each channel normalised as in training, windows of the training
    patch at ``overlap``, each also mirrored along the bundle's mirror axes, logits
    averaged over the mirrors and blended with Gaussian weights, divided by the
    bundle's temperature, one softmax, the label values of the most probable
    classes.

    Raises:
        InputFileError: a bundle this cannot serve (see :func:`serving_refusal`), or
            a network whose output is smaller than its input (unpadded).
    """
    import tensorflow as tf

    refusal = serving_refusal(metadata)
    if refusal:
        raise InputFileError(metadata.source, f"no segment endpoint for {refusal}")
    window = tuple(int(n) for n in metadata.window)
    dims, channels = len(window), int(metadata.in_channels)
    probe = model.compute_output_shape((1, *window, channels))
    if isinstance(probe, list):
        probe = probe[0]
    if tuple(probe[1:-1]) != window:
        raise InputFileError(
            metadata.source, "no segment endpoint for an unpadded network"
        )
    normalizers = metadata.preprocessor.normalizers
    values = tf.constant(metadata.label_values, tf.int32)
    weights = tf.constant(gaussian_importance(window)[..., None])
    flips = [
        list(combo)
        for r in range(1, len(metadata.mirror_axes) + 1)
        for combo in itertools.combinations([a + 1 for a in metadata.mirror_axes], r)
    ]
    offsets = tf.constant(
        np.stack(np.meshgrid(*[np.arange(n) for n in window], indexing="ij"), -1),
        tf.int32,
    )  # (*window, dims): a window's voxels, from its corner

    def network(batch):
        logits = tf.cast(model(batch, training=False), tf.float32)
        for axes in flips:
            mirrored = model(tf.reverse(batch, axes), training=False)
            logits += tf.reverse(tf.cast(mirrored, tf.float32), axes)
        return logits / float((1 + len(flips)) * metadata.temperature)

    @tf.function(
        input_signature=[tf.TensorSpec([None] * dims + [channels], tf.float32)]
    )
    def segment(image):
        image = tf.stack(
            [_normalise(image[..., c], n) for c, n in enumerate(normalizers)], -1
        )
        shape = tf.shape(image)[:dims]
        padded_shape = tf.maximum(shape, window)
        before = (padded_shape - shape) // 2
        image = tf.pad(
            image,
            tf.concat(
                [tf.stack([before, padded_shape - shape - before], 1), [[0, 0]]], 0
            ),
        )
        starts = _window_grid(padded_shape, window, overlap)  # (N, dims)
        count = tf.shape(starts)[0]
        classes = int(model.output_shape[-1])
        total = tf.zeros(tf.concat([padded_shape, [classes]], 0))
        weight = tf.zeros(tf.concat([padded_shape, [1]], 0))
        for_batch = tf.range(batch_size)

        def cut(start):
            return tf.slice(image, tf.concat([start, [0]], 0), [*window, channels])

        def body(first, total, weight):
            chosen = tf.gather(starts, tf.minimum(first + for_batch, count - 1))
            real = tf.minimum(batch_size, count - first)
            logits = network(tf.map_fn(cut, chosen, fn_output_signature=tf.float32))
            for i in range(batch_size):

                def add(total=total, weight=weight, i=i):
                    where = offsets + chosen[i]
                    return (
                        tf.tensor_scatter_nd_add(total, where, logits[i] * weights),
                        tf.tensor_scatter_nd_add(weight, where, weights),
                    )

                total, weight = tf.cond(
                    i < real, add, lambda total=total, weight=weight: (total, weight)
                )
            return first + batch_size, total, weight

        _, total, weight = tf.while_loop(
            lambda first, *_: first < count, body, (0, total, weight)
        )
        probabilities = tf.nn.softmax(total / weight, axis=-1)
        probabilities = tf.slice(
            probabilities, tf.concat([before, [0]], 0), tf.concat([shape, [-1]], 0)
        )
        labels = tf.gather(values, tf.argmax(probabilities, -1, output_type=tf.int32))
        return {"probabilities": probabilities, "labels": labels}

    return segment


def _window_grid(shape, window, overlap: float):
    """Every window's start ``(N, dims)``, per axis as
    :func:`medseg.inference.sliding_window.window_starts` spreads them."""
    import tensorflow as tf

    axes = []
    for axis, patch in enumerate(window):
        size = tf.cast(shape[axis], tf.float64)
        span = size - patch
        step = max(patch * (1 - overlap), 1.0)
        count = tf.cast(tf.math.ceil(span / step), tf.int32) + 1
        spacing = span / tf.cast(tf.maximum(count - 1, 1), tf.float64)
        starts = tf.round(tf.range(count, dtype=tf.float64) * spacing)
        axes.append(tf.cast(starts, tf.int32))
    grids = tf.meshgrid(*axes, indexing="ij")
    return tf.reshape(tf.stack(grids, -1), [-1, len(window)])


def _normalise(channel, normalizer):
    """One channel normalised as :mod:`medseg.preprocessing.intensity` does it."""
    import tensorflow as tf

    def scale(value):  # _safe_scale
        return tf.where(tf.abs(value) > 1e-8, value, tf.ones_like(value))

    if isinstance(normalizer, ZScoreNormalization):
        wide = tf.cast(channel, tf.float64)
        if not normalizer.nonzero_mask:
            mean, std = tf.reduce_mean(wide), tf.math.reduce_std(wide)
            return (channel - tf.cast(mean, tf.float32)) / tf.cast(
                scale(std), tf.float32
            )
        mask = tf.not_equal(channel, 0)
        inside = tf.boolean_mask(wide, mask)
        mean = tf.reduce_mean(inside)
        std = tf.math.reduce_std(inside)
        scaled = (channel - tf.cast(mean, tf.float32)) / tf.cast(scale(std), tf.float32)
        return tf.where(mask, scaled, tf.zeros_like(channel))
    if isinstance(normalizer, CTNormalization):
        clipped = tf.clip_by_value(channel, normalizer.lower, normalizer.upper)
        return (clipped - normalizer.mean) / _safe_scale(normalizer.std)
    if isinstance(normalizer, WindowNormalization):
        clipped = tf.clip_by_value(channel, normalizer.lower, normalizer.upper)
        return (clipped - normalizer.lower) / (normalizer.upper - normalizer.lower)
    if isinstance(normalizer, PercentileNormalization):
        ordered = tf.sort(tf.reshape(tf.cast(channel, tf.float64), [-1]))
        low = _percentile(ordered, normalizer.lower_percentile)
        high = _percentile(ordered, normalizer.upper_percentile)
        clipped = tf.clip_by_value(channel, low, high)
        return (clipped - low) / scale(high - low)
    raise TypeError(f"no in-graph version of {type(normalizer).__name__}")


def _percentile(ordered, q: float):
    """NumPy's default (linear) percentile of sorted values, as float32."""
    import tensorflow as tf

    rank = q / 100 * tf.cast(tf.size(ordered) - 1, tf.float64)
    below = tf.cast(tf.floor(rank), tf.int32)
    above = tf.cast(tf.math.ceil(rank), tf.int32)
    low, high = tf.gather(ordered, below), tf.gather(ordered, above)
    value = low + (high - low) * (rank - tf.floor(rank))
    return tf.cast(value, tf.float32)
