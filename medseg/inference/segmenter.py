"""A segmentation bundle ready to segment scans: the training-time preprocessing,
sliding-window prediction, and the way back to each scan's own grid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.inference.ood import OOD_ACTIONS, ScanCheck, Verdict, combined
from medseg.inference.postprocessing import checked_min_size, clean_labels
from medseg.inference.precision import (
    SLOW_BFLOAT16,
    bfloat16_is_slow_here,
    inference_precision,
)
from medseg.inference.scan_plan import WindowCount, _scan_notes, check_scan
from medseg.inference.sliding_window import (
    output_window,
    slicewise,
    sliding_window_predict,
    windows_per_pass,
)
from medseg.io.files import atomic_output
from medseg.io.volume import Volume
from medseg.preprocessing import geometry

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """A segmentation on the scan's own grid: ``labels`` (declared label values) and,
    when asked for, ``probabilities`` ``(*S, K)`` float16 in the order of ``values``
    (the label value of each class) and ``names``, and uncertainty maps ``(*S)``
    float32 in [0, 1]: ``entropy``, of the probabilities averaged over the passes
    (test-time mirrors, ensemble members), and ``mutual_information``, that entropy
    less the mean of each pass's own, the passes' disagreement (``None`` for a single
    pass); both in units of log K (1: all K classes equally likely)."""

    labels: Volume
    probabilities: np.ndarray | None = None
    values: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    nonfinite_replaced: int = 0
    notes: tuple[str, ...] = ()  # warnings about the scan (see field_of_view_note)
    entropy: np.ndarray | None = None
    mutual_information: np.ndarray | None = None
    #: how the scan compares with the training scans (``None``: not checked)
    ood: Verdict | None = None
    #: with uncertainty, each foreground label value's Dice as its probabilities
    #: expect it: 2 sum(p m) / (sum p + sum m), m the label's argmax mask
    dice_estimate: dict[int, float] | None = None

    def __repr__(self) -> str:
        grid = " x ".join(map(str, self.labels.spatial_shape))
        spacing = " x ".join(f"{s:g}" for s in self.labels.spacing)
        array = self.labels.array
        counts = ", ".join(
            f"{name} {np.count_nonzero(array == value)}"
            for value, name in zip(self.values, self.names, strict=True)
            if value != 0
        )
        extra = "; with probabilities" if self.probabilities is not None else ""
        return (
            f"Prediction(labels on {grid} voxels of {spacing} mm; voxels per label: "
            f"{counts}{extra})"
        )


class Segmenter:
    """A segmentation bundle ready to segment scans: the training-time preprocessing,
    sliding-window prediction, and the way back to each scan's own grid.

    Args:
        bundle: bundle folder (``model.keras`` + ``medseg.json``).
        overlap: sliding-window overlap.
        mirror_axes: test-time augmentation: also predict each window mirrored along
            these axes of the RAS-reoriented scan and average; ``()`` for none. A 2D
            network trained on slices of volumes (the plan's ``slice_axis``) segments a
            volume slice by slice, and its axes are the slice's (the volume's other
            two, in order).
        batch_size: windows per forward pass; ``None``: :func:`windows_per_pass` of
            the bundle's window.
        keep_largest: keep only the largest component of each label.
        min_size_mm3: remove components of a label smaller than this.
        probabilities: also return the class probabilities on the scan's grid.
        uncertainty: also return the uncertainty maps on the scan's grid (see
            :class:`Prediction`); each window's probabilities are then computed too.
        allow_modified: accept a model file whose sha256 differs from the bundle's
            record (see :func:`medseg.bundle.verify`).
        precision: ``"float32"``, ``"bfloat16"`` (convolutions in bfloat16, logits
            and blending in float32), or ``"auto"``: bfloat16 on a CPU with AMX
            bfloat16 units and no GPU, float32 otherwise (see
            :func:`inference_precision`).
        nonfinite: ``"error"`` or ``"replace"`` NaN/Inf voxels in place of the
            bundle's policy (see
            :func:`medseg.preprocessing.intensity.handle_nonfinite`);
            ``None`` keeps the bundle's. ``Prediction.nonfinite_replaced`` counts
            the voxels replaced.
        ood: a scan unlike the training scans (:mod:`medseg.inference.ood`):
            ``"warn"`` (a note naming what is off, and ``Prediction.ood``),
            ``"error"`` (refused with :class:`InputFileError`) or ``"off"``.
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        overlap: float = 0.5,
        mirror_axes: Sequence[int] = (),
        batch_size: int | None = None,
        keep_largest: bool = False,
        min_size_mm3: float = 0.0,
        probabilities: bool = False,
        allow_modified: bool = False,
        precision: str = "auto",
        nonfinite: str | None = None,
        uncertainty: bool = False,
        ood: str = "warn",
    ):
        from medseg import bundle as bundles
        from medseg.models import load_model, with_precision
        from medseg.models.info import flops_per_voxel

        self.bundle = bundle
        self.metadata = bundles.verify(bundle, allow_modified=allow_modified)
        if self.metadata.task != "segmentation":
            raise InputFileError(
                bundle, f"a {self.metadata.task} bundle, not a segmentation bundle"
            )
        network = load_model(bundle)
        self.precision = inference_precision(
            precision,
            lambda: flops_per_voxel(network, self.metadata.patch_size),
        )
        if self.precision == "bfloat16" and bfloat16_is_slow_here():
            logger.warning("--precision bfloat16: %s; use auto", SLOW_BFLOAT16)
        self.model = with_precision(
            network, "mixed_bfloat16" if self.precision == "bfloat16" else "float32"
        )
        classes = self.model.output_shape[-1]
        if classes != len(self.metadata.labels):
            raise InputFileError(
                bundle,
                f"medseg.json names {len(self.metadata.labels)} labels, but the "
                f"network outputs {classes} classes",
            )
        self.preprocessor = self.metadata.preprocessor
        if nonfinite is not None:
            self.preprocessor = replace(self.preprocessor, nonfinite=nonfinite)
        self.patch_size = self.metadata.patch_size
        self.slice_axis = self.metadata.slice_axis
        self.window = self.metadata.window
        self.output_window = output_window(self.model, self.window, self.slice_axis)
        in_plane = [a for a in range(len(self.window)) if a != self.slice_axis]
        self._window_mirror = tuple(in_plane[a] for a in mirror_axes)
        values = self.metadata.label_values
        self.names = list(self.metadata.label_names)
        self.values = np.array(values, dtype=np.min_scalar_type(max(values)))
        self.overlap = overlap
        self.mirror_axes = tuple(mirror_axes)
        self.batch_size = batch_size or windows_per_pass(self.window)
        self.keep_largest = keep_largest
        self.min_size_mm3 = checked_min_size(min_size_mm3)
        self.want_probabilities = probabilities
        self.want_uncertainty = uncertainty
        #: forward passes each window gets (itself and its mirrored copies)
        self.passes = 2 ** len(set(self._window_mirror))
        if ood not in OOD_ACTIONS:
            raise ValueError(f"ood must be one of {OOD_ACTIONS}, got {ood!r}")
        self.ood = ood
        self.ood_check = ScanCheck(self.metadata) if ood != "off" else None
        #: the layer whose output, averaged over each window and then over the
        #: windows of an image, :attr:`features` holds (``None``: not computed)
        self.feature_layer = self.ood_check.layer if self.ood_check else None
        self.features: np.ndarray | None = None
        self._feature_sums: list | None = None
        self._calls = 0
        self._forward = None
        #: called as windows are predicted with the scan's name, the windows done and
        #: the windows in all (see :class:`WindowCount`); ``None``: not called
        self.on_windows: Callable[[str, int, int], None] | None = None

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """The network's logits for a batch of windows, in float32; with
        ``uncertainty``, followed by the probabilities and their normalised entropy."""
        import tensorflow as tf

        if self._forward is None:
            model, uncertainty = self.model, self.want_uncertainty
            layer = self.feature_layer
            if layer is not None:
                import keras

                model = keras.Model(
                    model.inputs, [model.outputs[0], model.get_layer(layer).output]
                )
            scale = 1 / np.log(len(self.values))
            # logits over the bundle's temperature: blending and mirroring average
            # them, so the one softmax after is the calibrated one
            inverse_temperature = 1.0 / self.metadata.temperature

            @tf.function(reduce_retracing=True)
            def forward(x):
                if layer is None:
                    logits = tf.cast(model(x, training=False), tf.float32)
                    pooled = tf.zeros((tf.shape(x)[0], 0))
                else:
                    logits, features = model(x, training=False)
                    logits = tf.cast(logits, tf.float32)
                    spatial = list(range(1, len(features.shape) - 1))
                    pooled = tf.reduce_mean(tf.cast(features, tf.float32), spatial)
                if inverse_temperature != 1.0:
                    logits = logits * inverse_temperature
                if not uncertainty:
                    return logits, pooled
                probabilities = tf.nn.softmax(logits, axis=-1)
                entropy = -tf.reduce_sum(
                    tf.math.xlogy(probabilities, probabilities), -1, keepdims=True
                )
                return tf.concat([logits, probabilities, entropy * scale], -1), pooled

            self._forward = forward
        outputs, pooled = self._forward(batch)
        # the sliding window passes each batch as it is, then its mirrored copies:
        # the features are the windows' as they are, with test-time mirroring or
        # without (mirrored, a scan's features differ enough to move its score)
        as_it_is = self._calls % self.passes == 0
        self._calls += 1
        if self._feature_sums is not None and pooled.shape[-1] and as_it_is:
            self._feature_sums.append((np.asarray(pooled).sum(0), len(pooled)))
        return np.asarray(outputs)

    def probabilities(self, image: np.ndarray, progress=None) -> np.ndarray:
        """Class probabilities ``(*S, K)`` of a preprocessed image: the softmax of the
        windows' logits over the bundle's temperature, blended and averaged over the
        test-time mirrors; ``progress`` as :func:`sliding_window_predict` takes it.
        With ``uncertainty``, ``2K + 1`` channels: then the mean over the passes of
        each pass's probabilities, and of their normalised entropy. :attr:`features`
        becomes the image's bottleneck features, averaged over its windows (not
        their mirrored copies), where the bundle profiles them."""
        self._feature_sums, self._calls = [], 0
        scores = sliding_window_predict(
            image,
            slicewise(self._predict_batch, self.slice_axis),
            patch_size=self.window,
            overlap=self.overlap,
            batch_size=self.batch_size,
            mirror_axes=self._window_mirror,
            progress=progress,
            output_size=self.output_window,
            softmax=True,
            logit_channels=len(self.values),
        )
        sums, self._feature_sums = self._feature_sums, None
        self.features = (
            sum(total for total, _ in sums) / sum(n for _, n in sums) if sums else None
        )
        check_output(scores, self.bundle)
        return scores

    def verdict(self, volume: Volume, image: np.ndarray) -> Verdict | None:
        """How ``volume`` (preprocessed: ``image``, just segmented) compares with
        the training scans; ``None`` with ``ood="off"``."""
        if self.ood_check is None:
            return None
        name = str(volume.path or "input")
        return self.ood_check.verdict(name, volume.array, image, self.features)

    def check(self, volume: Volume) -> Volume:
        """``volume`` as the network takes it (a greyscale picture stored with colour
        channels: its one grey channel).

        Raises:
            InputFileError: the scan has other spatial dimensions or channels than the
                model segments, or is a single slice given to a 3D network.
        """
        return check_scan(volume, self.window, self.metadata.in_channels)

    def predict(self, volume: Volume) -> Prediction:
        """Labels (and probabilities) on ``volume``'s own grid and header.

        The probabilities go back to the scan's grid one class at a time (linear
        interpolation where the bundle resamples), with a running argmax, so no
        multi-class volume is resampled at once.
        """
        volume = self.check(volume)
        notes = _scan_notes(volume, [self])
        image, records = self.preprocessor.image(volume)
        scores = self.probabilities(
            image, WindowCount(self.on_windows, volume).member()
        )
        verdict = combined(volume, [(self, self.verdict(volume, image))])
        del image
        prediction = _on_scan_grid(volume, [(scores, records, 1.0)], self, notes)
        return replace(
            prediction,
            notes=prediction.notes + verdict.notes,
            ood=verdict if self.ood_check is not None else None,
        )

    def segment(self, volume: Volume) -> Volume:
        """Label map (declared label values) on ``volume``'s own grid and header."""
        return self.predict(volume).labels


def check_output(scores: np.ndarray, bundle) -> None:
    """Refuses a network output that is not finite: NaN probabilities would be
    written as background without a word.

    Raises:
        InputFileError: naming the bundle.
    """
    bad = scores.size - np.count_nonzero(np.isfinite(scores))
    if bad:
        raise InputFileError(
            bundle,
            f"the network's output holds {bad:,} NaN/Inf values on this scan (weights "
            "that are NaN, or an input it cannot take); nothing written",
        )


def _on_scan_grid(volume: Volume, parts, options, notes) -> Prediction:
    """The prediction on ``volume``'s grid from class probabilities on preprocessed
    grids: ``parts`` of ``(scores (*P, K), records, weight)`` (weights summing to 1)
    are taken back one class at a time and summed, with a running argmax;
    ``options`` (a :class:`Segmenter` or :class:`Ensemble`) gives the label values
    and names and the post-processing."""
    notes, replaced = notes
    shape = volume.spatial_shape
    count = len(options.values)
    best = classes = probabilities = None
    for k in range(count):
        score = None
        for scores, records, weight in parts:
            part = _to_scan_grid(
                volume.with_array(scores[..., k : k + 1]), records, 1.0 if k == 0 else 0
            )
            if part.shape != shape:  # a bundle whose records do not fit the scan
                raise ValueError(f"prediction on grid {part.shape}, scan is {shape}")
            if weight != 1.0:
                part = part * np.float32(weight)
            score = part if score is None else score + part
        if best is None:
            best = np.array(score, dtype=np.float32)
            classes = np.zeros(shape, np.min_scalar_type(count - 1))
        else:
            better = score > best
            classes[better] = k
            np.maximum(best, score, out=best)
        if options.want_probabilities:
            if probabilities is None:
                probabilities = np.empty((*shape, count), np.float16)
            probabilities[..., k] = score
    del best
    entropy = information = estimate = None
    if options.want_uncertainty:
        entropy, information, estimate = _uncertainty(
            volume, parts, count, options.passes, classes, options.values
        )
    del parts
    labels = options.values[classes]
    if options.keep_largest or options.min_size_mm3 > 0:
        labels = clean_labels(
            labels,
            volume.spacing,
            background=options.values[0],
            keep_largest=options.keep_largest,
            min_size_mm3=options.min_size_mm3,
        )
    return Prediction(
        volume.with_array(labels[..., None]),
        probabilities,
        tuple(int(v) for v in options.values),
        tuple(options.names),
        replaced,
        notes,
        entropy,
        information,
        dice_estimate=estimate,
    )


def _uncertainty(volume: Volume, parts, count: int, passes: int, classes, values):
    """``(entropy, mutual information, Dice estimates)`` on ``volume``'s grid from
    the parts' mean probabilities and mean entropy of the passes (channels ``K:2K``
    and ``2K``); no mutual information for a single pass. The estimates, per
    foreground label value, set the mean probabilities against the argmax
    ``classes`` (before post-processing)."""
    entropy = np.zeros(volume.spatial_shape, np.float32)
    estimate = {}
    for k in range(count):
        mean = _on_grid(volume, parts, count + k, 1.0 if k == 0 else 0.0)
        entropy -= np.asarray(_xlogy(mean), np.float32)
        if k:
            mask = classes == k
            overlap = float(mean[mask].sum(dtype=np.float64))
            total = float(mean.sum(dtype=np.float64)) + np.count_nonzero(mask)
            estimate[int(values[k])] = 2 * overlap / total if total > 0 else 1.0
    entropy /= np.float32(np.log(count))
    np.clip(entropy, 0.0, 1.0, out=entropy)
    if passes == 1:
        return entropy, None, estimate
    own = _on_grid(volume, parts, 2 * count, 0.0)
    return entropy, np.maximum(entropy - own, 0.0), estimate


def _on_grid(volume: Volume, parts, channel: int, fill: float) -> np.ndarray:
    """The parts' weighted sum of one channel on ``volume``'s grid."""
    total = None
    for scores, records, weight in parts:
        part = _to_scan_grid(
            volume.with_array(scores[..., channel : channel + 1]), records, fill
        )
        part = part * np.float32(weight) if weight != 1.0 else part
        total = part if total is None else total + part
    return total


def _xlogy(p: np.ndarray) -> np.ndarray:
    """``p * log(p)``, 0 where ``p`` is 0 (or below, from interpolation)."""
    p = np.clip(p, 0.0, 1.0)
    return np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0)


def _to_scan_grid(channel: Volume, records, fill: float) -> np.ndarray:
    """One channel on the preprocessed grid -> ``(*S)`` on the scan's grid, undoing the
    preprocessing records last first (resampling linearly, padding crops with
    ``fill``)."""
    for record in reversed(records):
        if isinstance(record, geometry.ResampleRecord):
            channel = record.undo(channel, order=1)
        else:
            channel = record.undo(channel, fill=fill)
    return np.asarray(channel.array)[..., 0]


def write_probabilities(path, probabilities: np.ndarray, affine, values, names) -> None:
    """Writes ``probabilities`` (float16 ``(*S, K)``) with the scan's affine and the
    label values and names to a compressed ``.npz``, atomically.

    Load with ``numpy.load(path)["probabilities"]``.
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            probabilities=probabilities,
            affine=np.asarray(affine, np.float64),
            label_values=np.asarray(values),
            label_names=np.asarray(names, dtype=str),
        )
