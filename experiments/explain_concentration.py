"""Do the shipped hippocampus model's explanations point at the structure? For each
case and label: the mean of the map's positive part (evidence for the label: an
occlusion map is negative where hiding a box raises the score) inside the true
structure (dilated by 2 voxels) over its mean outside, for occlusion, Grad-CAM and
saliency with default settings, and the seconds each took. Writes
experiments/results/explain_concentration.json.

By default, the shipped model on the first cases of the sample: it was trained on all
208 MSD hippocampus cases, the sample's included, so these are cases it has seen. With
``--model RUN`` (a run of one fold, such as experiments/cross_validate.py trains) and
``--data`` (the dataset it was trained on), that run's bundle on the first of the
held-out cases its medseg.json lists: cases it has not seen.

    python experiments/explain_concentration.py --cases 6
    python experiments/explain_concentration.py --cases 6 --model runs/cv/fold_0 \
        --data ../shared/datasets/hippocampus \
        --output experiments/results/explain_concentration_held_out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "data" / "sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--model", default="hippocampus", help="bundle or run folder")
    parser.add_argument("--data", type=Path, help="the run's dataset (held-out cases)")
    parser.add_argument(
        "--output", type=Path, default=HERE / "results" / "explain_concentration.json"
    )
    args = parser.parse_args()

    import machine

    from medseg import explain
    from medseg.io import read_volume

    rows = []
    if args.data is None:
        data = SAMPLE
        scans = sorted((data / "imagesTr").glob("*.nii.gz"))[: args.cases]
    else:
        data = args.data
        metadata = json.loads((Path(args.model) / "medseg.json").read_text())
        held_out = metadata["split"]["validation"][: args.cases]
        scans = [data / "imagesTr" / f"{case}.nii.gz" for case in held_out]
    for scan in scans:
        truth = read_volume(data / "labelsTr" / scan.name).array[..., 0]
        for value, label in ((1, "Anterior"), (2, "Posterior")):
            inside = ndimage.binary_dilation(truth == value, iterations=2)
            subject = explain.prepare(args.model, scan, label=label)
            for method in ("occlusion", "gradcam", "saliency"):
                started = time.perf_counter()
                result = getattr(explain, method)(subject)
                seconds = time.perf_counter() - started
                values = np.maximum(result.on_scan, 0)
                ratio = float(
                    values[inside].mean() / max(values[~inside].mean(), 1e-12)
                )
                rows.append(
                    {
                        "case": scan.name,
                        "label": label,
                        "method": method,
                        "ratio": round(ratio, 3),
                        "seconds": round(seconds, 1),
                    }
                )
                print(rows[-1], flush=True)
    summary = {}
    for method in ("occlusion", "gradcam", "saliency"):
        chosen = [r for r in rows if r["method"] == method]
        ratios = [r["ratio"] for r in chosen]
        summary[method] = {
            "median_ratio": round(statistics.median(ratios), 2),
            "min_ratio": round(min(ratios), 2),
            "at_least_3x": sum(r >= 3 for r in ratios),
            "maps": len(ratios),
            "median_seconds": round(statistics.median(r["seconds"] for r in chosen), 1),
        }
    report = {"command": "python experiments/explain_concentration.py "
              + " ".join(sys.argv[1:]), "model": args.model,
              "cases": [scan.name for scan in scans], "machine": machine.describe(),
              "summary": summary, "maps": rows}  # fmt: skip
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
