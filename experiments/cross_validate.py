"""k-fold cross-validation of a segmentation config, resumable fold by fold.

For each fold: ``medseg train --config CONFIG --fold K --output RUNS/fold_K`` (with
``--resume`` when the fold has a checkpoint, so an interrupted fold continues and a
finished one is left as it is), then ``medseg predict`` (with the bundle's test-time
mirroring) on that fold's held-out cases and ``medseg evaluate`` against their labels,
each case on its own grid. The table: per fold and over all scored cases, the mean Dice
and HD95 of each label. Folds not trained yet are listed as missing (``--score-only``
trains nothing and scores what is there). Writes
experiments/results/<config name>_cv.json, with each fold's per-case scores, after
each fold it scores (an interrupted run keeps those).

A cross-validation can outlive its run folders: a fold already in that JSON (same
config) whose run folder is gone is kept from the JSON rather than listed as missing,
so folds trained on different machines add up to one table. A fold is rescored whenever
its finished run folder is there. A run folder trained with other model or train
settings than the config's (a folder linked from another experiment, say) is refused,
before it is resumed or scored.

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


def differences(wanted: dict, trained: dict, prefix: str = "") -> list[str]:
    """The settings of ``wanted`` (nested, model and train sections at the top) that
    the run's resolved config ``trained`` has otherwise; ``trained`` may hold more."""
    wrong = []
    for key, value in wanted.items():
        if prefix == "" and key not in ("model", "train"):
            continue
        got = trained.get(key) if isinstance(trained, dict) else None
        if isinstance(value, dict) and isinstance(got, dict):
            wrong += differences(value, got, f"{prefix}{key}.")
        elif got != value:
            wrong.append(f"{prefix}{key}: {got!r}")
    return wrong


def unlike_config(run: Path, config: Path) -> list[str]:
    """How the run in ``run`` was trained otherwise than the config file ``config``
    says, with every default filled in: its model and train settings (not the fold,
    nor the number of classes training takes from the dataset, nor the dataset
    path); nothing for a run not started. ``train.keep`` only decides which epoch
    becomes the bundle, so a run whose bundle is its last epoch passes either way."""
    import yaml

    from medseg.config import load_config

    wanted = load_config(config).to_dict()
    if (run / "medseg.json").is_file():
        metadata = json.loads((run / "medseg.json").read_text())
        trained, epoch = metadata["config"], metadata["epoch"]
    elif (run / "config.yaml").is_file():
        trained, epoch = yaml.safe_load((run / "config.yaml").read_text()), None
    else:
        return []
    train = trained.get("train", {})
    if "keep" not in train:  # before train.keep, runs kept their best epoch
        trained = {**trained, "train": {**train, "keep": "best"}}
    wrong = differences(wanted, trained) + [  # model options the config leaves out
        f"model.{key}: {value!r}"
        for key, value in trained.get("model", {}).items()
        if key not in wanted["model"]
    ]
    ignored = ["train.fold:"]
    if wanted["model"].get("num_classes") is None:
        ignored.append("model.num_classes:")
    if epoch is not None and epoch == trained.get("train", {}).get("epochs"):
        ignored.append("train.keep:")
    return [w for w in wrong if not w.startswith(tuple(ignored))]


def last_epoch_bundle(run: Path, target: Path) -> int:
    """Writes to ``target`` a bundle of ``run``'s checkpoint, the weights of its last
    epoch, for a run whose bundle is an earlier epoch picked on its validation cases
    (``train.keep: best``); the metadata is the run's, less the picked epoch's
    validation scores. Returns that epoch."""
    from medseg.bundle import verify, write_bundle
    from medseg.config import load_config
    from medseg.models import build_model, load_model, main_output

    metadata = verify(run)
    epoch = checkpoint_epoch(run)
    model = load_config(run / "config.yaml").model
    if model.options.get("deep_supervision"):  # the checkpoint has the extra heads
        kwargs = {**model.builder_kwargs(), "patch_size": None}
        network = build_model(model.name, **kwargs)
    else:  # the network as this run built it (its layers' weights then load as saved)
        network = load_model(run)
    network.load_weights(run / "checkpoint" / "model.weights.h5")
    record = {
        k: v for k, v in metadata.items() if k not in ("model_sha256", "validation")
    }
    write_bundle(target, main_output(network), {**record, "epoch": epoch})
    return epoch


def score_run(
    run: Path,
    dataset: str | None = None,
    labels: str | None = None,
    predict_options: tuple[str, ...] = (),
    last_epoch: bool = False,
) -> list[dict]:
    """Per case and label rows (``medseg evaluate``'s CSV, of ``labels`` such as
    ``"0,255"`` or the non-zero values) of a run's held-out cases, each with the case's
    voxel error (the fraction of voxels whose predicted label is wrong).
    ``predict_options`` go to ``medseg predict`` (``--keep-largest``, say);
    ``last_epoch``: the checkpoint's weights (the end of training) are scored instead
    of a bundle picked at an earlier epoch on these same cases."""
    return score_runs([run], dataset, labels, predict_options, last_epoch)


def score_runs(
    runs: list[Path],
    dataset: str | None = None,
    labels: str | None = None,
    predict_options: tuple[str, ...] = (),
    last_epoch: bool = False,
) -> list[dict]:
    """:func:`score_run` of one run, or of the ensemble of several runs of the same
    fold (``medseg predict`` with each as a ``--model``: the mean of their class
    probabilities)."""
    import numpy as np

    from medseg.bundle import verify
    from medseg.datasets.layouts import load_dataset
    from medseg.io import read_volume

    records = [verify(run) for run in runs]
    held_out = [set((m.get("split") or {}).get("validation") or ()) for m in records]
    if any(cases != held_out[0] for cases in held_out):
        sys.exit(f"{', '.join(map(str, runs))}: not trained on the same fold")
    held_out, metadata = held_out[0], records[0]
    source = load_dataset(dataset or metadata["config"]["data"]["dataset"])
    cases = [c for c in source.cases if c.case_id in held_out]
    if not cases:
        sys.exit(f"{runs[0]}: no held-out cases recorded to score it on")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("images", "labels", "predicted"):
            (tmp / sub).mkdir()
        for case in cases:
            shutil.copyfile(case.images[0], tmp / "images" / case.label.name)
            shutil.copyfile(case.label, tmp / "labels" / case.label.name)
        models = []
        for i, (run, record) in enumerate(zip(runs, records, strict=True)):
            if last_epoch and record["epoch"] < checkpoint_epoch(run):
                last_epoch_bundle(run, tmp / f"last_{i}")
                run = tmp / f"last_{i}"
            models += ["--model", run]
        medseg("predict", *models, "--input", tmp / "images",
               "--output", tmp / "predicted", *predict_options)  # fmt: skip
        chosen = ["--labels", labels] if labels else []
        medseg("evaluate", "--prediction", tmp / "predicted", "--truth",
               tmp / "labels", "--output", tmp / "cases.csv", *chosen)  # fmt: skip
        with open(tmp / "cases.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        volumes = tmp / "predicted" / "medseg_volumes.csv"
        with open(volumes, newline="") as file:  # with --uncertainty, its scores
            scores = {(r["case"], r["label"]): r for r in csv.DictReader(file)}
        for row in rows:
            measured = scores.get((row["case"], row["label"]), {})
            row.update(
                {
                    k: v
                    for k, v in measured.items()
                    if k.startswith(("entropy", "dice_estimate", "ood_"))
                }
            )
            name = next((tmp / "labels").glob(row["case"] + ".*")).name
            predicted = read_volume(tmp / "predicted" / name).array
            truth = read_volume(tmp / "labels" / name).array
            row["voxel_error"] = float(np.mean(predicted != truth))
        return rows


def checkpoint_epoch(run: Path) -> int:
    """The epoch of a run's checkpoint (the last one trained)."""
    state = run / "checkpoint" / "state.json"
    if not state.is_file():
        sys.exit(f"{run}: no checkpoint to take the last epoch from")
    return json.loads(state.read_text())["epoch"]


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


def pooled(folds: list[dict]) -> dict:
    """Means over all cases of the folds, from each fold's means weighted by its
    number of cases (the same as pooling the cases when every case has a value);
    voxel error over the folds that report it."""
    import numpy as np

    weights = np.array([f["cases"] for f in folds], float)
    result = {"cases": int(weights.sum())}
    for metric in ("dice", "hd95_mm"):
        result[metric] = {
            name: round(
                float(np.average([f[metric][name] for f in folds], weights=weights)), 4
            )  # fmt: skip
            for name in folds[0][metric]
        }
    result["dice_mean"] = round(float(np.mean(list(result["dice"].values()))), 4)
    with_error = [f for f in folds if "voxel_error" in f]
    if with_error:
        result["voxel_error"] = round(float(np.average(
            [f["voxel_error"] for f in with_error],
            weights=[f["cases"] for f in with_error])), 4)  # fmt: skip
    return result


def run_finished(run: Path, metadata: dict) -> tuple[bool, int]:
    """Whether a run with a bundle has trained to its end (its epochs, or its whole
    time budget), and the epochs it has trained."""
    train = metadata["config"]["train"]
    history = run / "history.csv"
    done = (
        len(history.read_text().splitlines()) - 1
        if history.is_file()
        else train["epochs"]
    )
    if train.get("time_budget"):
        spent = metadata.get("trained_seconds") or 0.0
        return spent >= train["time_budget"] and done == metadata["epoch"], done
    return done >= train["epochs"], train["epochs"]


def training_seconds(run: Path) -> float | None:
    """Seconds of training summed over history.csv's epochs (a resumed run's earlier
    epochs included), None without it."""
    history = run / "history.csv"
    if not history.is_file():
        return None
    with open(history, newline="") as file:
        return sum(
            float(r["seconds"]) for r in csv.DictReader(file) if r.get("seconds")
        )


def training_hours(run: Path) -> float | None:
    """:func:`training_seconds` in hours, rounded."""
    seconds = training_seconds(run)
    return None if seconds is None else round(seconds / 3600, 2)


def recorded_folds(
    output: Path,
    config: Path,
    model: dict | None,
    postprocessing: tuple[str, ...] = (),
    last_epoch: bool = False,
) -> dict[int, dict]:
    """Folds of an earlier report of the same config, model, post-processing and
    choice of epoch, by fold number."""
    if not output.is_file():
        return {}
    report = json.loads(output.read_text())
    same_file = Path(report.get("config", "")).resolve() == config.resolve()
    same = report.get("model") == model
    post = report.get("postprocessing", [])
    last = report.get("last_epoch", False)
    if not same_file or not same or post != list(postprocessing) or last != last_epoch:
        print(f"{output}: written for another config, model, post-processing or "
              "choice of epoch; not reused")  # fmt: skip
        return {}
    return {f["fold"]: f for f in report.get("folds", [])}


def write_report(output: Path, header: dict, folds: list[dict], count: int) -> dict:
    """Writes the cross-validation JSON: ``header`` (command, config, ...), the folds
    in order, the fold numbers of ``range(count)`` without scores, and the scores
    pooled over all scored cases. Returns it."""
    from medseg.io import atomic_write_text

    folds = sorted(folds, key=lambda row: row["fold"])
    report = {
        **header,
        "folds": folds,
        "missing_folds": sorted(set(range(count)) - {row["fold"] for row in folds}),
        "all_scored_cases": pooled(folds),
    }
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def fold_order(text: str | None, folds: int) -> list[int]:
    """The folds to train, in order, from ``"3,0,1"`` (``None``: all, 0 first)."""
    if not text:
        return list(range(folds))
    order = [int(f) if f.strip().isdigit() else -1 for f in text.split(",")]
    if not set(order) <= set(range(folds)) or len(set(order)) != len(order):
        raise ValueError(f"--order {text}: folds must be distinct, 0 to {folds - 1}")
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data", help="dataset (default: the config's)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument(
        "--order",
        help="folds to train, in this order, e.g. 3,0,1,2,4 (default: every fold, "
        "0 first); the others are only scored",
    )
    parser.add_argument(
        "--labels", help="label values to score, e.g. 0,255 (default: the non-zero)"
    )
    parser.add_argument(
        "--keep-largest",
        action="store_true",
        help="score predictions post-processed with medseg predict --keep-largest",
    )
    parser.add_argument(
        "--last-epoch",
        action="store_true",
        help="score each fold's last epoch (its checkpoint) where its bundle is an "
        "earlier epoch picked on the held-out cases (train.keep: best)",
    )
    parser.add_argument("--output", help="JSON (default: results/<config>_cv.json)")
    args = parser.parse_args()

    import yaml

    output = Path(args.output or HERE / "results" / f"{args.config.stem}_cv.json")
    model = yaml.safe_load(args.config.read_text()).get("model")
    postprocessing = ("--keep-largest",) if args.keep_largest else ()
    recorded = recorded_folds(
        output, args.config, model, postprocessing, args.last_epoch
    )
    data = ["--data", args.data] if args.data else []
    header = {
        "command": "python experiments/cross_validate.py " + " ".join(sys.argv[1:]),
        "config": str(args.config),
        "model": model,
        "postprocessing": list(postprocessing),
        "last_epoch": args.last_epoch,
    }
    folds, processed = [], set()
    try:
        order = fold_order(args.order, args.folds)
    except ValueError as error:
        parser.error(str(error))
    for fold in order + sorted(set(range(args.folds)) - set(order)):
        processed.add(fold)
        run = args.runs / f"fold_{fold}"
        wrong = unlike_config(run, args.config)
        if wrong:
            sys.exit(f"{run}: not trained with {args.config} ({', '.join(wrong)})")
        if not args.score_only and fold in order:
            resume = ["--resume"] if (run / "checkpoint").exists() else []
            medseg("train", "--config", args.config, "--output", run,
                   "--fold", fold, *data, *resume)  # fmt: skip
        finished = (run / "medseg.json").is_file()
        if finished:
            metadata = json.loads((run / "medseg.json").read_text())
            finished, epochs = run_finished(run, metadata)
            if not finished:
                print(f"fold {fold}: not finished ({epochs} epochs trained)")
        if not finished:
            if fold in recorded:
                print(f"fold {fold}: kept from {output.name} (no finished run here)")
                folds.append(recorded[fold])
            continue
        names = label_names(metadata, args.labels)
        fold_rows = score_run(
            run, args.data, args.labels, postprocessing, args.last_epoch
        )
        scored = checkpoint_epoch(run) if args.last_epoch else metadata["epoch"]
        if scored < epochs:
            print(f"fold {fold}: its bundle is epoch {scored} of {epochs}, picked on "
                  "these held-out cases (--last-epoch scores the last)")  # fmt: skip
        folds.append({
            "fold": fold, "epochs": epochs, "scored_epoch": scored,
            "precision": metadata["config"]["train"].get("precision"),
            "training_hours": training_hours(run),
            **means(fold_rows, names), "case_scores": fold_rows,
        })  # fmt: skip
        # each fold's scores are written at once: an interrupted run loses none
        pending = [recorded[f] for f in sorted(recorded) if f not in processed]
        write_report(output, header, folds + pending, args.folds)
    if not folds:
        sys.exit("no fold finished yet")
    report = write_report(output, header, folds, args.folds)
    folds, missing, overall = (
        report["folds"],
        report["missing_folds"],
        report["all_scored_cases"],
    )
    names = list(overall["dice"])
    print(f"\n{'fold':<8}{'cases':>6}{'voxel error':>13}" + "".join(
        f"{'Dice ' + n:>16}{'HD95 ' + n:>16}" for n in names))  # fmt: skip
    for row in [*folds, {"fold": "all", **overall}]:
        error = f"{row['voxel_error']:>13.4f}" if "voxel_error" in row else " " * 13
        print(f"{row['fold']!s:<8}{row['cases']:>6}{error}" + "".join(
            f"{row['dice'][n]:>16.3f}{row['hd95_mm'][n]:>16.2f}"
            for n in names))  # fmt: skip
    if missing:
        print(f"missing folds (not trained to the end): {missing}")
    print(f"written to {output}")


if __name__ == "__main__":
    main()
