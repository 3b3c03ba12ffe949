"""Training recipes for the hippocampus at a fixed wall-clock budget, each trained on
the same fold and scored on its held-out cases, paired case by case against the first.

Each arm is experiments/hippocampus_recipe.yaml with some keys replaced (an arm whose
base is ``default`` starts from experiments/hippocampus_3d_shipped.yaml, the recipe
``medseg train`` plans by default), written to RUNS/<budget>/<arm>/config.yaml and
trained with ``medseg train --fold K --time-budget BUDGET`` (``--resume`` when it has
a checkpoint: an interrupted arm continues its budget, a finished one is only scored).
Every arm keeps its last epoch, so the held-out cases choose nothing. Each arm is scored
with and without test-time mirroring (``medseg predict --tta/--no-tta``) by
``medseg evaluate`` on each case's own grid. Prints a table and writes
experiments/results/recipe_study_<budget>.json after each arm: per arm the Dice and
HD95 of each label, the steps it trained in its budget, and the case-by-case
difference of its label-averaged Dice from the first arm's, with its standard error.

The budget is counted in each run's own CPU time per core (``MEDSEG_BUDGET_CLOCK=cpu``,
set here for the runs), which is wall-clock time on an idle machine: arms trained while
the machine did other work get the same compute.

    python experiments/recipe_study.py --runs runs/recipes --fold 0 --budget 15m
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import yaml
from cross_validate import label_names, means, medseg, score_run, unlike_config
from hippocampus_variants import MIRROR_ONLY, paired

from medseg.config import parse_duration

HERE = Path(__file__).resolve().parent
BASES = {
    "plain": HERE / "hippocampus_recipe.yaml",
    "default": HERE / "hippocampus_3d_shipped.yaml",
}
#: the augmentation medseg trains with by default (nnU-Net-like), mirroring as plain
DEFAULT_AUGMENT = {
    "mirror_axes": [0],
    **{k: None for k in MIRROR_ONLY if k != "mirror_axes"},
}

#: name: (what it changes, its base, the keys it replaces)
ARMS = {
    "plain": ("the plain recipe (hippocampus_recipe.yaml)", "plain", {}),
    "default": (
        "medseg's default recipe as shipped (SGD 0.01 Nesterov, instance norm, "
        "filters 24-192, leaky ReLU, 40 x 56 x 40 patches, nnU-Net augmentation), last "
        "epoch",
        "default",
        {"train": {"keep": "last"}},
    ),
    "instance_norm": ("instance norm", "plain", {"model": {"norm": "instance"}}),
    "group_norm": ("group norm", "plain", {"model": {"norm": "group"}}),
    "sgd": (
        "SGD 0.01, Nesterov momentum 0.99, weight decay 3e-5",
        "plain",
        {
            "train": {
                "optimizer": "sgd",
                "learning_rate": 0.01,
                "momentum": 0.99,
                "weight_decay": 3e-5,
            }
        },
    ),
    "adamw": ("AdamW (weight decay 1e-4)", "plain", {"train": {"weight_decay": 1e-4}}),
    "augment": (
        "medseg's default augmentation (rotation, scaling, intensity, noise, blur)",
        "plain",
        {"train": {"augment": DEFAULT_AUGMENT}},
    ),
    "mirror_02": (
        "mirroring over axes 0 and 2",
        "plain",
        {"train": {"augment": {"mirror_axes": [0, 2]}}},
    ),
    "wide": (
        "filters 24-48-96-192",
        "plain",
        {"model": {"filters": [24, 48, 96, 192]}},
    ),
    "deep": (
        "five levels, filters 16-256",
        "plain",
        {"model": {"filters": [16, 32, 64, 128, 256], "patch_size": [48, 64, 48]}},
    ),
    "batch_4": ("batch 4", "plain", {"train": {"batch_size": 4}}),
    "patches": (
        "40 x 56 x 40 patches, a third centred on foreground",
        "plain",
        {"model": {"patch_size": [40, 56, 40]}},
    ),
    "dice_focal": ("Dice + focal loss", "plain", {"train": {"loss": "dice_focal"}}),
    "ema": (
        "an exponential moving average of the weights (momentum 0.99)",
        "plain",
        {"train": {"ema": 0.99}},
    ),
}


def arm_config(base: str, overrides: dict, dataset: str | None, budget: str) -> dict:
    """The arm's config: its base with ``overrides`` (section by section; a ``None``
    removes a key, falling back to medseg's default), the budget, and the dataset path
    made absolute."""
    path = BASES[base]
    config = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        target = config.setdefault(section, {})
        for key, value in copy.deepcopy(values).items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    for section in config.values():
        if isinstance(section, dict):
            for key, value in list(section.items()):
                if isinstance(value, dict):
                    section[key] = {k: v for k, v in value.items() if v is not None}
    config["train"]["time_budget"] = parse_duration(budget)
    source = dataset or str((path.parent / config["data"]["dataset"]).resolve())
    config["data"]["dataset"] = str(Path(source).resolve())
    return config


def trained(run: Path) -> dict:
    """Steps and seconds of a finished run, from its history."""
    with open(run / "history.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {
        "epochs": len(rows),
        "steps_per_epoch": config["train"]["steps_per_epoch"],
        "seconds": float(rows[-1]["elapsed"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--budget", default="15m")
    parser.add_argument("--data", help="dataset (default: the configs')")
    parser.add_argument("--arms", default="plain,default")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    names = args.arms.split(",")
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; expected some of {list(ARMS)}")
    output = args.output or HERE / "results" / f"recipe_study_{args.budget}.json"
    report = {
        "command": "python experiments/recipe_study.py " + " ".join(sys.argv[1:]),
        "budget": args.budget,
        "fold": args.fold,
        "arms": [],
        "missing": [],
    }
    import os

    import machine

    report["machine"] = machine.describe()
    os.environ["MEDSEG_BUDGET_CLOCK"] = "cpu"
    report["budget_clock"] = "cpu seconds per core of the training process"
    for name in names:
        what, base, overrides = ARMS[name]
        folder = args.runs / args.budget / name
        folder.mkdir(parents=True, exist_ok=True)
        config = arm_config(base, overrides, args.data, args.budget)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run = folder / f"fold_{args.fold}"
        if not args.score_only:
            resume = ["--resume"] if (run / "checkpoint").exists() else []
            medseg("train", "--config", folder / "config.yaml", "--output", run,
                   "--fold", args.fold, *resume)  # fmt: skip
        if not (run / "medseg.json").is_file():
            report["missing"].append(name)
            continue
        wrong = unlike_config(run, folder / "config.yaml")
        if wrong:
            sys.exit(f"{run}: not trained as arm {name} ({', '.join(wrong)})")
        metadata = json.loads((run / "medseg.json").read_text())
        names_of = label_names(metadata)
        result = {"arm": name, "what": what, "base": base, "overrides": overrides,
                  **trained(run)}  # fmt: skip
        for tta in ("--no-tta", "--tta"):
            rows = score_run(run, args.data, predict_options=(tta,))
            key = tta.removeprefix("--")
            result[key] = {**means(rows, names_of), "case_scores": rows}
            if report["arms"]:
                first = report["arms"][0]
                result[key]["against_" + first["arm"]] = paired(
                    rows, first[key]["case_scores"]
                )
        report["arms"].append(result)
        output.write_text(json.dumps(report, indent=2) + "\n")
        show(report)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {output}")


def show(report: dict) -> None:
    first = report["arms"][0]["arm"]
    print(f"\nbudget {report['budget']}, fold {report['fold']}, held-out cases")
    print(f"{'arm':<16}{'steps':>7}{'Dice':>8}{'paired':>18}{'Dice TTA':>10}"
          f"{'paired TTA':>18}{'min case':>10}")  # fmt: skip
    for arm in report["arms"]:
        cells = []
        for key in ("no-tta", "tta"):
            scores = arm[key]
            against = scores.get("against_" + first)
            cells.append(f"{scores['dice_mean']:>8.4f}")
            cells.append(
                f"{against['mean_dice_difference']:>+10.4f} +- "
                f"{against['standard_error']:.4f}"
                if against
                else f"{'':>18}"
            )
        worst = min(
            sum(float(r["dice"]) for r in arm["tta"]["case_scores"] if r["case"] == c)
            / 2
            for c in {r["case"] for r in arm["tta"]["case_scores"]}
        )
        steps = arm["epochs"] * arm["steps_per_epoch"]
        print(f"{arm['arm']:<16}{steps:>7}{''.join(cells)}{worst:>10.4f}")


if __name__ == "__main__":
    main()
