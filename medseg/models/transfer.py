"""Starting a network from another one's weights (fine-tuning, encoder pretraining).

Layers are matched by name. Same shapes: copied. A first convolution whose kernel
differs only in its input channels: the pretrained kernel is averaged over its input
channels and repeated for the new ones (scaled so the response to a constant input is
unchanged). The output layers of a segmentation network given the pretrained and the
new label names: each class takes the pretrained output of the class of its name, so
labels in another order keep what each learnt, and a class of a new name starts
afresh. Anything else keeps its fresh initialisation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np

#: the output layers of a segmentation network: their last axis is the classes
OUTPUT_LAYERS = ("logits", "logits_ds*")


def adapt_weights(
    source,
    target,
    *,
    prefixes: Sequence[str] | None = None,
    classes: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict:
    """Loads ``source``'s weights into ``target`` where they fit.

    Args:
        source, target: Keras models.
        prefixes: only target layers whose names start with one of these (``None``:
            all layers).
        classes: the label names of ``source``'s and of ``target``'s classes, in
            class order: the output layers (:data:`OUTPUT_LAYERS`) are matched by
            name (:func:`class_sources`) where the two differ.

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
        if classes is not None and _is_output(layer.name):
            taken = _take_classes(layer, old, *classes)
            if taken is not None:
                report[taken[0]][layer.name] = taken[1]
                continue
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


def _is_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_LAYERS)


def class_sources(old: Sequence[str], new: Sequence[str]) -> list[int | None] | None:
    """For each new class, the pretrained class of its name (case, spaces, ``_`` and
    ``-`` aside), or ``None`` for a name the pretrained model has not; ``None`` in
    all when the two label sets are one, in one order."""
    from medseg.io.itk import name_key

    if [name_key(n) for n in old] == [name_key(n) for n in new]:
        return None
    index = {name_key(name): j for j, name in enumerate(old)}
    return [index.get(name_key(name)) for name in new]


def _take_classes(layer, old: list[np.ndarray], old_names, new_names):
    """Sets an output layer's weights class by class from the pretrained ``old``
    (:func:`class_sources`); ``(report section, how)``, or ``None`` where the label
    sets are one (or the weights differ otherwise than in their classes)."""
    sources = class_sources(old_names, new_names)
    fresh = [np.array(w) for w in layer.get_weights()]
    if sources is None or [w.shape[:-1] for w in old] != [w.shape[:-1] for w in fresh]:
        return None
    for k, j in enumerate(sources):
        if j is not None:
            for new, pretrained in zip(fresh, old, strict=True):
                new[..., k] = pretrained[..., j]
    kept = [name for name, j in zip(new_names, sources, strict=True) if j is not None]
    afresh = [name for name, j in zip(new_names, sources, strict=True) if j is None]
    if not kept:
        return "initialised", (
            f"no class named as a pretrained one ({', '.join(map(str, old_names))})"
        )
    layer.set_weights(fresh)
    how = f"classes by name from the pretrained ones: {', '.join(map(str, kept))}"
    return "adapted", how + (
        f"; initialised afresh: {', '.join(map(str, afresh))}" if afresh else ""
    )


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
