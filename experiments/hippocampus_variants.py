"""One fold of the shipped hippocampus config against variants that each change one
thing: which change moves the held-out Dice, and what it costs in training time.

Each variant is experiments/hippocampus_3d_shipped.yaml with some keys replaced,
written to RUNS/<variant>/config.yaml (its dataset made absolute) and trained on the
fold (``--resume`` when it has a checkpoint; a finished run is left as it is and only
scored, after checking that it was trained with the variant's settings). Its held-out
cases are scored as cross_validate.py scores a fold: ``medseg predict`` with the
bundle's test-time mirroring, ``medseg evaluate`` on each case's own grid. Prints a
table and writes experiments/results/hippocampus_variants.json: per variant the Dice and
HD95 of each label, the epoch scored (the bundle's, picked on the best validation Dice,
which are these held-out cases; ``--last-epoch``: the end of training), and the
median seconds per training epoch (runs trained at different times: machine load
differs between them); for every variant after the first, the case-by-case difference
of its label-averaged Dice from the first's, with the standard error of that mean.
``--ensembles a+b,...`` also scores ensembles of the variants' runs (``medseg predict``
with each run as a ``--model``: the mean of their class probabilities), each paired
against the first variant and against its best member. ``--baseline FILE:VARIANT``
takes the first row from an earlier results file instead of training it (its run
folder may be gone): the variants are then paired against that recorded result, case
by case.

    python experiments/hippocampus_variants.py --runs runs/variants --fold 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import yaml
from cross_validate import (
    checkpoint_epoch,
    label_names,
    means,
    medseg,
    score_run,
    score_runs,
    unlike_config,
)

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "hippocampus_3d_shipped.yaml"

#: the shipped config's augmentation with every transform but mirroring off
MIRROR_ONLY = {
    "mirror_axes": [0, 2],
    **{
        f"p_{name}": 0.0
        for name in (
            "rotate",
            "scale",
            "gamma",
            "brightness",
            "contrast",
            "noise",
            "blur",
        )
    },
}

#: name: (what it changes, the keys it replaces in the shipped config)
VARIANTS = {
    "shipped": ("the shipped config", {}),
    "filters_32_256": (
        "filters 32-64-128-256 (hippocampus_3d.yaml's network, 1.8x the FLOPs)",
        {"model": {"filters": [32, 64, 128, 256]}},
    ),
    "deep_supervision_2": (
        "deep supervision of the 1/2 and 1/4 resolution outputs",
        {"model": {"deep_supervision": 2}},
    ),
    "bfloat16": (
        "mixed bfloat16 training",
        {"train": {"precision": "mixed_bfloat16"}},
    ),
    "epochs_90": (
        "twice the epochs (the poly schedule stretched to 90)",
        {"train": {"epochs": 90}},
    ),
    "epochs_180": (
        "four times the epochs (the poly schedule stretched to 180), last epoch kept",
        {"train": {"epochs": 180, "keep": "last"}},
    ),
    "mirror_only": (
        "no augmentation but mirroring (at 45 epochs the training Dice, on augmented "
        "patches, is no higher than the held-out Dice: does augmentation slow a "
        "short schedule?)",
        {"train": {"augment": MIRROR_ONLY}},
    ),
    "mirror_only_90": (
        "no augmentation but mirroring, 90 epochs, the last epoch kept",
        {
            "train": {
                "epochs": 90,
                "keep": "last",
                "augment": MIRROR_ONLY,
            }
        },
    ),
    "ds90": (
        "hippocampus_3d_ds90.yaml: deep supervision, 90 epochs, bfloat16, last epoch",
        {
            "model": {"deep_supervision": 2},
            "train": {"epochs": 90, "precision": "mixed_bfloat16", "keep": "last"},
        },
    ),
}


def variant_config(overrides: dict) -> dict:
    """The shipped config with ``overrides`` (section by section) and its dataset path
    made absolute, so the config works from any folder."""
    config = yaml.safe_load(SHIPPED.read_text())
    for section, values in overrides.items():
        config.setdefault(section, {}).update(copy.deepcopy(values))
    dataset = Path(config["data"]["dataset"])
    config["data"]["dataset"] = str((SHIPPED.parent / dataset).resolve())
    return config


def case_means(rows: list[dict]) -> dict[str, float]:
    """Each case's Dice averaged over its labels."""
    by_case: dict[str, list[float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(float(row["dice"]))
    return {case: statistics.mean(values) for case, values in by_case.items()}


def paired(rows: list[dict], baseline: list[dict]) -> dict:
    """Case by case against ``baseline`` (the same cases): the mean difference of the
    cases' label-averaged Dice, its standard error, and how many cases rose / fell."""
    mine, theirs = case_means(rows), case_means(baseline)
    differences = [mine[case] - theirs[case] for case in sorted(theirs)]
    return {
        "mean_dice_difference": round(statistics.mean(differences), 4),
        "standard_error": round(
            statistics.stdev(differences) / len(differences) ** 0.5, 4
        ),
        "cases_up": sum(d > 0 for d in differences),
        "cases_down": sum(d < 0 for d in differences),
    }


def median_epoch_seconds(run: Path) -> float:
    import csv

    with open(run / "history.csv", newline="") as file:
        seconds = [float(r["seconds"]) for r in csv.DictReader(file)]
    return round(statistics.median(seconds), 1)


def recorded(spec: str, fold: int, last_epoch: bool) -> dict:
    """A variant's result as an earlier run of this script recorded it (``spec`` is
    FILE:VARIANT); ValueError when it is not there or was scored on another fold or,
    with ``last_epoch``, not at the end of its training."""
    file, _, name = spec.rpartition(":")
    if not Path(file).is_file():
        raise ValueError(f"--baseline {spec}: no file {file}")
    report = json.loads(Path(file).read_text())
    found = [r for r in report["variants"] if r["variant"] == name]
    if not found:
        raise ValueError(f"--baseline {spec}: no variant {name!r} in {file}")
    result = found[0]
    if result["fold"] != fold or (
        last_epoch and result["scored_epoch"] != result["epochs"]
    ):
        raise ValueError(
            f"--baseline {spec}: scored on fold {result['fold']} at epoch "
            f"{result['scored_epoch']} of {result['epochs']}, not fold {fold}"
            + (" at its last epoch" if last_epoch else "")
        )
    return {**result, "recorded_in": file}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--fold", type=int, default=3)
    parser.add_argument("--data", help="dataset (default: the shipped config's)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument(
        "--last-epoch",
        action="store_true",
        help="score each run's last epoch, not its bundle's (picked on these cases)",
    )
    parser.add_argument(
        "--ensembles",
        default="",
        help="also score ensembles of the variants' runs, e.g. "
        "epochs_90+ds90,shipped+bfloat16: the mean of their class probabilities",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="FILE:VARIANT, a variant's recorded result in an earlier results file "
        "(same fold, same scored epoch rule) to pair the variants against, untrained",
    )
    parser.add_argument(
        "--output", type=Path, default=HERE / "results" / "hippocampus_variants.json"
    )
    args = parser.parse_args()
    names = args.variants.split(",")
    ensembles = [e.split("+") for e in args.ensembles.split(",") if e]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    for members in ensembles:
        if len(members) < 2 or not set(members) <= set(names):
            parser.error(
                f"ensemble {'+'.join(members)}: two or more of --variants {names}"
            )

    results, missing = [], []
    if args.baseline:
        try:
            results.append(recorded(args.baseline, args.fold, args.last_epoch))
        except ValueError as error:
            parser.error(str(error))
    for name in names:
        what, overrides = VARIANTS[name]
        config = variant_config(overrides)
        if args.data:
            config["data"]["dataset"] = str(Path(args.data).resolve())
        folder = args.runs / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run = folder / f"fold_{args.fold}"
        metadata_path = run / "medseg.json"
        if not args.score_only:
            resume = ["--resume"] if (run / "checkpoint").exists() else []
            medseg("train", "--config", folder / "config.yaml", "--output", run,
                   "--fold", args.fold, *resume)  # fmt: skip
        if not metadata_path.is_file():
            missing.append(name)
            continue
        metadata = json.loads(metadata_path.read_text())
        wrong = unlike_config(run, folder / "config.yaml")
        if metadata["split"]["fold"] != args.fold:
            wrong.append(f"fold {metadata['split']['fold']}")
        if wrong:
            sys.exit(f"{run}: not trained as variant {name} ({', '.join(wrong)})")
        rows = score_run(run, args.data, last_epoch=args.last_epoch)
        results.append({
            "variant": name, "what": what, "overrides": overrides,
            "fold": args.fold, "bundle_epoch": metadata["epoch"],
            "scored_epoch": (
                checkpoint_epoch(run) if args.last_epoch else metadata["epoch"]),
            "epochs": metadata["config"]["train"]["epochs"],
            "median_epoch_seconds": median_epoch_seconds(run),
            **means(rows, label_names(metadata)), "case_scores": rows,
        })  # fmt: skip
        if len(results) > 1:
            results[-1]["against_" + results[0]["variant"]] = paired(
                rows, results[0]["case_scores"]
            )
    if not results:
        sys.exit("no variant trained yet")
    scored = {r["variant"]: r for r in results}
    for members in ensembles:
        if not set(members) <= set(scored):
            missing.append("+".join(members))
            continue
        runs = [args.runs / name / f"fold_{args.fold}" for name in members]
        rows = score_runs(runs, args.data, last_epoch=args.last_epoch)
        best = max(members, key=lambda name: scored[name]["dice_mean"])
        results.append({
            "variant": "+".join(members),
            "what": "ensemble: the mean of the class probabilities of "
            + ", ".join(members),
            "fold": args.fold, "members": members,
            "scored_epoch": "/".join(str(scored[m]["scored_epoch"]) for m in members),
            "median_epoch_seconds": sum(
                scored[m]["median_epoch_seconds"] for m in members),
            **means(rows, label_names(json.loads(
                (runs[0] / "medseg.json").read_text()))), "case_scores": rows,
            "against_" + results[0]["variant"]: paired(
                rows, results[0]["case_scores"]),
            "best_member": best,
            "against_best_member": paired(rows, scored[best]["case_scores"]),
        })  # fmt: skip
    labels = list(results[0]["dice"])
    width = max(22, *(len(r["variant"]) + 2 for r in results))
    print(f"\nfold {args.fold}, held-out cases\n{'variant':<{width}}{'cases':>6}"
          + "".join(f"{'Dice ' + n:>16}{'HD95 ' + n:>16}" for n in labels)
          + f"{'mean Dice':>11}{'paired diff':>18}"
          + f"{'s/epoch':>9}{'epoch':>12}")  # fmt: skip
    for r in results:
        against = r.get("against_" + results[0]["variant"])
        diff = (f"{against['mean_dice_difference']:+.4f} +- "
                f"{against['standard_error']:.4f}" if against else "")  # fmt: skip
        print(f"{r['variant']:<{width}}{r['cases']:>6}" + "".join(
            f"{r['dice'][n]:>16.4f}{r['hd95_mm'][n]:>16.2f}" for n in labels)
            + f"{r['dice_mean']:>11.4f}{diff:>18}{r['median_epoch_seconds']:>9.1f}"
            f"{r['scored_epoch']!s:>12}")  # fmt: skip
    if missing:
        print(f"not trained yet: {missing}")
    import machine

    report = {
        "command": "python experiments/hippocampus_variants.py "
        + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "base_config": str(SHIPPED.relative_to(HERE.parent)),
        "variants": results,
        "missing": missing,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
