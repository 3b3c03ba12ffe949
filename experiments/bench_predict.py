"""End to end, file in, file out: ``medseg predict`` against a MONAI inference script.

One network for both, the 3D U-Net of experiments/bench_monai.py (filters
32-64-128-256, instance norm, ReLU, transposed convolutions, 3 classes), its Keras
weights ported to the MONAI-built PyTorch copy. Two scans:

- ct: a synthetic 512 x 512 x 300 CT (int16, 0.8 x 0.8 x 1.0 mm, as in
  experiments/bench_memory.py), resampled to 3 mm, HU window [-1000, 1000] to [0, 1];
- hippocampus: the first case of ``--data`` (a hippocampus MR crop, 1 mm), z-score.

For each: read the NIfTI, reorient to RAS, resample (linear), normalise, 64^3 windows
with overlap 0.5 and Gaussian blending (4 per batch), softmax, the probabilities back to
the scan's grid (linear), argmax, write the label NIfTI. medseg: the ``medseg predict``
command (``--no-tta``), at its default precision (bfloat16 on a CPU with AMX bfloat16,
else float32) and at ``--precision float32``. MONAI: the dictionary transforms of its
tutorials (``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``,
``ScaleIntensityRanged``/``NormalizeIntensityd``), ``sliding_window_inference``,
``Invertd``, ``AsDiscreted``, ``SaveImaged``, float32 (its default). Each run a fresh
process; the seconds are the scan's own (read to written), and the whole process's
wall time and peak RSS are recorded too. Runs alternate; medians.

    python experiments/bench_predict.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CT_SPACING = (3.0, 3.0, 3.0)  # as TotalSegmentator's --fast models
WINDOW = (-1000.0, 1000.0)


def prepare(folder: Path, data: Path) -> None:
    """Scans, the two medseg bundles and the ported PyTorch weights (in a child)."""
    import shutil

    import bench_memory
    import bench_monai
    import torch

    from medseg.bundle import write_bundle
    from medseg.preprocessing import (
        Preprocessor,
        WindowNormalization,
        ZScoreNormalization,
    )

    bench_memory.make_scan(folder / "ct.nii.gz", bench_memory.SHAPE,
                           bench_memory.SPACING)  # fmt: skip
    case = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copyfile(case, folder / "hippocampus.nii.gz")
    model = bench_monai.keras_unet()
    for name, preprocessor in (
        ("ct", Preprocessor((WindowNormalization(*WINDOW),), CT_SPACING)),
        ("hippocampus", Preprocessor((ZScoreNormalization(),), None)),
    ):
        write_bundle(
            folder / f"bundle_{name}",
            model,
            {
                "task": "segmentation",
                "labels": {
                    str(k): {"value": k, "name": str(k)}
                    for k in range(bench_monai.CLASSES)
                },
                "in_channels": 1,
                "spatial_dims": 3,
                "patch_size": list(bench_monai.PATCH),
                "preprocessing": {**preprocessor.to_dict(), "crop_nonzero": False},
            },
        )
    net = bench_monai.torch_unet()
    bench_monai.port_weights(model, net)
    torch.save(net.state_dict(), folder / "monai_unet.pt")


def run_monai(folder: Path, scan: str, output: Path) -> float:
    import bench_monai
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    net = bench_monai.torch_unet().eval()
    net.load_state_dict(torch.load(folder / "monai_unet.pt"))
    steps = [
        LoadImaged("image"),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
    ]
    if scan == "ct":
        steps += [
            Spacingd("image", pixdim=CT_SPACING, mode="bilinear"),
            ScaleIntensityRanged("image", *WINDOW, 0.0, 1.0, clip=True),
        ]
    else:
        steps += [NormalizeIntensityd("image")]
    pre = Compose(steps)
    post = Compose(
        [
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted("pred", argmax=True),
            SaveImaged("pred", output_dir=output, output_postfix="seg",
                       separate_folder=False, resample=False,
                       output_dtype=np.uint8),
        ]
    )  # fmt: skip
    started = time.perf_counter()
    data = pre({"image": str(folder / f"{scan}.nii.gz")})
    with torch.inference_mode():
        logits = sliding_window_inference(
            data["image"][None], bench_monai.PATCH, bench_monai.SW_BATCH, net,
            overlap=0.5, mode="gaussian",
        )  # fmt: skip
        data["pred"] = torch.softmax(logits[0], dim=0)
        post(data)
    return time.perf_counter() - started


def run(folder: Path, tool: str, scan: str) -> dict:
    """One fresh process: scan seconds, process wall seconds, peak RSS."""
    output = Path(tempfile.mkdtemp(dir=folder))
    if tool == "monai":
        command = [sys.executable, __file__, "--worker", str(folder), "--scan", scan,
                   "--out", str(output)]  # fmt: skip
    else:
        command = [sys.executable, "-m", "medseg_cli", "predict",
                   "--model", str(folder / f"bundle_{scan}"),
                   "--input", str(folder / f"{scan}.nii.gz"), "--output", str(output),
                   "--no-tta", "--precision",
                   "float32" if tool == "medseg-float32" else "auto"]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stdout, stderr = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{tool} {scan} failed:\n{stderr[-3000:]}")
    if tool == "monai":
        seconds = json.loads(stdout.strip().splitlines()[-1])["seconds"]
        written = list(output.glob("*_seg.nii.gz"))
    else:
        report = json.loads((output / "medseg_predict_report.json").read_text())
        seconds = report["cases"][0]["seconds"]
        written = [output / f"{scan}.nii.gz"]
    if len(written) != 1 or not written[0].is_file():
        sys.exit(f"{tool} {scan}: no label file written in {output}")
    return {"seconds": seconds, "process_s": wall, "peak_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent / "data" / "sample")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "predict.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.data)
        return
    if args.worker:
        import bench_monai

        bench_monai.without_tensorflow()  # as a MONAI user's environment
        seconds = run_monai(Path(args.worker), args.scan, Path(args.out))
        print(json.dumps({"seconds": seconds}))
        return

    from medseg.inference import cpu_has_amx_bf16

    default = "bfloat16" if cpu_has_amx_bf16() else "float32"
    tools = ("medseg", "medseg-float32", "monai")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run(
            [sys.executable, __file__, "--prepare", str(folder), "--data",
             str(args.data)],
            check=True,
        )  # fmt: skip
        runs = {(s, t): [] for s in ("hippocampus", "ct") for t in tools}
        for repeat in range(args.repeats):
            for scan in ("hippocampus", "ct"):
                order = tools if repeat % 2 == 0 else tools[::-1]
                for tool in order:
                    runs[scan, tool].append(run(folder, tool, scan))
                    print(f"  {scan} {tool}: {runs[scan, tool][-1]}", flush=True)
    rows = []
    for scan in ("hippocampus", "ct"):
        med = {
            tool: {
                key: statistics.median(r[key] for r in runs[scan, tool])
                for key in ("seconds", "process_s", "peak_mib")
            }
            for tool in tools
        }
        rows.append(
            {
                "scan": scan,
                **med,
                "speed_ratio_default": med["monai"]["seconds"]
                / med["medseg"]["seconds"],
                "speed_ratio_float32": med["monai"]["seconds"]
                / med["medseg-float32"]["seconds"],
                "runs": {tool: runs[scan, tool] for tool in tools},
            }
        )
    print("\nseconds per scan, read to written")
    print(f"{'scan':<13}{'medseg ' + default:>17}{'medseg fp32':>13}{'MONAI':>8}"
          f"{'x default':>11}{'x fp32':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['scan']:<13}{r['medseg']['seconds']:>17.1f}"
            f"{r['medseg-float32']['seconds']:>13.1f}{r['monai']['seconds']:>8.1f}"
            f"{r['speed_ratio_default']:>11.2f}{r['speed_ratio_float32']:>8.2f}"
        )
    report = {
        "command": "python experiments/bench_predict.py --repeats " + str(args.repeats),
        "machine": machine.describe(),
        "medseg_default_precision": default,
        "ct_spacing_mm": list(CT_SPACING),
        "results": rows,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
