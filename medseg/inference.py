"""Sliding-window inference over whole scans, and segmenting scans with a bundle.

:func:`window_starts` places windows (a pure function); :func:`sliding_window_predict`
runs a predictor over them and blends the overlapping outputs with Gaussian importance
weights (sigma = 1/8 of the patch, as nnU-Net) or constant weights. NumPy outside the
predictor, so any callable mapping a batch of patches to per-class outputs works.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from medseg import geometry
from medseg.errors import InputFileError
from medseg.io import Volume, atomic_output
from medseg.postprocessing import clean_labels
from medseg.preprocessing import blank_note

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
) -> np.ndarray:
    """Predicts a whole channels-last image window by window and blends the outputs.

    Memory: one float32 accumulator of the output (``K`` channels over the image) plus
    the windows of one batch. The blending weights are a product of one weight per axis
    over a product grid of windows, so their sum at each voxel is a product of per-axis
    sums and is never stored as a volume.

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

    Returns:
        ``(*S, K)`` float32: the weighted mean of the window outputs at each voxel.
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
    padded_shape = tuple(max(s, p) for s, p in zip(spatial, patch_size, strict=True))
    pads = [
        ((p - s) // 2, p - s - (p - s) // 2)
        for s, p in zip(spatial, padded_shape, strict=True)
    ]
    padded = np.pad(image, [*pads, (0, 0)]) if any(sum(p) for p in pads) else image
    axis_weights = [
        _gaussian_1d(p, 1 / 8) if blend == "gaussian" else np.ones(p, np.float32)
        for p in patch_size
    ]
    weights = _outer(axis_weights)[..., None]
    starts = [
        window_starts(n, p, overlap)
        for n, p in zip(padded_shape, patch_size, strict=True)
    ]
    flips = [tuple(a + 1 for a in combo) for combo in _flip_combinations(mirror_axes)]
    windows = list(itertools.product(*starts))
    accumulator = None
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        boxes = [
            tuple(slice(s, s + p) for s, p in zip(w, patch_size, strict=True))
            for w in chunk
        ]
        batch = np.stack([padded[box] for box in boxes]).astype(np.float32)
        outputs = np.array(predict_fn(batch), dtype=np.float32)  # writable copy
        for axes in flips:
            mirrored = predict_fn(np.ascontiguousarray(np.flip(batch, axes)))
            outputs += np.flip(np.asarray(mirrored, dtype=np.float32), axes)
        if flips:
            outputs /= 1 + len(flips)
        if accumulator is None:
            accumulator = np.zeros((*padded_shape, outputs.shape[-1]), np.float32)
        for box, output in zip(boxes, outputs, strict=True):
            accumulator[box] += output * weights
        if progress is not None:
            progress(first + len(chunk), len(windows))
    # the weight sum at voxel (i, j, ...) is sum_0[i] * sum_1[j] * ...
    sums = []
    for n, p, axis_starts, w in zip(
        padded_shape, patch_size, starts, axis_weights, strict=True
    ):
        total = np.zeros(n, np.float32)
        for s in axis_starts:
            total[s : s + p] += w
        sums.append(total)
    rest = _outer(sums[1:])[..., None] if len(sums) > 1 else np.float32(1)
    for i in range(padded_shape[0]):  # in place, one slab at a time
        accumulator[i] /= sums[0][i] * rest
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial, strict=True))
    return accumulator[crop]


# bundles on whole scans


@dataclass
class Prediction:
    """A segmentation on the scan's own grid: ``labels`` (declared label values) and,
    when asked for, ``probabilities`` ``(*S, K)`` float16 in the order of ``values``
    (the label value of each class) and ``names``."""

    labels: Volume
    probabilities: np.ndarray | None = None
    values: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    nonfinite_replaced: int = 0
    notes: tuple[str, ...] = ()  # warnings about the scan (see field_of_view_note)


#: how far outside the training scans' sizes a scan's field of view may be before
#: prediction warns
FIELD_OF_VIEW_FACTOR = 2.0


def field_of_view_note(volume: Volume, fingerprint: dict | None) -> str | None:
    """A warning when the scan's longest side (in mm) is over twice the longest a
    training scan can have had, or under half the shortest longest side, or its
    shortest side under half the shortest any training scan had (a slab of a few
    slices), from the bundle's dataset fingerprint (per-axis shape and spacing
    ranges); ``None`` when it is within those, the bundle records none, or the scan is
    2D (pictures carry no spacing, and a larger one is only more of the same texture,
    as electron microscopy tiles are). A network trained on crops around one organ
    labels a whole-body scan (or a sliver, or a slab) without complaint, and
    wrongly."""
    if volume.spatial_dims != 3:
        return None
    try:
        shape, spacing = fingerprint["shape"], fingerprint["spacing_mm"]
        smallest = [n * s for n, s in zip(shape["min"], spacing["min"], strict=True)]
        most = max(n * s for n, s in zip(shape["max"], spacing["max"], strict=True))
        least, thinnest = max(smallest), min(smallest)
    except (KeyError, TypeError, ValueError):
        return None
    extent = [n * s for n, s in zip(volume.spatial_shape, volume.spacing, strict=True)]
    if most < max(extent) / FIELD_OF_VIEW_FACTOR:
        side, bound = "longest", f"at most {most:.0f} mm"
    elif max(extent) * FIELD_OF_VIEW_FACTOR < least:
        side, bound = "longest", f"at least {least:.0f} mm"
    elif min(extent) * FIELD_OF_VIEW_FACTOR < thinnest:
        side, bound = "shortest", f"at least {thinnest:.0f} mm"
    else:
        return None
    return (
        f"{volume.path or 'input'}: field of view "
        f"{' x '.join(f'{e:.0f}' for e in extent)} mm, while the {side} side of the "
        f"model's training scans was {bound}: it has not seen scans like this one; "
        "check its labels"
    )


def bundle_mirror_axes(metadata: dict) -> tuple[int, ...]:
    """The mirror axes a bundle was trained with (its test-time augmentation axes):
    axes along which flipping changes a label's meaning are left out in training, so
    they are left out here too."""
    augment = (metadata.get("config") or {}).get("train", {}).get("augment", {})
    return tuple(augment.get("mirror_axes") or ())


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_info(field: str, path="/proc/cpuinfo") -> str | None:
    """The value of the first ``field`` line of Linux's ``/proc/cpuinfo`` (``"model
    name"``, ``"flags"``); None where there is no such line or file."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tile units (Linux ``/proc/cpuinfo``)."""
    return "amx_bf16" in (cpu_info("flags") or "").split()


def cpu_lacks_onednn_bfloat16() -> bool:
    """Whether TensorFlow runs bfloat16 on this CPU without oneDNN: its oneDNN
    bfloat16 kernels need AVX-512, and without them TensorFlow falls back to kernels
    that emulate bfloat16, far slower than float32 (on a 2-core AVX2-only AMD EPYC,
    25x in training, ``experiments/results/precision_avx2.json``, and 13x in
    ``medseg predict``). False where the CPU's flags cannot be read."""
    flags = cpu_info("flags")
    return flags is not None and "avx512f" not in flags.split()


def bfloat16_is_slow_here() -> bool:
    """Whether bfloat16 would run emulated here: no GPU and
    :func:`cpu_lacks_onednn_bfloat16`."""
    import tensorflow as tf

    return cpu_lacks_onednn_bfloat16() and not tf.config.list_physical_devices("GPU")


#: Why bfloat16 is slow where :func:`bfloat16_is_slow_here`.
SLOW_BFLOAT16 = (
    "this CPU has no AVX-512, so TensorFlow runs bfloat16 without oneDNN, 10-25x "
    "slower than float32 (measured on an AVX2-only CPU: 13x in prediction, 25x in "
    "training)"
)


#: Names the precision that ``auto`` resolves to, whatever the machine.
AUTO_PRECISION_VARIABLE = "MEDSEG_AUTO_PRECISION"


def inference_precision(requested: str = "auto") -> str:
    """The precision a forward pass runs in: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` picks bfloat16 only where it is both fast and measured: a CPU with AMX
    bfloat16 units (Intel Sapphire Rapids and later) and no GPU, where it halves the
    time of a 3D U-Net's forward pass; float32 anywhere else. The environment variable
    ``MEDSEG_AUTO_PRECISION`` (``float32`` or ``bfloat16``) overrides what ``"auto"``
    resolves to, so that one machine can run, and test, what another would.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    forced = os.environ.get(AUTO_PRECISION_VARIABLE)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(
                f"{AUTO_PRECISION_VARIABLE} must be float32 or bfloat16, got {forced!r}"
            )
        return forced
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or not cpu_has_amx_bf16():
        return "float32"
    return "bfloat16"


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
        allow_modified: accept a model file whose sha256 differs from the bundle's
            record (see :func:`medseg.bundle.verify`).
        precision: ``"float32"``, ``"bfloat16"`` (convolutions in bfloat16, logits
            and blending in float32), or ``"auto"``: bfloat16 on a CPU with AMX
            bfloat16 units and no GPU, float32 otherwise (see
            :func:`inference_precision`).
        nonfinite: ``"error"`` or ``"replace"`` NaN/Inf voxels in place of the
            bundle's policy (see :func:`medseg.preprocessing.handle_nonfinite`);
            ``None`` keeps the bundle's. ``Prediction.nonfinite_replaced`` counts
            the voxels replaced.
    """

    def __init__(
        self,
        bundle,
        *,
        overlap: float = 0.5,
        mirror_axes=(),
        batch_size: int | None = None,
        keep_largest: bool = False,
        min_size_mm3: float = 0.0,
        probabilities: bool = False,
        allow_modified: bool = False,
        precision: str = "auto",
        nonfinite: str | None = None,
    ):
        from medseg import bundle as bundles
        from medseg.models import load_model, with_precision
        from medseg.preprocessing import Preprocessor

        self.bundle = bundle
        self.metadata = bundles.verify(bundle, allow_modified=allow_modified)
        if self.metadata.get("task") != "segmentation":
            raise InputFileError(
                bundle,
                f"a {self.metadata.get('task')} bundle, not a segmentation bundle",
            )
        self.precision = inference_precision(precision)
        if self.precision == "bfloat16" and bfloat16_is_slow_here():
            logger.warning("--precision bfloat16: %s; use auto", SLOW_BFLOAT16)
        self.model = with_precision(
            load_model(bundle),
            "mixed_bfloat16" if self.precision == "bfloat16" else "float32",
        )
        self.preprocessor = Preprocessor.from_dict(self.metadata["preprocessing"])
        if nonfinite is not None:
            self.preprocessor = replace(self.preprocessor, nonfinite=nonfinite)
        from medseg.training.planning import window_of

        self.patch_size = tuple(self.metadata["patch_size"])
        self.slice_axis = (self.metadata.get("plan") or {}).get("slice_axis")
        self.window = window_of(self.patch_size, self.slice_axis)
        in_plane = [a for a in range(len(self.window)) if a != self.slice_axis]
        self._window_mirror = tuple(in_plane[a] for a in mirror_axes)
        labels = self.metadata["labels"]
        values = [int(labels[str(k)]["value"]) for k in range(len(labels))]
        self.names = [str(labels[str(k)].get("name", v)) for k, v in enumerate(values)]
        self.values = np.array(values, dtype=np.min_scalar_type(max(values)))
        self.overlap = overlap
        self.mirror_axes = tuple(mirror_axes)
        self.batch_size = batch_size or windows_per_pass(self.window)
        self.keep_largest = keep_largest
        self.min_size_mm3 = min_size_mm3
        self.want_probabilities = probabilities
        self._forward = None
        #: called as windows are predicted with the scan's name, the windows done and
        #: the windows in all (see :class:`WindowCount`); ``None``: not called
        self.on_windows: Callable[[str, int, int], None] | None = None

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        import keras
        import tensorflow as tf

        if self._forward is None:
            model = self.model

            @tf.function(reduce_retracing=True)
            def forward(x):
                return keras.ops.softmax(model(x, training=False), axis=-1)

            self._forward = forward
        return np.asarray(self._forward(batch), dtype=np.float32)

    def probabilities(self, image: np.ndarray, progress=None) -> np.ndarray:
        """Class probabilities ``(*S, K)`` of a preprocessed image, mirroring TTA;
        ``progress`` as :func:`sliding_window_predict` takes it."""
        return sliding_window_predict(
            image,
            slicewise(self._predict_batch, self.slice_axis),
            patch_size=self.window,
            overlap=self.overlap,
            batch_size=self.batch_size,
            mirror_axes=self._window_mirror,
            progress=progress,
        )

    def check(self, volume: Volume) -> Volume:
        """``volume`` as the network takes it (a greyscale picture stored with colour
        channels: its one grey channel).

        Raises:
            InputFileError: the scan has other spatial dimensions or channels than the
                model segments, or is a single slice given to a 3D network.
        """
        return check_scan(volume, self.window, self.metadata["in_channels"])

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
        del image
        return _on_scan_grid(volume, [(scores, records, 1.0)], self, notes)

    def segment(self, volume: Volume) -> Volume:
        """Label map (declared label values) on ``volume``'s own grid and header."""
        return self.predict(volume).labels


def check_scan(volume: Volume, window: Sequence[int], channels: int) -> Volume:
    """``volume`` as a network of ``window`` (its sliding window on the scan) and
    ``channels`` input channels takes it: see :meth:`Segmenter.check`."""
    dims = len(window)
    volume = volume.with_array(_one_grey(volume.array, volume.spatial_dims, channels))
    if volume.spatial_dims != dims or volume.num_channels != channels:
        raise InputFileError(
            volume.path or "input",
            f"{volume.spatial_dims}D scan with {volume.num_channels} channel(s)"
            f"{_colour_note(volume.array, volume.spatial_dims, channels)}, "
            f"but the model segments {dims}D scans with {channels} channel(s)",
        )
    if dims == 3 and 1 in volume.spatial_shape and min(window) > 1:
        # a 2D NIfTI, or one slice saved as 3D: a 3D network would see it between
        # zero slices and return a label map that looks valid but means nothing
        raise InputFileError(
            volume.path or "input",
            f"a single slice (shape {' x '.join(map(str, volume.spatial_shape))}), "
            "but the model segments 3D volumes",
        )
    return volume


def scan_plan(
    volume: Volume,
    metadata: dict,
    *,
    overlap: float = 0.5,
    tta: bool = True,
    batch_size: int | None = None,
) -> dict:
    """What ``medseg predict`` would do with ``volume`` and the segmentation bundle of
    ``metadata`` (its ``medseg.json``), found without the network or resampling.

    Keys: ``refused`` (why predict would refuse the scan, else ``None``; the other
    keys but ``warnings`` are then ``None``), ``grid_shape`` and ``grid_spacing_mm``
    (the preprocessed scan: RAS order, cropped, resampled), ``window`` (the sliding
    window on that grid; a 2D network on volumes: one slice of it), ``overlap``,
    ``windows`` (in all), ``mirrored`` (predictions of each window: 1, or
    ``2 ** len(mirror axes)`` with test-time augmentation), ``forward_passes`` (of
    ``batch_size`` windows, the mirrored ones in passes of their own),
    ``batch_size`` (windows per pass; ``None``: :func:`windows_per_pass`, as
    :class:`Segmenter`), ``probabilities_mib`` (the float32 class probabilities
    held on the padded grid while windows are blended) and ``warnings`` (those
    predict gives a scan it segments).
    """
    from medseg.preprocessing import Preprocessor
    from medseg.training.planning import window_of

    slice_axis = (metadata.get("plan") or {}).get("slice_axis")
    window = window_of(metadata["patch_size"], slice_axis)
    mirror = bundle_mirror_axes(metadata) if tta else ()
    batch = batch_size or windows_per_pass(window)
    plan = dict.fromkeys(
        ["refused", "grid_shape", "grid_spacing_mm", "window", "overlap", "windows"]
        + ["mirrored", "forward_passes", "batch_size", "probabilities_mib"]
    )
    preprocessor = Preprocessor.from_dict(metadata["preprocessing"])
    try:
        volume = check_scan(volume, window, metadata["in_channels"])
        shape, spacing = preprocessor.grid(volume)
    except InputFileError as exc:
        return {**plan, "refused": exc.problem, "warnings": []}
    warnings = [note] if (note := blank_note(volume)) else []
    if note := field_of_view_note(volume, metadata.get("fingerprint")):
        warnings.append(note)
    padded = [max(n, p) for n, p in zip(shape, window, strict=True)]
    windows = math.prod(
        len(window_starts(n, p, overlap)) for n, p in zip(padded, window, strict=True)
    )
    classes = len(metadata["labels"])
    return {
        **plan,
        "grid_shape": list(shape),
        "grid_spacing_mm": list(spacing),
        "window": list(window),
        "overlap": overlap,
        "windows": windows,
        "mirrored": 2 ** len(mirror),
        "forward_passes": math.ceil(windows / batch) * 2 ** len(mirror),
        "batch_size": batch,
        "probabilities_mib": math.prod(padded) * classes * 4 / 2**20,
        "warnings": warnings,
    }


def ensemble_problem(bundles: Sequence, metadatas: Sequence[dict]) -> tuple | None:
    """Why bundles (with their ``medseg.json``) cannot be one ensemble, as ``(bundle,
    problem)``, or ``None``: each must segment (or each classify), with the same
    labels (values and names, in order), the same input channels and scans of the
    same dimensions as the first. Read before any model is loaded."""
    from medseg.training.planning import window_of

    def task(metadata):
        labels = metadata.get("labels") or {}
        classes = [labels[str(k)] for k in range(len(labels))]
        window = window_of(
            tuple(metadata.get("patch_size") or ()),
            (metadata.get("plan") or {}).get("slice_axis"),
        )
        return (
            [(int(c["value"]), str(c.get("name", c["value"]))) for c in classes],
            int(metadata.get("in_channels") or 1),
            len(window),
        )

    def named(labels):
        return ", ".join(f"{value} {name}" for value, name in labels)

    kind = metadatas[0].get("task")
    for bundle, metadata in zip(bundles, metadatas, strict=True):
        if metadata.get("task") not in ("segmentation", "classification"):
            return bundle, (
                f"a {metadata.get('task')} bundle; an ensemble of models takes "
                "segmentation or classification bundles"
            )
        if metadata.get("task") != kind:
            return bundle, (
                f"a {metadata.get('task')} bundle, but the first model "
                f"({bundles[0]}) is a {kind} bundle; an ensemble's models must do one "
                "task"
            )
    first = task(metadatas[0])
    for bundle, metadata in zip(bundles[1:], metadatas[1:], strict=True):
        labels, channels, dims = task(metadata)
        if labels != first[0]:
            return bundle, (
                f"labels {named(labels)}, but the first model ({bundles[0]}) has "
                f"{named(first[0])}; an ensemble's models must segment alike"
            )
        if (channels, dims) != first[1:]:
            return bundle, (
                f"segments {dims}D scans with {channels} channel(s), but the first "
                f"model ({bundles[0]}) {first[2]}D scans with {first[1]} channel(s)"
            )
    return None


class Ensemble:
    """Segmentation bundles of one task as one model: each scan is segmented by the
    mean of their class probabilities (nnU-Net's ensemble of cross-validation folds).

    Members that preprocess alike (the same :class:`~medseg.preprocessing.Preprocessor`,
    as folds of one dataset with per-scan normalisation) share one preprocessed scan
    and average there, before one way back to the scan's grid; the others' means are
    taken on the scan's grid (linear interpolation, one class at a time). Each member
    keeps its own patch, overlap, mirroring, batch size and precision; post-processing
    and probabilities are the ensemble's (the members' own are not used).

    Args:
        members: :class:`Segmenter` of each bundle.
        keep_largest, min_size_mm3, probabilities: as :class:`Segmenter`'s, applied to
            the mean.

    Raises:
        InputFileError: the bundles cannot be one ensemble (:func:`ensemble_problem`),
            naming the bundle that differs from the first.
    """

    def __init__(
        self,
        members: Sequence[Segmenter],
        *,
        keep_largest: bool = False,
        min_size_mm3: float = 0.0,
        probabilities: bool = False,
    ):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        problem = ensemble_problem(
            [m.bundle for m in members], [m.metadata for m in members]
        )
        if problem:
            raise InputFileError(*problem)
        self.members = tuple(members)
        self.values, self.names = members[0].values, members[0].names
        self.keep_largest = keep_largest
        self.min_size_mm3 = min_size_mm3
        self.want_probabilities = probabilities
        #: as :attr:`Segmenter.on_windows`, the windows of all members counted
        self.on_windows: Callable[[str, int, int], None] | None = None
        self._groups: list[tuple] = []  # (preprocessor, members)
        for member in self.members:
            for preprocessor, alike in self._groups:
                if preprocessor == member.preprocessor:
                    alike.append(member)
                    break
            else:
                self._groups.append((member.preprocessor, [member]))

    def predict(self, volume: Volume) -> Prediction:
        """Labels (and probabilities) of the mean, on ``volume``'s own grid."""
        volume = self.members[0].check(volume)
        notes = _scan_notes(volume, self.members)
        parts = []
        windows = WindowCount(self.on_windows, volume, len(self.members))
        for preprocessor, alike in self._groups:
            image, records = preprocessor.image(volume)
            mean = None
            for member in alike:
                scores = member.probabilities(image, windows.member())
                if mean is None:
                    mean = scores
                else:
                    mean += scores
            del image
            mean /= len(alike)
            parts.append((mean, records, len(alike) / len(self.members)))
        return _on_scan_grid(volume, parts, self, notes)

    def segment(self, volume: Volume) -> Volume:
        """Label map (declared label values) on ``volume``'s own grid and header."""
        return self.predict(volume).labels


class WindowCount:
    """The windows done on one scan by ``members`` networks in turn (an ensemble's),
    told to ``on_windows`` (``None``: not told) with the scan's name: those of the
    members done, and of the one in hand; in all, theirs and as many as the one in
    hand has for each member still to come (members that resample otherwise have
    other counts)."""

    def __init__(self, on_windows, volume: Volume, members: int = 1):
        self.on_windows, self.name = on_windows, str(volume.path or "input")
        self.counted, self.left = 0, members

    def member(self) -> Callable[[int, int], None] | None:
        """The ``progress`` of :func:`sliding_window_predict` for the next member."""
        if self.on_windows is None:
            return None

        def progress(done: int, total: int) -> None:
            self.on_windows(
                self.name, self.counted + done, self.counted + total * self.left
            )
            if done == total:
                self.counted, self.left = self.counted + total, self.left - 1

        return progress


def _scan_notes(volume: Volume, members: Sequence[Segmenter]) -> tuple[tuple, int]:
    """Warnings about ``volume`` (logged): a blank channel, and those from the
    members' fingerprints; and the count of NaN/Inf voxels a member's preprocessing
    replaces."""
    notes = [note] if (note := blank_note(volume)) else []
    if note:
        logger.warning("%s", note)
    for member in members:
        note = field_of_view_note(volume, member.metadata.get("fingerprint"))
        if note and note not in notes:
            logger.warning("%s", note)
            notes.append(note)
    replaced = 0
    if any(m.preprocessor.nonfinite == "replace" for m in members):
        from medseg.preprocessing import count_nonfinite

        replaced = count_nonfinite(np.asarray(volume.array))
    return tuple(notes), replaced


def _on_scan_grid(volume: Volume, parts, options, notes) -> Prediction:
    """The prediction on ``volume``'s grid from class probabilities on preprocessed
    grids: ``parts`` of ``(scores (*P, K), records, weight)`` (weights summing to 1)
    are taken back one class at a time and summed, with a running argmax;
    ``options`` (a :class:`Segmenter` or :class:`Ensemble`) gives the label values
    and names and the post-processing."""
    notes, replaced = notes
    shape = volume.spatial_shape
    count = parts[0][0].shape[-1]
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
    del parts, best
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
    )


def _one_grey(array, spatial_dims: int, channels: int):
    """A 2D picture's one grey channel where the model takes one channel and the
    picture is greyscale stored with colour or alpha channels; else ``array``."""
    if _pictured(array, spatial_dims, channels):
        from medseg.preprocessing import grey_channel

        grey = grey_channel(np.asarray(array))
        if grey is not None:
            return grey
    return array


def _colour_note(array, spatial_dims: int, channels: int) -> str:
    """Why a 2D picture with colour channels was not taken as grey."""
    if _pictured(array, spatial_dims, channels):
        return " (a colour picture: its channels differ)"
    return ""


def _pictured(array, spatial_dims: int, channels: int) -> bool:
    """A 2D picture with colour or alpha channels, for a one-channel model."""
    return spatial_dims == 2 and channels == 1 and array.shape[-1] in (2, 3, 4)


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


# classification bundles


class Classifier:
    """A classification bundle ready to classify images: per-image normalisation as in
    training, one forward pass, softmax probabilities.

    Images whose shape differs from the training images are resized to it (linear
    interpolation), as MedMNIST images were made. ``nonfinite`` overrides the
    bundle's NaN/Inf policy as in :class:`Segmenter`.
    """

    def __init__(
        self,
        bundle,
        *,
        batch_size: int = 64,
        allow_modified: bool = False,
        nonfinite: str | None = None,
    ):
        from medseg import bundle as bundles
        from medseg.models import load_model
        from medseg.preprocessing import Preprocessor

        self.metadata = bundles.verify(bundle, allow_modified=allow_modified)
        if self.metadata.get("task") != "classification":
            raise InputFileError(
                bundle,
                f"a {self.metadata.get('task')} bundle, not a classification bundle",
            )
        self.model = load_model(bundle)
        self.preprocessor = Preprocessor.from_dict(self.metadata["preprocessing"])
        if nonfinite is not None:
            self.preprocessor = replace(self.preprocessor, nonfinite=nonfinite)
        self.shape = tuple(self.metadata["patch_size"])
        labels = self.metadata["labels"]
        self.names = [str(labels[str(k)]["name"]) for k in range(len(labels))]
        self.batch_size = batch_size

    def prepare(self, image: np.ndarray, source) -> np.ndarray:
        """One image ``(*S, C)`` -> the normalised network input ``(*shape, C)``.

        Raises:
            InputFileError: wrong number of spatial axes or channels, or NaN/Inf.
        """
        from medseg.preprocessing import handle_nonfinite, normalize

        dims, channels = self.metadata["spatial_dims"], self.metadata["in_channels"]
        image = _one_grey(image, image.ndim - 1, channels)
        if image.ndim - 1 != dims or image.shape[-1] != channels:
            raise InputFileError(
                source,
                f"{image.ndim - 1}D image with {image.shape[-1]} channel(s)"
                f"{_colour_note(image, image.ndim - 1, channels)}, but the "
                f"model classifies {dims}D images with {channels} channel(s)",
            )
        image = handle_nonfinite(
            np.asarray(image, np.float32), source, self.preprocessor.nonfinite
        )
        if tuple(image.shape[:-1]) != self.shape:
            image = geometry.resample_array(image, self.shape, order=1)
        return normalize(image, self.preprocessor.normalizers).astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax ``(N, K)`` of prepared images ``(N, *shape, C)``."""
        import keras

        logits = self.model.predict(images, batch_size=self.batch_size, verbose=0)
        return np.asarray(keras.ops.softmax(logits, axis=-1), dtype=np.float64)

    def probabilities_of(self, prepared: list[np.ndarray]) -> np.ndarray:
        """:meth:`probabilities` of images each :meth:`prepare` gave."""
        return self.probabilities(np.stack(prepared))


class ClassifierEnsemble:
    """Classification bundles of one task as one classifier: each image is prepared
    as each member's training images were, and classified by the mean of the members'
    softmax probabilities."""

    def __init__(self, members: Sequence[Classifier]):
        self.members = list(members)
        self.names = self.members[0].names
        self.batch_size = min(member.batch_size for member in self.members)

    def prepare(self, image: np.ndarray, source) -> tuple[np.ndarray, ...]:
        """Each member's input (see :meth:`Classifier.prepare`)."""
        return tuple(member.prepare(image, source) for member in self.members)

    def probabilities_of(self, prepared: list[tuple]) -> np.ndarray:
        """The mean of the members' softmax ``(N, K)``."""
        return np.mean(
            [
                member.probabilities(np.stack([inputs[i] for inputs in prepared]))
                for i, member in enumerate(self.members)
            ],
            axis=0,
        )
