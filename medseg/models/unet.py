"""U-Net (Ronneberger et al. 2015) and its convolutional autoencoder twin.

Layer names: encoder ``enc{i}_*`` (level ``i`` from the top), its downsampling
``enc{i}_pool`` or ``enc{i}_down``, the bottleneck ``bottleneck_*``, decoder
``dec{i}_*`` with upsampling ``dec{i}_up`` (and ``dec{i}_up_conv`` where channels are
adjusted), the head ``logits`` and deep-supervision heads ``logits_ds{i}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
from keras import layers

from medseg.models.blocks import (
    ARGMAX_POOL,
    BED_OF_NAILS,
    CONV,
    CONV_TRANSPOSE,
    CROP,
    MAX_POOL,
    MAX_UNPOOL,
    NORMS,
    UPSAMPLE,
    check_activation,
    check_choice,
    check_spatial_dims,
    conv_block,
    conv_unit,
)

UPSAMPLING_MODES = ("transpose", "nearest", "bed_of_nails", "max_unpool")
DOWNSAMPLING_MODES = ("maxpool", "strided_conv")
PADDINGS = ("same", "valid")


@dataclass(frozen=True)
class _Arch:
    """The validated options every U-Net-shaped builder shares."""

    spatial_dims: int
    filters: tuple[int, ...]
    convs_per_level: int
    kernel_size: int
    upsampling: str
    downsampling: str
    padding: str
    padding_mode: str
    norm: str
    activation: str
    dropout: float
    residual: bool
    dilation: int
    patch_size: tuple[int, ...] | None

    @property
    def depth(self) -> int:
        return len(self.filters) - 1

    def block_kwargs(self) -> dict:
        return dict(
            spatial_dims=self.spatial_dims,
            convs=self.convs_per_level,
            residual=self.residual,
            dropout=self.dropout,
            activation=self.activation,
            kernel_size=self.kernel_size,
            dilation=self.dilation,
            padding=self.padding,
            padding_mode=self.padding_mode,
            norm=self.norm,
        )


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _validated(spatial_dims, filters, patch_size, **options) -> _Arch:
    from medseg.layers import PADDING_MODES

    check_spatial_dims(spatial_dims)
    try:
        filters = tuple(filters)
    except TypeError:
        filters = ()
    if len(filters) < 2 or not all(
        isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters
    ):
        raise ValueError(
            f"filters must list at least 2 positive ints (one per level, the last is "
            f"the bottleneck), got {filters!r}"
        )
    check_choice(options["upsampling"], "upsampling", UPSAMPLING_MODES)
    check_choice(options["downsampling"], "downsampling", DOWNSAMPLING_MODES)
    check_choice(options["padding"], "padding", PADDINGS)
    check_choice(options["padding_mode"], "padding_mode", PADDING_MODES)
    check_choice(options["norm"], "norm", NORMS)
    check_activation(options["activation"])
    _positive_int(options["convs_per_level"], "convs_per_level")
    _positive_int(options["dilation"], "dilation")
    kernel = _positive_int(options["kernel_size"], "kernel_size")
    if kernel % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel}")
    if not 0.0 <= options["dropout"] < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {options['dropout']!r}")
    if options["upsampling"] == "max_unpool" and options["downsampling"] != "maxpool":
        raise ValueError("upsampling='max_unpool' needs downsampling='maxpool'")
    if options["upsampling"] == "max_unpool" and options["padding"] == "valid":
        raise ValueError("upsampling='max_unpool' needs padding='same'")
    if patch_size is not None:
        patch_size = tuple(patch_size)
        if len(patch_size) != spatial_dims or not all(
            isinstance(n, int) and n > 0 for n in patch_size
        ):
            raise ValueError(
                f"patch_size must be {spatial_dims} positive ints, got {patch_size!r}"
            )
    arch = _Arch(spatial_dims, filters, patch_size=patch_size, **options)
    _check_patch(arch)
    return arch


def _check_patch(arch: _Arch) -> None:
    if arch.padding == "valid" and arch.patch_size is None:
        raise ValueError("padding='valid' needs patch_size (the skip crops are static)")
    if arch.patch_size is None:
        return
    for n in arch.patch_size:
        if arch.padding == "same" and n % 2**arch.depth:
            raise ValueError(
                f"patch_size {arch.patch_size}: each size must be divisible by "
                f"2**depth = {2**arch.depth} with padding='same'"
            )
        if (
            arch.padding == "valid"
            and unet_output_size(
                n,
                depth=arch.depth,
                convs_per_level=arch.convs_per_level,
                kernel_size=arch.kernel_size,
                dilation=arch.dilation,
            )
            is None
        ):
            valid = valid_unet_input_sizes(
                depth=arch.depth,
                convs_per_level=arch.convs_per_level,
                kernel_size=arch.kernel_size,
                dilation=arch.dilation,
                max_size=n + 64,
            )
            raise ValueError(
                f"patch_size {arch.patch_size}: {n} is not a valid input size for a "
                f"'valid' U-Net of depth {arch.depth}; nearby valid sizes: {valid[-4:]}"
            )


def unet_output_size(
    input_size: int,
    *,
    depth: int,
    convs_per_level: int = 2,
    kernel_size: int = 3,
    dilation: int = 1,
) -> int | None:
    """Output size of a 'valid' U-Net along one axis, or ``None`` if the input does not
    fit.

    Each conv trims ``(kernel_size - 1) * dilation``; each pooling halves and must see
    an even size; each upsampling doubles. Original U-Net: 572 -> 388.
    """
    trim = convs_per_level * (kernel_size - 1) * dilation
    n = input_size
    for _ in range(depth):
        n -= trim
        if n <= 0 or n % 2:
            return None
        n //= 2
    n -= trim
    if n <= 0:
        return None
    for _ in range(depth):
        n = 2 * n - trim
        if n <= 0:
            return None
    return n


def valid_unet_input_sizes(
    *,
    depth: int,
    convs_per_level: int = 2,
    kernel_size: int = 3,
    dilation: int = 1,
    max_size: int = 1024,
) -> list[int]:
    """Every input size up to ``max_size`` that a 'valid' U-Net accepts."""
    return [
        n
        for n in range(1, max_size + 1)
        if unet_output_size(
            n,
            depth=depth,
            convs_per_level=convs_per_level,
            kernel_size=kernel_size,
            dilation=dilation,
        )
        is not None
    ]


def _inputs(arch: _Arch, in_channels: int):
    _positive_int(in_channels, "in_channels")
    shape = arch.patch_size or (None,) * arch.spatial_dims
    return keras.Input((*shape, in_channels), name="image")


def _encoder(x, arch: _Arch):
    """Encoder levels and bottleneck. Returns (x, skips, argmax indices per level)."""
    skips, indices = [], []
    d = arch.spatial_dims
    for i, f in enumerate(arch.filters[:-1]):
        x = conv_block(x, f, name=f"enc{i}", **arch.block_kwargs())
        skips.append(x)
        if arch.downsampling == "strided_conv":
            x = conv_unit(
                x,
                f,
                spatial_dims=d,
                name=f"enc{i}",
                index="_down",
                kernel_size=2,
                strides=2,
                padding="valid",
                norm=arch.norm,
                activation=arch.activation,
            )
        elif arch.upsampling == "max_unpool":
            x, where = ARGMAX_POOL[d](2, name=f"enc{i}_pool")(x)
            indices.append(where)
        else:
            x = MAX_POOL[d](2, name=f"enc{i}_pool")(x)
    x = conv_block(x, arch.filters[-1], name="bottleneck", **arch.block_kwargs())
    return x, skips, indices


def _upsample(x, level: int, arch: _Arch, skip=None, indices=None):
    """Doubles the resolution and sets the channels to ``filters[level]``."""
    d, f = arch.spatial_dims, arch.filters[level]
    if arch.upsampling == "transpose":
        return CONV_TRANSPOSE[d](f, 2, strides=2, name=f"dec{level}_up")(x)
    if arch.upsampling == "max_unpool":
        # SegNet: match the encoder's channels, then put values back at the argmax
        x = CONV[d](f, 1, name=f"dec{level}_up_conv")(x)
        return MAX_UNPOOL[d](2, name=f"dec{level}_up")([x, indices, skip])
    layer = UPSAMPLE[d](2) if arch.upsampling == "nearest" else BED_OF_NAILS[d](2)
    layer.name = f"dec{level}_up"
    x = layer(x)
    return CONV[d](f, 1, name=f"dec{level}_up_conv")(x)


def _crop_to(skip, x, name: str, spatial_dims: int):
    """Centre-crops a skip connection to the decoder's size ('valid' U-Net)."""
    crops = []
    for big, small in zip(skip.shape[1:-1], x.shape[1:-1], strict=True):
        extra = big - small
        crops.append((extra // 2, extra - extra // 2))
    if all(c == (0, 0) for c in crops):
        return skip
    return CROP[spatial_dims](tuple(crops), name=name)(skip)


def build_unet(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    filters: Sequence[int] = (32, 64, 128, 256, 320),
    convs_per_level: int = 2,
    kernel_size: int = 3,
    upsampling: str = "transpose",
    downsampling: str = "maxpool",
    padding: str = "same",
    padding_mode: str = "zero",
    norm: str = "instance",
    activation: str = "relu",
    dropout: float = 0.0,
    residual: bool = False,
    dilation: int = 1,
    deep_supervision: int = 0,
    patch_size: Sequence[int] | None = None,
    name: str = "unet",
) -> keras.Model:
    """Builds a 2D or 3D U-Net that outputs per-class logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (modalities).
        num_classes: output channels, background included.
        filters: channels per resolution level; the last is the bottleneck, so
            ``len(filters) - 1`` poolings.
        convs_per_level: convolutions per block.
        kernel_size: odd convolution size.
        upsampling: ``"transpose"`` (2x2 transposed conv), ``"nearest"`` (Keras
            UpSampling + 1x1 conv), ``"bed_of_nails"`` (zero insertion + 1x1 conv) or
            ``"max_unpool"`` (1x1 conv + unpooling at the encoder's argmax, SegNet).
        downsampling: ``"maxpool"`` or ``"strided_conv"`` (2x2, stride 2).
        padding: ``"same"``, or ``"valid"`` as the original U-Net (unpadded convs,
            centre-cropped skips; see :func:`unet_output_size`). ``"valid"`` needs
            ``patch_size``.
        padding_mode: ``"zero"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        activation: a Keras activation name.
        dropout: spatial dropout rate after each block.
        residual: residual blocks (shortcut projected by a 1x1 conv).
        dilation: dilation rate of the block convolutions.
        deep_supervision: number of extra lower-resolution outputs (``logits_ds1``...).
        patch_size: fixed spatial input size; ``None`` accepts any size divisible by ``2
            ** (len(filters) - 1)``.
        name: model name.

    Returns:
        A functional model, input ``(B, *S, in_channels)``; output logits ``(B, *S_out,
        num_classes)`` (``S_out = S`` for 'same' padding), or a list ``[logits,
        logits_ds1, ...]`` with deep supervision, highest resolution first.

    Raises:
        ValueError: naming any bad argument.
    """
    arch = _validated(
        spatial_dims,
        filters,
        patch_size,
        convs_per_level=convs_per_level,
        kernel_size=kernel_size,
        upsampling=upsampling,
        downsampling=downsampling,
        padding=padding,
        padding_mode=padding_mode,
        norm=norm,
        activation=activation,
        dropout=dropout,
        residual=residual,
        dilation=dilation,
    )
    _positive_int(num_classes, "num_classes")
    if not isinstance(deep_supervision, int) or not 0 <= deep_supervision < arch.depth:
        raise ValueError(
            f"deep_supervision must be an int in [0, {arch.depth - 1}], "
            f"got {deep_supervision!r}"
        )
    inputs = _inputs(arch, in_channels)
    x, skips, indices = _encoder(inputs, arch)
    extra_outputs = []
    for level in reversed(range(arch.depth)):
        x = _upsample(x, level, arch, skips[level], indices[level] if indices else None)
        skip = skips[level]
        if arch.padding == "valid":
            skip = _crop_to(skip, x, f"dec{level}_crop", arch.spatial_dims)
        # the skip and upsampled tensors, convolved as their concatenation
        x = conv_block(
            [skip, x], arch.filters[level], name=f"dec{level}", **arch.block_kwargs()
        )
        if 1 <= level <= deep_supervision:
            head = CONV[arch.spatial_dims](num_classes, 1, name=f"logits_ds{level}")
            extra_outputs.insert(0, head(x))
    logits = CONV[arch.spatial_dims](num_classes, 1, name="logits")(x)
    outputs = [logits, *extra_outputs] if deep_supervision else logits
    return keras.Model(inputs, outputs, name=name)


def build_autoencoder(
    *,
    spatial_dims: int,
    in_channels: int,
    filters: Sequence[int] = (32, 64, 128, 256, 320),
    convs_per_level: int = 2,
    kernel_size: int = 3,
    upsampling: str = "transpose",
    downsampling: str = "maxpool",
    padding_mode: str = "zero",
    norm: str = "instance",
    activation: str = "relu",
    dropout: float = 0.0,
    residual: bool = False,
    dilation: int = 1,
    denoising: bool = False,
    noise_std: float = 0.1,
    patch_size: Sequence[int] | None = None,
    name: str = "autoencoder",
) -> keras.Model:
    """Builds a convolutional autoencoder whose encoder is a U-Net encoder.

    The encoder and bottleneck are built and named exactly as in :func:`build_unet`
    with the same ``filters`` (and block options), so a trained autoencoder's encoder
    loads into such a U-Net with :func:`transfer_encoder_weights`. The decoder has no
    skip connections (``max_unpool`` still uses the encoder's argmax indices, as
    SegNet does). ``denoising`` adds Gaussian noise of ``noise_std`` to the input
    while training (layer ``noise``). Output ``reconstruction``: linear,
    ``in_channels`` channels, the input's shape.

    Raises:
        ValueError: naming any bad argument.
    """
    arch = _validated(
        spatial_dims,
        filters,
        patch_size,
        convs_per_level=convs_per_level,
        kernel_size=kernel_size,
        upsampling=upsampling,
        downsampling=downsampling,
        padding="same",
        padding_mode=padding_mode,
        norm=norm,
        activation=activation,
        dropout=dropout,
        residual=residual,
        dilation=dilation,
    )
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    inputs = _inputs(arch, in_channels)
    x = layers.GaussianNoise(noise_std, name="noise")(inputs) if denoising else inputs
    x, skips, indices = _encoder(x, arch)
    for level in reversed(range(arch.depth)):
        x = _upsample(x, level, arch, skips[level], indices[level] if indices else None)
        x = conv_block(
            x, arch.filters[level], name=f"dec{level}", **arch.block_kwargs()
        )
    outputs = CONV[arch.spatial_dims](in_channels, 1, name="reconstruction")(x)
    return keras.Model(inputs, outputs, name=name)


def transfer_encoder_weights(
    source: keras.Model,
    target: keras.Model,
    prefixes: Sequence[str] = ("enc", "bottleneck"),
) -> dict:
    """Copies the weights of layers named ``prefix*`` from ``source`` into ``target``.

    Layers are matched by name and must have weights of identical shapes.

    Returns:
        ``{"matched": [names], "skipped": {name: reason}}`` over the target's layers
        with weights whose names start with a prefix.
    """
    source_layers = {layer.name: layer for layer in source.layers}
    report = {"matched": [], "skipped": {}}
    for layer in target.layers:
        if not layer.weights or not layer.name.startswith(tuple(prefixes)):
            continue
        other = source_layers.get(layer.name)
        if other is None:
            report["skipped"][layer.name] = "not in source"
            continue
        weights = other.get_weights()
        shapes = [w.shape for w in weights]
        if shapes != [tuple(w.shape) for w in layer.weights]:
            report["skipped"][layer.name] = (
                f"shape mismatch: source {shapes}, target "
                f"{[tuple(w.shape) for w in layer.weights]}"
            )
            continue
        layer.set_weights(weights)
        report["matched"].append(layer.name)
    return report
