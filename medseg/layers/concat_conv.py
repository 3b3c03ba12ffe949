"""A convolution of concatenated inputs that never forms the concatenation.

A U-Net decoder concatenates the encoder's skip tensor with the upsampled one and
convolves the result. The convolution's gradient needs its input, so training keeps the
concatenated copy until the backward pass, although its skip half is kept anyway (the
encoder's pooling needs it). A convolution is linear in its input channels: convolving
each part with its slice of the kernel and adding the results is the same function,
and training then keeps the two parts instead of the copy, one skip tensor less per
level (at a 3D U-Net's first level with 32 filters, 64 MiB for a 64^3 batch of 2).
"""

from __future__ import annotations

import keras
from keras import ops


def _is_one_shape(shape) -> bool:
    return any(s is None or isinstance(s, int) for s in shape)


def _shapes(input_shape) -> list[tuple]:
    shapes = list(input_shape or ())
    if not shapes or _is_one_shape(shapes):
        raise ValueError(f"ConcatConv takes a list of inputs, got one: {input_shape}")
    return [tuple(s) for s in shapes]


def _joined(shapes: list[tuple]) -> tuple:
    """The shape of the channel concatenation of ``shapes``."""
    for shape in shapes[1:]:
        if len(shape) != len(shapes[0]) or any(
            a is not None and b is not None and a != b
            for a, b in zip(shape[:-1], shapes[0][:-1], strict=True)
        ):
            raise ValueError(f"ConcatConv inputs differ but in channels: {shapes}")
    return (*shapes[0][:-1], sum(s[-1] for s in shapes))


class _ConcatConv:
    """``Conv(concatenate(inputs, axis=-1))`` as a sum of one convolution per input,
    each with its slice of the kernel: the weights (kernel ``(*k, sum of input
    channels, filters)``, bias) and the function of ``Concatenate`` + ``ConvND``,
    channels-last, ``groups=1``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.data_format != "channels_last" or self.groups != 1:
            raise ValueError("ConcatConv is channels-last with groups=1")
        self.input_spec = None  # a list of inputs, checked in build

    def build(self, input_shape):
        shapes = _shapes(input_shape)
        super().build(_joined(shapes))
        self.input_spec = None
        self.splits = [int(s[-1]) for s in shapes]

    def compute_output_shape(self, input_shape):
        if not _is_one_shape(input_shape):
            input_shape = _joined(_shapes(input_shape))
        return super().compute_output_shape(input_shape)

    def call(self, inputs):
        kernel = self.kernel
        outputs, start = None, 0
        for x, channels in zip(inputs, self.splits, strict=True):
            part = self.convolution_op(x, kernel[..., start : start + channels, :])
            outputs = part if outputs is None else ops.add(outputs, part)
            start += channels
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="medseg")
class ConcatConv2D(_ConcatConv, keras.layers.Conv2D):
    __doc__ = _ConcatConv.__doc__


@keras.saving.register_keras_serializable(package="medseg")
class ConcatConv3D(_ConcatConv, keras.layers.Conv3D):
    __doc__ = _ConcatConv.__doc__
