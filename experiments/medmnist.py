"""MedMNIST v2 classification with ``build_classifier``, next to the paper's baselines.

For each dataset: ``medseg train --config experiments/NAME.yaml`` (train on
``train_*``, the best epoch chosen on ``val_*`` AUC), then ``medseg predict`` of the
chosen bundle on the ``val`` split, scored here from its predictions CSV: accuracy and
AUC (class 1's, Mann-Whitney). The last epoch's validation numbers are reported as
well: they involve no choice made on the validation set.

The baselines are the MedMNIST v2 paper's (Yang et al., Scientific Data 2023, tables 2
and 3), which are on each dataset's *test* split; the shared copies here have train
and val only, so the numbers are not from the same images. Prints a table and writes
experiments/results/medmnist.json; datasets not run keep their results there, each
with the command and machine that produced it.

    python experiments/medmnist.py --runs runs/medmnist
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import machine
import numpy as np
from cross_validate import medseg, training_seconds

HERE = Path(__file__).resolve().parent

#: MedMNIST v2 baselines on the test split: (ACC, AUC).
BASELINES = {
    "adrenalmnist3d": {
        "ResNet-18 + 3D": (0.721, 0.827),
        "ResNet-50 + 3D": (0.745, 0.828),
        "ResNet-18 + ACS": (0.754, 0.839),
        "auto-sklearn": (0.802, 0.828),
    },
    "vesselmnist3d": {
        "ResNet-18 + 3D": (0.877, 0.874),
        "ResNet-50 + 3D": (0.918, 0.907),
        "ResNet-18 + ACS": (0.928, 0.930),
        "auto-sklearn": (0.915, 0.910),
    },
    "breastmnist": {
        "ResNet-18 (28)": (0.863, 0.901),
        "ResNet-50 (28)": (0.812, 0.857),
        "ResNet-18 (224)": (0.833, 0.891),
        "Google AutoML Vision": (0.861, 0.919),
    },
}


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("val_auc")]


def score_predictions(path: Path, labels: np.ndarray) -> dict:
    from medseg.evaluation.classification import classification_scores

    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    names = [k for k in rows[0] if k.startswith("prob_")]
    order = sorted(rows, key=lambda r: int(r["case"].rsplit("_", 1)[1]))
    probabilities = np.array([[float(r[k]) for k in names] for r in order])
    return classification_scores(probabilities, labels.reshape(-1).astype(int))


def merged(path: str, results: list[dict]) -> dict:
    """``results`` with the results already in ``path`` for other datasets (given
    the command and machine of that file where they do not carry their own)."""
    kept = []
    if Path(path).exists():
        before = json.loads(Path(path).read_text())
        ran = {r["dataset"] for r in results}
        for old in before["results"]:
            if old["dataset"] not in ran:
                kept.append({"command": before.get("command"),
                             "machine": before.get("machine"), **old})  # fmt: skip
    order = list(BASELINES)
    everything = sorted([*kept, *results], key=lambda r: order.index(r["dataset"]))
    return {"results": everything}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(BASELINES))
    parser.add_argument("--runs", type=Path, default=Path("runs/medmnist"))
    parser.add_argument("--data", type=Path, help="folder of the .npz files")
    parser.add_argument("--output", default=str(HERE / "results" / "medmnist.json"))
    args = parser.parse_args()

    import yaml

    results = []
    for name in args.datasets.split(","):
        config = HERE / f"{name}.yaml"
        dataset = Path(yaml.safe_load(config.read_text())["data"]["dataset"])
        if args.data:
            dataset = args.data / dataset.name
        elif not dataset.is_absolute():
            dataset = (Path.cwd() / dataset).resolve()
        run = args.runs / name
        extra = ["--resume"] if (run / "checkpoint").exists() else []
        medseg("train", "--config", config, "--data", dataset, "--output", run, *extra)
        medseg("predict", "--model", run, "--input", dataset, "--split", "val",
               "--output", run / "val_predictions.csv")  # fmt: skip
        with np.load(dataset, allow_pickle=False) as arrays:
            labels = arrays["val_labels"]
        chosen = score_predictions(run / "val_predictions.csv", labels)
        rows = history(run)
        best = max(rows, key=lambda r: float(r["val_auc"]))
        last = rows[-1]
        metadata = json.loads((run / "medseg.json").read_text())
        results.append(
            {
                "dataset": name,
                "config": f"experiments/{name}.yaml",
                "architecture": metadata["config"]["model"].get("architecture"),
                "epochs": len(rows),
                "chosen_epoch": int(best["epoch"]),
                "val_chosen": {"acc": chosen["accuracy"], "auc": chosen["auc"]},
                "val_last_epoch": {
                    "acc": float(last["val_accuracy"]),
                    "auc": float(last["val_auc"]),
                },
                "val_cases": int(labels.size),
                "train_seconds": round(training_seconds(run), 1),
                "baselines_test": {
                    k: {"acc": a, "auc": u} for k, (a, u) in BASELINES[name].items()
                },
                "command": "python experiments/medmnist.py " + " ".join(sys.argv[1:]),
                "machine": machine.describe(),
            }
        )
    print(f"\n{'dataset':<16}{'ACC':>7}{'AUC':>7}{'last ACC':>10}{'last AUC':>10}"
          f"{'best baseline ACC / AUC (test)':>33}")  # fmt: skip
    for r in results:
        base = r["baselines_test"].values()
        best_acc = max(b["acc"] for b in base)
        best_auc = max(b["auc"] for b in base)
        print(
            f"{r['dataset']:<16}{r['val_chosen']['acc']:>7.3f}"
            f"{r['val_chosen']['auc']:>7.3f}{r['val_last_epoch']['acc']:>10.3f}"
            f"{r['val_last_epoch']['auc']:>10.3f}{best_acc:>24.3f} / {best_auc:.3f}"
        )
    Path(args.output).write_text(
        json.dumps(merged(args.output, results), indent=2) + "\n"
    )
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
