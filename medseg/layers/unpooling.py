"""Unpooling layers: back to the pre-pooling grid by argmax or zero insertion."""

from __future__ import annotations

import math

import keras
from keras import ops

from medseg.layers._util import as_tuple, dims, from_windows


def _pad_to(x, target_spatial):
    """Zero-pads ``(B, *S, C)`` at the end of the spatial axes to ``target_spatial``."""
    current = dims(x)[1:-1]
    widths = [[0, 0]]
    needed = False
    for now, want in zip(current, target_spatial, strict=True):
        if isinstance(now, int) and isinstance(want, int):
            if want < now:
                raise ValueError(f"unpooling target size {want} is smaller than {now}")
            needed = needed or want > now
        else:
            needed = True
        widths.append([0, want - now])
    widths.append([0, 0])
    return ops.pad(x, widths) if needed else x


class _MaxUnpooling(keras.layers.Layer):
    spatial_dims = 0

    def __init__(self, pool_size=2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = as_tuple(pool_size, self.spatial_dims, "pool_size")

    def _unpack(self, inputs):
        if not isinstance(inputs, list | tuple) or len(inputs) not in (2, 3):
            raise ValueError(
                f"{type(self).__name__} takes [values, indices] or [values, indices, "
                f"reference], got {type(inputs).__name__} of length "
                f"{len(inputs) if isinstance(inputs, list | tuple) else 1}"
            )
        return inputs[0], inputs[1], inputs[2] if len(inputs) == 3 else None

    def _target(self, values, reference):
        if reference is not None:
            return dims(reference)[1:-1]
        return [c * p for c, p in zip(dims(values)[1:-1], self.pool_size, strict=True)]

    def call(self, inputs):
        values, indices, reference = self._unpack(inputs)
        pool, n = self.pool_size, self.spatial_dims
        target = self._target(values, reference)
        channels = ops.cast(dims(values)[-1], "int64")
        indices = ops.cast(indices, "int64")
        position = indices // channels  # flat spatial position in the target grid
        local = ops.zeros_like(indices)
        for axis in reversed(range(n)):
            size = ops.cast(target[axis], "int64")
            offset = (position % size) % pool[axis]
            position = position // size
            stride = math.prod(pool[axis + 1 :])
            local = local + offset * stride
        windows = ops.one_hot(local, math.prod(pool), dtype=values.dtype)
        windows = windows * ops.expand_dims(values, -1)
        return _pad_to(from_windows(windows, pool), target)

    def compute_output_spec(self, inputs):
        values, _, reference = self._unpack(inputs)
        shape = list(values.shape)
        for i, p in enumerate(self.pool_size):
            if reference is not None:
                shape[1 + i] = reference.shape[1 + i]
            else:
                shape[1 + i] = None if shape[1 + i] is None else shape[1 + i] * p
        return keras.KerasTensor(shape, dtype=values.dtype)

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size}


@keras.saving.register_keras_serializable(package="medseg")
class MaxUnpooling2D(_MaxUnpooling):
    """Puts pooled values back at their argmax positions, zeros elsewhere (SegNet).

    Args:
        pool_size: int or 2 ints; must match the pooling layer that made the indices.
    Input: ``[values, indices]`` from :class:`MaxPoolingWithArgmax2D`, both
    ``(B, h, w, C)``, optionally with a third tensor whose spatial size is the
    pre-pooling size (needed when that size was odd). Output: ``(B, h*ph, w*pw, C)``
    or the reference's size. Gradients flow to ``values``.
    Reference: Badrinarayanan et al., SegNet, TPAMI 2017.
    """

    spatial_dims = 2


@keras.saving.register_keras_serializable(package="medseg")
class MaxUnpooling3D(_MaxUnpooling):
    """3D max unpooling with int64 indices (see :class:`MaxUnpooling2D`).

    Input: ``[values, indices(, reference)]``, ``(B, d, h, w, C)``. Output:
    ``(B, d*pd, h*ph, w*pw, C)`` or the reference's spatial size.
    """

    spatial_dims = 3


class _BedOfNailsUnpooling(keras.layers.Layer):
    spatial_dims = 0

    def __init__(self, size=2, **kwargs):
        super().__init__(**kwargs)
        self.size = as_tuple(size, self.spatial_dims, "size")

    def call(self, inputs):
        window = math.prod(self.size)
        rank = len(inputs.shape)
        windows = ops.pad(
            ops.expand_dims(inputs, -1), [[0, 0]] * rank + [[0, window - 1]]
        )
        return from_windows(windows, self.size)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for i, s in enumerate(self.size):
            shape[1 + i] = None if shape[1 + i] is None else shape[1 + i] * s
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "size": self.size}


@keras.saving.register_keras_serializable(package="medseg")
class BedOfNailsUnpooling2D(_BedOfNailsUnpooling):
    """Zero insertion: each value goes to the first position of its ``size`` block.

    Args:
        size: int or 2 ints, the upsampling factor.
    Input ``(B, H, W, C)``; output ``(B, H*sh, W*sw, C)``.
    """

    spatial_dims = 2


@keras.saving.register_keras_serializable(package="medseg")
class BedOfNailsUnpooling3D(_BedOfNailsUnpooling):
    """3D zero insertion (see :class:`BedOfNailsUnpooling2D`)."""

    spatial_dims = 3
