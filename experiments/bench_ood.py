"""What the out-of-distribution check and ``--uncertainty`` add to prediction.

The shipped hippocampus model (with its test-time mirroring, ``precision auto``)
segments the 12 sample scans, already read, with ``Segmenter.predict`` in three
settings: the check off (``ood="off"``), on (the default), and on with the
uncertainty maps. The settings take turns, round after round (one warm-up round
first), and each round's time over the 12 scans is kept; the ratios are taken round
by round, then their median. Writes experiments/results/ood_cost.json.

    python experiments/bench_ood.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SETTINGS = {
    "off": {"ood": "off"},
    "ood": {"ood": "warn"},
    "ood_and_uncertainty": {"ood": "warn", "uncertainty": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import machine

    from medseg.bundle import resolve
    from medseg.inference import Segmenter
    from medseg.io import read_volume

    bundle = resolve("hippocampus")
    scans = [
        read_volume(p) for p in sorted((REPO / "data/sample/imagesTr").glob("*.nii.gz"))
    ]
    segmenters = {
        name: Segmenter(bundle, mirror_axes=(0,), **options)
        for name, options in SETTINGS.items()
    }
    times = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds + 1):
        for name, segmenter in segmenters.items():
            started = time.perf_counter()
            for scan in scans:
                segmenter.predict(scan)
            if round_:  # the first is the warm-up
                times[name].append(time.perf_counter() - started)
    ratios = {
        name: round(
            statistics.median(
                a / b for a, b in zip(times[name], times["off"], strict=True)
            ),
            4,
        )
        for name in SETTINGS
        if name != "off"
    }
    report = {
        "command": "python experiments/bench_ood.py " + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "scans": len(scans),
        "seconds_per_round": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_seconds_per_scan": {
            k: round(statistics.median(v) / len(scans), 4) for k, v in times.items()
        },
        "median_ratio_to_off": ratios,
    }
    (HERE / "results" / "ood_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("median_seconds_per_scan", "median_ratio_to_off")}
        )
    )


if __name__ == "__main__":
    main()
