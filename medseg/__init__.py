"""medseg: medical image segmentation with Keras 3.

The Python API: :func:`segment`, :func:`load_bundle`, :class:`Segmenter`,
:func:`read_volume`, :func:`write_volume` and :func:`evaluate` (see ``medseg.api``).
Importing this package is cheap: no TensorFlow, no file reads; each of these names
imports what it needs when it is first used.

It sets one TensorFlow default, for a TensorFlow imported after it: oneDNN's CPU kernels
on x86-64 (``TF_ENABLE_ONEDNN_OPTS=1`` unless already set). TensorFlow turns them on by
itself only on CPUs with AVX-512 VNNI/BF16 or AMX units; on an AVX2-only CPU (an AMD
EPYC here) its fallback convolutions made 3D U-Net training 3.1x slower and its peak
memory 2.3x larger.
"""

import os as _os
import platform as _platform

__version__ = "0.1.0"

if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

#: The public API: each name's module, imported on first use (PEP 562).
_API = {
    "segment": "medseg.api",
    "load_bundle": "medseg.api",
    "evaluate": "medseg.api",
    "Segmenter": "medseg.inference.segmenter",
    "Prediction": "medseg.inference.segmenter",
    "Volume": "medseg.io.volume",
    "read_volume": "medseg.io.formats",
    "write_volume": "medseg.io.formats",
    "BundleMetadata": "medseg.bundle",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
