"""Where the time goes: one training step and one prediction, taken apart.

Training (experiments/hippocampus_3d_sgd.yaml's 3D U-Net, patch 40 x 56 x 40, batch 2,
the real input pipeline on ``--data``): the one-off preprocessing per case; producing
one augmented batch with the model idle; the forward pass alone; the whole step
(forward, backward, SGD update). FLOP/s reached: the step's FLOPs (3 x the forward
FLOPs that ``medseg info`` counts: forward, gradient for inputs, gradient for
weights) over its time, against the CPU's float32 peak measured here with a large
matrix product (and against bfloat16's, for the bfloat16 step).

Prediction (``medseg predict`` as it runs, bundle ``--model`` on scan ``--scan``, with
its test-time mirroring): reading the file, preprocessing, the network's forward passes,
sliding-window stitching (everything in the window loop but the network), the way back
to the scan's grid, writing the labels.

Prints tables and writes experiments/results/profile.json.

    python experiments/profile_steps.py --data data/sample --model hippocampus
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
PATCH = (40, 56, 40)
BATCH = 2


def seconds(function, repeats: int) -> float:
    """Median wall seconds of ``function()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: str, n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of an n x n matrix product in TensorFlow (the practical peak)."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    product = tf.function(lambda x: tf.linalg.matmul(x, x))
    product(a).numpy()
    return 2 * n**3 / seconds(lambda: product(a).numpy(), repeats)


def profile_training(data: str, steps: int, policy: str) -> dict:
    import keras
    import tensorflow as tf
    from fit_timing import fit_seconds

    from medseg.config import AugmentConfig
    from medseg.datasets.checks import check_dataset
    from medseg.datasets.layouts import load_dataset
    from medseg.losses import DiceCELoss
    from medseg.models import build_unet
    from medseg.models.info import describe_model
    from medseg.preprocessing import Preprocessor, ZScoreNormalization
    from medseg.training import data as training_data
    from medseg.training.augment import Augmenter

    keras.mixed_precision.set_global_policy(policy)
    dataset = load_dataset(data)
    fingerprint = check_dataset(dataset).fingerprint
    values = training_data.class_values(dataset)
    preprocessor = Preprocessor(
        (ZScoreNormalization(),), tuple(fingerprint["spacing_mm"]["median"])
    )
    start = time.perf_counter()
    cases = [
        training_data.prepare_case(c, preprocessor, values, None) for c in dataset.cases
    ]
    prepare = (time.perf_counter() - start) / len(cases)
    sampler = training_data.PatchSampler(
        cases, PATCH, foreground_oversample=0.33, seed=0, samples_per_epoch=10**9
    )
    augmenter = Augmenter(AugmentConfig(mirror_axes=(0, 2)), 3)
    stream = training_data.make_dataset(sampler, augmenter, BATCH, 0)
    batches = iter(stream)
    next(batches)
    produce = seconds(lambda: next(batches), steps)
    images, labels = next(batches)

    model = build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=len(values),
        filters=(32, 64, 128, 256),
        activation="leaky_relu",
        patch_size=PATCH,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.99, nesterov=True),
        loss=DiceCELoss(),
    )
    memory = tf.data.Dataset.from_tensors((images, labels)).repeat()
    step = fit_seconds(model, memory, steps, warmup=3) / steps
    forward_fn = tf.function(lambda x: model(x, training=False))
    forward_fn(images)
    forward = seconds(lambda: forward_fn(images).numpy(), steps)
    flops_forward = describe_model(model, batch_size=BATCH).flops_per_sample * BATCH
    return {
        "policy": policy,
        "prepare_case_s": prepare,
        "produce_batch_s": produce,
        "forward_s": forward,
        "step_s": step,
        "flops_forward_per_batch": flops_forward,
        "step_flop_per_s": 3 * flops_forward / step,
        "forward_flop_per_s": flops_forward / forward,
    }


def profile_prediction(model: str, scan: str, precision: str) -> dict:
    from medseg import inference, io
    from medseg.bundle import read_metadata, resolve
    from medseg.preprocessing import Preprocessor

    bundle = resolve(model)
    segmenter = inference.Segmenter(
        bundle,
        mirror_axes=inference.bundle_mirror_axes(read_metadata(bundle)),
        precision=precision,
    )
    parts = dict.fromkeys(("forward", "preprocess", "window loop"), 0.0)
    forward, window, image = segmenter._predict_batch, segmenter.probabilities, None

    def timed(part, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[part] += time.perf_counter() - start

        return wrapper

    segmenter._predict_batch = timed("forward", forward)
    segmenter.probabilities = timed("window loop", window)
    original_image = Preprocessor.image
    Preprocessor.image = timed("preprocess", original_image)
    try:
        segmenter.predict(io.read_volume(scan))  # warm-up: traces the graph
        parts = dict.fromkeys(parts, 0.0)
        start = time.perf_counter()
        volume = io.read_volume(scan)
        read = time.perf_counter() - start
        start = time.perf_counter()
        prediction = segmenter.predict(volume)
        total_predict = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            io.write_volume(prediction.labels, Path(tmp) / "labels.nii.gz")
            write = time.perf_counter() - start
        image = segmenter.preprocessor.image(volume)[0]
    finally:
        Preprocessor.image = original_image
    return {
        "scan": str(scan),
        "scan_shape": list(volume.spatial_shape),
        "preprocessed_shape": list(image.shape[:-1]),
        "precision": segmenter.precision,
        "tta_axes": list(segmenter.mirror_axes),
        "read_s": read,
        "preprocess_s": parts["preprocess"],
        "forward_s": parts["forward"],
        "stitching_s": parts["window loop"] - parts["forward"],
        "way_back_s": total_predict - parts["preprocess"] - parts["window loop"],
        "write_s": write,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent / "data" / "sample"))
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--scan", help="default: the first image of --data")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default=str(HERE / "results" / "profile.json"))
    args = parser.parse_args()
    scan = args.scan or sorted((Path(args.data) / "imagesTr").glob("*.nii.gz"))[0]

    peaks = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16")}
    training = [
        profile_training(args.data, args.steps, policy)
        for policy in ("float32", "mixed_bfloat16")
    ]
    for row in training:
        peak = peaks["bfloat16" if "bfloat16" in row["policy"] else "float32"]
        row["fraction_of_matmul_peak"] = row["step_flop_per_s"] / peak
    prediction = [
        profile_prediction(args.model, str(scan), p) for p in ("float32", "bfloat16")
    ]

    print(f"matrix-product peak: float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
          f"bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")  # fmt: skip
    print(f"\ntraining step, patch {PATCH}, batch {BATCH} (seconds)")
    print(f"{'policy':<16}{'case prep':>10}{'batch':>8}{'forward':>9}{'step':>7}"
          f"{'GFLOP/s':>9}{'of peak':>9}")  # fmt: skip
    for r in training:
        print(
            f"{r['policy']:<16}{r['prepare_case_s']:>10.3f}{r['produce_batch_s']:>8.3f}"
            f"{r['forward_s']:>9.3f}{r['step_s']:>7.2f}"
            f"{r['step_flop_per_s'] / 1e9:>9.0f}{r['fraction_of_matmul_peak']:>9.1%}"
        )
    print(f"\nprediction of {Path(scan).name} (seconds)")
    keys = ("read", "preprocess", "forward", "stitching", "way_back", "write")
    print(f"{'precision':<11}" + "".join(f"{k:>11}" for k in keys))
    for r in prediction:
        print(f"{r['precision']:<11}" + "".join(f"{r[k + '_s']:>11.3f}" for k in keys))
    report = {
        "command": "python experiments/profile_steps.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "output"),
        "machine": machine.describe(),
        "matmul_peak_flop_per_s": peaks,
        "training": training,
        "prediction": prediction,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
