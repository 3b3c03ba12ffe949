"""Slow, obvious NumPy versions of what medseg computes fast; tests compare the two."""

from __future__ import annotations

import itertools
import math

import numpy as np


def voxel_indices(shape):
    """Every index of an array of ``shape``, in C order."""
    return itertools.product(*(range(n) for n in shape))


def world_lookup(original: np.ndarray, original_affine, new_shape, new_affine):
    """Builds the array on a new grid by looking up, voxel by voxel, the original voxel
    at the same world position (for grids that are permutations/flips of each other)."""
    inverse = np.linalg.inv(original_affine)
    out = np.empty((*new_shape, original.shape[-1]), dtype=original.dtype)
    for index in voxel_indices(new_shape):
        world = np.asarray(new_affine) @ np.array([*index, 1.0])
        source = np.rint((inverse @ world)[:3]).astype(int)
        out[index] = original[tuple(source)]
    return out


def nonzero_bbox(array: np.ndarray):
    """Bounding box of voxels non-zero in any channel, by visiting every voxel."""
    spatial = array.shape[:-1]
    start, stop = list(spatial), [0] * len(spatial)
    found = False
    for index in voxel_indices(spatial):
        if any(v != 0 for v in array[index]):
            found = True
            for axis, i in enumerate(index):
                start[axis] = min(start[axis], i)
                stop[axis] = max(stop[axis], i + 1)
    if not found:
        return (0,) * len(spatial), tuple(spatial)
    return tuple(start), tuple(stop)


def linear_resample(channel: np.ndarray, new_shape) -> np.ndarray:
    """Multilinear resampling with voxel edges aligned and edge values repeated.

    Output voxel ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5`` on each
    axis, clamped to the array, interpolating between the 2**ndim neighbours.
    """
    out = np.empty(new_shape, dtype=np.float64)
    ndim = channel.ndim
    for index in voxel_indices(new_shape):
        coords = [
            min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            for i, n_in, n_out in zip(index, channel.shape, new_shape, strict=True)
        ]
        total = 0.0
        for corner in itertools.product((0, 1), repeat=ndim):
            weight, source = 1.0, []
            for axis in range(ndim):
                low = int(np.floor(coords[axis]))
                frac = coords[axis] - low
                pick = min(low + corner[axis], channel.shape[axis] - 1)
                weight *= frac if corner[axis] else 1.0 - frac
                source.append(pick)
            total += weight * float(channel[tuple(source)])
        out[index] = total
    return out


def labels_by_class_linear(labels: np.ndarray, new_shape) -> np.ndarray:
    """Per-class linear interpolation of one-hot masks, then argmax (ties: lowest
    value)."""
    classes = sorted(np.unique(labels).tolist())
    scores = np.stack(
        [linear_resample((labels == c).astype(float), new_shape) for c in classes]
    )
    return np.array(classes)[np.argmax(scores, axis=0)].astype(labels.dtype)


def zscore(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score with mean and population std summed by hand; outside the mask -> 0."""
    flat = values.astype(np.float64).ravel()
    keep = np.ones(flat.shape, bool) if mask is None else mask.ravel()
    chosen = [v for v, k in zip(flat, keep, strict=True) if k]
    mean = sum(chosen) / len(chosen)
    std = (sum((v - mean) ** 2 for v in chosen) / len(chosen)) ** 0.5
    std = std if std > 1e-8 else 1.0
    out = [(v - mean) / std if k else 0.0 for v, k in zip(flat, keep, strict=True)]
    return np.array(out).reshape(values.shape)


def percentile_linear(values: np.ndarray, q: float) -> float:
    """The ``q``-th percentile with linear interpolation between order statistics."""
    ordered = sorted(float(v) for v in values.ravel())
    position = q / 100 * (len(ordered) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def instance_norm(x: np.ndarray, gamma, beta, epsilon: float) -> np.ndarray:
    """Each channel of each sample to zero mean and unit variance over its spatial
    axes (channels-last), then scaled and shifted per channel."""
    out = np.empty(x.shape, np.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[-1]):
            values = x[b, ..., c].astype(np.float64)
            mean = values.sum() / values.size
            variance = ((values - mean) ** 2).sum() / values.size
            normalised = (values - mean) / np.sqrt(variance + epsilon)
            out[b, ..., c] = gamma[c] * normalised + beta[c]
    return out


def leaky_relu(x: np.ndarray, slope: float) -> np.ndarray:
    """x where positive, slope * x elsewhere, element by element."""
    out = np.empty(x.shape, np.float64)
    for index in np.ndindex(x.shape):
        value = float(x[index])
        out[index] = value if value > 0 else slope * value
    return out


def numeric_gradient(function, x: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """Central differences of the scalar ``function`` at ``x`` (float64)."""
    x = x.astype(np.float64)
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up) - function(down)) / (2 * step)
    return gradient


def max_pool_with_argmax(x: np.ndarray, pool):
    """Loops over windows; the first maximum in C order wins. Indices are positions in
    the flattened ``(*spatial, C)`` array of each sample."""
    batch, *spatial, channels = x.shape
    cells = [s // p for s, p in zip(spatial, pool, strict=True)]
    values = np.zeros((batch, *cells, channels), x.dtype)
    indices = np.zeros((batch, *cells, channels), np.int64)
    for b in range(batch):
        for cell in voxel_indices(cells):
            for c in range(channels):
                best, best_index = None, None
                for offset in voxel_indices(pool):
                    pos = tuple(
                        k * p + o for k, p, o in zip(cell, pool, offset, strict=True)
                    )
                    value = x[(b, *pos, c)]
                    if best is None or value > best:
                        best = value
                        best_index = np.ravel_multi_index(
                            (*pos, c), (*spatial, channels)
                        )
                values[(b, *cell, c)] = best
                indices[(b, *cell, c)] = best_index
    return values, indices


def max_unpool(values: np.ndarray, indices: np.ndarray, out_spatial):
    """Writes each value at its flat index in zeros of ``(B, *out_spatial, C)``."""
    batch, channels = values.shape[0], values.shape[-1]
    out = np.zeros((batch, *out_spatial, channels), values.dtype)
    for b in range(batch):
        flat = out[b].reshape(-1)
        for value, index in zip(values[b].ravel(), indices[b].ravel(), strict=True):
            flat[index] = value
        out[b] = flat.reshape(out[b].shape)
    return out


def bed_of_nails(x: np.ndarray, size):
    """Each value at the first position of its block, zeros elsewhere."""
    batch, *spatial, channels = x.shape
    out = np.zeros(
        (batch, *(s * k for s, k in zip(spatial, size, strict=True)), channels)
    )
    for b in range(batch):
        for index in voxel_indices(spatial):
            target = tuple(i * k for i, k in zip(index, size, strict=True))
            out[(b, *target)] = x[(b, *index)]
    return out


def n_max_pool(x: np.ndarray, pool, n: int):
    """Mean of the n largest values of each window, by sorting each window."""
    batch, *spatial, channels = x.shape
    cells = [s // p for s, p in zip(spatial, pool, strict=True)]
    out = np.zeros((batch, *cells, channels))
    for b in range(batch):
        for cell in voxel_indices(cells):
            for c in range(channels):
                window = [
                    x[
                        (
                            b,
                            *(
                                k * p + o
                                for k, p, o in zip(cell, pool, offset, strict=True)
                            ),
                            c,
                        )
                    ]
                    for offset in voxel_indices(pool)
                ]
                out[(b, *cell, c)] = np.mean(sorted(window)[-n:])
    return out


def pad(x: np.ndarray, padding, mode: str):
    """Pads each spatial axis by mapping every output index back to a source index."""
    batch, *spatial, channels = x.shape
    out_spatial = [s + 2 * p for s, p in zip(spatial, padding, strict=True)]
    out = np.zeros((batch, *out_spatial, channels), x.dtype)

    def source(i, n):
        if 0 <= i < n:
            return i
        if mode == "zero":
            return None
        if mode == "replicate":
            return 0 if i < 0 else n - 1
        if mode == "circular":
            return i % n
        return -i if i < 0 else 2 * (n - 1) - i  # reflect, edge not repeated

    for index in voxel_indices(out_spatial):
        src = [
            source(i - p, n) for i, p, n in zip(index, padding, spatial, strict=True)
        ]
        if None not in src:
            out[(slice(None), *index)] = x[(slice(None), *src)]
    return out


def conv_transpose_2d(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """Single-channel transposed convolution: each input pixel adds ``x * kernel`` at
    ``stride`` times its position (no padding)."""
    h, w = x.shape
    kh, kw = kernel.shape
    out = np.zeros(((h - 1) * stride + kh, (w - 1) * stride + kw))
    for i in range(h):
        for j in range(w):
            out[i * stride : i * stride + kh, j * stride : j * stride + kw] += (
                x[i, j] * kernel
            )
    return out


def conv_same_2d(x: np.ndarray, kernel: np.ndarray, dilation: int = 1) -> np.ndarray:
    """Cross-correlation of ``x`` ``(H, W, C)`` with ``kernel`` ``(kh, kw, C, F)``
    (odd sizes), zeros outside the image, output ``(H, W, F)``: one output pixel at a
    time."""
    h, w, _ = x.shape
    kh, kw, _, filters = kernel.shape
    out = np.zeros((h, w, filters))
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    y = i + (a - kh // 2) * dilation
                    z = j + (b - kw // 2) * dilation
                    if 0 <= y < h and 0 <= z < w:
                        out[i, j] += x[y, z] @ kernel[a, b]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def soft_dice_loss(
    labels, logits, include_background=False, batch_dice=False, smooth=1e-5
):
    """Per-class soft Dice from explicit sums; 1 - mean over classes; per sample."""
    probs = softmax(logits.astype(np.float64))
    classes = range(0 if include_background else 1, logits.shape[-1])
    groups = [range(len(labels))] if batch_dice else [[b] for b in range(len(labels))]
    losses = []
    for group in groups:
        dices = []
        for k in classes:
            inter = sum(
                float((probs[b, ..., k] * (labels[b] == k)).sum()) for b in group
            )
            total = sum(
                float(probs[b, ..., k].sum() + (labels[b] == k).sum()) for b in group
            )
            dices.append((2 * inter + smooth) / (total + smooth))
        losses.append(1 - np.mean(dices))
    return np.array(losses)


def cross_entropy(labels, logits):
    probs = softmax(logits.astype(np.float64))
    picked = np.take_along_axis(probs, labels[..., None].astype(int), axis=-1)[..., 0]
    return -np.log(picked).reshape(len(labels), -1).mean(axis=1)


def focal(labels, logits, gamma, alpha=None):
    probs = softmax(logits.astype(np.float64))
    p_t = np.take_along_axis(probs, labels[..., None].astype(int), axis=-1)[..., 0]
    weight = 1.0 if alpha is None else np.asarray(alpha)[labels]
    return (-weight * (1 - p_t) ** gamma * np.log(p_t)).reshape(len(labels), -1).mean(1)


def tversky_loss(labels, logits, alpha, beta, smooth=1e-5):
    probs = softmax(logits.astype(np.float64))
    out = []
    for b in range(len(labels)):
        indices = []
        for k in range(1, logits.shape[-1]):
            g = labels[b] == k
            p = probs[b, ..., k]
            tp, fp, fn = (p * g).sum(), (p * ~g).sum(), ((1 - p) * g).sum()
            indices.append((tp + smooth) / (tp + alpha * fp + beta * fn + smooth))
        out.append(1 - np.mean(indices))
    return np.array(out)


def hard_dice(truth: np.ndarray, prediction: np.ndarray, k: int) -> float:
    """Dice of class k from the sets of voxel positions (NaN when both are empty)."""
    a = {tuple(i) for i in np.argwhere(truth == k)}
    b = {tuple(i) for i in np.argwhere(prediction == k)}
    if not a and not b:
        return float("nan")
    return 2 * len(a & b) / (len(a) + len(b))


def sample_linear_zero(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Multilinear sample of ``volume (*S, C)`` at each point of ``coords (*T, d)``;
    neighbours outside the volume count as zero. One point at a time."""
    d = coords.shape[-1]
    out = np.zeros((*coords.shape[:-1], volume.shape[-1]))
    for index in voxel_indices(coords.shape[:-1]):
        point = coords[index]
        low = np.floor(point).astype(int)
        for corner in itertools.product((0, 1), repeat=d):
            neighbour = low + np.array(corner)
            weight = np.prod(
                [f if c else 1 - f for f, c in zip(point - low, corner, strict=True)]
            )
            if all(0 <= n < s for n, s in zip(neighbour, volume.shape, strict=False)):
                out[index] += weight * volume[tuple(neighbour)]
    return out


def sample_nearest_zero(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-voxel sample (numpy's round-half-to-even), zero outside."""
    out = np.zeros((*coords.shape[:-1], volume.shape[-1]), volume.dtype)
    for index in voxel_indices(coords.shape[:-1]):
        nearest = np.round(coords[index]).astype(int)
        if all(0 <= n < s for n, s in zip(nearest, volume.shape, strict=False)):
            out[index] = volume[tuple(nearest)]
    return out


def affine_coords(shape, matrix: np.ndarray) -> np.ndarray:
    """Input coordinates ``matrix @ (x - c) + c`` of every output voxel ``x``."""
    centre = (np.array(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (grid - centre) @ np.asarray(matrix).T + centre


def pairwise_auc(scores, positive) -> float:
    """AUC as the fraction of (positive, negative) pairs ranked right, ties as 1/2."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def stitch(image: np.ndarray, predict, patch, starts, weights) -> np.ndarray:
    """Weighted average of window outputs, accumulated voxel by voxel."""
    spatial = image.shape[:-1]
    total = {}
    weight = {}
    for start in itertools.product(*starts):
        box = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        out = predict(image[box][None])[0]
        for local in voxel_indices(patch):
            where = tuple(s + i for s, i in zip(start, local, strict=True))
            total[where] = total.get(where, 0) + out[local] * weights[local]
            weight[where] = weight.get(where, 0) + weights[local]
    result = np.zeros((*spatial, next(iter(total.values())).shape[-1]))
    for where, value in total.items():
        result[where] = value / weight[where]
    return result


def boundary_voxels(mask: np.ndarray) -> list[tuple[int, ...]]:
    """Mask voxels with a face neighbour outside the mask or outside the array."""
    out = []
    for index in voxel_indices(mask.shape):
        if not mask[index]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                neighbour = list(index)
                neighbour[axis] += step
                if (
                    not 0 <= neighbour[axis] < mask.shape[axis]
                    or not mask[tuple(neighbour)]
                ):
                    out.append(index)
                    break
            else:
                continue
            break
    return out


def directed_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """For each boundary voxel of a, the distance (mm) to the nearest of b's, by brute
    force over all pairs."""
    spacing = np.asarray(spacing, float)
    pa = np.array(boundary_voxels(a), float) * spacing
    pb = np.array(boundary_voxels(b), float) * spacing
    return np.array([np.sqrt(((pb - p) ** 2).sum(axis=1)).min() for p in pa])


def mirror_averaged(predict, axes):
    """A predictor that averages ``predict`` over the batch mirrored along every
    subset of the spatial ``axes`` (the empty one included), each mirrored back."""

    def averaged(batch):
        outputs = []
        for r in range(len(axes) + 1):
            for subset in itertools.combinations(axes, r):
                flipped = batch
                for a in subset:
                    flipped = flipped[
                        (slice(None),) * (a + 1) + (slice(None, None, -1),)
                    ]
                out = np.asarray(predict(flipped), dtype=np.float64)
                for a in subset:
                    out = out[(slice(None),) * (a + 1) + (slice(None, None, -1),)]
                outputs.append(out)
        return sum(outputs) / len(outputs)

    return averaged


def flood_components(mask: np.ndarray) -> list[list[tuple[int, ...]]]:
    """Components of a boolean mask, fully connected (any neighbour within one voxel
    along every axis), by breadth-first search."""
    seen = np.zeros(mask.shape, bool)
    steps = [d for d in itertools.product((-1, 0, 1), repeat=mask.ndim) if any(d)]
    components = []
    for start in voxel_indices(mask.shape):
        if not mask[start] or seen[start]:
            continue
        seen[start] = True
        queue, members = [start], []
        while queue:
            here = queue.pop()
            members.append(here)
            for d in steps:
                there = tuple(h + s for h, s in zip(here, d, strict=True))
                if all(0 <= t < n for t, n in zip(there, mask.shape, strict=True)):
                    if mask[there] and not seen[there]:
                        seen[there] = True
                        queue.append(there)
        components.append(members)
    return components


def clean_labels(labels, voxel_volume, background, keep_largest, min_size):
    """Per label value: keep the largest component and/or drop components under
    ``min_size`` (in voxel_volume units); dropped voxels become background."""
    out = labels.copy()
    for value in np.unique(labels):
        if value == background:
            continue
        parts = flood_components(labels == value)
        sizes = [len(p) * voxel_volume for p in parts]
        for i, part in enumerate(parts):
            drop = (keep_largest and i != int(np.argmax(sizes))) or sizes[i] < min_size
            if drop:
                for where in part:
                    out[where] = background
    return out


def block_centre_labels(label: np.ndarray, factor: int) -> np.ndarray:
    """``(*S, 1)`` labels at 1/``factor`` resolution: voxel ``i`` of the result is the
    label at ``factor * i + factor // 2`` along each axis, one voxel at a time."""
    spatial = label.shape[:-1]
    out = np.zeros((*(n // factor for n in spatial), 1), label.dtype)
    for index in voxel_indices(out.shape[:-1]):
        source = tuple(factor * i + factor // 2 for i in index)
        out[index] = label[source]
    return out


def dicom_pixel_lps(position, orientation, pixel_spacing, row: int, column: int):
    """Where DICOM puts the pixel in ``row``, ``column`` of a slice (PS3.3 C.7.6.2.1.1):
    ``ImagePositionPatient + column * spacing between columns * row cosine + row *
    spacing between rows * column cosine``, in LPS patient coordinates (mm)."""
    position = np.asarray(position, float)
    row_cosine = np.asarray(orientation[:3], float)
    column_cosine = np.asarray(orientation[3:], float)
    between_rows, between_columns = (float(v) for v in pixel_spacing)
    return (
        position
        + column * between_columns * row_cosine
        + row * between_rows * column_cosine
    )


def sampled_content_id(contents: list[bytes], ordered: bool) -> str:
    """SHA-256 over each file's size (8 bytes, little-endian) and bytes: all of them
    up to 1 MiB, else the 4 KiB blocks starting at round(i * (size - 4096) / 31),
    i = 0..31; the files' digests in order, or sorted; 32 hex digits."""
    import hashlib

    digests = []
    for data in contents:
        size = len(data)
        if size <= 1 << 20:
            kept = data
        else:
            starts = [round(i * (size - 4096) / 31) for i in range(32)]
            kept = b"".join(data[s : s + 4096] for s in starts)
        digests.append(hashlib.sha256(size.to_bytes(8, "little") + kept).digest())
    if not ordered:
        digests.sort()
    return hashlib.sha256(b"".join(digests)).hexdigest()[:32]


def lesion_scores(prediction, truth, voxel_volume: float = 1.0, min_size: float = 0.0):
    """Lesion-wise counts and scores of two masks, with voxel sets: components
    (:func:`flood_components`) under ``min_size`` left out; a truth lesion detected
    when a predicted component shares a voxel with it, its Dice against the union of
    those; lesion Dice summed over truth lesions and divided by them plus the
    predicted components sharing no voxel with a truth lesion."""
    truths = [
        set(c) for c in flood_components(truth) if len(c) * voxel_volume >= min_size
    ]
    preds = [
        set(c)
        for c in flood_components(prediction)
        if len(c) * voxel_volume >= min_size
    ]
    detected = sum(1 for t in truths if any(t & p for p in preds))
    hits = sum(1 for p in preds if any(p & t for t in truths))
    dices = []
    for t in truths:
        union = set().union(*(p for p in preds if p & t))
        dices.append(2 * len(t & union) / (len(t) + len(union)))
    nan = float("nan")
    recall = detected / len(truths) if truths else nan
    precision = hits / len(preds) if preds else nan
    if not truths and not preds:
        f1 = dice = nan
    else:
        f1 = 0.0
        if truths and preds and recall + precision > 0:
            f1 = 2 * recall * precision / (recall + precision)
        dice = sum(dices) / (len(truths) + len(preds) - hits)
    return {
        "lesions_truth": len(truths),
        "lesions_pred": len(preds),
        "lesions_detected": detected,
        "lesions_false": len(preds) - hits,
        "lesion_recall": recall,
        "lesion_precision": precision,
        "lesion_f1": f1,
        "lesion_dice": dice,
    }


def world_lookup_or_zero(original: np.ndarray, original_affine, new_shape, new_affine):
    """:func:`world_lookup` where the original grid has the voxel, 0 elsewhere."""
    inverse = np.linalg.inv(original_affine)
    out = np.zeros((*new_shape, original.shape[-1]), dtype=original.dtype)
    for index in voxel_indices(new_shape):
        world = np.asarray(new_affine) @ np.array([*index, 1.0])
        source = np.rint((inverse @ world)[:3]).astype(int)
        if all(0 <= s < n for s, n in zip(source, original.shape[:3], strict=True)):
            out[index] = original[tuple(source)]
    return out


def expected_calibration_error(confidences, outcomes, bins: int) -> float:
    """ECE voxel by voxel: each probability put in the bin [b/bins, (b+1)/bins) (1.0 in
    the last), then the bins' |mean outcome - mean probability| weighed by their
    share of the voxels."""
    members = [[] for _ in range(bins)]
    for p, hit in zip(confidences, outcomes, strict=True):
        b = min(int(float(p) * bins), bins - 1)
        members[b].append((float(p), float(hit)))
    total = len(confidences)
    error = 0.0
    for chosen in members:
        if chosen:
            mean_p = sum(p for p, _ in chosen) / len(chosen)
            mean_hit = sum(h for _, h in chosen) / len(chosen)
            error += len(chosen) / total * abs(mean_hit - mean_p)
    return error


def temperature_by_grid(logits, truth, temperatures) -> float:
    """The temperature of the list with the lowest mean negative log-likelihood,
    computed voxel by voxel."""

    def nll(t):
        total = 0.0
        for z, y in zip(logits, truth, strict=True):
            z = [v / t for v in z]
            top = max(z)
            total += top + math.log(sum(math.exp(v - top) for v in z)) - z[y]
        return total / len(truth)

    return min(temperatures, key=nll)


def mahalanobis_rms(points: np.ndarray, x: np.ndarray) -> float:
    """sqrt(z' C^-1 z / d) with z the point standardised by the points' mean and
    standard deviation and C the standardised points' covariance (n - 1), inverted
    whole."""
    points = np.asarray(points, np.float64)
    mean, std = points.mean(0), points.std(0)
    standard = (points - mean) / std
    covariance = np.cov(standard, rowvar=False, ddof=1)
    z = (np.asarray(x, np.float64) - mean) / std
    return float(np.sqrt(z @ np.linalg.inv(covariance) @ z / len(z)))
