"""Training speed of the hippocampus 3D U-Net at float32 and at mixed bfloat16 on CPU
(or any Keras precision policy), side by side in one process.

Each policy gets its own model (Keras fixes a layer's dtype when it is built), the
same random batches held in memory, a warm-up, then timed steps; policies alternate
over the repeats so machine-load drifts hit all of them. Prints a table and writes
experiments/results/precision.json.

    python experiments/bench_precision.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "precision.json"))
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from fit_timing import fit_seconds

    from medseg.losses import DiceCELoss
    from medseg.models import build_unet

    patch = (40, 56, 40)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch * 4, *patch, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=(args.batch * 4, *patch, 1)).astype(np.int32)
    data = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(args.batch)
        .repeat()
        .prefetch(2)
    )
    policies = args.policies.split(",")
    models = {}
    for policy in policies:
        keras.mixed_precision.set_global_policy(policy)
        model = build_unet(
            spatial_dims=3,
            in_channels=1,
            num_classes=3,
            filters=(32, 64, 128, 256),
            activation="leaky_relu",
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.99, nesterov=True),
            loss=DiceCELoss(),
        )
        model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)  # build and trace
        models[policy] = model
    keras.mixed_precision.set_global_policy("float32")

    rates = {p: [] for p in policies}
    for _ in range(args.repeats):
        for policy in policies:
            seconds = fit_seconds(models[policy], data, args.steps)
            rates[policy].append(args.steps / seconds)
    medians = {p: statistics.median(v) for p, v in rates.items()}
    base = medians[policies[0]]
    print(f"{'policy':<16}{'median steps/s':>16}{'vs ' + policies[0]:>20}")
    for policy in policies:
        print(f"{policy:<16}{medians[policy]:>16.3f}{medians[policy] / base:>20.2f}")
    record = {
        "command": "python experiments/bench_precision.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "output"),
        "machine": machine.describe(gpu=bool(tf.config.list_physical_devices("GPU"))),
        "patch": list(patch),
        "batch": args.batch,
        "steps_per_s": {p: [round(v, 4) for v in vs] for p, vs in rates.items()},
        "median_steps_per_s": {p: round(v, 4) for p, v in medians.items()},
        "ratio_to_first": {p: round(v / base, 3) for p, v in medians.items()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
