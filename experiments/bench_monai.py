"""Speed and memory of medseg against MONAI on the same 3D U-Net, side by side.

The network: medseg's ``build_unet`` (3D, filters 32-64-128-256, two 3x3x3 conv +
instance norm + ReLU (``--activation leaky_relu``: leaky ReLU, slope 0.2) per
level, max pooling, 2x2x2 transposed convolutions, skip
concatenation, 1x1x1 logits, 3 classes) and the same network built from MONAI's
blocks (``Convolution`` with instance norm, ``UpSample`` deconv) in PyTorch. The
weights of the Keras model are ported to the PyTorch one and both are run on the same
input first: their outputs must agree, so both sides compute the same function.

Then, each measurement in a fresh process (so peak RSS is the process's own), the two
tools alternating over the repeats:

- training: patch 64^3, batch 2, Dice + cross-entropy loss, SGD (momentum 0.99,
  Nesterov, weight decay 3e-5), the same random batches; samples per second over
  ``--steps`` steps after a warm-up. medseg as its trainer runs it (``model.fit`` on a
  repeated tf.data dataset; float32 by default on CPU, and with ``--bf16`` also its
  ``mixed_bfloat16`` policy); MONAI as its tutorials run it (a PyTorch loop with
  ``DiceCELoss``; float32, and with ``--bf16`` under ``torch.autocast(bfloat16)``).
- inference: a 160^3 volume, 64^3 windows, overlap 0.5, Gaussian blending, 4 windows
  per batch, softmax: medseg's ``Segmenter.probabilities`` on a bundle holding the
  network, MONAI's ``sliding_window_inference``; seconds.

Prints medians and medseg/MONAI ratios (speed: MONAI's time / medseg's; memory:
medseg's peak / MONAI's) and writes experiments/results/monai.json. Memory is also
split: each worker first imports its framework (TensorFlow, Keras and medseg, or
PyTorch and MONAI, without TensorFlow: see ``without_tensorflow``) and records its
resident memory then (``framework_mib``); the peak less that is what running the
network adds (``run_mib``, ratio ``run x``). Much of TensorFlow's resident memory is
its shared libraries' pages, file-backed: shared by every process that loads them and
dropped by the kernel under pressure rather than swapped. So the private (anonymous)
resident memory is sampled too, every 5 ms by a thread (``peak_private_mib``, ratio
``private x``; ``framework_private_mib`` after the imports). Needs the bench extra
(``pip install -e ".[bench]"``: torch and monai).

    python experiments/bench_monai.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
FILTERS = (32, 64, 128, 256)
CLASSES = 3
PATCH = (64, 64, 64)
#: ``relu`` or ``leaky_relu`` (slope 0.2; MONAI's in place, as its DynUNet runs it);
#: set from ``--activation``
ACTIVATION = "relu"
VOLUME = (160, 160, 160)
BATCH = 2
SW_BATCH = 4
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.99, 3e-5


def keras_unet():
    from medseg.models import build_unet

    return build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=CLASSES,
        filters=FILTERS,
        norm="instance",
        activation=ACTIVATION,
    )


def torch_unet():
    """The same network from MONAI's blocks (channels-first)."""
    import torch
    from monai.networks.blocks import Convolution, UpSample

    act = "RELU"
    if ACTIVATION == "leaky_relu":
        act = ("LEAKYRELU", {"negative_slope": 0.2, "inplace": True})

    def unit(cin, cout):
        return Convolution(
            3, cin, cout, kernel_size=3, act=act,
            norm=("INSTANCE", {"affine": True, "eps": 1e-5}), bias=False,
        )  # fmt: skip

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            f = FILTERS
            self.enc = torch.nn.ModuleList()
            cin = 1
            for width in f[:-1]:
                self.enc.append(
                    torch.nn.Sequential(unit(cin, width), unit(width, width))
                )
                cin = width
            self.pool = torch.nn.MaxPool3d(2)
            self.bottleneck = torch.nn.Sequential(
                unit(f[-2], f[-1]), unit(f[-1], f[-1])
            )
            self.up = torch.nn.ModuleList()
            self.dec = torch.nn.ModuleList()
            for level in reversed(range(len(f) - 1)):
                self.up.append(
                    UpSample(3, f[level + 1], f[level], scale_factor=2, mode="deconv")
                )
                self.dec.append(
                    torch.nn.Sequential(
                        unit(2 * f[level], f[level]), unit(f[level], f[level])
                    )
                )
            self.logits = torch.nn.Conv3d(f[0], CLASSES, 1)

        def forward(self, x):
            skips = []
            for block in self.enc:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
                x = dec(torch.cat([skip, up(x)], dim=1))
            return self.logits(x)

    return UNet()


def port_weights(model, net) -> None:
    """Copies the Keras model's weights into the PyTorch network."""
    import torch

    def conv(torch_conv, layer):
        kernel = layer.get_weights()[0]  # (kd, kh, kw, in, out)
        torch_conv.weight.data = torch.from_numpy(
            kernel.transpose(4, 3, 0, 1, 2).copy()
        )
        if torch_conv.bias is not None:
            torch_conv.bias.data = torch.from_numpy(layer.get_weights()[1].copy())

    def norm(torch_norm, layer):
        gamma, beta = layer.get_weights()
        torch_norm.weight.data = torch.from_numpy(gamma.copy())
        torch_norm.bias.data = torch.from_numpy(beta.copy())

    def block(sequential, name):
        for j, unit in enumerate(sequential, start=1):
            conv(unit.conv, model.get_layer(f"{name}_conv{j}"))
            norm(unit.adn.N, model.get_layer(f"{name}_norm{j}"))

    for i, sequential in enumerate(net.enc):
        block(sequential, f"enc{i}")
    block(net.bottleneck, "bottleneck")
    levels = list(reversed(range(len(FILTERS) - 1)))
    for up, dec, level in zip(net.up, net.dec, levels, strict=True):
        kernel, bias = model.get_layer(f"dec{level}_up").get_weights()
        deconv = up.deconv  # kernel (kd, kh, kw, out, in) -> (in, out, kd, kh, kw)
        deconv.weight.data = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy())
        deconv.bias.data = torch.from_numpy(bias.copy())
        block(dec, f"dec{level}")
    conv(net.logits, model.get_layer("logits"))


def check_same_function() -> dict:
    import numpy as np
    import torch

    model, net = keras_unet(), torch_unet()
    port_weights(model, net)
    counts = {
        "medseg_parameters": int(model.count_params()),
        "monai_parameters": int(sum(p.numel() for p in net.parameters())),
    }
    x = np.random.default_rng(0).normal(size=(1, *PATCH, 1)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    with torch.inference_mode():
        got = net.eval()(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())).numpy()
    counts["max_abs_output_difference"] = float(
        np.abs(got.transpose(0, 2, 3, 4, 1) - expected).max()
    )
    counts["output_scale"] = float(np.abs(expected).max())
    return counts


def batches(n: int):
    import numpy as np

    rng = np.random.default_rng(1)
    images = rng.normal(size=(n, BATCH, *PATCH, 1)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=(n, BATCH, *PATCH, 1)).astype(np.int32)
    return images, labels


def train_medseg(steps: int, warmup: int, bf16: bool) -> float:
    import keras
    import tensorflow as tf
    from fit_timing import fit_seconds

    from medseg.losses import DiceCELoss

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
    model = keras_unet()
    model.compile(
        optimizer=keras.optimizers.SGD(
            LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
        ),
        loss=DiceCELoss(),
    )
    images, labels = batches(4)
    data = (
        tf.data.Dataset.from_tensor_slices((images, labels)).repeat().prefetch(2)
    )  # one repeated dataset, as the trainer feeds fit
    return fit_seconds(model, data, steps, warmup)


def train_monai(steps: int, warmup: int, bf16: bool) -> float:
    import contextlib

    import torch
    from monai.losses import DiceCELoss

    net = torch_unet().train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
        weight_decay=WEIGHT_DECAY,
    )  # fmt: skip
    images, labels = batches(4)
    x = torch.from_numpy(images.transpose(0, 1, 5, 2, 3, 4).copy())
    y = torch.from_numpy(labels.transpose(0, 1, 5, 2, 3, 4).copy())

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        with autocast:
            loss = loss_fn(net(x[i % len(x)]), y[i % len(y)])
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return time.perf_counter() - started


def volume():
    import numpy as np

    return np.random.default_rng(2).normal(size=(*VOLUME, 1)).astype(np.float32)


def bundle_record() -> dict:
    """The medseg.json of a bundle of the benchmark's network: CLASSES labels, PATCH
    windows, z-scored scans taken as they are."""
    return {
        "task": "segmentation",
        "labels": {str(k): {"value": k, "name": str(k)} for k in range(CLASSES)},
        "in_channels": 1,
        "spatial_dims": 3,
        "patch_size": list(PATCH),
        "preprocessing": {
            "normalizers": [{"scheme": "zscore"}],
            "target_spacing_mm": None,
            "crop_nonzero": False,
        },
    }


def infer_medseg(bf16: bool) -> float:
    from medseg.bundle import write_bundle
    from medseg.inference import Segmenter

    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(tmp, keras_unet(), bundle_record())
        segmenter = Segmenter(
            tmp,
            overlap=0.5,
            batch_size=SW_BATCH,
            precision="bfloat16" if bf16 else "float32",
        )
        image = volume()
        segmenter.probabilities(image[:64, :64, :64])  # warm-up (traces the graph)
        started = time.perf_counter()
        scores = segmenter.probabilities(image)
        seconds = time.perf_counter() - started
    assert scores.shape == (*VOLUME, CLASSES)
    return seconds


def infer_monai(bf16: bool) -> float:
    import contextlib

    import torch
    from monai.inferers import sliding_window_inference

    net = torch_unet().eval()
    image = torch.from_numpy(volume().transpose(3, 0, 1, 2)[None].copy())
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        net(image[..., :64, :64, :64])  # warm-up
        started = time.perf_counter()
        logits = sliding_window_inference(
            image, PATCH, SW_BATCH, net, overlap=0.5, mode="gaussian"
        )
        scores = torch.softmax(logits.float(), dim=1)
        seconds = time.perf_counter() - started
    assert tuple(scores.shape) == (1, CLASSES, *VOLUME)
    return seconds


WORKERS = {
    ("medseg", "train"): train_medseg,
    ("monai", "train"): train_monai,
    ("medseg", "infer"): infer_medseg,
    ("monai", "infer"): infer_monai,
}


def versions() -> dict:
    import monai
    import tensorflow as tf
    import torch

    return {"tensorflow": tf.__version__, "torch": torch.__version__,
            "monai": monai.__version__}  # fmt: skip


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``RssAnon``, ``RssFile``) in
    MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class PrivatePeak:
    """The largest private (anonymous) resident memory of this process while the
    ``with`` block runs, read from /proc/self/status every ``interval`` seconds by a
    thread (the kernel keeps the peak of the whole RSS only). Both frameworks release
    Python's lock in their kernels, so the thread samples during them."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak = interval, status_mib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, status_mib("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_mib("RssAnon"))


def without_tensorflow() -> None:
    """Make ``import tensorflow`` fail in this process. MONAI imports TensorBoard, and
    TensorBoard imports TensorFlow when it is installed (as it is here, beside medseg),
    adding about 475 MiB of resident memory and seconds of start-up to MONAI's runs
    that a MONAI user, with no TensorFlow, would not have. TensorBoard falls back to
    its stub without it."""
    sys.modules["tensorflow"] = None


def import_framework(tool: str) -> float:
    """Import what the tool's run uses; the resident memory it costs before any
    network exists (the runtime's own libraries and state)."""
    if tool == "medseg":
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        import medseg.inference  # noqa: F401
        import medseg.losses  # noqa: F401
    else:
        without_tensorflow()
        import monai.inferers  # noqa: F401
        import monai.losses  # noqa: F401
        import torch  # noqa: F401
    return status_mib("VmRSS")  # resident now, not the peak


def worker(tool: str, task: str, args) -> None:
    if task == "check":  # also in a child: Linux keeps a parent's peak RSS in forks
        print(json.dumps({**check_same_function(), "versions": versions()}))
        return
    baseline = import_framework(tool)
    private = status_mib("RssAnon")
    with PrivatePeak() as sampled:
        if task == "train":
            bf16 = args.precision == "bf16"
            seconds = WORKERS[tool, task](args.steps, args.warmup, bf16)
            rate = args.steps * BATCH / seconds
        else:
            seconds, rate = WORKERS[tool, task](args.precision == "bf16"), None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "samples_per_s": rate, "peak_mib": peak,
                      "framework_mib": baseline, "peak_private_mib": sampled.peak,
                      "framework_private_mib": private,
                      "file_backed_mib": status_mib("RssFile")}))  # fmt: skip


def measure(tool, task, precision, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", tool, "--task", task,
        "--precision", precision, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--activation", args.activation,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{tool} {task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def default_row(rows: list[dict]) -> dict | None:
    """Inference as each tool runs by default here: ``medseg predict --precision
    auto`` (bfloat16 on a CPU with AMX bfloat16 units) against MONAI in float32."""
    from medseg.inference import cpu_has_amx_bf16  # imports neither framework

    by_key = {(row["task"], row["precision"]): row for row in rows}
    ours = by_key.get(("infer", "bf16" if cpu_has_amx_bf16() else "fp32"))
    theirs = by_key.get(("infer", "fp32"))
    if ours is None or theirs is None:
        return None
    return {
        "task": "infer",
        "precision": f"default ({ours['precision']} vs fp32)",
        "medseg": ours["medseg"],
        "monai": theirs["monai"],
        "speed_ratio": theirs["monai"]["seconds"] / ours["medseg"]["seconds"],
        "memory_ratio": ours["medseg"]["peak_mib"] / theirs["monai"]["peak_mib"],
        "run_memory_ratio": ours["medseg"]["run_mib"] / theirs["monai"]["run_mib"],
        "private_memory_ratio": ours["medseg"]["peak_private_mib"]
        / theirs["monai"]["peak_private_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--bf16", action="store_true", help="also bfloat16 training and inference"
    )
    parser.add_argument(
        "--activation",
        choices=("relu", "leaky_relu"),
        default="relu",
        help="the network's activation (leaky_relu: slope 0.2, medseg's fused "
        "instance norm + leaky ReLU layer against MONAI's in-place LeakyReLU)",
    )
    parser.add_argument("--output", default=str(HERE / "results" / "monai.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global ACTIVATION
    ACTIVATION = args.activation
    if args.worker:
        worker(args.worker, args.task, args)
        return

    check = measure("both", "check", "fp32", args)
    tool_versions = check.pop("versions")
    print(
        f"parameters: medseg {check['medseg_parameters']:,}, MONAI "
        f"{check['monai_parameters']:,}; ported weights, max output difference "
        f"{check['max_abs_output_difference']:.2e} (outputs up to "
        f"{check['output_scale']:.2f})"
    )
    scenarios = [("train", "fp32"), ("infer", "fp32")]
    if args.bf16:
        scenarios = [("train", "fp32"), ("train", "bf16"), ("infer", "fp32"),
                     ("infer", "bf16")]  # fmt: skip
    runs = {s: {"medseg": [], "monai": []} for s in scenarios}
    for repeat in range(args.repeats):
        for scenario in scenarios:
            order = ("medseg", "monai") if repeat % 2 == 0 else ("monai", "medseg")
            for tool in order:
                runs[scenario][tool].append(measure(tool, *scenario, args))
                print(f"  {scenario} {tool}: {runs[scenario][tool][-1]}", flush=True)
    rows = []
    for (task, precision), by_tool in runs.items():
        med = {
            tool: {
                key: statistics.median(r[key] for r in values)
                for key in (
                    "seconds",
                    "peak_mib",
                    "framework_mib",
                    "peak_private_mib",
                    "framework_private_mib",
                    "file_backed_mib",
                )
            }
            for tool, values in by_tool.items()
        }
        speed = med["monai"]["seconds"] / med["medseg"]["seconds"]
        for tool in med:  # what the network's run adds to the imported runtime
            med[tool]["run_mib"] = med[tool]["peak_mib"] - med[tool]["framework_mib"]
        if task == "train":
            for tool in med:
                med[tool]["samples_per_s"] = args.steps * BATCH / med[tool]["seconds"]
        rows.append(
            {
                "task": task,
                "precision": precision,
                "medseg": med["medseg"],
                "monai": med["monai"],
                "speed_ratio": speed,
                "memory_ratio": med["medseg"]["peak_mib"] / med["monai"]["peak_mib"],
                "run_memory_ratio": med["medseg"]["run_mib"] / med["monai"]["run_mib"],
                "private_memory_ratio": med["medseg"]["peak_private_mib"]
                / med["monai"]["peak_private_mib"],
                "runs": by_tool,
            }
        )
    print(
        f"\n{'task':<36}{'medseg':>8}{'MONAI':>8}{'speed x':>9}"
        f"{'medseg MiB':>12}{'MONAI MiB':>11}{'mem x':>7}{'run x':>7}"
        f"{'private x':>11}"
    )
    default = default_row(rows)
    if default:
        rows.append(default)
    for row in rows:
        train = row["task"] == "train"
        key = "samples_per_s" if train else "seconds"
        title = f"{row['task']} {row['precision']} ({'samples/s' if train else 's'})"
        print(
            f"{title:<36}{row['medseg'][key]:>8.2f}{row['monai'][key]:>8.2f}"
            f"{row['speed_ratio']:>9.2f}{row['medseg']['peak_mib']:>12.0f}"
            f"{row['monai']['peak_mib']:>11.0f}{row['memory_ratio']:>7.2f}"
            f"{row['run_memory_ratio']:>7.2f}{row['private_memory_ratio']:>11.2f}"
        )
    report = {
        "network": {
            "filters": FILTERS,
            "classes": CLASSES,
            "activation": ACTIVATION,
            **check,
        },
        "patch": PATCH,
        "batch": BATCH,
        "volume": VOLUME,
        "sw_batch": SW_BATCH,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": rows,
        "versions": tool_versions,
        "machine": machine.describe(),
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
