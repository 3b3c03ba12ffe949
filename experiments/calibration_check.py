"""Does a temperature fitted on some held-out cases calibrate others?

A finished training run's bundle segments its validation cases (``Segmenter``, no
test-time mirroring, on the preprocessed grid, so each voxel is one the network saw
once). Its log-probabilities and the preprocessed truth of every voxel are kept. The
cases are split in two halves (alternately, in the split's order): a temperature is
fitted on one half (``medseg.evaluation.calibration.fit_temperature``, as ``medseg
train --calibrate`` fits it on all of them) and the other half is scored before and
after (NLL, top-class ECE and each label's ECE, 15 bins); then the halves swap. Also
the temperature fitted on all cases, as the training run would store it. Writes
experiments/results/calibration_<name>.json.

    python experiments/calibration_check.py --run runs/recipes/15m/plain/fold_0 \
        --data ../shared/datasets/hippocampus --name hippocampus
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def held_out_voxels(run: Path, data: Path):
    """Per validation case: ``(log-probabilities (N, K), truth (N,))`` of its voxels
    on the preprocessed grid, without the bundle's temperature."""
    from medseg import bundle
    from medseg.datasets.layouts import load_dataset
    from medseg.inference import Segmenter
    from medseg.io import read_volume
    from medseg.io.formats import stack_channels
    from medseg.training import data as training_data

    metadata = bundle.verify(run)
    segmenter = Segmenter(run, precision="float32")
    cases = {c.case_id: c for c in load_dataset(data).cases}
    values = list(metadata.label_values)
    result = {}
    for case_id in metadata["split"]["validation"]:
        case = cases[case_id]
        scan = stack_channels([read_volume(p) for p in case.images], case.images)
        image, _ = segmenter.preprocessor.image(scan)
        p = segmenter.probabilities(image).astype(np.float64)
        # log p_T * T is the logits up to a shift per voxel: as if uncalibrated
        log_p = np.log(np.maximum(p, 1e-30)) * metadata.temperature
        prepared = training_data.prepare_case(
            case, segmenter.preprocessor, values, cache_dir=None
        )
        result[case_id] = (
            log_p.reshape(-1, len(values)).astype(np.float32),
            prepared.label.reshape(-1).astype(np.int64),
        )
    return metadata, result


def scores(log_p, truth, temperature, names) -> dict:
    from medseg.evaluation.calibration import (
        Reliability,
        negative_log_likelihood,
        softmax,
    )

    summary = Reliability.of(softmax(log_p, temperature), truth).summary(names)
    return {
        "nll": round(negative_log_likelihood(log_p, truth, temperature), 5),
        "ece": summary["ece"],
        "ece_per_label": summary["ece_per_label"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--name", default="hippocampus")
    args = parser.parse_args()

    import machine

    from medseg.evaluation.calibration import fit_temperature

    metadata, cases = held_out_voxels(args.run, args.data)
    names = list(metadata.label_names)
    ids = list(cases)
    halves = [ids[0::2], ids[1::2]]

    def joined(chosen):
        return (
            np.concatenate([cases[i][0] for i in chosen]),
            np.concatenate([cases[i][1] for i in chosen]),
        )

    report = {
        "command": "python experiments/calibration_check.py " + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "run": str(args.run),
        "cases": len(ids),
        "bundle_calibration": metadata.get("calibration"),
        "halves": [],
    }
    for fit_on, score_on in ((halves[0], halves[1]), (halves[1], halves[0])):
        temperature = fit_temperature(*joined(fit_on))
        log_p, truth = joined(score_on)
        report["halves"].append(
            {
                "fitted_on": fit_on,
                "scored_on": score_on,
                "voxels": int(len(truth)),
                "temperature": round(temperature, 4),
                "before": scores(log_p, truth, 1.0, names),
                "after": scores(log_p, truth, temperature, names),
            }
        )
    everything = fit_temperature(*joined(ids))
    report["temperature_on_all"] = round(everything, 4)
    output = HERE / "results" / f"calibration_{args.name}.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    for half in report["halves"]:
        before, after = half["before"], half["after"]
        print(
            f"T {half['temperature']:.3f} fitted on {len(half['fitted_on'])} cases, "
            f"scored on {len(half['scored_on'])}: NLL {before['nll']:.4f} -> "
            f"{after['nll']:.4f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
            f"per label {before['ece_per_label']} -> {after['ece_per_label']}"
        )
    print(f"T on all {len(ids)} cases: {everything:.3f}; written to {output}")


if __name__ == "__main__":
    main()
