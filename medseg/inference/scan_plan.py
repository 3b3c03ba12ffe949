"""What prediction would do with a scan, told before any network is loaded: refused or
not, its grid, windows, passes and memory."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import InputFileError
from medseg.inference.sliding_window import window_starts, windows_per_pass
from medseg.io.volume import Volume
from medseg.preprocessing.intensity import blank_note

if TYPE_CHECKING:
    from medseg.bundle import BundleMetadata
    from medseg.inference.segmenter import Segmenter


logger = logging.getLogger(__name__)


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


def bundle_mirror_axes(metadata: BundleMetadata) -> tuple[int, ...]:
    """The mirror axes a bundle was trained with (its test-time augmentation axes):
    axes along which flipping changes a label's meaning are left out in training, so
    they are left out here too."""
    return metadata.mirror_axes


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
    metadata: BundleMetadata,
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
    window = metadata.window
    mirror = bundle_mirror_axes(metadata) if tta else ()
    batch = batch_size or windows_per_pass(window)
    plan = dict.fromkeys(
        ["refused", "grid_shape", "grid_spacing_mm", "window", "overlap", "windows"]
        + ["mirrored", "forward_passes", "batch_size", "probabilities_mib"]
    )
    try:
        volume = check_scan(volume, window, metadata.in_channels)
        shape, spacing = metadata.preprocessor.grid(volume)
    except InputFileError as exc:
        return {**plan, "refused": exc.problem, "warnings": []}
    warnings = [note] if (note := blank_note(volume)) else []
    if note := field_of_view_note(volume, metadata.get("fingerprint")):
        warnings.append(note)
    padded = [max(n, p) for n, p in zip(shape, window, strict=True)]
    windows = math.prod(
        len(window_starts(n, p, overlap)) for n, p in zip(padded, window, strict=True)
    )
    classes = len(metadata.labels)
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
        from medseg.preprocessing.intensity import count_nonfinite

        replaced = count_nonfinite(np.asarray(volume.array))
    return tuple(notes), replaced


def _one_grey(array, spatial_dims: int, channels: int):
    """A 2D picture's one grey channel where the model takes one channel and the
    picture is greyscale stored with colour or alpha channels; else ``array``."""
    if _pictured(array, spatial_dims, channels):
        from medseg.io.pictures import grey_channel

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
