"""How fast does ``medseg evaluate`` score one case of many labels?

Scores a truth label map against a prediction made from it (the truth shifted by a
few voxels along its first axis) two ways, alternating, several times:

* whole maps: label by label, each metric on the whole maps (``dice``, ``iou``,
  ``hausdorff_distance``, ``average_surface_distance``, ``surface_dice`` and
  ``volume_ml`` called one by one, each of the three surface metrics computing its
  own distance transforms), as ``label_metrics`` did before;
* boxes: ``medseg.metrics.label_metrics`` (each label on the box that holds it, its
  boxes found in one pass, the distance transforms computed once a label).

Both must give the same numbers (checked); it prints a table and writes
experiments/results/evaluate_metrics.json.

    python experiments/bench_evaluate.py \\
        --truth ../shared/datasets/samples/example_seg.nii.gz --zoom 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def whole_maps(prediction, truth, labels, spacing, tolerance_mm=1.0):
    from medseg import metrics

    rows = []
    for label in labels:
        p, t = prediction == label, truth == label
        rows.append(
            {
                "label": int(label),
                "dice": metrics.dice(p, t),
                "iou": metrics.iou(p, t),
                "hd95_mm": metrics.hausdorff_distance(p, t, spacing, 95),
                "assd_mm": metrics.average_surface_distance(p, t, spacing),
                "nsd": metrics.surface_dice(p, t, spacing, tolerance_mm),
                "volume_truth_ml": metrics.volume_ml(t, spacing),
                "volume_pred_ml": metrics.volume_ml(p, spacing),
            }
        )
    return rows


def same(a: list[dict], b: list[dict]) -> bool:
    def equal(x, y):
        return x == y or (
            isinstance(x, float)
            and isinstance(y, float)
            and math.isnan(x)
            and math.isnan(y)
        )

    return len(a) == len(b) and all(
        equal(r[k], s[k]) for r, s in zip(a, b, strict=True) for k in r
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--truth",
        default=str(HERE.parent / "data/sample/labelsTr/hippocampus_003.nii.gz"),
    )
    parser.add_argument(
        "--zoom", type=int, default=1, help="repeat each voxel this many times per axis"
    )
    parser.add_argument("--shift", type=int, default=2, help="voxels, along axis 0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--output", default=str(HERE / "results" / "evaluate_metrics.json")
    )
    args = parser.parse_args()

    from medseg.io import read_volume
    from medseg.io.grid import label_array
    from medseg.metrics import label_metrics

    volume = read_volume(args.truth)
    truth = label_array(volume)
    spacing = tuple(s / args.zoom for s in volume.spacing)
    for axis in range(truth.ndim):
        truth = truth.repeat(args.zoom, axis=axis)
    prediction = np.roll(truth, args.shift * args.zoom, axis=0)
    labels = sorted(set(np.unique(truth).tolist()) - {0})
    ways = {
        "whole maps": lambda: whole_maps(prediction, truth, labels, spacing),
        "boxes": lambda: label_metrics(prediction, truth, labels, spacing),
    }
    seconds = {name: [] for name in ways}
    answers = {}
    for _ in range(args.repeats):
        for name, way in ways.items():
            started = time.perf_counter()
            answers[name] = way()
            seconds[name].append(time.perf_counter() - started)
    assert same(answers["whole maps"], answers["boxes"]), "the two ways differ"
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(
        f"{args.truth}: {' x '.join(map(str, truth.shape))} voxels of "
        f"{' x '.join(f'{s:g}' for s in spacing)} mm, {len(labels)} labels"
    )
    print(f"{'way':<12} {'median s':>9}  runs")
    for name, values in seconds.items():
        print(
            f"{name:<12} {median[name]:>9.2f}  {', '.join(f'{v:.2f}' for v in values)}"
        )
    ratio = median["whole maps"] / median["boxes"]
    print(f"boxes are {ratio:.1f}x faster; the same numbers")
    record = {
        "truth": args.truth,
        "shape": list(truth.shape),
        "spacing_mm": list(spacing),
        "labels": len(labels),
        "seconds": seconds,
        "median_s": median,
        "speedup": ratio,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
