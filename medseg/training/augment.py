"""Data augmentation as TensorFlow ops, for 2D and 3D patches.

Each random transform samples its parameters from a stateless seed, then calls a
deterministic twin (``flip``, ``affine``, ``elastic``, ``adjust_gamma``, ...) that the
tests check against NumPy. Everything is TensorFlow, so ``tf.data`` runs it in parallel
threads (or on the GPU) and the same seed gives the same patch whatever the threading.

Conventions: ``image`` is ``(*S, C)`` float32, ``label`` is ``(*S, 1)`` int32. Spatial
transforms move both with the same coordinates: linear interpolation for the image,
nearest for the label; outside the patch the image is 0 and the label 0 (background).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace

import tensorflow as tf

from medseg.config import AugmentConfig
from medseg.errors import ConfigError

# deterministic twins


def flip(image, label, axes: Sequence[int]):
    """Reverses the given spatial axes of image and label."""
    if not axes:
        return image, label
    return tf.reverse(image, axis=list(axes)), tf.reverse(label, axis=list(axes))


def _grid(shape: Sequence[int]):
    """Voxel coordinates ``(*S, d)`` float32 of a spatial shape."""
    ranges = [tf.range(n, dtype=tf.float32) for n in shape]
    return tf.stack(tf.meshgrid(*ranges, indexing="ij"), axis=-1)


def sample_linear(volume, coords):
    """Samples ``volume (*S, C)`` at fractional ``coords (*T, d)`` with (bi/tri)linear
    interpolation; neighbours outside the volume count as 0. Returns ``(*T, C)``."""
    shape = tf.shape(volume)[:-1]
    d = coords.shape[-1]
    low = tf.floor(coords)
    frac = coords - low
    low = tf.cast(low, tf.int32)
    out = 0.0
    for corner in itertools.product((0, 1), repeat=d):
        offset = tf.constant(corner, tf.int32)
        index = low + offset
        inside = tf.reduce_all((index >= 0) & (index < shape), axis=-1)
        weight = tf.reduce_prod(
            tf.where(tf.constant([bool(c) for c in corner]), frac, 1.0 - frac), axis=-1
        )
        values = tf.gather_nd(volume, tf.clip_by_value(index, 0, shape - 1))
        out += values * tf.expand_dims(tf.where(inside, weight, 0.0), -1)
    return out


def sample_nearest(volume, coords, fill=0):
    """Samples ``volume (*S, C)`` at the voxel nearest each point; ``fill`` outside."""
    shape = tf.shape(volume)[:-1]
    index = tf.cast(tf.round(coords), tf.int32)
    inside = tf.reduce_all((index >= 0) & (index < shape), axis=-1, keepdims=True)
    values = tf.gather_nd(volume, tf.clip_by_value(index, 0, shape - 1))
    return tf.where(inside, values, tf.cast(fill, volume.dtype))


def _transform(image, label, coords):
    return (
        sample_linear(image, coords),
        sample_nearest(label, coords),
    )


def affine(image, label, matrix):
    """Rotates/scales about the patch centre: output voxel ``x`` takes the input at
    ``matrix @ (x - c) + c`` with ``c`` the centre; image linear, label nearest."""
    shape = image.shape[:-1]
    centre = tf.constant([(n - 1) / 2 for n in shape], tf.float32)
    grid = _grid(shape) - centre
    coords = tf.einsum("ij,...j->...i", tf.cast(matrix, tf.float32), grid) + centre
    return _transform(image, label, coords)


def elastic(image, label, displacement):
    """Moves each output voxel's sampling point by ``displacement (*S, d)`` voxels."""
    coords = _grid(image.shape[:-1]) + tf.cast(displacement, tf.float32)
    return _transform(image, label, coords)


def adjust_gamma(image, gamma):
    """Per channel: rescale to [0, 1], raise to ``gamma``, rescale back (nnU-Net)."""
    axes = list(range(len(image.shape) - 1))
    low = tf.reduce_min(image, axis=axes, keepdims=True)
    span = tf.reduce_max(image, axis=axes, keepdims=True) - low
    safe = tf.where(span > 0, span, 1.0)
    return tf.pow((image - low) / safe, gamma) * safe + low


def adjust_brightness(image, factor):
    """Multiplies intensities by ``factor``."""
    return image * factor


def adjust_contrast(image, factor):
    """Per channel ``(x - mean) * factor + mean``, clipped to the original range."""
    axes = list(range(len(image.shape) - 1))
    mean = tf.reduce_mean(image, axis=axes, keepdims=True)
    low = tf.reduce_min(image, axis=axes, keepdims=True)
    high = tf.reduce_max(image, axis=axes, keepdims=True)
    return tf.clip_by_value((image - mean) * factor + mean, low, high)


def gaussian_kernel(sigma: float | tf.Tensor, radius: int):
    """Normalised 1D Gaussian of ``2 * radius + 1`` taps."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    return kernel / tf.reduce_sum(kernel)


def gaussian_blur(image, sigma, radius: int = 3):
    """Separable Gaussian blur along each spatial axis, edges repeated."""
    kernel = gaussian_kernel(sigma, radius)
    d = len(image.shape) - 1
    out = image
    for axis in range(d):
        paddings = [[0, 0]] * (d + 1)
        paddings[axis] = [radius, radius]
        padded = tf.pad(out, paddings, mode="SYMMETRIC")
        # weighted sum of shifted copies: exact, and fine for small kernels
        size = tf.shape(out)[axis]
        total = 0.0
        for tap in range(2 * radius + 1):
            total += kernel[tap] * tf.gather(
                padded, tf.range(tap, tap + size), axis=axis
            )
        out = total
    return out


# random transforms


def rotation_matrix(angles, d: int):
    """Rotation by ``angles`` (radians; 1 in 2D, 3 in 3D about axes 0, 1, 2)."""
    if d == 2:
        c, s = tf.cos(angles[0]), tf.sin(angles[0])
        return tf.stack([tf.stack([c, -s]), tf.stack([s, c])])
    matrix = tf.eye(3)
    for axis in range(3):
        c, s = tf.cos(angles[axis]), tf.sin(angles[axis])
        i, j = [a for a in range(3) if a != axis]
        rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        rows = [[tf.constant(v) for v in row] for row in rows]
        rows[i][i], rows[i][j], rows[j][i], rows[j][j] = c, -s, s, c
        matrix = tf.stack([tf.stack(r) for r in rows]) @ matrix
    return matrix


class Augmenter:
    """Applies the random transforms of an :class:`AugmentConfig`.

    ``augmenter(image, label, seed)`` with ``seed`` a ``(2,)`` int tensor gives the
    same result for the same seed (stateless random ops).
    """

    def __init__(self, config: AugmentConfig, spatial_dims: int):
        if config.mirror_axes is None:  # every spatial axis
            config = replace(config, mirror_axes=tuple(range(spatial_dims)))
        bad = [a for a in config.mirror_axes if not 0 <= a < spatial_dims]
        if bad:
            raise ConfigError(
                f"augment.mirror_axes {bad} out of range for {spatial_dims}D data"
            )
        self.config = config
        self.spatial_dims = spatial_dims

    def __call__(self, image, label, seed):
        cfg, d = self.config, self.spatial_dims
        seeds = iter(tf.unstack(tf.random.experimental.stateless_split(seed, 32)))

        def uniform(shape=(), low=0.0, high=1.0):
            return tf.random.stateless_uniform(shape, next(seeds), low, high)

        def chance(p):
            return uniform() < p

        # flips
        flips = uniform((len(cfg.mirror_axes),)) < 0.5
        for k, axis in enumerate(cfg.mirror_axes):
            image, label = tf.cond(
                flips[k],
                lambda a=axis, im=image, lb=label: flip(im, lb, [a]),
                lambda im=image, lb=label: (im, lb),
            )
        # rotation and scaling share one resampling
        n_angles = 1 if d == 2 else 3
        limit = math.radians(cfg.rotation_deg)
        angles = tf.where(
            chance(cfg.p_rotate), uniform((n_angles,), -limit, limit), 0.0
        )
        scale = tf.where(chance(cfg.p_scale), uniform((), *cfg.scale_range), 1.0)
        spatial_change = tf.reduce_any(angles != 0.0) | (scale != 1.0)
        matrix = rotation_matrix(angles, d) * scale
        image, label = tf.cond(
            spatial_change, lambda: affine(image, label, matrix), lambda: (image, label)
        )
        if cfg.p_elastic > 0:
            image, label = tf.cond(
                chance(cfg.p_elastic),
                lambda: elastic(image, label, self._displacement(image, next(seeds))),
                lambda: (image, label),
            )
        # intensities
        image = tf.cond(
            chance(cfg.p_noise),
            lambda: (
                image
                + tf.random.stateless_normal(tf.shape(image), next(seeds))
                * uniform((), 0.0, cfg.noise_std)
            ),
            lambda: image,
        )
        image = tf.cond(
            chance(cfg.p_blur),
            lambda: gaussian_blur(image, uniform((), *cfg.blur_sigma)),
            lambda: image,
        )
        image = tf.cond(
            chance(cfg.p_brightness),
            lambda: adjust_brightness(image, uniform((), *cfg.brightness_range)),
            lambda: image,
        )
        image = tf.cond(
            chance(cfg.p_contrast),
            lambda: adjust_contrast(image, uniform((), *cfg.contrast_range)),
            lambda: image,
        )
        image = tf.cond(
            chance(cfg.p_gamma),
            lambda: adjust_gamma(image, uniform((), *cfg.gamma_range)),
            lambda: image,
        )
        return image, label

    def _displacement(self, image, seed):
        shape = image.shape[:-1]
        noise = tf.random.stateless_uniform(
            (*shape, self.spatial_dims), seed, -1.0, 1.0
        )
        smooth = gaussian_blur(
            noise, self.config.elastic_sigma, radius=int(2 * self.config.elastic_sigma)
        )
        peak = tf.reduce_max(tf.abs(smooth))
        return smooth / tf.maximum(peak, 1e-6) * self.config.elastic_magnitude
