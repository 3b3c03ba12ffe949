"""The precision a forward pass runs in, and what the CPU says about it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_info(field: str, path="/proc/cpuinfo") -> str | None:
    """The value of the first ``field`` line of Linux's ``/proc/cpuinfo`` (``"model
    name"``, ``"flags"``); None where there is no such line or file."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tile units (Linux ``/proc/cpuinfo``)."""
    return "amx_bf16" in (cpu_info("flags") or "").split()


def cpu_lacks_onednn_bfloat16() -> bool:
    """Whether TensorFlow runs bfloat16 on this CPU without oneDNN: its oneDNN
    bfloat16 kernels need AVX-512, and without them TensorFlow falls back to kernels
    that emulate bfloat16, far slower than float32 (on a 2-core AVX2-only AMD EPYC,
    25x in training, ``experiments/results/precision_avx2.json``, and 13x in
    ``medseg predict``). False where the CPU's flags cannot be read."""
    flags = cpu_info("flags")
    return flags is not None and "avx512f" not in flags.split()


def bfloat16_is_slow_here() -> bool:
    """Whether bfloat16 would run emulated here: no GPU and
    :func:`cpu_lacks_onednn_bfloat16`."""
    import tensorflow as tf

    return cpu_lacks_onednn_bfloat16() and not tf.config.list_physical_devices("GPU")


#: Why bfloat16 is slow where :func:`bfloat16_is_slow_here`.
SLOW_BFLOAT16 = (
    "this CPU has no AVX-512, so TensorFlow runs bfloat16 without oneDNN, 10-25x "
    "slower than float32 (measured on an AVX2-only CPU: 13x in prediction, 25x in "
    "training)"
)


#: Names the precision that ``auto`` resolves to, whatever the machine.
AUTO_PRECISION_VARIABLE = "MEDSEG_AUTO_PRECISION"


#: Forward FLOPs per input voxel below which ``auto`` keeps float32 on an AMX CPU: on
#: a 2-core Xeon with AMX, bfloat16 made the sliding window of a light U-Net (MONAI's
#: 16-128 UNet, 3.8 k FLOPs a voxel) 1.02x faster and of a 5.6 M-parameter one (427 k)
#: 2.35x (experiments/bench_window_overhead.py); the shipped hippocampus network
#: (241 k) sits with the second (its forward passes 1.8x faster in bfloat16).
BFLOAT16_MIN_FLOPS_PER_VOXEL = 20_000


def inference_precision(
    requested: str = "auto", flops_per_voxel: Callable[[], float] | None = None
) -> str:
    """The precision a forward pass runs in: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` picks bfloat16 only where it is both fast and measured: a CPU with AMX
    bfloat16 units (Intel Sapphire Rapids and later) and no GPU, where it halves the
    time of a 3D U-Net's forward pass, for a network of at least
    :data:`BFLOAT16_MIN_FLOPS_PER_VOXEL` forward FLOPs per input voxel
    (``flops_per_voxel``, called only there; ``None``: any network); float32 anywhere
    else. The environment variable ``MEDSEG_AUTO_PRECISION`` (``float32`` or
    ``bfloat16``) overrides what ``"auto"`` resolves to, so that one machine can run,
    and test, what another would.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    forced = os.environ.get(AUTO_PRECISION_VARIABLE)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(
                f"{AUTO_PRECISION_VARIABLE} must be float32 or bfloat16, got {forced!r}"
            )
        return forced
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or not cpu_has_amx_bf16():
        return "float32"
    if flops_per_voxel is not None and flops_per_voxel() < BFLOAT16_MIN_FLOPS_PER_VOXEL:
        return "float32"  # too light a network for bfloat16 to pay
    return "bfloat16"
