"""Pooling layers that keep what unpooling needs: argmax indices, and N-max pooling."""

from __future__ import annotations

import keras
from keras import ops

from medseg.layers._util import as_tuple, dims, to_windows, window_offsets


class _MaxPoolingWithArgmax(keras.layers.Layer):
    spatial_dims = 0

    def __init__(self, pool_size=2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = as_tuple(pool_size, self.spatial_dims, "pool_size")

    def call(self, inputs):
        pool = self.pool_size
        windows = to_windows(inputs, pool)  # (B, *cells, C, P)
        values = ops.max(windows, axis=-1)
        local = ops.cast(ops.argmax(windows, axis=-1), "int64")
        shape = dims(inputs)
        spatial, channels = shape[1:-1], ops.cast(shape[-1], "int64")
        cells = dims(values)[1:-1]
        n = self.spatial_dims
        # offset of the argmax inside its window along each axis: a lookup table
        table = ops.convert_to_tensor(window_offsets(pool), dtype="int64")  # (P, n)
        flat = ops.zeros_like(local)
        for axis in range(n):
            offset = ops.take(table[:, axis], local)
            start = ops.arange(0, cells[axis], dtype="int64") * pool[axis]
            start = ops.reshape(start, [1] * (axis + 1) + [-1] + [1] * (n - axis))
            position = start + offset
            flat = flat * ops.cast(spatial[axis], "int64") + position
        channel = ops.reshape(
            ops.arange(0, shape[-1], dtype="int64"), [1] * (n + 1) + [-1]
        )
        indices = flat * channels + channel
        return values, indices

    def compute_output_spec(self, inputs):
        shape = list(inputs.shape)
        for i, p in enumerate(self.pool_size):
            shape[1 + i] = None if shape[1 + i] is None else shape[1 + i] // p
        return (
            keras.KerasTensor(shape, dtype=inputs.dtype),
            keras.KerasTensor(shape, dtype="int64"),
        )

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size}


@keras.saving.register_keras_serializable(package="medseg")
class MaxPoolingWithArgmax2D(_MaxPoolingWithArgmax):
    """2D max pooling (non-overlapping windows) that also returns where each max was.

    Args:
        pool_size: int or 2 ints; windows and strides are equal.
    Input: ``(B, H, W, C)``. Output: ``(values, indices)``, both ``(B, H//ph, W//pw,
        C)``; ``indices`` are int64 positions in the flattened input of each sample,
        ``(y * W + x) * C + c``, as ``tf.nn.max_pool_with_argmax`` numbers them. Rows or
        columns past the last whole window are ignored. Ties go to the first position.
    Reference: Badrinarayanan et al., SegNet, TPAMI 2017.
    """

    spatial_dims = 2


@keras.saving.register_keras_serializable(package="medseg")
class MaxPoolingWithArgmax3D(_MaxPoolingWithArgmax):
    """3D max pooling that also returns int64 argmax indices (see the 2D layer).

    Input: ``(B, D, H, W, C)``. Output: ``(values, indices)``, ``(B, D//pd, H//ph,
    W//pw, C)``, indices ``((z * H + y) * W + x) * C + c``.
    """

    spatial_dims = 3


class _NMaxPooling(keras.layers.Layer):
    spatial_dims = 0

    def __init__(self, pool_size=2, n=2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = as_tuple(pool_size, self.spatial_dims, "pool_size")
        window = 1
        for p in self.pool_size:
            window *= p
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= window:
            raise ValueError(
                f"n must be an int in [1, {window}] for pool_size "
                f"{self.pool_size}, got {n!r}"
            )
        self.n = n

    def call(self, inputs):
        windows = to_windows(inputs, self.pool_size)
        largest, _ = ops.top_k(windows, self.n, sorted=False)
        return ops.mean(largest, axis=-1)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for i, p in enumerate(self.pool_size):
            shape[1 + i] = None if shape[1 + i] is None else shape[1 + i] // p
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "n": self.n}


@keras.saving.register_keras_serializable(package="medseg")
class NMaxPooling2D(_NMaxPooling):
    """Mean of the ``n`` largest values in each non-overlapping 2D window.

    ``n=1`` is max pooling, ``n = window size`` is average pooling.
    Args:
        pool_size: int or 2 ints. n: how many of the largest values to average.
    Input ``(B, H, W, C)``; output ``(B, H//ph, W//pw, C)``.
    """

    spatial_dims = 2


@keras.saving.register_keras_serializable(package="medseg")
class NMaxPooling3D(_NMaxPooling):
    """Mean of the ``n`` largest values in each non-overlapping 3D window."""

    spatial_dims = 3
