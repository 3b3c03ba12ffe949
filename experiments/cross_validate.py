"""k-fold cross-validation of a segmentation config, resumable fold by fold.

For each fold: ``medseg train --config CONFIG --fold K --output RUNS/fold_K`` (with
``--resume`` when the fold has a checkpoint, so an interrupted fold continues and a
finished one is left as it is), then ``medseg predict`` (with the bundle's test-time
mirroring) on that fold's held-out cases and ``medseg evaluate`` against their labels,
each case on its own grid. The table: per fold and over all scored cases, the mean Dice
and HD95 of each label. Folds not trained yet are listed as missing (``--score-only``
trains nothing and scores what is there). Writes
experiments/results/<config name>_cv.json.

    python experiments/cross_validate.py \
        --config experiments/hippocampus_3d_shipped.yaml --runs runs/hippocampus_cv
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def medseg(*args) -> None:
    command = [sys.executable, "-m", "medseg_cli", *map(str, args)]
    print("$ medseg " + " ".join(map(str, args)), flush=True)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}):\n{result.stderr.decode()[-3000:]}")


def score_run(
    run: Path, dataset: str | None = None, labels: str | None = None
) -> list[dict]:
    """Per case and label rows (``medseg evaluate``'s CSV, of ``labels`` such as
    ``"0,255"`` or the non-zero values) of a run's held-out cases, each with the case's
    voxel error (the fraction of voxels whose predicted label is wrong)."""
    import numpy as np

    from medseg.bundle import verify
    from medseg.datasets import load_dataset
    from medseg.io import read_volume

    metadata = verify(run)
    held_out = set((metadata.get("split") or {}).get("validation") or ())
    source = load_dataset(dataset or metadata["config"]["data"]["dataset"])
    cases = [c for c in source.cases if c.case_id in held_out]
    if not cases:
        sys.exit(f"{run}: no held-out cases recorded to score it on")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("images", "labels", "predicted"):
            (tmp / sub).mkdir()
        for case in cases:
            shutil.copyfile(case.images[0], tmp / "images" / case.label.name)
            shutil.copyfile(case.label, tmp / "labels" / case.label.name)
        medseg("predict", "--model", run, "--input", tmp / "images",
               "--output", tmp / "predicted")  # fmt: skip
        chosen = ["--labels", labels] if labels else []
        medseg("evaluate", "--prediction", tmp / "predicted", "--truth",
               tmp / "labels", "--output", tmp / "cases.csv", *chosen)  # fmt: skip
        with open(tmp / "cases.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        for row in rows:
            name = next((tmp / "labels").glob(row["case"] + ".*")).name
            predicted = read_volume(tmp / "predicted" / name).array
            truth = read_volume(tmp / "labels" / name).array
            row["voxel_error"] = float(np.mean(predicted != truth))
        return rows


def label_names(metadata: dict, labels: str | None = None) -> dict:
    """``{value: name}`` of the labels to score: ``labels`` such as ``"0,255"``, or
    every label but class 0."""
    scored = labels.split(",") if labels else None
    return {
        str(v["value"]): v["name"]
        for k, v in metadata["labels"].items()
        if (str(v["value"]) in scored if scored else k != "0")
    }


def means(rows: list[dict], names: dict) -> dict:
    """Mean Dice and HD95 per label name over the rows' cases (NaN left out)."""
    import numpy as np

    result = {"cases": len({r["case"] for r in rows})}
    for metric in ("dice", "hd95_mm"):
        result[metric] = {}
        for value, name in names.items():
            values = np.array([float(r[metric]) for r in rows if r["label"] == value])
            result[metric][name] = round(float(np.nanmean(values)), 4)
    result["dice_mean"] = round(float(np.mean(list(result["dice"].values()))), 4)
    if rows and "voxel_error" in rows[0]:
        errors = {r["case"]: r["voxel_error"] for r in rows}
        result["voxel_error"] = round(float(np.mean(list(errors.values()))), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data", help="dataset (default: the config's)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument(
        "--labels", help="label values to score, e.g. 0,255 (default: the non-zero)"
    )
    parser.add_argument("--output", help="JSON (default: results/<config>_cv.json)")
    args = parser.parse_args()

    import yaml

    output = args.output or HERE / "results" / f"{args.config.stem}_cv.json"
    data = ["--data", args.data] if args.data else []
    folds, rows, missing = [], [], []
    names = None
    for fold in range(args.folds):
        run = args.runs / f"fold_{fold}"
        if not args.score_only:
            resume = ["--resume"] if (run / "checkpoint").exists() else []
            medseg("train", "--config", args.config, "--output", run,
                   "--fold", fold, *data, *resume)  # fmt: skip
        if not (run / "medseg.json").is_file():
            missing.append(fold)
            continue
        metadata = json.loads((run / "medseg.json").read_text())
        epochs = metadata["config"]["train"]["epochs"]
        done = len((run / "history.csv").read_text().splitlines()) - 1
        if done < epochs:
            missing.append(fold)
            print(f"fold {fold}: {done} of {epochs} epochs trained; not scored")
            continue
        names = label_names(metadata, args.labels)
        fold_rows = score_run(run, args.data, args.labels)
        rows += fold_rows
        folds.append({"fold": fold, "epochs": epochs, **means(fold_rows, names)})
    if not folds:
        sys.exit("no fold finished yet")
    overall = means(rows, names)
    print(f"\n{'fold':<8}{'cases':>6}{'voxel error':>13}" + "".join(
        f"{'Dice ' + n:>16}{'HD95 ' + n:>16}" for n in names.values()))  # fmt: skip
    for row in [*folds, {"fold": "all", **overall}]:
        print(f"{row['fold']!s:<8}{row['cases']:>6}{row['voxel_error']:>13.4f}"
              + "".join(
            f"{row['dice'][n]:>16.3f}{row['hd95_mm'][n]:>16.2f}"
            for n in names.values()))  # fmt: skip
    if missing:
        print(f"missing folds (not trained to the end): {missing}")
    config = yaml.safe_load(args.config.read_text())
    report = {
        "command": "python experiments/cross_validate.py " + " ".join(sys.argv[1:]),
        "config": str(args.config),
        "model": config.get("model"),
        "folds": folds,
        "missing_folds": missing,
        "all_scored_cases": overall,
    }
    Path(output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {output}")


if __name__ == "__main__":
    main()
