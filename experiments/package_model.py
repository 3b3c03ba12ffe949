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
from pathlib import Path

import yaml
from cross_validate import means, score_run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training run folder (a bundle)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True, type=Path, help="its config file")
    args = parser.parse_args()

    from medseg.bundle import MODEL_FILE, PRETRAINED_DIR, verify
    from medseg.io import atomic_write_text

    metadata = verify(args.run)
    config = metadata["config"]
    names = {
        str(v["value"]): v["name"] for k, v in metadata["labels"].items() if k != "0"
    }
    evaluation = {
        "what": f"fold {metadata['split']['fold']} of {metadata['split']['folds']}: "
        "held-out cases, each scored on its own grid, mean over cases",
        **means(score_run(args.run), names),
    }
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
    what, cases = evaluation["what"], evaluation["cases"]
    print(f"\n{args.name}: {what}, {cases} cases, {size:.1f} MB")
    print(f"{'label':<12}{'Dice':>8}{'HD95 mm':>9}")
    for label, dice in evaluation["dice"].items():
        print(f"{label:<12}{dice:>8.3f}{evaluation['hd95_mm'][label]:>9.2f}")
    result = {"name": args.name, "model_mb": round(size, 2), **evaluation}
    out = HERE / "results" / f"pretrained_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {target} and {out}")


if __name__ == "__main__":
    main()
