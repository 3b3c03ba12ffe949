"""Building blocks shared by the builders: one code path for 2D and 3D.

Every layer gets a deterministic name from its position, e.g. ``enc1_conv2``,
``enc1_norm2``, ``enc1_act2``, so weights load by name and ``enc*`` can be frozen.
"""

from __future__ import annotations

import keras
from keras import layers

from medseg import layers as medseg_layers

CONV = {2: layers.Conv2D, 3: layers.Conv3D}
CONCAT_CONV = {2: medseg_layers.ConcatConv2D, 3: medseg_layers.ConcatConv3D}
CONV_TRANSPOSE = {2: layers.Conv2DTranspose, 3: layers.Conv3DTranspose}
MAX_POOL = {2: layers.MaxPooling2D, 3: layers.MaxPooling3D}
AVG_POOL = {2: layers.AveragePooling2D, 3: layers.AveragePooling3D}
UPSAMPLE = {2: layers.UpSampling2D, 3: layers.UpSampling3D}
CROP = {2: layers.Cropping2D, 3: layers.Cropping3D}
SPATIAL_DROPOUT = {2: layers.SpatialDropout2D, 3: layers.SpatialDropout3D}
GLOBAL_AVG = {2: layers.GlobalAveragePooling2D, 3: layers.GlobalAveragePooling3D}
GLOBAL_MAX = {2: layers.GlobalMaxPooling2D, 3: layers.GlobalMaxPooling3D}
ARGMAX_POOL = {
    2: medseg_layers.MaxPoolingWithArgmax2D,
    3: medseg_layers.MaxPoolingWithArgmax3D,
}
MAX_UNPOOL = {2: medseg_layers.MaxUnpooling2D, 3: medseg_layers.MaxUnpooling3D}
BED_OF_NAILS = {
    2: medseg_layers.BedOfNailsUnpooling2D,
    3: medseg_layers.BedOfNailsUnpooling3D,
}
PAD = {2: medseg_layers.Padding2D, 3: medseg_layers.Padding3D}

NORMS = ("batch", "instance", "group", "none")


def check_choice(value, name: str, choices) -> None:
    """Raises ``ValueError`` naming the argument when ``value`` is not a choice."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_spatial_dims(spatial_dims) -> None:
    check_choice(spatial_dims, "spatial_dims", (2, 3))


def check_activation(activation: str) -> None:
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError):
        raise ValueError(
            f"activation {activation!r} is not a Keras activation"
        ) from None


def norm_layer(norm: str, filters: int, name: str):
    """The normalisation layer for ``norm`` (None for ``"none"``).

    ``instance`` normalises each channel alone (``medseg.layers.InstanceNormalization``,
    lighter in training than group normalisation with one channel per group, same
    function); ``group`` uses the largest group count up to 8 that divides ``filters``.
    """
    if norm == "batch":
        return layers.BatchNormalization(name=name)
    if norm == "instance":
        return medseg_layers.InstanceNormalization(epsilon=1e-5, name=name)
    if norm == "group":
        groups = max(g for g in range(1, 9) if filters % g == 0)
        return layers.GroupNormalization(groups=groups, epsilon=1e-5, name=name)
    return None


def activation_layer(activation: str, name: str):
    """The layer for ``activation``: ``leaky_relu`` (Keras' function, slope 0.2) is
    ``medseg.layers.LeakyReLU``, whose gradient needs only its output, so training does
    not keep its input; other names are ``keras.layers.Activation``."""
    if activation == "leaky_relu":
        return medseg_layers.LeakyReLU(negative_slope=0.2, name=name)
    return layers.Activation(activation, name=name)


def conv_unit(
    x,
    filters: int,
    *,
    spatial_dims: int,
    name: str,
    index: int | str = "",
    kernel_size: int = 3,
    strides: int = 1,
    dilation: int = 1,
    padding: str = "same",
    padding_mode: str = "zero",
    norm: str = "instance",
    activation: str | None = "relu",
):
    """Convolution, normalisation, activation: ``{name}_conv{index}``, ``_norm``...

    ``x`` may be a list of tensors, convolved as their channel concatenation without
    forming it (``medseg.layers.ConcatConv2D/3D``; zero padding only). With
    ``padding="same"`` and a ``padding_mode`` other than zero, an explicit padding
    layer ``{name}_pad{index}`` comes first and the convolution is 'valid'. Instance
    normalisation followed by ``leaky_relu`` is one layer, ``{name}_norm{index}``
    (``medseg.layers.InstanceNormLeakyReLU``: the same function, half the memory
    kept for training).
    """
    conv_padding = padding
    several = isinstance(x, list | tuple)
    if padding == "same" and padding_mode != "zero" and kernel_size > 1:
        if several:
            raise ValueError(f"padding_mode {padding_mode!r} needs one input tensor")
        if strides != 1:
            raise ValueError(
                "padding_mode other than 'zero' needs stride 1 convolutions"
            )
        amount = (kernel_size - 1) // 2 * dilation
        x = PAD[spatial_dims](amount, mode=padding_mode, name=f"{name}_pad{index}")(x)
        conv_padding = "valid"
    x = (CONCAT_CONV if several else CONV)[spatial_dims](
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation,
        padding=conv_padding,
        use_bias=norm == "none",  # a bias before normalisation is cancelled by it
        name=f"{name}_conv{index}",
    )(x)
    if norm == "instance" and activation == "leaky_relu":
        return medseg_layers.InstanceNormLeakyReLU(
            negative_slope=0.2, epsilon=1e-5, name=f"{name}_norm{index}"
        )(x)
    norm_op = norm_layer(norm, filters, f"{name}_norm{index}")
    if norm_op is not None:
        x = norm_op(x)
    if activation is not None:
        x = activation_layer(activation, f"{name}_act{index}")(x)
    return x


def conv_block(
    x,
    filters: int,
    *,
    spatial_dims: int,
    name: str,
    convs: int = 2,
    residual: bool = False,
    dropout: float = 0.0,
    activation: str = "relu",
    kernel_size: int = 3,
    dilation: int = 1,
    padding: str = "same",
    norm: str = "instance",
    **unit_kwargs,
):
    """``convs`` conv units; residual blocks add a (1x1-projected) shortcut before the
    last activation (``{name}_skip``, ``{name}_add``, ``{name}_act_out``); optional
    spatial dropout ``{name}_dropout``.

    ``x`` may be a list of tensors (a U-Net's skip and upsampled tensors): the first
    convolution takes their channel concatenation without forming it, unless the block
    is residual or pads other than with zeros, which need the concatenated tensor
    (``{name}_concat``).
    """
    if isinstance(x, list | tuple) and (
        residual
        or (
            padding == "same"
            and unit_kwargs.get("padding_mode", "zero") != "zero"
            and kernel_size > 1
        )
    ):
        x = layers.Concatenate(name=f"{name}_concat")(list(x))
    shortcut = x
    common = dict(
        spatial_dims=spatial_dims,
        name=name,
        kernel_size=kernel_size,
        dilation=dilation,
        padding=padding,
        norm=norm,
        **unit_kwargs,
    )
    for j in range(1, convs + 1):
        last = j == convs
        act = None if residual and last else activation
        x = conv_unit(x, filters, index=j, activation=act, **common)
    if residual:
        if shortcut.shape[-1] != filters:
            shortcut = CONV[spatial_dims](
                filters, 1, use_bias=norm == "none", name=f"{name}_skip"
            )(shortcut)
        if padding == "valid":
            trim = convs * (kernel_size - 1) * dilation // 2
            shortcut = CROP[spatial_dims](trim, name=f"{name}_skip_crop")(shortcut)
        x = layers.Add(name=f"{name}_add")([x, shortcut])
        x = activation_layer(activation, f"{name}_act_out")(x)
    if dropout:
        x = SPATIAL_DROPOUT[spatial_dims](dropout, name=f"{name}_dropout")(x)
    return x
