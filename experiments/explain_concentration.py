"""Do the shipped hippocampus model's explanations point at the structure? For each
case and label: the mean of the map's positive part (evidence for the label: an
occlusion map is negative where hiding a box raises the score) inside the true
structure (dilated by 2 voxels) over its mean outside, for occlusion, Grad-CAM and
saliency with default settings, and the seconds each took. Writes
experiments/results/explain_concentration.json.

The shipped model was trained on all 208 MSD hippocampus cases, the sample's
included: these are cases it has seen.

    python experiments/explain_concentration.py --cases 6
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
    parser.add_argument(
        "--output", type=Path, default=HERE / "results" / "explain_concentration.json"
    )
    args = parser.parse_args()

    import machine

    from medseg import explain
    from medseg.io import read_volume

    rows = []
    scans = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[: args.cases]
    for scan in scans:
        truth = read_volume(SAMPLE / "labelsTr" / scan.name).array[..., 0]
        for value, label in ((1, "Anterior"), (2, "Posterior")):
            inside = ndimage.binary_dilation(truth == value, iterations=2)
            subject = explain.prepare("hippocampus", scan, label=label)
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
              + " ".join(sys.argv[1:]), "machine": machine.describe(),
              "summary": summary, "maps": rows}  # fmt: skip
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
