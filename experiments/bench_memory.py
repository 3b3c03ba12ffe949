"""Peak memory of ``medseg predict`` on a 512 x 512 x 300 CT with a 3-class 3D U-Net.

Writes a synthetic CT (int16, 0.8 x 0.8 x 1.0 mm, a body of soft tissue and two
"organs" in air) and a bundle with an untrained U-Net (the weights do not change the
memory), then runs ``medseg predict`` in a fresh process per scenario and reads that
process's peak resident memory (``wait4`` rusage). A run on a 192 x 144 x 96 scan (12
windows, so full batches) gives the fixed cost (Python, TensorFlow, the model and its
activations), so the table also shows what the scan itself costs, per voxel of the
scan. Scenarios: the bundle keeps the scan's spacing; the bundle
resamples to 1.5 mm (probabilities go back to the scan's grid class by class); and
``--probabilities`` (float16 maps written as well). Prints a table and writes
experiments/results/memory.json.

    python experiments/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.0)
CLASSES = 3
MIB = 1024 * 1024


def make_scan(path: Path, shape, spacing) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n / 2 for n in shape]
    radius = [0.42 * n for n in shape]
    body = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True))
    ct = np.full(shape, -1000, np.int16)
    ct[body <= 1] = 40
    ct[body <= 0.15] = 80
    organ = sum(
        ((g - c - 0.2 * n) / (0.1 * n)) ** 2
        for g, c, n in zip(grid, centre, shape, strict=True)
    )
    ct[organ <= 1] = 160
    ct += rng.integers(-20, 20, shape, dtype=np.int16)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(ct, affine), path)


def make_bundle(folder: Path, spacing, patch) -> None:
    from medseg.bundle import write_bundle
    from medseg.models import build_unet
    from medseg.preprocessing import Preprocessor, WindowNormalization

    model = build_unet(
        spatial_dims=3, in_channels=1, num_classes=CLASSES, filters=(8, 16, 32)
    )
    preprocessor = Preprocessor(
        (WindowNormalization(-1000.0, 1000.0),), spacing, crop_nonzero=True
    )
    names = ["background", "tissue", "organ"]
    write_bundle(
        folder,
        model,
        {
            "task": "segmentation",
            "labels": {str(k): {"value": k, "name": names[k]} for k in range(CLASSES)},
            "in_channels": 1,
            "spatial_dims": 3,
            "patch_size": list(patch),
            "preprocessing": preprocessor.to_dict(),
            "config": {"train": {"augment": {"mirror_axes": []}}},
        },
    )


def predict_command(bundle: Path, scan: Path, output: Path, *extra) -> list[str]:
    """``medseg predict`` in this Python, as a fresh process."""
    return [sys.executable, "-m", "medseg_cli", "predict", "--model", str(bundle)] + [
        "--input",
        str(scan),
        "--output",
        str(output),
        *extra,
    ]


def run_predict(bundle: Path, scan: Path, output: Path, *extra) -> dict:
    command = predict_command(bundle, scan, output, *extra)
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict failed:\n{stderr[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="x".join(map(str, SHAPE)))
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--output", default=str(HERE / "results" / "memory.json"))
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split("x"))
    patch = (args.patch,) * 3
    voxels = int(__import__("numpy").prod(shape))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_scan(tmp / "ct.nii", shape, SPACING)
        # 4 x 3 x 1 windows: the model runs on full batches, as on the CT
        make_scan(tmp / "small.nii", (192, 144, 96), SPACING)
        make_bundle(tmp / "native", None, patch)
        make_bundle(tmp / "resampled", (1.5, 1.5, 1.5), patch)
        baseline = run_predict(tmp / "native", tmp / "small.nii", tmp / "o0")
        scenarios = [
            ("same spacing", "native", ()),
            ("resampled to 1.5 mm", "resampled", ()),
            ("same spacing, --probabilities", "native", ("--probabilities",)),
        ]
        rows = []
        for name, bundle, extra in scenarios:
            out = tmp / f"out_{len(rows)}"
            result = run_predict(tmp / bundle, tmp / "ct.nii", out, *extra)
            above = result["peak_rss_mib"] - baseline["peak_rss_mib"]
            rows.append(
                {
                    "scenario": name,
                    **result,
                    "above_baseline_mib": above,
                    "bytes_per_scan_voxel": round(above * MIB / voxels, 1),
                }
            )
            print(rows[-1], flush=True)

    reference = {
        "scan_int16_mib": round(voxels * 2 / MIB),
        "scan_float32_mib": round(voxels * 4 / MIB),
        "classes_float32_mib": round(voxels * 4 * CLASSES / MIB),
    }
    print(
        f"\nmedseg predict, {'x'.join(map(str, shape))} CT, {CLASSES} classes, "
        f"patch {patch[0]}^3, no TTA; fixed cost (192x144x96 scan): "
        f"{baseline['peak_rss_mib']} MiB"
    )
    print(
        f"for scale: the scan as int16 {reference['scan_int16_mib']} MiB, as float32 "
        f"{reference['scan_float32_mib']} MiB, {CLASSES} float32 class maps "
        f"{reference['classes_float32_mib']} MiB\n"
    )
    header = (
        f"{'scenario':32} {'seconds':>8} {'peak MiB':>9} {'above':>7} {'B/voxel':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['scenario']:32} {row['seconds']:8.1f} {row['peak_rss_mib']:9d} "
            f"{row['above_baseline_mib']:7d} {row['bytes_per_scan_voxel']:8.1f}"
        )
    record = {
        "command": "python experiments/bench_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "shape": list(shape),
        "spacing_mm": list(SPACING),
        "classes": CLASSES,
        "patch": list(patch),
        "baseline": baseline,
        "reference_sizes": reference,
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
