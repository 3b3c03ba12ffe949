"""Adds the out-of-distribution profile (``ood`` in medseg.json) to a bundle trained
before training recorded it: its training cases (the ``split`` its medseg.json lists,
read from DATASET) are preprocessed as the bundle does and profiled as ``medseg
train`` does at the end of a run (``medseg.training.validation.profile_bundle``).
model.keras is not touched.

    python experiments/profile_bundle.py --model medseg/pretrained/hippocampus \
        --data ../shared/datasets/hippocampus
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()

    from medseg import bundle
    from medseg.datasets.layouts import load_dataset
    from medseg.training import data as training_data
    from medseg.training.validation import profile_bundle

    started = time.time()
    metadata = bundle.verify(args.model)
    cases = {c.case_id: c for c in load_dataset(args.data).cases}
    values = list(metadata.label_values)
    train = [
        training_data.prepare_case(
            cases[i], metadata.preprocessor, values, cache_dir=None
        )
        for i in metadata["split"]["train"]
    ]
    record = profile_bundle(args.model, train)
    print(
        f"{args.model}: profiled {record['scans']} training scans in "
        f"{time.time() - started:.0f} s; thresholds: intensity "
        f"{record['intensity']['threshold']:.3g}"
        + (
            f", features {record['features']['threshold']:.3g} "
            f"({record['features']['layer']})"
            if "features" in record
            else ""
        )
    )


if __name__ == "__main__":
    main()
