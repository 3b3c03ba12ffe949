"""Writing explanations: maps on the scan's grid (NIfTI, or PNG for 2D pictures),
pictures of them over the scan, grids of kernels and feature maps, and a JSON of what
was computed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medseg.io.files import atomic_output, atomic_write_text, json_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    _pyplot().close(figure)


def write_explanation(explanation, folder: Path, stem: str) -> list[Path]:
    """``STEM_METHOD.nii.gz`` (``.png`` for a 2D scan, the map scaled to 0-255),
    ``STEM_METHOD_overlay.png`` and ``STEM_METHOD.json``; the paths written."""
    from medseg.io import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    volume = explanation.subject.volume
    base = folder / f"{stem}_{explanation.method}"
    record = explanation.record()
    on_scan = explanation.on_scan
    if volume.spatial_dims == 3:
        map_path = base.with_name(base.name + ".nii.gz")
        write_volume(volume.with_array(on_scan[..., None].astype(np.float32)), map_path)
    else:
        map_path = base.with_name(base.name + ".png")
        top = float(np.abs(on_scan).max()) or 1.0
        scaled = np.clip(np.round(255 * np.abs(on_scan) / top), 0, 255)
        write_volume(volume.with_array(scaled.astype(np.uint8)[..., None]), map_path)
        record["png_scale"] = f"pixel 255 is a map value of {top:.6g}"
    overlay = base.with_name(base.name + "_overlay.png")
    write_overlay(explanation, overlay)
    record["files"] = [map_path.name, overlay.name]
    record_path = base.with_name(base.name + ".json")
    atomic_write_text(record_path, json_text(record))
    return [map_path, overlay, record_path]


def _cuts(array: np.ndarray, centre) -> list[tuple[str, np.ndarray]]:
    if array.ndim == 2:
        return [("", array)]
    i, j, k = centre
    return [
        (f"axis 0, slice {i}", array[i]),
        (f"axis 1, slice {j}", array[:, j]),
        (f"axis 2, slice {k}", array[:, :, k]),
    ]


def write_overlay(explanation, path: Path) -> None:
    """The map over the scan: three orthogonal slices through the map's largest
    value for a 3D scan (in the scan's voxel axes), the picture for a 2D one."""
    plt = _pyplot()
    image = np.asarray(explanation.subject.volume.array, np.float32)[..., 0]
    heat = explanation.on_scan
    centre = np.unravel_index(int(np.argmax(heat)), heat.shape)
    pairs = list(zip(_cuts(image, centre), _cuts(heat, centre), strict=True))
    figure, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 4))
    axes = np.atleast_1d(axes)
    top = float(np.abs(heat).max()) or 1.0
    for axis, ((title, grey), (_, hot)) in zip(axes, pairs, strict=True):
        low, high = np.percentile(grey, [1, 99]) if grey.size else (0, 1)
        axis.imshow(grey.T, cmap="gray", vmin=low, vmax=high, origin="lower")
        faint = np.abs(hot) < 0.1 * top  # the scan shows through where the map is ~0
        shown = axis.imshow(
            np.ma.masked_where(faint, hot).T, cmap="inferno", alpha=0.6,
            vmin=-top if hot.min() < 0 else 0, vmax=top, origin="lower",
        )  # fmt: skip
        axis.set_title(title, fontsize=8)
        axis.set_axis_off()
    figure.colorbar(shown, ax=list(axes), shrink=0.7)
    subject = explanation.subject
    figure.suptitle(
        f"{explanation.method}: {subject.label_name} (score {explanation.score:.3f})",
        fontsize=10,
    )
    _save(figure, path)


def _grid(tiles: list[np.ndarray], path: Path, title: str, symmetric: bool) -> None:
    plt = _pyplot()
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns + 1, 1.6 * rows))
    axes = np.atleast_1d(axes).ravel()
    top = max(float(np.abs(t).max()) for t in tiles) or 1.0
    low = -top if symmetric else min(float(t.min()) for t in tiles)
    for axis in axes:
        axis.set_axis_off()
    for index, (axis, tile) in enumerate(zip(axes, tiles, strict=False)):
        shown = axis.imshow(tile, cmap="RdBu_r" if symmetric else "viridis",
                            vmin=low, vmax=top)  # fmt: skip
        axis.set_title(str(index), fontsize=7)
    figure.colorbar(shown, ax=list(axes), shrink=0.8)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def write_kernels(kernels, folder: Path, stem: str) -> list[Path]:
    """``STEM_filters.png`` (the kernels, one colour scale shown beside them) and
    ``STEM_filters.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = folder / f"{stem}_filters.png"
    _grid(kernels.tiles(), picture,
          f"{kernels.layer}: {kernels.weights.shape[-1]} kernels "
          f"{' x '.join(map(str, kernels.weights.shape[:-2]))}, input channel 0",
          symmetric=True)  # fmt: skip
    record = folder / f"{stem}_filters.json"
    atomic_write_text(record, json_text({**kernels.record(), "files": [picture.name]}))
    return [picture, record]


def write_activations(acts, folder: Path, stem: str) -> list[Path]:
    """``STEM_activations.png`` (the most active channels, each at the slice where
    it is most active for 3D maps) and ``STEM_activations.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    for channel in acts.top:
        feature = acts.maps[..., channel]
        if feature.ndim == 3:
            feature = feature[..., int(np.argmax(feature.sum(axis=(0, 1))))]
        tiles.append(feature.T)
    picture = folder / f"{stem}_activations.png"
    _grid(tiles, picture, f"{acts.layer}: channels {acts.top}", symmetric=False)
    record = folder / f"{stem}_activations.json"
    atomic_write_text(record, json_text({**acts.record(), "files": [picture.name]}))
    return [picture, record]
