"""Classification CNNs for 2D and 3D scans: LeNet-like, VGG, ResNet and DenseNet.

Layer names: ``stem_*``; ``stage{i}_*`` (VGG), ``stage{i}_block{j}_*`` (ResNet),
``block{i}_layer{j}_*`` and ``transition{i}_*`` (DenseNet); ``conv{i}``/``pool{i}``
(simple); the head ``head_*`` and ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from medseg.models.blocks import (
    AVG_POOL,
    CONV,
    GLOBAL_AVG,
    GLOBAL_MAX,
    MAX_POOL,
    NORMS,
    check_choice,
    check_spatial_dims,
    conv_unit,
    norm_layer,
)

ARCHITECTURES = ("simple", "vgg", "resnet18", "resnet34", "resnet50", "densenet121")
HEADS = ("global_avg", "global_max", "flatten")
STEMS = ("standard", "small")
_RESNET_BLOCKS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
}
_VGG_CONVS = (1, 1, 2, 2)
_DENSENET121_LAYERS = (6, 12, 24, 16)


def _stem(x, d, base, stem, norm):
    if stem == "small":  # for small inputs such as MedMNIST's 28 x 28
        return conv_unit(x, base, spatial_dims=d, name="stem", norm=norm)
    x = conv_unit(
        x, base, spatial_dims=d, name="stem", kernel_size=7, strides=2, norm=norm
    )
    return MAX_POOL[d](3, strides=2, padding="same", name="stem_pool")(x)


def _simple(x, d, base, stem, norm):
    # LeNet-5 proportions: 6 and 16 feature maps of 5x5 kernels, 2x2 pooling
    for i, filters in enumerate((6, 16), start=1):
        x = CONV[d](filters, 5, padding="same", activation="relu", name=f"conv{i}")(x)
        x = MAX_POOL[d](2, name=f"pool{i}")(x)
    return x


def _vgg(x, d, base, stem, norm):
    for i, convs in enumerate(_VGG_CONVS):
        for j in range(1, convs + 1):
            x = conv_unit(
                x, base * 2**i, spatial_dims=d, name=f"stage{i}", index=j, norm=norm
            )
        x = MAX_POOL[d](2, padding="same", name=f"stage{i}_pool")(x)
    return x


def _resnet_block(x, filters, strides, name, d, norm, bottleneck):
    expansion = 4 if bottleneck else 1
    shortcut = x
    if strides != 1 or x.shape[-1] != filters * expansion:
        shortcut = CONV[d](
            filters * expansion,
            1,
            strides=strides,
            use_bias=norm == "none",
            name=f"{name}_shortcut",
        )(x)
        shortcut_norm = norm_layer(norm, filters * expansion, f"{name}_shortcut_norm")
        if shortcut_norm is not None:
            shortcut = shortcut_norm(shortcut)
    unit = dict(spatial_dims=d, name=name, norm=norm)
    if bottleneck:
        x = conv_unit(x, filters, index=1, kernel_size=1, **unit)
        x = conv_unit(x, filters, index=2, strides=strides, **unit)
        x = conv_unit(x, filters * 4, index=3, kernel_size=1, activation=None, **unit)
    else:
        x = conv_unit(x, filters, index=1, strides=strides, **unit)
        x = conv_unit(x, filters, index=2, activation=None, **unit)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _resnet(architecture):
    def build(x, d, base, stem, norm):
        x = _stem(x, d, base, stem, norm)
        for i, blocks in enumerate(_RESNET_BLOCKS[architecture]):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = _resnet_block(
                    x,
                    base * 2**i,
                    strides,
                    f"stage{i}_block{j}",
                    d,
                    norm,
                    bottleneck=architecture == "resnet50",
                )
        return x

    return build


def _norm_act(x, norm, name):
    norm_op = norm_layer(norm, x.shape[-1], f"{name}_norm")
    if norm_op is not None:
        x = norm_op(x)
    return layers.Activation("relu", name=f"{name}_act")(x)


def _densenet121(x, d, base, stem, norm):
    growth = base // 2  # 32 for the standard base width of 64
    x = _stem(x, d, base, stem, norm)
    for i, count in enumerate(_DENSENET121_LAYERS):
        for j in range(count):
            name = f"block{i}_layer{j}"
            y = _norm_act(x, norm, f"{name}_1")
            y = CONV[d](4 * growth, 1, use_bias=False, name=f"{name}_conv1")(y)
            y = _norm_act(y, norm, f"{name}_2")
            y = CONV[d](
                growth, 3, padding="same", use_bias=False, name=f"{name}_conv2"
            )(y)
            x = layers.Concatenate(name=f"{name}_concat")([x, y])
        if i < len(_DENSENET121_LAYERS) - 1:
            x = _norm_act(x, norm, f"transition{i}")
            x = CONV[d](
                x.shape[-1] // 2, 1, use_bias=False, name=f"transition{i}_conv"
            )(x)
            x = AVG_POOL[d](2, padding="same", name=f"transition{i}_pool")(x)
    return _norm_act(x, norm, "final")


_BODIES = {
    "simple": _simple,
    "vgg": _vgg,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "densenet121": _densenet121,
}


def build_classifier(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    architecture: str = "resnet18",
    head: str = "global_avg",
    base_filters: int = 64,
    stem: str = "standard",
    norm: str = "batch",
    dropout: float = 0.0,
    hidden_units: int = 256,
    patch_size: Sequence[int] | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds a 2D or 3D image classifier that outputs class logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: number of classes (output width).
        architecture: ``"simple"`` (LeNet-like), ``"vgg"`` (VGG-11 style, four stages),
            ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"densenet121"``.
        head: ``"global_avg"`` or ``"global_max"`` pooling, or ``"flatten"`` (dense
            layer of ``hidden_units`` on the flattened map; needs ``patch_size``).
        base_filters: width of the first stage (64 as in the papers; smaller for small
            data). DenseNet's growth rate is half of it.
        stem: ``"standard"`` (7x7 stride-2 conv and 3x3 stride-2 pooling) or ``"small"``
            (one 3x3 conv, for inputs such as 28 x 28).
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        dropout: dropout before the logits.
        patch_size: fixed spatial input size (``None``: any size, not with flatten).
        name: model name (default: the architecture).

    Returns:
        A functional model: ``(B, *S, in_channels)`` -> logits ``(B, num_classes)``.

    Raises:
        ValueError: naming any bad argument.
    """
    check_spatial_dims(spatial_dims)
    check_choice(architecture, "architecture", ARCHITECTURES)
    check_choice(head, "head", HEADS)
    check_choice(stem, "stem", STEMS)
    check_choice(norm, "norm", NORMS)
    for value, label in (
        (in_channels, "in_channels"),
        (num_classes, "num_classes"),
        (base_filters, "base_filters"),
        (hidden_units, "hidden_units"),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if patch_size is not None and (
        len(tuple(patch_size)) != spatial_dims
        or not all(isinstance(n, int) and n > 0 for n in patch_size)
    ):
        raise ValueError(
            f"patch_size must be {spatial_dims} positive ints, got {patch_size!r}"
        )
    if head == "flatten" and patch_size is None:
        raise ValueError("head='flatten' needs patch_size (a fixed input size)")
    shape = tuple(patch_size) if patch_size is not None else (None,) * spatial_dims
    inputs = keras.Input((*shape, in_channels), name="image")
    x = _BODIES[architecture](inputs, spatial_dims, base_filters, stem, norm)
    if head == "flatten":
        x = layers.Flatten(name="head_flatten")(x)
        x = layers.Dense(hidden_units, activation="relu", name="head_dense1")(x)
    else:
        pool = GLOBAL_AVG if head == "global_avg" else GLOBAL_MAX
        x = pool[spatial_dims](name="head_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or architecture)
