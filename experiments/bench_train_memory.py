"""Training memory and step time of the shipped hippocampus U-Net with Keras' layers
against medseg's lighter ones.

The network of experiments/hippocampus_3d_shipped.yaml (3D U-Net, filters 24-192,
instance norm, leaky ReLU, 3 classes), trained with SGD and Dice + cross-entropy on
random batches, in five builds that compute the same function:

- ``keras``: Keras' ``GroupNormalization(groups=-1)`` and ``Activation("leaky_relu")``
  (what U-Nets were built with before medseg had its own layers),
- ``medseg norm``: medseg's ``InstanceNormalization``, Keras' activation,
- ``medseg separate``: medseg's ``InstanceNormalization`` and ``LeakyReLU``,
- ``medseg fused``: medseg's fused ``InstanceNormLeakyReLU``,
- ``medseg``: that, and each decoder's first convolution a ``ConcatConv3D``, which
  never forms the skip concatenation (what ``build_unet`` gives now).

The four builds before the last concatenate the skip and upsampled tensors and
convolve the result, as ``build_unet`` did before ``ConcatConv3D``.

Each build runs in a fresh process: resident memory after importing TensorFlow and
building the model (``start_mib``), peak resident memory after ``--steps`` steps
(``peak_mib``), and seconds per step after a warm-up. The builds take turns over
``--repeats``, the order rotated each time; medians are printed and written to
experiments/results/train_memory.json.

    python experiments/bench_train_memory.py --patch 64 64 64 --batch 2 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
BUILDS = ("keras", "medseg norm", "medseg separate", "medseg fused", "medseg")


def concatenated(layer):
    """A layer that concatenates its inputs and convolves the result, configured as
    ``layer`` (a ``ConcatConv3D``; fresh weights, as every build here starts from
    random ones): the concatenated tensor exists."""
    import keras

    class ConcatenateThenConv(keras.layers.Layer):
        def __init__(self, conv, **kwargs):
            super().__init__(**kwargs)
            self.conv = conv

        def call(self, inputs):
            return self.conv(keras.ops.concatenate(inputs, axis=-1))

    settings = {**layer.get_config(), "name": f"{layer.name}_joined"}
    return ConcatenateThenConv(
        keras.layers.Conv3D.from_config(settings), name=layer.name
    )


def build(kind: str, patch):
    import keras
    import yaml

    from medseg.layers import (
        ConcatConv3D,
        InstanceNormalization,
        InstanceNormLeakyReLU,
        LeakyReLU,
    )
    from medseg.models import build_model

    config = yaml.safe_load((HERE / "hippocampus_3d_shipped.yaml").read_text())
    options = {k: v for k, v in config["model"].items() if k != "name"}
    model = build_model(
        "unet", in_channels=1, num_classes=3, patch_size=patch, **options
    )

    def replace(layer):
        settings = layer.get_config()
        if isinstance(layer, ConcatConv3D):
            return concatenated(layer)
        if kind == "medseg fused":
            return layer.__class__.from_config(settings)
        if isinstance(layer, InstanceNormLeakyReLU):  # norm, then activation
            assert settings["negative_slope"] == 0.2  # Keras' "leaky_relu" slope
            if kind == "keras":
                norm = keras.layers.GroupNormalization(groups=-1, epsilon=layer.epsilon)
            else:
                norm = InstanceNormalization(epsilon=layer.epsilon)
            if kind == "medseg separate":
                activation = LeakyReLU(0.2)
            else:
                activation = keras.layers.Activation("leaky_relu")
            return keras.Sequential([norm, activation], name=layer.name)
        if kind == "keras" and isinstance(layer, InstanceNormalization):
            return keras.layers.GroupNormalization(
                groups=-1, epsilon=layer.epsilon, name=layer.name
            )
        if kind in ("keras", "medseg norm") and isinstance(layer, LeakyReLU):
            assert settings["negative_slope"] == 0.2  # Keras' "leaky_relu" slope
            return keras.layers.Activation("leaky_relu", name=layer.name)
        return layer.__class__.from_config(settings)

    if kind != "medseg":
        model = keras.models.clone_model(model, clone_function=replace)
    return model


def worker(kind: str, patch, batch: int, steps: int, warmup: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf
    from fit_timing import fit_seconds

    from medseg.losses import DiceCELoss

    model = build(kind, patch)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.99, nesterov=True),
        loss=DiceCELoss(),
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, batch, *patch, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, batch, *patch, 1)).astype(np.int32)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    start = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    seconds = fit_seconds(model, data, steps, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "start_mib": round(start, 1),
        "peak_mib": round(peak, 1),
        "seconds_per_step": round(seconds / steps, 3),
        "parameters": model.count_params(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(HERE / "results" / "train_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.patch, args.batch, args.steps, args.warmup)
        print(json.dumps(result))
        return

    runs = {kind: [] for kind in BUILDS}
    for repeat in range(args.repeats):
        shift = repeat % len(BUILDS)  # each build in each place of the order in turn
        for kind in BUILDS[shift:] + BUILDS[:shift]:
            command = [
                sys.executable, __file__, "--worker", kind,
                "--patch", *map(str, args.patch), "--batch", str(args.batch),
                "--steps", str(args.steps), "--warmup", str(args.warmup),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
            runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1} {kind}: {runs[kind][-1]}", flush=True)

    rows = {}
    for kind, results in runs.items():
        rows[kind] = {
            key: statistics.median(r[key] for r in results)
            for key in ("start_mib", "peak_mib", "seconds_per_step")
        }
        rows[kind]["run_mib"] = round(rows[kind]["peak_mib"] - rows[kind]["start_mib"])
    base = rows["keras"]
    print(f"\npatch {args.patch}, batch {args.batch}, medians of {args.repeats}")
    print(f"{'build':<13}{'start MiB':>10}{'peak MiB':>10}{'run MiB':>9}"
          f"{'run vs keras':>14}{'s/step':>8}")  # fmt: skip
    for kind, row in rows.items():
        print(f"{kind:<13}{row['start_mib']:>10.0f}{row['peak_mib']:>10.0f}"
              f"{row['run_mib']:>9}{row['run_mib'] / base['run_mib']:>14.2f}"
              f"{row['seconds_per_step']:>8.2f}")  # fmt: skip
    report = {
        "command": "python experiments/bench_train_memory.py " + " ".join(sys.argv[1:]),
        "network": "experiments/hippocampus_3d_shipped.yaml's model",
        "patch": args.patch,
        "batch": args.batch,
        "steps": args.steps,
        "medians": rows,
        "runs": runs,
        "parameters": runs["medseg"][0]["parameters"],
        "machine": machine.describe(),
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
