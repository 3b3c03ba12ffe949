"""Looking into a network's layers: the kernels of a convolution, and the feature
maps a layer makes of one scan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.errors import InputFileError


@dataclass
class Kernels:
    """A convolution's kernels, one picture per (output, input) channel pair.

    Attributes:
        layer: the layer's name.
        weights: ``(*kernel, in, out)`` as Keras stores them.
    """

    layer: str
    weights: np.ndarray

    def tiles(self) -> list[np.ndarray]:
        """Each output channel's kernel for input channel 0, as a 2D tile: a 3D
        kernel's slices side by side along its last axis."""
        kernels = np.moveaxis(self.weights[..., 0, :], -1, 0)  # (out, *kernel)
        if kernels.ndim == 3:
            return list(kernels)
        return [np.concatenate(list(np.moveaxis(k, -1, 0)), axis=1) for k in kernels]

    def record(self) -> dict:
        return {
            "method": "filters",
            "layer": self.layer,
            "kernel_shape": list(self.weights.shape),
            "weight_min": float(self.weights.min()),
            "weight_max": float(self.weights.max()),
        }


def convolutions(model) -> list:
    """The layers of ``model`` that hold convolution kernels, in order."""
    return [
        layer
        for layer in model.layers
        if "conv" in type(layer).__name__.lower() and layer.get_weights()
    ]


def kernels(model, layer: str | None = None, source="model") -> Kernels:
    """The kernels of ``layer`` (default: the first convolution).

    Raises:
        InputFileError: naming ``source`` and the convolutions there are.
    """
    found = convolutions(model)
    if not found:
        raise InputFileError(source, "no convolution to show")
    if layer is None:
        return Kernels(found[0].name, np.asarray(found[0].get_weights()[0]))
    for candidate in found:
        if candidate.name == layer:
            return Kernels(layer, np.asarray(candidate.get_weights()[0]))
    names = ", ".join(c.name for c in found)
    raise InputFileError(source, f"no convolution {layer!r}; its convolutions: {names}")


@dataclass
class Activations:
    """The feature maps of one layer for one input.

    Attributes:
        layer: the layer's name.
        maps: ``(*spatial, channels)``.
        top: the channels with the largest mean activation, largest first.
    """

    layer: str
    maps: np.ndarray
    top: list[int]

    def record(self) -> dict:
        return {
            "method": "activations",
            "layer": self.layer,
            "map_shape": list(self.maps.shape),
            "channels_shown": self.top,
            "channel_means": [float(self.maps[..., c].mean()) for c in self.top],
        }


def activations(subject, layer: str, count: int = 16) -> Activations:
    """The feature maps ``layer`` makes of the subject's input, and its ``count``
    most active channels."""
    import keras

    from medseg.explain.maps import _single, layer_named

    chosen = layer_named(subject, layer)
    if len(chosen.output.shape) != subject.inputs.ndim + 1:
        raise InputFileError(subject.bundle, f"layer {layer!r} has no feature maps")
    tap = keras.Model(_single(subject.model.inputs), chosen.output)
    maps = keras.ops.convert_to_numpy(tap(subject.inputs[None], training=False))[0]
    means = maps.reshape(-1, maps.shape[-1]).mean(axis=0)
    top = [int(c) for c in np.argsort(-means, kind="stable")[:count]]
    return Activations(layer, np.asarray(maps, np.float32), top)
