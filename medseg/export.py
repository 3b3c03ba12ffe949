"""Exporting a bundle for serving, checked against the bundle: a TensorFlow
SavedModel (TF Serving) or an ONNX model (onnxruntime and other ONNX runtimes; needs
the ``onnx`` extra). Each export is a folder that also holds the bundle's
``medseg.json`` (preprocessing, labels, patch size), so the preprocessing travels with
the model; the ONNX file carries it in its metadata too."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.files import hidden_sibling
from medseg.serving import SEGMENT_ENDPOINT

FORMATS = ("savedmodel", "onnx")
ONNX_FILE = "model.onnx"
#: Key of the bundle's metadata in the ONNX model's ``metadata_props``.
ONNX_METADATA_KEY = "medseg.json"
TOLERANCE = 1e-4


def _savedmodel(model, folder: Path, sample: np.ndarray, metadata) -> tuple:
    """Writes the SavedModel (``serve``, and ``segment`` where the bundle can have
    it); returns ``serve``'s output on ``sample`` and the loaded model."""
    import tensorflow as tf
    from keras.export import ExportArchive

    from medseg.serving import SEGMENT_ENDPOINT, segment_function, serving_refusal

    archive = ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec(model.input_shape, tf.float32)],
    )
    if serving_refusal(metadata) is None:
        archive.add_endpoint(SEGMENT_ENDPOINT, segment_function(model, metadata))
    archive.write_out(str(folder), verbose=False)
    loaded = tf.saved_model.load(str(folder))  # kept: its variables back serve()
    return np.asarray(loaded.serve(tf.constant(sample))), loaded


def _segment_difference(bundle, metadata, loaded, seed: int) -> float:
    """The largest gap between the ``segment`` endpoint's probabilities and
    :class:`~medseg.inference.Segmenter`'s on a random scan a little larger than
    the window (so windows overlap and are blended)."""
    import tensorflow as tf

    from medseg.inference import Segmenter
    from medseg.preprocessing.intensity import normalize

    shape = [int(n) + 7 for n in metadata.window]
    rng = np.random.default_rng(seed + 1)
    scan = rng.normal(100, 20, size=(*shape, metadata.in_channels)).astype(np.float32)
    segmenter = Segmenter(bundle, mirror_axes=metadata.mirror_axes, precision="float32")
    expected = segmenter.probabilities(
        normalize(scan, metadata.preprocessor.normalizers)
    )
    served = loaded.segment(tf.constant(scan))["probabilities"].numpy()
    return float(np.max(np.abs(served - expected)))


def _onnx(model, folder: Path, sample: np.ndarray) -> np.ndarray:
    import onnxruntime

    folder.mkdir()
    path = folder / ONNX_FILE
    model.export(str(path), format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: sample})[0]


def _embed_onnx_metadata(path: Path, record: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(record)
    onnx.save(proto, str(path))


def export_bundle(
    bundle: str | Path, output: str | Path, fmt: str = "savedmodel", *, seed: int = 0
) -> dict:
    """Writes ``output``, a folder with the exported model (a SavedModel whose
    ``serve`` endpoint maps a batch of preprocessed patches to logits, or
    ``model.onnx`` with input ``image`` doing the same) and the bundle's
    ``medseg.json``, after checking that the export gives the bundle's outputs on a
    random input of the patch size (:func:`output_difference`).

    The folder is built under a temporary name and renamed, so ``output`` is either
    complete and checked or absent.

    Returns:
        ``{"max_abs_difference": ..., "compared": ..., "input_shape": [...]}``.

    Raises:
        InputFileError: ``output`` exists, an unknown format, the onnx extra missing,
            or an export that disagrees with the bundle by more than 1e-4.
    """
    from medseg import bundle as bundles
    from medseg.models import load_model

    if fmt not in FORMATS:
        raise InputFileError(output, f"unknown export format {fmt!r}; one of {FORMATS}")
    output = Path(output)
    if fmt == "onnx":
        import importlib.util

        missing = [
            name
            for name in ("onnx", "onnxruntime", "tf2onnx")
            if importlib.util.find_spec(name) is None
        ]
        if missing:
            raise InputFileError(
                output,
                f"ONNX export needs {', '.join(missing)}: pip install 'medseg[onnx]'",
            )
    if output.exists():
        raise InputFileError(output, "exists already; choose a new output folder")
    metadata = bundles.verify(bundle)
    model = load_model(bundle)
    shape = (1, *metadata.patch_size, metadata.in_channels)
    sample = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    expected = np.asarray(model(sample, training=False))
    tmp = hidden_sibling(output, f".{uuid.uuid4().hex[:8]}.partial")
    try:
        endpoints = {}
        if fmt == "savedmodel":
            exported, loaded = _savedmodel(model, tmp, sample, metadata)
        else:
            exported = _onnx(model, tmp, sample)
        difference, compared = output_difference(metadata, exported, expected)
        if not difference <= TOLERANCE:
            raise InputFileError(
                output,
                f"exported model's {compared} differ from the bundle's by "
                f"{difference:.3g}",
            )
        if fmt == "savedmodel" and hasattr(loaded, SEGMENT_ENDPOINT):
            gap = _segment_difference(bundle, metadata, loaded, seed)
            if not gap <= TOLERANCE:
                raise InputFileError(
                    output,
                    f"the {SEGMENT_ENDPOINT} endpoint's probabilities differ from "
                    f"medseg predict's by {gap:.3g}",
                )
            endpoints[SEGMENT_ENDPOINT] = {
                "input": "a scan on the bundle's grid (reoriented to RAS, cropped "
                "and resampled as preprocessing says, not normalised): (*spatial, "
                "channels), float32",
                "output": {
                    "probabilities": "(*spatial, classes) float32",
                    "labels": "(*spatial) int32, the label values",
                },
                "overlap": 0.5,
                "mirror_axes": list(metadata.mirror_axes),
                "checked_max_abs_difference": gap,
            }
        record = {
            **metadata,
            "export": {
                "format": fmt,
                **(
                    {"endpoint": "serve"}
                    if fmt == "savedmodel"
                    else {"file": ONNX_FILE, "input_name": "image"}
                ),
                "input": "preprocessed patches (batch, *spatial, channels), float32",
                "output": "logits (batch, *spatial, classes); softmax for "
                "probabilities",
                "checked_max_abs_difference": difference,
                "checked": compared,
                **({"endpoints": endpoints} if endpoints else {}),
            },
        }
        record[bundles.METADATA_CHECKSUM] = bundles.metadata_checksum(record)
        if fmt == "onnx":
            _embed_onnx_metadata(tmp / ONNX_FILE, record)
        (tmp / bundles.METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {
        "max_abs_difference": difference,
        "compared": compared,
        "input_shape": list(shape),
    }


def output_difference(metadata: dict, exported, expected) -> tuple[float, str]:
    """How far an export's outputs are from the bundle's, and what was compared: for
    a network that gives logits of classes (segmentation, classification), the class
    probabilities (their softmax, what ``medseg predict`` uses: logits of a
    hundred, as a trained network gives, differ by 1e-4 between runtimes from
    float32 rounding alone, about 1e-6 of their size); for another (an autoencoder),
    its outputs over their largest magnitude (at least 1)."""
    exported = np.asarray(exported, np.float64)
    expected = np.asarray(expected, np.float64)
    if metadata.get("task") in ("segmentation", "classification"):

        def softmax(logits):
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            return shifted / shifted.sum(axis=-1, keepdims=True)

        gap = np.abs(softmax(exported) - softmax(expected))
        return float(np.max(gap)), "class probabilities"
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(exported - expected))) / scale, "outputs (to scale)"
