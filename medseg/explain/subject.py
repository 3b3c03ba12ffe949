"""What an explanation is about: a bundle's network, one scan as the network sees it,
and the score of the target (a label's or a class's) that the maps explain.

A segmentation network is explained on one window of the preprocessed scan, centred
on the structure it predicts for the target label (the whole scan when it fits in a
window): the score is the label's mean probability inside the region the scan's own
prediction gives it there. A classifier is explained on its whole input: the score
is the class probability. Maps are made on that input and taken back to the scan's
own grid and affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.volume import Volume


@dataclass
class Subject:
    """A scan prepared for explaining.

    Attributes:
        bundle: the bundle folder.
        task: ``"segmentation"`` or ``"classification"``.
        model: the Keras network.
        volume: the scan as read.
        inputs: the network input ``(*W, C)`` (one window, or the classifier's).
        label: the target's index among the network's outputs.
        label_name: its name.
        region: segmentation: the voxels of the input the unoccluded scan predicts
            as the label (the score's region); classification: ``None``.
        to_scan: takes a map ``(*W)`` on the input to the scan's grid ``(*S)``.
        fill: what occlusion fills a box with: the input's mean value, which adds
            no edge or structure of its own (on the shipped hippocampus model the
            input's minimum, a dark blob in these crops, gave maps with a third of
            the contrast between the structure and the rest).
    """

    bundle: Path
    task: str
    model: object
    volume: Volume
    inputs: np.ndarray
    label: int
    label_name: str
    region: np.ndarray | None
    to_scan: object
    fill: float

    def score(self, batch):
        """The target's score of each input of ``batch`` (a tensor or array
        ``(B, *W, C)``), as a tensor ``(B,)``; differentiable."""
        return self.target(self.model(batch, training=False))

    def target(self, logits):
        """The target's score of the network's outputs ``logits``."""
        import keras

        probabilities = keras.ops.softmax(keras.ops.cast(logits, "float32"), axis=-1)
        chosen = probabilities[..., self.label]
        if self.region is None:
            return chosen
        region = keras.ops.convert_to_tensor(self.region.astype(np.float32))
        axes = tuple(range(1, len(self.region.shape) + 1))
        return keras.ops.sum(chosen * region, axis=axes) / float(self.region.sum())

    def base_score(self) -> float:
        import keras

        return float(keras.ops.convert_to_numpy(self.score(self.inputs[None]))[0])


def label_index(names: list[str], values: list[int], label: str | None, bundle) -> int:
    """The output index of ``label`` (a name, any case, or a value); ``None``: the
    first non-background output (the only class of a two-class model).

    Raises:
        InputFileError: naming the labels there are.
    """
    if label is None:
        return 1 if len(names) > 1 else 0
    for index, (name, value) in enumerate(zip(names, values, strict=True)):
        if str(label).lower() in (name.lower(), str(value)):
            return index
    listed = ", ".join(f"{v} ({n})" for v, n in zip(values, names, strict=True))
    raise InputFileError(bundle, f"no label {label!r}; its labels are {listed}")


def prepare(bundle, scan, *, label: str | None = None) -> Subject:
    """The :class:`Subject` of ``scan`` (a path or a Volume) and the segmentation or
    classification bundle ``bundle`` (a folder or a shipped model's name).

    Raises:
        InputFileError: an unreadable scan or bundle, a label the bundle has not, or
            a target label the scan's prediction does not contain.
    """
    from medseg import bundle as bundles
    from medseg.io import read_volume

    folder = bundles.resolve(bundle)
    metadata = bundles.verify(folder)
    volume = scan if isinstance(scan, Volume) else read_volume(scan)
    if metadata.task == "classification":
        return _classification(folder, volume, label)
    if metadata.task != "segmentation":
        raise InputFileError(
            folder, f"a {metadata.task} bundle: explain takes segmentation or "
            "classification bundles"
        )  # fmt: skip
    if metadata.slice_axis is not None:
        raise InputFileError(
            folder,
            "a 2D network on volumes: explain it on 2D pictures, or explain a 3D "
            "network",
        )
    return _segmentation(folder, volume, label)


def _classification(folder: Path, volume: Volume, label: str | None) -> Subject:
    from medseg.inference.classifier import Classifier
    from medseg.preprocessing import geometry

    classifier = Classifier(folder)
    inputs = classifier.prepare(np.asarray(volume.array), volume.path or "image")
    index = label_index(
        classifier.names, list(range(len(classifier.names))), label, folder
    )
    shape = volume.spatial_shape

    def to_scan(window_map: np.ndarray) -> np.ndarray:
        resized = geometry.resample_array(window_map[..., None], shape, order=1)
        return resized[..., 0]

    return Subject(
        folder, "classification", classifier.model, volume, inputs, index,
        classifier.names[index], None, to_scan, float(inputs.mean()),
    )  # fmt: skip


def _segmentation(folder: Path, volume: Volume, label: str | None) -> Subject:
    from medseg.inference.segmenter import Segmenter, _to_scan_grid

    segmenter = Segmenter(folder)
    volume = segmenter.check(volume)
    index = label_index(segmenter.names, list(segmenter.values), label, folder)
    image, records = segmenter.preprocessor.image(volume)
    scores = segmenter.probabilities(image)
    predicted = scores.argmax(-1) == index
    if not predicted.any():
        raise InputFileError(
            volume.path or "image",
            f"the model predicts no {segmenter.names[index]!r} on this scan: nothing "
            "to explain for that label",
        )
    box, pads = _window_around(predicted, segmenter.window)
    # zeros, as the sliding window pads a scan smaller than the window (and training
    # a case smaller than the patch): the network has seen no other padding
    padded = np.pad(image, [*pads, (0, 0)]) if _any(pads) else image
    inputs = padded[box]
    region = np.pad(predicted, pads)[box] if _any(pads) else predicted[box]
    full = image.shape[:-1]

    def to_scan(window_map: np.ndarray) -> np.ndarray:
        on_padded = np.zeros(padded.shape[:-1], np.float32)
        on_padded[box] = window_map
        inner = tuple(slice(a, a + n) for (a, _), n in zip(pads, full, strict=True))
        grid = volume.with_array(on_padded[inner][..., None])
        return _to_scan_grid(grid, records, 0.0)

    return Subject(
        folder, "segmentation", segmenter.model, volume, inputs.astype(np.float32),
        index, segmenter.names[index], region, to_scan, float(inputs.mean()),
    )  # fmt: skip


def _any(pads) -> bool:
    return any(a or b for a, b in pads)


def _window_around(mask: np.ndarray, window) -> tuple[tuple[slice, ...], list]:
    """The window (a box of the padded image) centred on ``mask``'s voxels, and the
    padding that makes an image smaller than the window as large as it."""
    shape = mask.shape
    pads = [((w - n) // 2, w - n - (w - n) // 2) if n < w else (0, 0)
            for n, w in zip(shape, window, strict=True)]  # fmt: skip
    centre = np.argwhere(mask).mean(axis=0)
    box = []
    for axis, (n, w) in enumerate(zip(shape, window, strict=True)):
        size = n + sum(pads[axis])
        start = int(round(centre[axis] + pads[axis][0] - w / 2))
        start = min(max(start, 0), size - w)
        box.append(slice(start, start + w))
    return tuple(box), pads
