"""Starting a network from another one's weights (fine-tuning, encoder pretraining).

Layers are matched by name. Same shapes: copied. A first convolution whose kernel
differs only in its input channels: the pretrained kernel is averaged over its input
channels and repeated for the new ones (scaled so the response to a constant input is
unchanged). Anything else, such as an output layer for another label set, keeps its
fresh initialisation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np


def adapt_weights(source, target, *, prefixes: Sequence[str] | None = None) -> dict:
    """Loads ``source``'s weights into ``target`` where they fit.

    Args:
        source, target: Keras models.
        prefixes: only target layers whose names start with one of these (``None``:
            all layers).

    Returns:
        ``{"copied": [...], "adapted": {name: how}, "initialised": {name: why}}``.
    """
    source_layers = {layer.name: layer for layer in source.layers}
    report: dict = {"copied": [], "adapted": {}, "initialised": {}}
    for layer in target.layers:
        if not layer.weights:
            continue
        if prefixes is not None and not layer.name.startswith(tuple(prefixes)):
            continue
        other = source_layers.get(layer.name)
        if other is None or not other.weights:
            report["initialised"][layer.name] = "not in the pretrained model"
            continue
        old = other.get_weights()
        new_shapes = [tuple(w.shape) for w in layer.weights]
        if [w.shape for w in old] == new_shapes:
            layer.set_weights(old)
            report["copied"].append(layer.name)
            continue
        adapted = _adapt_input_channels(old, new_shapes)
        if adapted is not None:
            layer.set_weights(adapted)
            report["adapted"][layer.name] = (
                f"input channels {old[0].shape[-2]} -> {new_shapes[0][-2]}: "
                "pretrained kernel averaged over channels and repeated"
            )
            continue
        report["initialised"][layer.name] = (
            f"shapes differ: pretrained {[w.shape for w in old]}, here {new_shapes}"
        )
    return report


def _adapt_input_channels(old: list[np.ndarray], new_shapes) -> list | None:
    """A convolution kernel ``(*k, C_in, C_out)`` with another ``C_in`` and everything
    else equal: the mean over the old input channels, repeated, times C_old / C_new."""
    kernel, rest = old[0], old[1:]
    shape = new_shapes[0]
    if (
        kernel.ndim < 3
        or len(shape) != kernel.ndim
        or shape[:-2] != kernel.shape[:-2]
        or shape[-1] != kernel.shape[-1]
        or [w.shape for w in rest] != list(new_shapes[1:])
    ):
        return None
    mean = kernel.mean(axis=-2, keepdims=True)
    scale = kernel.shape[-2] / shape[-2]
    repeated = np.repeat(mean, shape[-2], axis=-2) * scale
    return [repeated.astype(kernel.dtype), *rest]


def freeze_layers(model, patterns: Sequence[str]) -> list[str]:
    """Sets ``trainable = False`` on layers whose names match any glob pattern;
    returns their names."""
    frozen = []
    for layer in model.layers:
        if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen
