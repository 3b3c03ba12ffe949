"""Packages a training run as a model shipped inside medseg (medseg/pretrained/NAME).

A run of one fold is scored on its own held-out cases first: ``medseg predict`` (with
the bundle's test-time mirroring) on the validation cases its medseg.json lists, then
``medseg evaluate`` against their labels, on each scan's own grid. A run trained on all
cases (``--fold all``) has none: give ``--cross-validation`` with the JSON that
cross_validate.py wrote for the same config, and its all-folds means are the record.
The bundle's medseg.json gets that record (``evaluation``: cases, mean Dice, HD95 and
voxel error per label, and per fold for cross-validation), the name, and the config
file it was trained with; machine-specific paths (the dataset
folder, the preprocessing cache) are replaced by the config's own. model.keras is copied
unchanged (its sha256 still matches), or with ``--weights float16`` saved again with its
weights rounded to float16, in half the bytes (a run of one fold is then scored as
shipped, with the rounded weights). Prints the table and writes
experiments/results/pretrained_NAME.json.

    python experiments/package_model.py runs/hippocampus --name hippocampus \
        --config experiments/hippocampus_3d_shipped.yaml
    python experiments/package_model.py runs/membrane_all --name membrane \
        --config experiments/membrane_2d_shipped.yaml --labels 0,255 \
        --cross-validation experiments/results/membrane_2d_shipped_cv.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml
from cross_validate import label_names, means, score_run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def cross_validation_record(path: Path, config: Path) -> dict:
    """The all-folds means of cross_validate.py's JSON, checked to be of ``config``
    and complete, with the per-fold means."""
    report = json.loads(path.read_text())
    if Path(report["config"]).resolve() != config.resolve():
        raise SystemExit(
            f"{path}: cross-validation of {report['config']}, not {config}"
        )
    if report["missing_folds"]:
        raise SystemExit(f"{path}: folds {report['missing_folds']} are missing")
    folds = [
        {k: v for k, v in fold.items() if k != "case_scores"}
        for fold in report["folds"]
    ]
    last = all(fold.get("scored_epoch") == fold["epochs"] for fold in folds)
    return {
        "what": f"{len(folds)}-fold cross-validation of the same config: each fold's "
        "held-out cases, each scored on its own grid, mean over all cases; "
        + (
            "each fold at its last epoch"
            if last
            else "each fold at its best validation epoch, picked on those cases"
        ),
        **report["all_scored_cases"],
        "folds": folds,
        "command": report["command"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training run folder (a bundle)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True, type=Path, help="its config file")
    parser.add_argument(
        "--labels", help="label values to score, e.g. 0,255 (default: the non-zero)"
    )
    parser.add_argument(
        "--cross-validation",
        type=Path,
        help="cross_validate.py's JSON for this config (for a run on all cases)",
    )
    parser.add_argument(
        "--weights",
        choices=("float32", "float16"),
        default="float32",
        help="dtype the shipped weights are stored in (float16: half the bytes)",
    )
    args = parser.parse_args()

    from medseg.bundle import (
        MODEL_FILE,
        PRETRAINED_DIR,
        verify,
        write_bundle,
        write_metadata,
    )
    from medseg.models import load_model

    metadata = verify(args.run).to_dict()
    config = metadata["config"]
    scored_split = (metadata.get("split") or {}).get("validation")
    if not (args.cross_validation or scored_split):
        parser.error(f"{args.run} has no held-out cases: give --cross-validation")
    dataset = config["data"]["dataset"]  # where the run found it, on this machine
    source = yaml.safe_load(args.config.read_text())
    config["data"]["dataset"] = source["data"]["dataset"]
    config["data"]["cache_dir"] = None
    metadata.update(
        name=args.name, trained_with=str(args.config.resolve().relative_to(REPO))
    )
    target = PRETRAINED_DIR / args.name
    if target.exists():
        shutil.rmtree(target)
    if args.weights == "float32":
        target.mkdir(parents=True)
        shutil.copyfile(args.run / MODEL_FILE, target / MODEL_FILE)
        metadata["weights_dtype"] = "float32"
        write_metadata(target, metadata)
    else:
        write_bundle(target, load_model(args.run), metadata, weights_dtype=args.weights)
        metadata = verify(target).to_dict()
    if args.cross_validation:
        evaluation = cross_validation_record(args.cross_validation, args.config)
    else:
        evaluation = {
            "what": f"fold {metadata['split']['fold']} of "
            f"{metadata['split']['folds']}: held-out cases, each scored on its own "
            "grid, mean over cases",
            **means(
                score_run(target, dataset, args.labels),
                label_names(metadata, args.labels),
            ),
        }
    metadata["evaluation"] = evaluation
    write_metadata(target, metadata)
    verify(target)
    size = (target / MODEL_FILE).stat().st_size / 1e6
    what, cases = evaluation["what"], evaluation["cases"]
    print(f"\n{args.name}: {what}, {cases} cases, {size:.1f} MB")
    # 2D images (PNG, TIFF) have no physical spacing: their distances are in pixels
    hd95 = "HD95 mm" if metadata["spatial_dims"] == 3 else "HD95"
    print(f"{'label':<12}{'Dice':>8}{hd95:>9}")
    for label, dice in evaluation["dice"].items():
        print(f"{label:<12}{dice:>8.3f}{evaluation['hd95_mm'][label]:>9.2f}")
    result = {"name": args.name, "model_mb": round(size, 2), **evaluation}
    out = HERE / "results" / f"pretrained_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {target} and {out}")


if __name__ == "__main__":
    main()
