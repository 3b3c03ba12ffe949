"""Maps of what a network's decision rests on: occlusion, saliency (SmoothGrad) and
Grad-CAM, each on the network's input and on the scan's own grid."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medseg.errors import InputFileError
from medseg.explain.subject import Subject


@dataclass
class Explanation:
    """A map and what it explains.

    Attributes:
        method: ``occlusion``, ``saliency`` or ``gradcam``.
        subject: the scan, network and target.
        on_input: the map on the network's input ``(*W)``.
        on_scan: the map on the scan's grid ``(*S)``.
        score: the target's score on the unoccluded input.
        settings: what was computed (box, stride, layer, passes, ...).
    """

    method: str
    subject: Subject
    on_input: np.ndarray
    on_scan: np.ndarray
    score: float
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What the JSON beside the map says."""
        return {
            "method": self.method,
            "bundle": str(self.subject.bundle),
            "scan": str(self.subject.volume.path),
            "task": self.subject.task,
            "label": self.subject.label_name,
            "score": self.score,
            "input_shape": list(self.on_input.shape),
            "map_max": float(self.on_input.max()),
            "map_min": float(self.on_input.min()),
            **self.settings,
        }


def _finish(method, subject, on_input, settings) -> Explanation:
    on_input = np.asarray(on_input, np.float32)
    return Explanation(
        method,
        subject,
        on_input,
        np.asarray(subject.to_scan(on_input), np.float32),
        subject.base_score(),
        settings,
    )


def box_starts(size: int, box: int, stride: int) -> list[int]:
    """Starts of an occluding box along one axis: every ``stride`` voxels, the last
    one flush with the end."""
    if box >= size:
        return [0]
    starts = list(range(0, size - box + 1, stride))
    if starts[-1] != size - box:
        starts.append(size - box)
    return starts


def occlusion(
    subject: Subject,
    *,
    box: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Explanation:
    """The fall of the target's score when a box of the input is filled with its
    mean value (:attr:`Subject.fill`), at each voxel the mean over the box positions
    covering it.

    Args:
        box: the box's side in voxels (default: a quarter of the input's largest
            side, at least 2).
        stride: between box positions (default: half the box).
        batch_size: occluded inputs per forward pass.
        progress: called with the passes done and the passes in all.
    """
    import keras

    window = subject.inputs.shape[:-1]
    box, stride = occlusion_box(window, box, stride)
    if box < 1 or stride < 1:
        raise ValueError(f"box and stride must be >= 1, got {box} and {stride}")
    positions = list(itertools.product(*(box_starts(n, box, stride) for n in window)))
    base = subject.base_score()
    total = np.zeros(window, np.float64)
    count = np.zeros(window, np.int32)
    passes = math.ceil(len(positions) / batch_size)
    for number, first in enumerate(range(0, len(positions), batch_size)):
        chunk = positions[first : first + batch_size]
        batch = np.repeat(subject.inputs[None], len(chunk), axis=0)
        boxes = [tuple(slice(s, s + box) for s in start) for start in chunk]
        for i, where in enumerate(boxes):
            batch[(i, *where)] = subject.fill
        scores = keras.ops.convert_to_numpy(subject.score(batch))
        for where, score in zip(boxes, scores, strict=True):
            total[where] += base - float(score)
            count[where] += 1
        if progress is not None:
            progress(number + 1, passes)
    on_input = total / np.maximum(count, 1)
    settings = {"box": box, "stride": stride, "positions": len(positions),
                "forward_passes": passes}  # fmt: skip
    return _finish("occlusion", subject, on_input, settings)


def occlusion_box(window, box: int | None, stride: int | None) -> tuple[int, int]:
    """The box side and stride :func:`occlusion` uses: those given, else a quarter of
    the input's largest side (at least 2) and half the box."""
    box = box or max(2, max(window) // 4)
    return box, stride or max(1, box // 2)


def occlusion_passes(
    window, box: int | None = None, stride: int | None = None, batch_size: int = 8
) -> int:
    """The forward passes :func:`occlusion` makes (for an estimate before it runs)."""
    box, stride = occlusion_box(window, box, stride)
    positions = math.prod(len(box_starts(n, box, stride)) for n in window)
    return math.ceil(positions / batch_size)


def occlusion_estimate(
    subject: Subject,
    box: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> tuple[int, float]:
    """``(passes, seconds)``: the forward passes :func:`occlusion` makes and about
    how long they take, from one pass timed after a first that warms up."""
    import time

    import keras

    passes = occlusion_passes(subject.inputs.shape[:-1], box, stride, batch_size)
    batch = np.repeat(subject.inputs[None], batch_size, axis=0)
    keras.ops.convert_to_numpy(subject.score(batch))
    started = time.perf_counter()
    keras.ops.convert_to_numpy(subject.score(batch))
    return passes, passes * (time.perf_counter() - started)


def saliency(
    subject: Subject, *, smooth: int = 0, noise: float = 0.15, seed: int = 0
) -> Explanation:
    """The magnitude of the gradient of the target's score with respect to the input
    (the largest over channels); with ``smooth`` N, the mean over N copies of the
    input with Gaussian noise of ``noise`` times its range (SmoothGrad)."""
    inputs = subject.inputs[None].astype(np.float32)
    copies = [inputs]
    if smooth:
        rng = np.random.default_rng(seed)
        spread = noise * float(inputs.max() - inputs.min() or 1.0)
        copies = [
            inputs + rng.normal(0, spread, inputs.shape).astype(np.float32)
            for _ in range(smooth)
        ]
    gradients = [np.abs(_gradient(subject, copy)) for copy in copies]
    on_input = np.mean(gradients, axis=0)[0].max(axis=-1)
    settings = {"smooth": smooth, **({"noise": noise} if smooth else {})}
    return _finish("saliency", subject, on_input, settings)


def _gradient(subject: Subject, inputs: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    tensor = tf.convert_to_tensor(inputs)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        score = tf.reduce_sum(subject.score(tensor))
    return tape.gradient(score, tensor).numpy()


def default_layer(subject: Subject) -> str:
    """Grad-CAM's layer by default: a U-Net's coarsest decoder block (its last
    layer), a classifier's last convolutional layer. The decoder block rather than
    the bottleneck: on the shipped hippocampus model the bottleneck's maps (5 x 7 x 5
    for a 40 x 56 x 40 window) put 1.1 to 2.5 times as much inside the structure as
    outside, the decoder block's 2.8 to 6.8 times."""
    names = [layer.name for layer in subject.model.layers]
    levels = sorted(
        {int(n[3:].split("_")[0]) for n in names if n[:3] == "dec" and n[3:4].isdigit()}
    )
    if levels:
        return [n for n in names if n.startswith(f"dec{levels[-1]}_")][-1]
    bottleneck = [n for n in names if n.startswith("bottleneck")]
    if bottleneck:
        return bottleneck[-1]
    convolutional = [
        layer.name
        for layer in subject.model.layers
        if len(getattr(layer, "output", None).shape or ()) == subject.inputs.ndim + 1
        and "conv" in type(layer).__name__.lower()
    ]
    if not convolutional:
        raise InputFileError(subject.bundle, "no convolutional layer for Grad-CAM")
    return convolutional[-1]


def _single(inputs):
    """A model's one input as itself (Keras warns when a list of one is called
    with a tensor)."""
    return inputs[0] if len(inputs) == 1 else inputs


def layer_named(subject: Subject, name: str, spatial: bool = True):
    """The layer ``name`` of the subject's network.

    Raises:
        InputFileError: naming the layers there are (those with spatial outputs
            where ``spatial``).
    """
    for layer in subject.model.layers:
        if layer.name == name:
            return layer
    ranks = subject.inputs.ndim + 1
    names = [
        layer.name
        for layer in subject.model.layers
        if not spatial or len(layer.output.shape) == ranks
    ]
    raise InputFileError(
        subject.bundle, f"no layer {name!r}; its layers are {', '.join(names)}"
    )


def gradcam(subject: Subject, *, layer: str | None = None) -> Explanation:
    """Grad-CAM: the layer's feature maps weighed by the mean gradient of the
    target's score over each map, summed, negative values set to 0, and resized
    (linearly) to the input."""
    import keras
    import tensorflow as tf

    from medseg.preprocessing import geometry

    name = layer or default_layer(subject)
    chosen = layer_named(subject, name)
    if len(chosen.output.shape) != subject.inputs.ndim + 1:
        raise InputFileError(
            subject.bundle, f"layer {name!r} has no spatial output for Grad-CAM"
        )
    model = subject.model
    tap = keras.Model(_single(model.inputs), [chosen.output, model.output])
    inputs = tf.convert_to_tensor(subject.inputs[None].astype(np.float32))
    with tf.GradientTape() as tape:
        features, logits = tap(inputs, training=False)
        score = tf.reduce_sum(subject.target(logits))
    gradients = tape.gradient(score, features).numpy()[0]
    features = features.numpy()[0]
    axes = tuple(range(features.ndim - 1))
    weights = gradients.mean(axis=axes)
    cam = np.maximum((features * weights).sum(axis=-1), 0.0)
    window = subject.inputs.shape[:-1]
    if cam.shape != window:
        cam = geometry.resample_array(cam[..., None], window, order=1)[..., 0]
    settings = {"layer": name, "layer_shape": list(features.shape)}
    return _finish("gradcam", subject, cam, settings)
