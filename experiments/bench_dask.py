"""Cases per second of ``medseg predict`` over a folder: in one process, and on a
local Dask cluster of 1 and 2 worker processes (``--scheduler local:N``).

Each arm is the whole command in a fresh process into an empty folder (model
loading and the workers' start included), the arms alternating over the rounds;
the label maps of every arm are checked to be byte-identical to the first's.

    python experiments/bench_dask.py --data ../shared/datasets/hippocampus/imagesTr \
        --cases 48 --rounds 2 --output experiments/results/dask_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = {"one process": [], "local:1": ["--scheduler", "local:1"],
        "local:2": ["--scheduler", "local:2"]}  # fmt: skip


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of scans")
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--output", type=Path, required=True, help="JSON to write")
    args = parser.parse_args()

    scans = sorted(args.data.glob("*.nii.gz"))[: args.cases]
    work = Path(tempfile.mkdtemp(prefix="bench_dask_"))
    folder = work / "in"
    folder.mkdir()
    for scan in scans:
        (folder / scan.name).symlink_to(scan.resolve())
    seconds = {arm: [] for arm in ARMS}
    first = None
    try:
        for _ in range(args.rounds):
            for arm, extra in ARMS.items():
                output = work / "out"
                shutil.rmtree(output, ignore_errors=True)
                command = [sys.executable, "-m", "medseg_cli", "predict", "--model",
                           args.model, "--input", str(folder), "--output",
                           str(output), *extra]  # fmt: skip
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                seconds[arm].append(time.perf_counter() - started)
                maps = {p.name: p.read_bytes() for p in output.glob("*.nii.gz")}
                if len(maps) != len(scans):
                    raise SystemExit(f"{arm}: {len(maps)} label maps, not {len(scans)}")
                if first is None:
                    first = maps
                elif maps != first:
                    raise SystemExit(f"{arm}: label maps differ from the first arm's")
                print(f"{arm}: {seconds[arm][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {
        arm: {
            "seconds": [round(s, 2) for s in values],
            "median_s": round(sorted(values)[len(values) // 2], 2),
            "cases_per_s": round(len(scans) / sorted(values)[len(values) // 2], 3),
        }
        for arm, values in seconds.items()
    }
    report = {
        "command": " ".join(sys.argv),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "cases": len(scans),
        "model": args.model,
        "arms": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'arm':<14}{'median s':>10}{'cases/s':>10}")
    for arm, row in rows.items():
        print(f"{arm:<14}{row['median_s']:>10.1f}{row['cases_per_s']:>10.2f}")


if __name__ == "__main__":
    main()
