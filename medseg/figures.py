"""Pictures of an evaluation: overlays of the best, median and worst cases, and a box
plot of Dice per label (matplotlib, written without a display)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.io.files import atomic_output
from medseg.io.formats import read_volume

#: Contour colours per label, cycled (truth solid, prediction dashed).
COLOURS = ("#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf")


def label_title(value, names: dict[int, str] | None) -> str:
    """``"1 anterior"`` where the label has a name, else ``"1"``."""
    name = (names or {}).get(int(value))
    return f"{value} {name}" if name else str(value)


def case_scores(rows: list[dict]) -> dict[str, float]:
    """Mean Dice over each case's labels with a defined Dice (NaN if none)."""
    by_case: dict[str, list[float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], [])
        if not math.isnan(row["dice"]):
            by_case[row["case"]].append(row["dice"])
    return {
        case: float(np.mean(values)) if values else math.nan
        for case, values in by_case.items()
    }


def pick_cases(scores: dict[str, float]) -> dict[str, str]:
    """``{"best": case, "median": case, "worst": case}`` by mean Dice; cases without a
    defined Dice are left out; the median is the lower middle for an even count; ties
    go to the case named first."""
    ranked = sorted(
        (case for case, s in scores.items() if not math.isnan(s)),
        key=lambda c: (-scores[c], c),
    )
    if not ranked:
        return {}
    return {
        "best": ranked[0],
        "median": ranked[(len(ranked) - 1) // 2],
        "worst": ranked[-1],
    }


def pick_slice(foreground: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the most foreground (first on ties; the
    middle slice when there is none)."""
    other = tuple(a for a in range(foreground.ndim) if a != axis)
    counts = foreground.sum(axis=other)
    if counts.max() == 0:
        return foreground.shape[axis] // 2
    return int(np.argmax(counts))


def _display(volume):
    """A 2D array ``(rows, cols)`` view for drawing: 3D scans are put in RAS order,
    whose axial slices (last axis) are then drawn as radiologists view them (see
    ``write_overlay``)."""
    from medseg.preprocessing import geometry

    if volume.spatial_dims == 3:
        volume, _ = geometry.reorient_to_canonical(volume)
    return np.asarray(volume.array)[..., 0], volume.spacing


def write_overlay(
    path: Path,
    truth_path: Path,
    prediction_path: Path,
    image_path: Path | None,
    labels: Sequence[int],
    title: str,
    names: dict[int, str] | None = None,
) -> None:
    """One PNG: the axial slice with most truth foreground (prediction foreground when
    the truth is empty), seen from below, anterior up (the patient's right on the
    left, as radiologists view it), truth contours solid and prediction contours
    dashed per label,
    over the image when one is given, with the voxels' aspect ratio; the legend names
    the labels where ``names`` gives them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, spacing = _display(read_volume(truth_path))
    prediction, _ = _display(read_volume(prediction_path))
    image = None
    if image_path is not None:
        image = _display(read_volume(image_path))[0].astype(np.float32)
    three_d = truth.ndim == 3
    chosen = [v for v in labels if (truth == v).any() or (prediction == v).any()]
    foreground = np.isin(truth, chosen)  # the structure, or what was predicted
    if not foreground.any():
        foreground = np.isin(prediction, chosen)
    if three_d:
        index = pick_slice(foreground, axis=2)

        def cut(a):  # rows: posterior to anterior; the patient's right on the left
            return a[:, :, index].T[:, ::-1]

        origin, aspect = "lower", spacing[1] / spacing[0]
    else:

        def cut(a):
            return a

        origin, aspect = "upper", spacing[0] / spacing[1]
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    if image is not None:
        shown = cut(image)
        low, high = np.percentile(shown, [1, 99]) if shown.size else (0, 1)
        axes.imshow(
            shown, cmap="gray", vmin=low, vmax=high, origin=origin, aspect=aspect
        )
    else:
        axes.imshow(
            np.zeros(cut(truth).shape), cmap="gray", origin=origin, aspect=aspect
        )
    for i, value in enumerate(chosen):
        colour = COLOURS[i % len(COLOURS)]
        for mask, style in (
            (cut(truth) == value, "solid"),
            (cut(prediction) == value, "dashed"),
        ):
            if mask.any() and not mask.all():
                axes.contour(
                    mask.astype(float),
                    levels=[0.5],
                    colors=[colour],
                    linestyles=style,
                    linewidths=1.2,
                    origin=origin,
                )
    if chosen:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=COLOURS[i % len(COLOURS)], label=label_title(v, names))
            for i, v in enumerate(chosen)
        ]
        axes.legend(handles=handles, loc="lower right", fontsize=7)
    where = f", axial slice {index}" if three_d else ""
    axes.set_title(f"{title}{where}\ntruth solid, prediction dashed", fontsize=9)
    axes.set_axis_off()
    _save(figure, path)


def write_boxplot(
    path: Path, rows: list[dict], names: dict[int, str] | None = None
) -> None:
    """Box plot of Dice per label over cases (cases with a defined Dice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["label"] for r in rows})
    values = [
        [r["dice"] for r in rows if r["label"] == v and not math.isnan(r["dice"])]
        for v in labels
    ]
    figure, axes = plt.subplots(figsize=(1.2 + 1.0 * len(labels), 4), dpi=100)
    axes.boxplot(values, showmeans=True)
    axes.set_xticks(range(1, len(labels) + 1), [label_title(v, names) for v in labels])
    axes.set_xlabel("label")
    axes.set_ylabel("Dice")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"Dice per label ({len({r['case'] for r in rows})} cases)")
    _save(figure, path)


def write_reliability(path: Path, calibration: dict) -> None:
    """Reliability diagram: for each label and the top class, the observed frequency
    against the mean predicted probability of each bin (the diagonal is perfect
    calibration), over a histogram of the voxels per bin of the top class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, counts) = plt.subplots(
        2, 1, figsize=(5, 6), dpi=100, height_ratios=(3, 1), sharex=True
    )
    curves.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect")
    per_label = calibration["ece_per_label"]
    for name, points in calibration["reliability"].items():
        ece = calibration["ece"] if name == "top class" else per_label.get(name)
        top = name == "top class"
        curves.plot(
            points["mean_probability"],
            points["frequency"],
            marker="o",
            markersize=3,
            linewidth=2.0 if top else 1.0,
            color="black" if top else None,
            label=f"{name} (ECE {'-' if ece is None else f'{ece:.3f}'})",
        )
    curves.set_ylabel("observed frequency")
    curves.set_xlim(0, 1)
    curves.set_ylim(0, 1)
    curves.legend(fontsize=7, loc="upper left")
    curves.set_title(
        f"reliability over {calibration['voxels']} voxels, "
        f"{calibration['cases']} case(s)",
        fontsize=9,
    )
    top = calibration["reliability"]["top class"]
    width = 1.0 / calibration["bins"]
    counts.bar(top["mean_probability"], top["voxels"], width=width * 0.8, color="0.4")
    counts.set_yscale("log")
    counts.set_xlabel("predicted probability")
    counts.set_ylabel("voxels (top class)")
    _save(figure, path)


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        figure.tight_layout()
        with atomic_output(path) as tmp:
            figure.savefig(tmp, format="png")
    finally:
        plt.close(figure)


def write_report(
    folder: Path,
    rows: list[dict],
    pairs: list[tuple[str, Path, Path]],
    images: dict[str, Path] | None = None,
    names: dict[int, str] | None = None,
) -> list[Path]:
    """Overlays of the best, median and worst cases and the Dice box plot in
    ``folder``, labels named by ``names`` where given; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "dice_boxplot.png"]
    write_boxplot(written[0], rows, names)
    scores = case_scores(rows)
    files = {case: (p, t) for case, p, t in pairs}
    labels = sorted({r["label"] for r in rows})
    for rank, case in pick_cases(scores).items():
        prediction, truth = files[case]
        target = folder / f"overlay_{rank}_{case}.png"
        write_overlay(
            target,
            truth,
            prediction,
            (images or {}).get(case),
            labels,
            f"{rank}: {case} (mean Dice {scores[case]:.3f})",
            names,
        )
        written.append(target)
    return written


# a picture of each prediction (``medseg predict --preview``)

#: the planes of a 3D preview: name, the RAS axis cut across, the axes shown (as
#: columns, rows)
PREVIEW_PLANES = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))


def preview_cuts(image, labels, values) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The planes a preview shows, as ``(title, image plane, label plane)`` with rows
    first: for a 3D scan (both :class:`medseg.io.Volume` on one grid), its axial,
    coronal and sagittal planes through the slice with the most voxels of ``values``
    along each axis (the middle one where there are none), as radiologists view them:
    the first row lowest (anterior at the top of the axial plane, superior at the top
    of the others), the patient's right on the left (axial, coronal) and anterior on
    the left (sagittal); a 2D picture as it is (rows first, first row at the
    top)."""
    from medseg.preprocessing import geometry

    if labels.spatial_dims != 3:
        picture = np.asarray(image.array)[..., 0]
        return [("", picture, np.asarray(labels.array).reshape(picture.shape))]
    image, _ = geometry.reorient_to_canonical(image)
    labels, _ = geometry.reorient_to_canonical(labels)
    scan = np.asarray(image.array)[..., 0]
    label_map = np.asarray(labels.array).reshape(scan.shape)
    foreground = np.isin(label_map, values)
    cuts = []
    for title, axis, (across, up) in PREVIEW_PLANES:
        index = pick_slice(foreground, axis)
        where = [slice(None)] * 3
        where[axis] = index
        order = (1, 0) if up > across else (0, 1)  # rows: the upward axis
        cuts.append(  # columns flipped: RAS's right and anterior go to the left
            (
                f"{title} {index}",
                scan[tuple(where)].transpose(order)[:, ::-1],
                label_map[tuple(where)].transpose(order)[:, ::-1],
            )
        )
    return cuts


def write_preview(
    path: Path,
    image,
    labels,
    values: Sequence[int],
    names: Sequence[str],
    title: str,
) -> None:
    """One PNG of a prediction: the scan in grey (its first channel, 1st to 99th
    percentile) with each label of ``values`` filled in its colour, in the planes of
    :func:`preview_cuts`, with the voxels' aspect ratio; the legend names the labels
    and ``title`` heads it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    from medseg.preprocessing import geometry

    cuts = preview_cuts(image, labels, values)
    three_d = labels.spatial_dims == 3
    spacing = (
        geometry.reorient_to_canonical(labels)[0].spacing if three_d else labels.spacing
    )
    figure, axes = plt.subplots(
        1, len(cuts), figsize=(4 * len(cuts), 4.4), dpi=100, squeeze=False
    )
    for ax, (plane_title, picture, label_plane), (_, _, (across, up)) in zip(
        axes[0], cuts, PREVIEW_PLANES, strict=False
    ):
        if three_d:
            origin, aspect = "lower", spacing[up] / spacing[across]
        else:
            origin, aspect = "upper", spacing[0] / spacing[1]
        shown = picture.astype(np.float32)
        low, high = np.percentile(shown, [1, 99]) if shown.size else (0, 1)
        ax.imshow(shown, cmap="gray", vmin=low, vmax=high, origin=origin, aspect=aspect)
        overlay = np.zeros((*label_plane.shape, 4), np.float32)
        for i, value in enumerate(values):
            overlay[label_plane == value] = to_rgba(COLOURS[i % len(COLOURS)], 0.45)
        ax.imshow(overlay, origin=origin, aspect=aspect, interpolation="nearest")
        ax.set_title(plane_title, fontsize=9)
        ax.set_axis_off()
    handles = [
        Patch(color=COLOURS[i % len(COLOURS)], label=f"{value} {name}")
        for i, (value, name) in enumerate(zip(values, names, strict=True))
    ]
    if handles:
        axes[0][-1].legend(handles=handles, loc="upper right", fontsize=7)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)
