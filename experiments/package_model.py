"""Packages a training run as a model shipped inside medseg (medseg/pretrained/NAME).

Scores the run on its own held-out cases first: ``medseg predict`` (with the bundle's
test-time mirroring) on the validation cases its medseg.json lists, then
``medseg evaluate`` against their labels, on each scan's own grid. The bundle's
medseg.json gets that record (``evaluation``: cases, mean Dice and HD95 per label), the
name, and the config file it was trained with; machine-specific paths (the dataset
folder, the preprocessing cache) are replaced by the config's own. model.keras is copied
unchanged (its sha256 still matches). Prints the table and writes
experiments/results/pretrained_NAME.json.

    python experiments/package_model.py runs/hippocampus --name hippocampus \
        --config experiments/hippocampus_3d_shipped.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def medseg(*args) -> None:
    command = [sys.executable, "-m", "medseg_cli", *map(str, args)]
    print("$ medseg " + " ".join(map(str, args)), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training run folder (a bundle)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True, type=Path, help="its config file")
    args = parser.parse_args()

    from medseg.bundle import MODEL_FILE, PRETRAINED_DIR, verify
    from medseg.datasets import load_dataset
    from medseg.io import atomic_write_text

    metadata = verify(args.run)
    config = metadata["config"]
    dataset = load_dataset(config["data"]["dataset"])
    held_out = set((metadata.get("split") or {}).get("validation") or ())
    cases = [c for c in dataset.cases if c.case_id in held_out]
    if not cases:
        sys.exit(f"{args.run}: no held-out cases recorded to score it on")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("images", "labels", "predicted"):
            (tmp / sub).mkdir()
        for case in cases:
            shutil.copyfile(case.images[0], tmp / "images" / case.label.name)
            shutil.copyfile(case.label, tmp / "labels" / case.label.name)
        medseg("predict", "--model", args.run, "--input", tmp / "images",
               "--output", tmp / "predicted")  # fmt: skip
        medseg("evaluate", "--prediction", tmp / "predicted", "--truth",
               tmp / "labels", "--summary", tmp / "summary.json")  # fmt: skip
        summary = json.loads((tmp / "summary.json").read_text())
    names = {str(v["value"]): v["name"] for v in metadata["labels"].values()}
    evaluation = {
        "cases": len(cases),
        "what": f"fold {metadata['split']['fold']} of {metadata['split']['folds']}: "
        "held-out cases, each scored on its own grid, mean over cases",
        "dice": {
            names[k]: round(v["dice"]["mean"], 4) for k, v in summary["labels"].items()
        },
        "hd95_mm": {
            names[k]: round(v["hd95_mm"]["mean"], 3)
            for k, v in summary["labels"].items()
        },
    }
    evaluation["dice_mean"] = round(
        sum(evaluation["dice"].values()) / len(evaluation["dice"]), 4
    )
    source = yaml.safe_load(args.config.read_text())
    config["data"]["dataset"] = source["data"]["dataset"]
    config["data"]["cache_dir"] = None
    metadata.update(
        name=args.name,
        trained_with=str(args.config.resolve().relative_to(REPO)),
        evaluation=evaluation,
    )
    target = PRETRAINED_DIR / args.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(args.run / MODEL_FILE, target / MODEL_FILE)
    atomic_write_text(target / "medseg.json", json.dumps(metadata, indent=2) + "\n")
    verify(target)
    size = (target / MODEL_FILE).stat().st_size / 1e6
    print(f"\n{args.name}: {evaluation['what']}, {len(cases)} cases, {size:.1f} MB")
    print(f"{'label':<12}{'Dice':>8}{'HD95 mm':>9}")
    for label, dice in evaluation["dice"].items():
        print(f"{label:<12}{dice:>8.3f}{evaluation['hd95_mm'][label]:>9.2f}")
    result = {"name": args.name, "model_mb": round(size, 2), **evaluation}
    out = HERE / "results" / f"pretrained_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {target} and {out}")


if __name__ == "__main__":
    main()
