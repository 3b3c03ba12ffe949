"""Memory of one ``medseg predict`` job over many scans: it must stay flat.

Copies the shipped sample (12 hippocampus MRIs) to N scans (default 500), writes a
bundle with an untrained 3-class 3D U-Net (the weights do not change the memory), runs
``medseg predict`` once over the folder, and samples the job's resident memory
(/proc/PID/status VmRSS) every 0.1 s along with the number of label files written.
Prints the RSS after 50 and after all N scans, and the peak; writes
experiments/results/batch_memory.json.

    python experiments/bench_batch_memory.py --cases 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "data" / "sample" / "imagesTr"
sys.path.insert(0, str(HERE))

from bench_memory import make_bundle, predict_command  # noqa: E402


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--output", default=str(HERE / "results" / "batch_memory.json"))
    args = parser.parse_args()
    sources = sorted(SAMPLE.glob("*.nii.gz"))
    checkpoints = sorted({min(50, args.cases), args.cases})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs, out = tmp / "in", tmp / "out"
        inputs.mkdir()
        for i in range(args.cases):
            shutil.copy(sources[i % len(sources)], inputs / f"case_{i:04d}.nii.gz")
        make_bundle(tmp / "bundle", None, (40, 56, 40))
        command = predict_command(tmp / "bundle", inputs, out, "--no-tta")
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        samples, at = [], {}
        while process.poll() is None:
            rss = rss_mib(process.pid)
            done = len(list(out.glob("case_*.nii.gz"))) if out.is_dir() else 0
            if rss is not None:
                samples.append((round(time.perf_counter() - started, 2), done, rss))
                for mark in checkpoints:
                    if done >= mark and mark not in at:
                        at[mark] = round(rss)
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        stderr = process.stderr.read()
        if process.returncode != 0:
            raise SystemExit(f"predict failed:\n{stderr[-3000:]}")
        written = len(list(out.glob("case_*.nii.gz")))
    for mark in checkpoints:  # the job may end between two samples
        at.setdefault(mark, round(samples[-1][2]))
    peak = round(max(s[2] for s in samples))
    print(f"medseg predict over {args.cases} hippocampus scans, {seconds:.0f} s")
    print(f"{'scans written':>14} {'RSS MiB':>8}")
    for mark in checkpoints:
        print(f"{mark:>14} {at.get(mark, float('nan')):>8}")
    print(f"{'peak':>14} {peak:>8}")
    record = {
        "command": "python experiments/bench_batch_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "cases": args.cases,
        "written": written,
        "seconds": round(seconds, 1),
        "rss_mib_after": {str(k): v for k, v in at.items()},
        "peak_rss_mib": peak,
        "samples_every_10th": samples[::10],
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
