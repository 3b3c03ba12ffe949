"""Spatial padding with zero, reflect, replicate (edge) or circular modes."""

from __future__ import annotations

import keras
from keras import ops

from medseg.layers._util import dims

PADDING_MODES = ("zero", "reflect", "replicate", "circular")


class _Padding(keras.layers.Layer):
    spatial_dims = 0

    def __init__(self, padding=1, mode="zero", **kwargs):
        super().__init__(**kwargs)
        values = (padding,) * self.spatial_dims if isinstance(padding, int) else padding
        try:
            values = tuple(values)
        except TypeError:
            values = ()
        if len(values) != self.spatial_dims or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in values
        ):
            raise ValueError(
                f"padding must be a non-negative int or {self.spatial_dims} of them, "
                f"got {padding!r}"
            )
        self.padding = values
        if mode not in PADDING_MODES:
            raise ValueError(f"mode must be one of {PADDING_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        if self.mode in ("zero", "reflect"):
            widths = [[0, 0], *([p, p] for p in self.padding), [0, 0]]
            return ops.pad(
                inputs, widths, mode="constant" if self.mode == "zero" else "reflect"
            )
        x = inputs
        for axis, p in enumerate(self.padding, start=1):
            if p == 0:
                continue
            size = dims(x)[axis]
            index = ops.arange(-p, size + p, dtype="int32")
            if self.mode == "replicate":
                index = ops.clip(index, 0, size - 1)
            else:  # circular
                index = ops.mod(index, size)  # floor modulo: -1 -> size - 1
            x = ops.take(x, index, axis=axis)
        return x

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for i, p in enumerate(self.padding):
            shape[1 + i] = None if shape[1 + i] is None else shape[1 + i] + 2 * p
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "mode": self.mode}


@keras.saving.register_keras_serializable(package="medseg")
class Padding2D(_Padding):
    """Pads height and width by ``padding`` on both sides.

    Args:
        padding: int or 2 non-negative ints.
        mode: ``"zero"``, ``"reflect"`` (mirror without repeating the edge; padding
            must be smaller than the size), ``"replicate"`` (repeat the edge) or
            ``"circular"`` (wrap around).
    Input ``(B, H, W, C)``; output ``(B, H + 2p, W + 2p, C)``.
    """

    spatial_dims = 2


@keras.saving.register_keras_serializable(package="medseg")
class Padding3D(_Padding):
    """3D padding with zero, reflect, replicate or circular modes (see Padding2D)."""

    spatial_dims = 3
