"""Exporting a bundle for serving: a TensorFlow SavedModel that carries the bundle's
metadata (preprocessing, labels, patch size), checked against the bundle."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

FORMATS = ("savedmodel",)


def export_savedmodel(bundle: str | Path, output: str | Path, *, seed: int = 0) -> dict:
    """Writes ``output`` (a SavedModel folder with a ``serve`` endpoint that maps a
    batch of preprocessed patches to logits, plus the bundle's ``medseg.json``), after
    checking that it gives the bundle's outputs on a random input of the patch size.

    The folder is built under a temporary name and renamed, so ``output`` is either
    complete and checked or absent.

    Returns:
        ``{"max_abs_difference": ..., "input_shape": [...]}``.

    Raises:
        InputFileError: ``output`` exists, or the exported model disagrees with the
            bundle by more than 1e-4.
    """
    import tensorflow as tf

    from medseg import bundle as bundles
    from medseg.models import load_model

    output = Path(output)
    if output.exists():
        raise InputFileError(output, "exists already; choose a new output folder")
    metadata = bundles.verify(bundle)
    model = load_model(bundle)
    shape = (1, *metadata["patch_size"], metadata["in_channels"])
    sample = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    expected = np.asarray(model(sample, training=False))
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        loaded = tf.saved_model.load(str(tmp))  # kept: its variables back serve()
        served = loaded.serve(tf.constant(sample))
        difference = float(np.max(np.abs(np.asarray(served) - expected)))
        if not difference <= 1e-4:
            raise InputFileError(
                output, f"exported model differs from the bundle by {difference:.3g}"
            )
        record = {
            **metadata,
            "export": {
                "format": "savedmodel",
                "endpoint": "serve",
                "input": "preprocessed patches (batch, *spatial, channels), float32",
                "output": "logits (batch, *spatial, classes); softmax for "
                "probabilities",
                "checked_max_abs_difference": difference,
            },
        }
        (tmp / bundles.METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"max_abs_difference": difference, "input_shape": list(shape)}
