"""Is the input pipeline the bottleneck of training?

Trains the same 3D U-Net (experiments/hippocampus_3d_sgd.yaml's network, patch
40 x 56 x 40, batch 2) for a fixed number of steps fed two ways, alternating, several
times:

* pipeline: the real medseg stream (preprocessed NIfTI cases, patch sampling with
  foreground oversampling, every augmentation as TensorFlow ops, prefetch);
* memory: the same number of batches taken from that stream once and replayed from
  memory, so the model never waits for data.

It prints a table and writes experiments/results/pipeline_<augment>.json. The target:
pipeline steps/s >= 0.9 x memory steps/s. On a CPU-only machine both feeds share the
same cores, so augmentation work is taken from the model's compute.

    python experiments/bench_pipeline.py --data data/sample --steps 20 --repeats 3
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
    parser.add_argument("--data", default=str(HERE.parent / "data" / "sample"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--augment",
        choices=["default", "all"],
        default="default",
        help="default: the training probabilities; all: every transform on every patch",
    )
    parser.add_argument(
        "--output",
        help="JSON file (default: experiments/results/pipeline_<augment>.json)",
    )
    args = parser.parse_args()
    args.output = args.output or str(HERE / "results" / f"pipeline_{args.augment}.json")

    import keras
    import tensorflow as tf
    from fit_timing import fit_seconds

    from medseg.config import AugmentConfig
    from medseg.datasets.checks import check_dataset
    from medseg.datasets.layouts import load_dataset
    from medseg.losses import DiceCELoss
    from medseg.models import build_unet
    from medseg.preprocessing import Preprocessor, ZScoreNormalization
    from medseg.training import data as training_data
    from medseg.training.augment import Augmenter

    patch = (40, 56, 40)
    dataset = load_dataset(args.data)
    fingerprint = check_dataset(dataset).fingerprint
    values = training_data.class_values(dataset)
    preprocessor = Preprocessor(
        (ZScoreNormalization(),), tuple(fingerprint["spacing_mm"]["median"])
    )
    cases = [
        training_data.prepare_case(c, preprocessor, values, None) for c in dataset.cases
    ]
    sampler = training_data.PatchSampler(
        cases, patch, foreground_oversample=0.33, seed=0, samples_per_epoch=10**9
    )
    if args.augment == "all":  # every transform on every patch: the most work
        augment = AugmentConfig(
            mirror_axes=(0, 2),
            p_rotate=1.0,
            p_scale=1.0,
            p_gamma=1.0,
            p_brightness=1.0,
            p_contrast=1.0,
            p_noise=1.0,
            p_blur=1.0,
        )
    else:  # the augmentation of experiments/hippocampus_3d_sgd.yaml
        augment = AugmentConfig(mirror_axes=(0, 2))
    stream = training_data.make_dataset(sampler, Augmenter(augment, 3), args.batch, 0)
    stored = list(stream.take(args.steps + 5))
    images = tf.concat([b[0] for b in stored], 0)
    labels = tf.concat([b[1] for b in stored], 0)
    memory = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(args.batch)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )

    model = build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=len(values),
        filters=(32, 64, 128, 256),
        activation="leaky_relu",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.99, nesterov=True),
        loss=DiceCELoss(),
    )
    model.fit(memory, epochs=1, steps_per_epoch=5, verbose=0)  # build and trace

    def rate(source) -> float:
        return args.steps / fit_seconds(model, source, args.steps)

    results = {"pipeline": [], "memory": []}
    for _ in range(args.repeats):  # alternate so drifts in machine load hit both
        results["pipeline"].append(rate(stream))
        results["memory"].append(rate(memory))
    pipeline = statistics.median(results["pipeline"])
    in_memory = statistics.median(results["memory"])
    record = {
        "command": "python experiments/bench_pipeline.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "output"),
        "machine": machine.describe(),
        "patch": list(patch),
        "batch": args.batch,
        "steps": args.steps,
        "augment": args.augment,
        "steps_per_s": {k: [round(v, 4) for v in vs] for k, vs in results.items()},
        "median_steps_per_s": {
            "pipeline": round(pipeline, 4),
            "memory": round(in_memory, 4),
        },
        "ratio_pipeline_over_memory": round(pipeline / in_memory, 3),
    }
    print(f"{'feed':<10}{'median steps/s':>16}{'runs':>30}")
    for name in ("pipeline", "memory"):
        runs = ", ".join(f"{v:.3f}" for v in results[name])
        print(f"{name:<10}{statistics.median(results[name]):>16.3f}{runs:>30}")
    print(f"ratio pipeline / memory: {record['ratio_pipeline_over_memory']:.3f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
