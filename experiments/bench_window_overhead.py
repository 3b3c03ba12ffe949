"""What sliding-window prediction adds to the network's own time.

For two 3D U-Nets, a 160^3 volume cut into 64^3 windows (overlap 0.5, Gaussian
blending, 4 windows a pass: 64 windows in 16 passes, as experiments/bench_monai.py):

- network: the 16 forward passes alone, the model called in a plain ``tf.function``
  on batches made beforehand (logits, nothing else);
- medseg: ``Segmenter.probabilities`` on a bundle holding the network (cutting the
  windows, the forward passes, blending, the softmax; no test-time mirroring, and
  with ``--mirror``, also with mirroring over all three axes, against 8 x the
  network's passes).

The overhead is medseg's time over the network's, less one. Both are timed in the
same process, alternating, after a warm-up; float32. The networks: ``light``, MONAI's
``UNet(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=0)`` rebuilt in
Keras layer for layer (487 k parameters); ``bench``, experiments/bench_monai.py's
(filters 32-256, max pooling, instance norm, leaky ReLU; 5.6 M). ``--tree`` runs
another checkout's medseg (a worktree of an earlier commit, say) for before/after in
one run; each tree runs in its own process, alternating.
``--bfloat16`` also times ``Segmenter.probabilities`` with ``precision="bfloat16"``,
for the rule ``precision="auto"`` follows.

    python experiments/bench_window_overhead.py --bfloat16 --tree /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_monai import CLASSES, PATCH, VOLUME, bundle_record

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
PER_PASS = 4


def light_unet():
    """MONAI's ``UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32,
    64, 128), strides=(2, 2, 2), num_res_units=0)`` in Keras, layer for layer: strided
    3x3x3 convolutions down, stride-2 3x3x3 transposed convolutions up, instance norm
    and PReLU after each but the last; 487 k parameters."""
    import keras
    from keras import layers

    def unit(x, channels, stride, transpose=False, last=False):
        conv = layers.Conv3DTranspose if transpose else layers.Conv3D
        x = conv(channels, 3, strides=stride, padding="same")(x)
        if last:
            return x
        x = layers.GroupNormalization(groups=channels, epsilon=1e-5)(x)
        return layers.PReLU(shared_axes=[1, 2, 3])(x)

    inputs = keras.Input((None, None, None, 1))
    d1 = unit(inputs, 16, 2)
    d2 = unit(d1, 32, 2)
    d3 = unit(d2, 64, 2)
    bottom = unit(d3, 128, 1)
    u3 = unit(layers.Concatenate()([d3, bottom]), 32, 2, transpose=True)
    u2 = unit(layers.Concatenate()([d2, u3]), 16, 2, transpose=True)
    logits = unit(layers.Concatenate()([d1, u2]), CLASSES, 2, transpose=True, last=True)
    return keras.Model(inputs, logits, name="light_unet")


def bench_unet():
    """experiments/bench_monai.py's network: medseg's U-Net of filters 32-256, max
    pooling, instance norm and leaky ReLU; 5.6 M parameters."""
    from medseg.models import build_unet

    return build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=CLASSES,
        filters=(32, 64, 128, 256),
        norm="instance",
        activation="leaky_relu",
    )


NETWORKS = {"light": light_unet, "bench": bench_unet}


def worker(network: str, repeats: int, mirror: bool, bfloat16: bool) -> dict:
    """Times the network alone and ``Segmenter.probabilities`` (float32, and with
    ``bfloat16`` also in bfloat16), alternating."""
    import numpy as np
    import tensorflow as tf

    from medseg.bundle import write_bundle
    from medseg.inference import Segmenter
    from medseg.inference.sliding_window import window_starts

    model = NETWORKS[network]()
    image = np.random.default_rng(2).normal(size=(*VOLUME, 1)).astype(np.float32)
    starts = [window_starts(n, p, 0.5) for n, p in zip(VOLUME, PATCH, strict=True)]
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    batches = [
        np.stack(
            [
                image[a : a + PATCH[0], b : b + PATCH[1], c : c + PATCH[2]]
                for a, b, c in windows[i : i + PER_PASS]
            ]
        )
        for i in range(0, len(windows), PER_PASS)
    ]
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    passes = 8 if mirror else 1

    def network_alone() -> float:
        started = time.perf_counter()
        for _ in range(passes):
            for batch in batches:
                np.asarray(forward(batch))
        return time.perf_counter() - started

    results = {"network": [], "medseg": [], **({"medseg_bf16": []} if bfloat16 else {})}
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(tmp, model, bundle_record())  # the same patch and classes
        segmenters = {
            key: Segmenter(
                tmp,
                overlap=0.5,
                batch_size=PER_PASS,
                precision=precision,
                mirror_axes=(0, 1, 2) if mirror else (),
            )
            for key, precision in (("medseg", "float32"), ("medseg_bf16", "bfloat16"))
            if key in results
        }

        def medseg(key) -> float:
            started = time.perf_counter()
            scores = segmenters[key].probabilities(image)
            seconds = time.perf_counter() - started
            assert scores.shape == (*VOLUME, CLASSES)
            return seconds

        network_alone()  # warm-up: traces the graphs
        for key in segmenters:
            medseg(key)
        for _ in range(repeats):
            results["network"].append(network_alone())
            for key in segmenters:
                results[key].append(medseg(key))
    return {
        "parameters": int(model.count_params()),
        "windows": len(windows),
        "forward_passes": len(batches) * passes,
        **results,
    }


def run_worker(
    tree: str, network: str, repeats: int, mirror: bool, bfloat16: bool
) -> dict:
    """One worker process importing medseg from the checkout ``tree``."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(tree).resolve()), environment.get("PYTHONPATH", "")]
    )
    command = [sys.executable, __file__, "--worker", network, "--repeats",
               str(repeats), *(["--mirror"] if mirror else []),
               *(["--bfloat16"] if bfloat16 else [])]  # fmt: skip
    out = subprocess.run(
        command, env=environment, capture_output=True, text=True, cwd=HERE
    )
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="processes per tree")
    parser.add_argument("--mirror", action="store_true")
    parser.add_argument(
        "--bfloat16", action="store_true", help="also time precision bfloat16"
    )
    parser.add_argument("--tree", help="another checkout to compare (before)")
    parser.add_argument(
        "--networks", default="light,bench", help="some of: " + ",".join(NETWORKS)
    )
    parser.add_argument(
        "--output", default=str(HERE / "results" / "window_overhead.json")
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.mirror, args.bfloat16)))
        return

    import machine

    trees = {"this": str(HERE.parent), **({"other": args.tree} if args.tree else {})}
    report = {
        "command": "python experiments/bench_window_overhead.py "
        + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "volume": VOLUME,
        "patch": PATCH,
        "windows_per_pass": PER_PASS,
        "mirror": args.mirror,
        "bfloat16": args.bfloat16,
        "networks": {},
    }
    for network in args.networks.split(","):
        runs = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                bfloat16 = args.bfloat16 and name == "this"  # the rule is this tree's
                runs[name].append(
                    run_worker(tree, network, args.repeats, args.mirror, bfloat16)
                )
        entry = {}
        for name, results in runs.items():
            network_s = statistics.median(t for r in results for t in r["network"])
            medseg_s = statistics.median(t for r in results for t in r["medseg"])
            entry[name] = {
                "parameters": results[0]["parameters"],
                "forward_passes": results[0]["forward_passes"],
                "network_s": round(network_s, 3),
                "medseg_s": round(medseg_s, 3),
                "overhead": round(medseg_s / network_s - 1, 3),
                "raw": results,
            }
            if "medseg_bf16" in results[0]:
                bf16_s = statistics.median(t for r in results for t in r["medseg_bf16"])
                entry[name]["medseg_bf16_s"] = round(bf16_s, 3)
                entry[name]["bf16_speedup"] = round(medseg_s / bf16_s, 3)
                print(f"{'':<13}bfloat16 {bf16_s:7.3f} s  float32 / bfloat16 "
                      f"{medseg_s / bf16_s:.2f}x")  # fmt: skip
            overhead = medseg_s / network_s - 1
            print(f"{network:<7}{name:<6} network {network_s:7.3f} s  medseg "
                  f"{medseg_s:7.3f} s  overhead {overhead:+.1%}")  # fmt: skip
        report["networks"][network] = entry
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
