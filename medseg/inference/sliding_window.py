"""Sliding-window prediction over a whole scan: windows, Gaussian blending, mirroring,
and 2D networks over a volume's slices."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

logger = logging.getLogger(__name__)


BLENDS = ("gaussian", "constant")


def window_starts(size: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start positions of windows of ``patch`` covering ``size`` with at least
    ``overlap`` between neighbours, spread evenly, first at 0 and last at the end.

    Example: size 110, patch 64, overlap 0.5: step at most 32, so ceil(46 / 32) + 1 = 3
    windows spread over 46 voxels: starts 0, 23, 46.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if patch >= size:
        return [0]
    target_step = max(patch * (1 - overlap), 1)  # a window one voxel deep: every voxel
    count = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


#: windows per forward pass when none is asked for: at least this many ...
LEAST_WINDOWS_PER_PASS = 4


#: ... and more of small windows (a 2D network's slices of volumes), up to about this
#: many voxels a pass ...
VOXELS_PER_PASS = 2**18


#: ... and at most this many windows
MOST_WINDOWS_PER_PASS = 64


def windows_per_pass(window: Sequence[int], least: int = LEAST_WINDOWS_PER_PASS) -> int:
    """How many windows of shape ``window`` one forward pass takes: as many as hold
    :data:`VOXELS_PER_PASS` voxels, but at least ``least`` (large windows, as the
    shipped models' 40 x 56 x 40 and 256 x 256, stay at ``least``) and at most
    :data:`MOST_WINDOWS_PER_PASS`. A pass so holds no more than the larger of
    ``least`` windows and :data:`VOXELS_PER_PASS` voxels."""
    fit = VOXELS_PER_PASS // max(1, math.prod(int(n) for n in window))
    return int(max(least, min(MOST_WINDOWS_PER_PASS, fit)))


def slicewise(predict_fn: Callable, slice_axis: int | None) -> Callable:
    """A 2D network's batch function as one over 3D windows one voxel deep across
    ``slice_axis`` (``(B, *window, C)``, the axis squeezed for the network and put back
    on its output), so :func:`sliding_window_predict` runs it slice by slice on a
    volume. ``predict_fn`` itself for ``None``."""
    if slice_axis is None:
        return predict_fn
    axis = slice_axis + 1

    def predict(batch):
        return np.expand_dims(np.asarray(predict_fn(np.squeeze(batch, axis))), axis)

    return predict


def _gaussian_1d(n: int, sigma_scale: float) -> np.ndarray:
    x = np.arange(n) - (n - 1) / 2
    weights = np.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
    return (weights / weights.max()).astype(np.float32)


def _outer(vectors: Sequence[np.ndarray]) -> np.ndarray:
    out = vectors[0]
    for v in vectors[1:]:
        out = np.multiply.outer(out, v)
    return out


def gaussian_importance(
    patch_size: Sequence[int], sigma_scale: float = 1 / 8
) -> np.ndarray:
    """Gaussian weights peaking (at 1) at the patch centre, sigma = ``sigma_scale`` x
    size per axis. A product of one Gaussian per axis, so never zero: the corner of a
    128^3 patch weighs about 4e-11."""
    return _outer([_gaussian_1d(int(n), sigma_scale) for n in patch_size])


def _flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``axes`` (mirror test-time augmentation)."""
    axes = tuple(axes)
    return [
        combo
        for r in range(1, len(axes) + 1)
        for combo in itertools.combinations(axes, r)
    ]


def output_window(
    model, window: Sequence[int], slice_axis: int | None = None
) -> tuple[int, ...]:
    """The output a network gives for an input ``window`` (with a 1 at
    ``slice_axis`` for a 2D network on volumes): the window itself, or for an
    unpadded (``"valid"``) U-Net, whose output shape is fixed, its centre."""
    shape = model.output_shape
    if isinstance(shape, list):  # deep supervision: the full-resolution output first
        shape = shape[0]
    spatial = list(shape[1:-1])
    if any(n is None for n in spatial):
        return tuple(int(n) for n in window)
    if slice_axis is not None:
        spatial.insert(slice_axis, 1)
    return tuple(int(n) for n in spatial)


def _margins(window: Sequence[int], output: Sequence[int]) -> tuple[int, ...]:
    """The voxels a network without padding loses on each side, per axis."""
    if len(output) != len(window) or any(
        o > w or (w - o) % 2 for w, o in zip(window, output, strict=True)
    ):
        raise ValueError(
            f"output size {tuple(output)} is not the centre of window {tuple(window)}"
        )
    return tuple((w - o) // 2 for w, o in zip(window, output, strict=True))


def sliding_window_predict(
    image: np.ndarray,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
    output_size: Sequence[int] | None = None,
    softmax: bool = False,
    logit_channels: int | None = None,
) -> np.ndarray:
    """Predicts a whole channels-last image window by window and blends the outputs.

    Memory: one float32 accumulator of the output (``K`` channels over the image) plus
    the windows of two batches. The blending weights are a product of one weight per
    axis over a product grid of windows, so their sum at each voxel is a product of
    per-axis sums and is never stored as a volume. While the network runs on one batch,
    a second thread cuts the next batch's windows out of the image and adds the last
    batch's outputs into the accumulator.

    Args:
        image: ``(*S, C)``.
        predict_fn: maps a batch ``(B, *patch_size, C)`` to ``(B, *patch_size, K)``.
        patch_size: window size; images smaller than it are zero-padded, and the
            output cropped back.
        overlap: fraction of a window shared with its neighbour (0 to <1).
        blend: ``"gaussian"`` or ``"constant"`` weighting of overlapping outputs.
        batch_size: windows per ``predict_fn`` call.
        mirror_axes: test-time augmentation: each window is also predicted mirrored
            along every non-empty subset of these spatial axes, mirrored back and
            averaged (as nnU-Net does, per window).
        progress: called after each forward pass (with its mirrored ones) with the
            windows done and the windows in all.
        output_size: the size of ``predict_fn``'s output, where it is smaller than
            its input (an unpadded, ``"valid"`` U-Net: the output is the input's
            centre). The output windows then tile the image with ``overlap``, each
            read from an input window around it; the image is extended past its
            edges by mirroring (as the original U-Net does). ``None``: the same as
            ``patch_size``.
        softmax: ``predict_fn`` gives logits: they are blended (and averaged over
            the mirrored windows), and the softmax over the last axis is taken once,
            of the blended logits, as nnU-Net does, instead of once per window.
        logit_channels: with ``softmax``, how many of the first output channels are
            logits (the others are blended as they are); ``None``: all.

    Returns:
        ``(*S, K)`` float32: the weighted mean of the window outputs at each voxel
        (with ``softmax``, its softmax); a view of an array stored channels first,
        so that each channel's voxels are together.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    patch_size = tuple(int(p) for p in patch_size)
    spatial = image.shape[:-1]
    if len(patch_size) != len(spatial):
        raise ValueError(
            f"patch_size {patch_size} does not match image shape {image.shape}"
        )
    if any(not 0 <= a < len(spatial) for a in mirror_axes):
        raise ValueError(f"mirror_axes {tuple(mirror_axes)} outside {len(spatial)}D")
    window = patch_size  # what the network reads
    patch_size = tuple(int(o) for o in (output_size or window))  # what it gives
    source, padded_shape, pads = _padded(
        image, patch_size, _margins(window, patch_size)
    )
    axis_weights = [
        _gaussian_1d(p, 1 / 8) if blend == "gaussian" else np.ones(p, np.float32)
        for p in patch_size
    ]
    starts = [
        window_starts(n, p, overlap)
        for n, p in zip(padded_shape, patch_size, strict=True)
    ]
    flips = [tuple(a + 1 for a in combo) for combo in _flip_combinations(mirror_axes)]
    # the mean over the mirrored windows folded into the blending weights
    weights = _outer(axis_weights) / np.float32(1 + len(flips))
    windows = list(itertools.product(*starts))
    chunks = [
        windows[first : first + batch_size]
        for first in range(0, len(windows), batch_size)
    ]
    accumulator = None

    with ThreadPoolExecutor(max_workers=1) as helper:
        batch_ahead = helper.submit(_cut, source, chunks[0], window)
        added = None
        done = 0
        for number, chunk in enumerate(chunks):
            batch = batch_ahead.result()
            if number + 1 < len(chunks):
                batch_ahead = helper.submit(_cut, source, chunks[number + 1], window)
            outputs = [np.asarray(predict_fn(batch), dtype=np.float32)]
            for axes in flips:
                mirrored = predict_fn(np.ascontiguousarray(np.flip(batch, axes)))
                outputs.append(np.flip(np.asarray(mirrored, dtype=np.float32), axes))
            if accumulator is None:  # channels first: each class's voxels together
                accumulator = np.zeros(
                    (outputs[0].shape[-1], *padded_shape), np.float32
                )
            if added is not None:
                added.result()  # an error there stops here; two batches at most wait
            added = helper.submit(
                _add, accumulator, chunk, outputs, weights, patch_size
            )
            done += len(chunk)
            if progress is not None:
                progress(done, len(windows))
        added.result()
    sums = [
        _weight_sum(n, p, axis_starts, w)
        for n, p, axis_starts, w in zip(
            padded_shape, patch_size, starts, axis_weights, strict=True
        )
    ]
    _normalise(accumulator, sums, softmax, logit_channels)
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial, strict=True))
    return np.moveaxis(accumulator[(slice(None), *crop)], 0, -1)


def _padded(image: np.ndarray, patch_size, margins):
    """``(source, padded shape, pads)``: ``image`` padded with zeros (``pads`` each
    side) to at least ``patch_size``, the output windows' size, then by ``margins``
    mirrored (the input an unpadded network reads around its output)."""
    spatial = image.shape[:-1]
    padded_shape = tuple(max(s, p) for s, p in zip(spatial, patch_size, strict=True))
    pads = [
        ((p - s) // 2, p - s - (p - s) // 2)
        for s, p in zip(spatial, padded_shape, strict=True)
    ]
    source = np.pad(image, [*pads, (0, 0)]) if any(sum(p) for p in pads) else image
    if any(margins):
        mode = "reflect" if min(padded_shape) > 1 else "edge"
        source = np.pad(source, [*((m, m) for m in margins), (0, 0)], mode=mode)
    return source, padded_shape, pads


def _cut(source: np.ndarray, chunk, window) -> np.ndarray:
    """The windows of ``source`` starting at each of ``chunk``, as one batch."""
    return np.stack(
        [
            source[tuple(slice(s, s + n) for s, n in zip(w, window, strict=True))]
            for w in chunk
        ],
        dtype=np.float32,
    )


def _add(accumulator, chunk, outputs: list[np.ndarray], weights, patch_size) -> None:
    """Adds a batch's outputs (``outputs``: the batch's, then its mirrored ones,
    mirrored back) weighted into the channels-first ``accumulator``."""
    total = outputs[0]
    for more in outputs[1:]:
        total = total + more
    # weighted, and channels first as the accumulator is, in one pass
    total = np.multiply(np.moveaxis(total, -1, 1), weights, order="C")
    for w, output in zip(chunk, total, strict=True):
        box = tuple(slice(s, s + n) for s, n in zip(w, patch_size, strict=True))
        accumulator[(slice(None), *box)] += output


def _weight_sum(size: int, patch: int, starts, weights: np.ndarray) -> np.ndarray:
    """The blending weights of one axis summed over its windows, per position: the
    weight sum at voxel (i, j, ...) is the product of these (never a volume)."""
    total = np.zeros(size, np.float32)
    for s in starts:
        total[s : s + patch] += weights
    return total


def _normalise(accumulator, sums, softmax: bool, logit_channels: int | None) -> None:
    """Divides the channels-first ``accumulator`` by the weight sums (per axis, see
    :func:`_weight_sum`) and with ``softmax`` takes the softmax of its first
    ``logit_channels`` planes (all for ``None``), in place, one slab at a time."""
    rest = _outer(sums[1:]) if len(sums) > 1 else np.float32(1)
    planes = len(accumulator)
    logits = planes if logit_channels is None else logit_channels
    for i in range(accumulator.shape[1]):
        slab = [accumulator[k, i] for k in range(planes)]  # each contiguous
        scale = np.float32(1) / (sums[0][i] * rest)
        for plane in slab:
            plane *= scale
        if softmax:  # over the classes, one plane each
            largest = slab[0].copy()
            for plane in slab[1:logits]:
                np.maximum(largest, plane, out=largest)
            total = np.zeros_like(largest)
            for plane in slab[:logits]:
                plane -= largest
                np.exp(plane, out=plane)
                total += plane
            for plane in slab[:logits]:
                plane /= total
