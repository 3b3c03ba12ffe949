"""Instance normalisation with a hand-written gradient that keeps little for backward.

Keras' ``GroupNormalization(groups=-1)`` computes the same function, but its automatic
gradient keeps full-size intermediates of every normalisation layer (the centred
input among them) until the backward pass. Here the backward pass needs only the
layer's input and two numbers per sample and channel, which is what fused instance-norm
kernels keep. Statistics and gradients are computed in float32 whatever the compute
dtype (float16 can overflow and bfloat16 loses precision in sums over a 3D patch).
"""

from __future__ import annotations

import keras
from keras import ops

from medseg.layers._util import waits_for_upstream


@keras.saving.register_keras_serializable(package="medseg")
class InstanceNormalization(keras.layers.GroupNormalization):
    """Normalises each channel of each sample over its spatial axes, then scales by
    ``gamma`` and shifts by ``beta`` (one each per channel). Channels-last, 2D or 3D.

    Same weights and outputs as ``keras.layers.GroupNormalization(groups=-1)``.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        kwargs.pop("groups", None)  # always one channel per group
        super().__init__(groups=-1, epsilon=epsilon, **kwargs)

    def build(self, input_shape):
        if self.axis not in (-1, len(input_shape) - 1):
            raise ValueError("InstanceNormalization is channels-last (axis=-1)")
        super().build(input_shape)

    def call(self, inputs):
        outputs = _instance_norm(inputs, *self._affine(inputs), self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def _affine(self, inputs):
        """``gamma`` and ``beta`` as tensors (ones and zeros where not learnt):
        copies, since a custom gradient takes tensors, and the variables' own gradients
        flow through the copy."""
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else ops.ones((channels,), "float32")
        beta = self.beta if self.center else ops.zeros((channels,), "float32")
        return ops.copy(gamma), ops.copy(beta)

    def get_config(self):
        config = super().get_config()
        config.pop("groups")
        return config


def _statistics(x, gamma, beta, epsilon: float, spatial: tuple[int, ...]):
    """In float32: the input, its mean and inverse deviation per sample and channel,
    and the scale and shift that normalise it and apply ``gamma`` and ``beta``."""
    x32 = ops.cast(x, "float32")
    mean = ops.mean(x32, axis=spatial, keepdims=True)
    variance = ops.mean(ops.square(x32 - mean), axis=spatial, keepdims=True)
    inverse = ops.rsqrt(variance + epsilon)
    scale = inverse * ops.cast(gamma, "float32")
    shift = ops.cast(beta, "float32") - mean * scale
    return x32, mean, inverse, scale, shift


def _instance_norm(x, gamma, beta, epsilon: float):
    spatial = tuple(range(1, len(x.shape) - 1))
    every = (0, *spatial)

    @ops.custom_gradient
    def forward(x, gamma, beta):
        x32, mean, inverse, scale, shift = _statistics(x, gamma, beta, epsilon, spatial)
        y = ops.cast(x32 * scale + shift, x.dtype)

        def backward(upstream):
            # with n = (x - mean) * inverse, per sample and channel over N voxels:
            # dx = inverse * gamma * (dy - sum(dy) / N - n * sum(dy * n) / N),
            # written as k * dy + (x - mean) * a + b with per-channel k, a, b so that
            # few full-size temporaries exist at once
            dy = ops.cast(upstream, "float32")
            centred = ops.cast(x, "float32") - mean
            sum_dy = ops.sum(dy, axis=spatial, keepdims=True)
            sum_dy_n = ops.sum(dy * centred, axis=spatial, keepdims=True) * inverse
            d_beta = ops.sum(sum_dy, axis=every)
            d_gamma = ops.sum(sum_dy_n, axis=every)
            count = ops.cast(ops.size(x), "float32") / ops.cast(
                ops.size(sum_dy), "float32"
            )  # voxels per sample and channel, also for shapes known only at run time
            k = inverse * ops.cast(gamma, "float32")
            a = -k * inverse * sum_dy_n / count
            b = -k * sum_dy / count
            dx = k * dy + (centred * a + b)
            return (
                ops.cast(dx, x.dtype),
                ops.cast(d_gamma, gamma.dtype),
                ops.cast(d_beta, beta.dtype),
            )

        return y, waits_for_upstream(backward)

    return forward(x, gamma, beta)


@keras.saving.register_keras_serializable(package="medseg")
class InstanceNormLeakyReLU(InstanceNormalization):
    """``InstanceNormalization`` followed by a leaky ReLU (``negative_slope``, default
    0.2 as Keras' ``leaky_relu``), as one layer that keeps only its output for the
    backward pass.

    The output is what the next convolution keeps anyway; the normalised values are
    recovered from it (the leaky ReLU is invertible for a positive slope, the affine
    for a non-zero ``gamma``), as in-place activated batch normalisation does (Rota
    Bulo et al., CVPR 2018). So a conv + norm + activation unit keeps one full-size
    tensor for training instead of two. Where ``|gamma|`` is below 1e-3 the recovery
    divides by 1e-3 instead, and that channel's gradients are only approximate.
    Same weights as ``InstanceNormalization`` (and Keras'
    ``GroupNormalization(groups=-1)``).
    """

    def __init__(self, negative_slope: float = 0.2, epsilon: float = 1e-5, **kwargs):
        super().__init__(epsilon=epsilon, **kwargs)
        if not negative_slope > 0:
            raise ValueError(f"negative_slope must be > 0, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def call(self, inputs):
        outputs = _instance_norm_leaky_relu(
            inputs, *self._affine(inputs), self.epsilon, self.negative_slope
        )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


#: Below this ``|gamma|`` the recovery of the normalised values divides by it instead.
MIN_RECOVERY_GAMMA = 1e-3


def _instance_norm_leaky_relu(x, gamma, beta, epsilon: float, slope: float):
    spatial = tuple(range(1, len(x.shape) - 1))
    every = (0, *spatial)

    @ops.custom_gradient
    def forward(x, gamma, beta):
        x32, _, inverse, scale, shift = _statistics(x, gamma, beta, epsilon, spatial)
        dtype = x.dtype  # the backward closure must not hold x itself
        y = ops.cast(ops.leaky_relu(x32 * scale + shift, slope), dtype)

        def backward(upstream):
            # only y, the per-channel inverse deviation and the weights are used here:
            # z = gamma * n + beta is y where y > 0, else y / slope; with N voxels per
            # sample and channel and dz the gradient at z,
            # dx = inverse * gamma * (dz - sum(dz) / N - n * sum(dz * n) / N),
            # where gamma * n = z - beta, so only sum(dz * n) divides by gamma
            dy = ops.cast(upstream, "float32")
            y32 = ops.cast(y, "float32")
            positive = y32 > 0
            dz = ops.where(positive, dy, dy * slope)
            g = ops.cast(gamma, "float32")
            gamma_n = ops.where(positive, y32, y32 / slope) - ops.cast(beta, "float32")
            safe_g = ops.where(
                ops.abs(g) < MIN_RECOVERY_GAMMA,
                ops.where(g < 0, -MIN_RECOVERY_GAMMA, MIN_RECOVERY_GAMMA),
                g,
            )
            sum_dz = ops.sum(dz, axis=spatial, keepdims=True)
            sum_dz_n = ops.sum(dz * gamma_n, axis=spatial, keepdims=True) / safe_g
            d_beta = ops.sum(sum_dz, axis=every)
            d_gamma = ops.sum(sum_dz_n, axis=every)
            count = ops.cast(ops.size(y), "float32") / ops.cast(
                ops.size(sum_dz), "float32"
            )  # voxels per sample and channel (from y: x is not kept)
            k = inverse * g
            a = -inverse * sum_dz_n / count  # times gamma * n
            b = -k * sum_dz / count
            dx = k * dz + (gamma_n * a + b)
            return (
                ops.cast(dx, dtype),
                ops.cast(d_gamma, gamma.dtype),
                ops.cast(d_beta, beta.dtype),
            )

        return y, waits_for_upstream(backward)

    return forward(x, gamma, beta)
