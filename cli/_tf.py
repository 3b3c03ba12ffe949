"""Starting TensorFlow for a command without its C++ start-up chatter.

TensorFlow prints several lines to the process's stderr while it loads and probes for
GPUs (oneDNN notices, "could not find cuda drivers" on CPU machines). They are not
errors, and a clinical user reading a command's output should not have to wonder. They
are hidden unless ``--debug``; Python exceptions still surface normally.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def start_tensorflow(debug: bool = False) -> None:
    """Imports TensorFlow and Keras and lists devices, quietly unless ``debug``."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import medseg  # noqa: F401  (TensorFlow's oneDNN default, before TensorFlow)

    quiet = contextlib.nullcontext() if debug else _stderr_silenced()
    with quiet:
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
