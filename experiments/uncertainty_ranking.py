"""Does the uncertainty score of a segmented structure rank the bad ones first?

For each fold run of a cross-validation (experiments/cross_validate.py's run folders),
its held-out cases are segmented with ``medseg predict --uncertainty`` (test-time
mirroring as the bundle says) and scored with ``medseg evaluate``. Over all the held-out
structures (case and label), the Spearman correlation of Dice with the label's mean
entropy inside the predicted structure and on its boundary (the volumes table's
``entropy_mean``, ``entropy_boundary``), and with the Dice its averaged probabilities
expect (``dice_estimate``); a good entropy correlates negatively with Dice (more
uncertain, lower Dice), a good estimate positively. Also: of the 10 % most suspect
structures by each score, how many are among the 10 % of lowest Dice. Writes
experiments/results/uncertainty_ranking.json (``--output`` elsewhere).

    python experiments/uncertainty_ranking.py --runs runs/hippocampus_cv \
        --data ../shared/datasets/hippocampus
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cross_validate import score_run

HERE = Path(__file__).resolve().parent
#: each score and its direction: -1 where a higher score says a worse segmentation
SCORES = {"entropy_mean": -1, "entropy_boundary": -1, "dice_estimate": 1}


def ranking(rows: list[dict]) -> dict:
    """Spearman correlations of Dice with each score, and the overlap of the most
    uncertain tenth with the lowest-Dice tenth."""
    from scipy.stats import spearmanr

    dice = [float(r["dice"]) for r in rows]
    tenth = max(1, len(rows) // 10)
    worst = set(sorted(range(len(rows)), key=lambda i: dice[i])[:tenth])
    result = {"structures": len(rows), "tenth": tenth}
    for key, sign in SCORES.items():
        if not all(r.get(key) not in (None, "") for r in rows):
            continue  # a bundle or medseg that does not give this score
        values = [float(r[key]) for r in rows]
        rho, p = spearmanr(dice, values)
        # the most suspect first: the highest entropy, the lowest Dice estimate
        flagged = set(sorted(range(len(rows)), key=lambda i: sign * values[i])[:tenth])
        result[key] = {
            "spearman": round(float(rho), 3),
            "p_value": float(f"{p:.3g}"),
            "worst_tenth_caught": len(flagged & worst),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data", help="dataset (default: the runs')")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--output", type=Path, default=HERE / "results" / "uncertainty_ranking.json"
    )
    args = parser.parse_args()

    import machine

    rows = []
    for fold in range(args.folds):
        run = args.runs / f"fold_{fold}"
        if not (run / "medseg.json").is_file():
            sys.exit(f"{run}: no finished run")
        for row in score_run(run, args.data, predict_options=("--uncertainty",)):
            rows.append({"fold": fold, **row})
    report = {
        "command": "python experiments/uncertainty_ranking.py "
        + " ".join(sys.argv[1:]),
        "runs": str(args.runs),
        "machine": machine.describe(),
        "all": ranking(rows),
        "per_label": {
            label: ranking([r for r in rows if r["label"] == label])
            for label in sorted({r["label"] for r in rows})
        },
        "structures": [
            {k: r.get(k) for k in ("fold", "case", "label", "dice", *SCORES)}
            for r in rows
        ],
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("all", "per_label")}, indent=2))


if __name__ == "__main__":
    main()
