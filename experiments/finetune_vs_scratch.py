"""Fine-tuning a pretrained bundle against training from scratch, with little data.

The task: whole hippocampus (anterior and posterior merged into one label) from the
MSD hippocampus scans. Only cases the pretrained bundle never saw are used (its
medseg.json lists its training cases): N of them (default 20) are the training set,
the rest the test set. Both runs get the same budget (epochs x steps, batch, optimizer,
schedule, seed, patch, preprocessing) and differ only in their starting weights:

    medseg finetune --model BUNDLE --data D --output finetuned --fold all ...
    medseg train --config BUNDLE_CONFIG --data D --output scratch --fold all ...

Each is then run with ``medseg predict`` on the test cases and scored with
``medseg evaluate``. Prints a table and writes
experiments/results/finetune_vs_scratch.json.

    python experiments/finetune_vs_scratch.py --model runs/hippocampus_cv/fold_0 \
        --data ../shared/datasets/hippocampus --epochs 8 --steps 25

The bundle must have been trained on one fold: one trained on every case (as the
shipped ``hippocampus`` is) leaves no unseen cases.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine
import nibabel as nib
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def medseg(*args) -> float:
    """Runs ``medseg ARGS``; returns its wall seconds (stops on failure)."""
    command = [sys.executable, "-m", "medseg_cli", *map(str, args)]
    print("$ medseg " + " ".join(map(str, args)), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def whole_structure_copy(cases, folder: Path) -> None:
    """A Decathlon-layout dataset of ``cases`` with every non-zero label set to 1."""
    entries = []
    for case in cases:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        name = case.images[0].name
        shutil.copyfile(case.images[0], folder / "imagesTr" / name)
        label = nib.load(case.label)
        merged = (np.asarray(label.dataobj) > 0).astype(np.uint8)
        out = nib.Nifti1Image(merged, label.affine, label.header)
        out.set_data_dtype(np.uint8)
        nib.save(out, folder / "labelsTr" / case.label.name)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {
        "name": "Hippocampus, whole structure",
        "labels": {"0": "background", "1": "hippocampus"},
        "modality": {"0": "MRI"},
        "training": entries,
    }
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hippocampus", help="pretrained bundle")
    parser.add_argument(
        "--data", default=str(HERE.parent.parent / "shared/datasets/hippocampus")
    )
    parser.add_argument("--train-cases", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=str(HERE / "results" / "finetune_vs_scratch.json")
    )
    parser.add_argument("--keep", help="keep the runs in this folder")
    args = parser.parse_args()

    from medseg.bundle import read_metadata, resolve
    from medseg.datasets.layouts import load_dataset

    bundle = resolve(args.model).resolve()
    metadata = read_metadata(bundle)
    seen = set((metadata.get("split") or {}).get("train") or ())
    dataset = load_dataset(args.data)
    pool = sorted(c.case_id for c in dataset.cases if c.case_id not in seen)
    if len(pool) <= args.train_cases:
        sys.exit(
            f"{bundle}: only {len(pool)} cases of {args.data} are unseen by the "
            f"pretrained model; need more than --train-cases {args.train_cases}"
        )
    random.Random(args.seed).shuffle(pool)
    train_ids, test_ids = (
        sorted(pool[: args.train_cases]),
        sorted(pool[args.train_cases :]),
    )
    by_id = {c.case_id: c for c in dataset.cases}
    work = Path(args.keep or tempfile.mkdtemp(prefix="finetune_vs_scratch_"))
    work.mkdir(parents=True, exist_ok=True)
    whole_structure_copy([by_id[c] for c in train_ids], work / "train")
    whole_structure_copy([by_id[c] for c in test_ids], work / "test")
    config = dict(metadata["config"])
    config["data"] = {k: v for k, v in config["data"].items() if k != "cache_dir"}
    config["data"].update(dataset=None, labels=None)
    config["model"] = {**config["model"], "num_classes": None}
    (work / "scratch.yaml").write_text(yaml.safe_dump(config))
    budget = [
        "--epochs", args.epochs, "--steps-per-epoch", args.steps,
        "--fold", "all", "--seed", args.seed,
    ]  # fmt: skip
    runs = {
        "finetuned": ["finetune", "--model", bundle],
        "scratch": ["train", "--config", work / "scratch.yaml"],
    }
    results = {}
    for name, command in runs.items():
        run = work / name
        seconds = medseg(*command, "--data", work / "train", "--output", run, *budget)
        medseg(
            "predict", "--model", run, "--input", work / "test" / "imagesTr",
            "--output", work / f"{name}_pred",
        )  # fmt: skip
        medseg(
            "evaluate", "--prediction", work / f"{name}_pred",
            "--truth", work / "test" / "labelsTr",
            "--summary", work / f"{name}_summary.json",
        )  # fmt: skip
        summary = json.loads((work / f"{name}_summary.json").read_text())
        dice = summary["labels"]["1"]["dice"]
        results[name] = {
            "dice_mean": round(dice["mean"], 4),
            "dice_std": round(dice["std"], 4),
            "dice_median": round(dice["median"], 4),
            "hd95_mm_mean": round(summary["labels"]["1"]["hd95_mm"]["mean"], 3),
            "train_seconds": round(seconds, 1),
        }
    report = {
        "pretrained": args.model,
        "pretrained_sha256": metadata.get("model_sha256"),
        "pretrained_validation": metadata.get("validation"),
        "train_cases": train_ids,
        "test_cases": test_ids,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "seed": args.seed,
        "results": results,
        "machine": machine.describe(),
    }
    print(
        f"\n{len(train_ids)} training cases, {len(test_ids)} test cases, "
        f"{args.epochs} x {args.steps} steps"
    )
    print(f"{'start':<12}{'Dice mean':>10}{'std':>8}{'HD95 mm':>9}{'train s':>9}")
    for name, row in results.items():
        print(
            f"{name:<12}{row['dice_mean']:>10.3f}{row['dice_std']:>8.3f}"
            f"{row['hd95_mm_mean']:>9.2f}{row['train_seconds']:>9.0f}"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
