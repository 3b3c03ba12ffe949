"""Leaky ReLU whose gradient is computed from its output.

TensorFlow's leaky ReLU gradient reads the activation's input, so training keeps that
input (the normalisation's output, a full-size tensor per convolution) alive until the
backward pass, in addition to the activation's output, which the next convolution
keeps anyway. With a positive slope the output has the sign of the input, so the
gradient can be read from the output instead, as TensorFlow's own ReLU does, and the
input is freed after the forward pass.
"""

from __future__ import annotations

import keras
from keras import ops

from medseg.layers._util import waits_for_upstream


@keras.saving.register_keras_serializable(package="medseg")
class LeakyReLU(keras.layers.Layer):
    """``x`` where ``x > 0``, else ``negative_slope * x``: the function of
    ``keras.layers.Activation("leaky_relu")`` (slope 0.2) or ``keras.layers.LeakyReLU``,
    with a gradient that needs only the output (``negative_slope`` must be positive)."""

    def __init__(self, negative_slope: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not negative_slope > 0:
            raise ValueError(f"negative_slope must be > 0, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self.supports_masking = True

    def call(self, inputs):
        return _leaky_relu(inputs, self.negative_slope)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


def _leaky_relu(x, slope: float):
    @ops.custom_gradient
    def forward(x):
        y = ops.leaky_relu(x, negative_slope=slope)

        def backward(dy):
            # waits for dy, else y > 0 would be made, and kept, during the forward pass
            return ops.where(y > 0, dy, dy * ops.cast(slope, dy.dtype))

        return y, waits_for_upstream(backward)

    return forward(x)
