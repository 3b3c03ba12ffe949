"""What the benchmarks ran on, for their JSON: the CPU's model and the instruction sets
that change the numbers (bfloat16 is fast only with AVX-512 BF16 or AMX), the core
count, and whether TensorFlow sees a GPU."""

from __future__ import annotations

import os
import platform

import medseg  # noqa: F401  (TensorFlow's defaults as medseg's commands run with them)
from medseg.inference import cpu_info


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (the platform's name elsewhere)."""
    return cpu_info("model name") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The CPU flags among AVX2, AVX-512F, AVX-512 BF16 and AMX BF16 that it has."""
    flags = set((cpu_info("flags") or "").split())
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def describe(gpu: bool | None = None) -> dict:
    """The machine: CPU model, architecture, cores, relevant flags and (when ``gpu``
    is given) whether a GPU was used."""
    result = {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "cpu_features": cpu_features(),
        "platform": platform.platform(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }
    if gpu is not None:
        result["gpu"] = gpu
    return result
