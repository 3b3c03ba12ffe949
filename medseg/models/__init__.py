"""Network builders, the model registry and safe model loading.

Importing this package imports Keras (and TensorFlow).
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputFileError
from medseg.models.classifier import build_classifier
from medseg.models.unet import (
    build_autoencoder,
    build_unet,
    transfer_encoder_weights,
    unet_output_size,
    valid_unet_input_sizes,
)

#: Builders by the name configs use.
MODELS = {
    "unet": build_unet,
    "autoencoder": build_autoencoder,
    "classifier": build_classifier,
}

__all__ = [
    "MODELS",
    "build_autoencoder",
    "build_classifier",
    "build_model",
    "build_unet",
    "builder_for",
    "builder_options",
    "load_model",
    "main_output",
    "transfer_encoder_weights",
    "unet_output_size",
    "valid_unet_input_sizes",
    "weights_dtype",
    "with_precision",
    "with_weights_dtype",
]

#: The dtypes a saved model's weights can be stored in.
WEIGHTS_DTYPES = ("float32", "float16")


def build_model(name: str, **kwargs):
    """Builds a registered model by name: ``unet``, ``autoencoder``, ``classifier``.

    Raises:
        ValueError: unknown name, or a bad argument of the builder.
    """
    builder = builder_for(name)
    allowed = builder_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; allowed: {allowed}"
        )
    return builder(**kwargs)


def builder_for(name: str):
    """The builder registered as ``name``; ``ValueError`` listing the names if none."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def builder_options(name: str) -> list[str]:
    """The keyword arguments the builder ``name`` takes."""
    import inspect

    return list(inspect.signature(builder_for(name)).parameters)


def load_model(path: str | Path):
    """Loads a ``.keras`` model (or a bundle folder's ``model.keras``) in safe mode.

    medseg's layers are registered first, so models using them load; Keras' safe mode
    refuses Lambda layers and anything else that would run code from the file.

    Raises:
        InputFileError: missing or unreadable file, or a file that is not a Keras model.
    """
    import keras

    import medseg.layers  # noqa: F401  (registers the custom layers)

    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise InputFileError(path, "model file not found")
    import zipfile

    if not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise InputFileError(
            path, "cannot load model (damaged or truncated: not a whole .keras archive)"
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        text = str(exc)
        if "safe_mode" in text or "arbitrary code" in text:
            raise InputFileError(
                path,
                "refused: the model holds Python code (a Lambda layer or a function "
                "of its own), and medseg never runs code from a model file",
            ) from None
        message = text.splitlines()[0] if text else type(exc).__name__
        raise InputFileError(path, f"cannot load model ({message})") from None
    if weights_dtype(model) != "float32":  # stored small: compute in float32
        model = with_weights_dtype(model, "float32")
    return model


def main_output(model):
    """``model``, or for one with several outputs (a deep-supervised U-Net) a model of
    the same layers and weights with only its first, full-resolution output."""
    import keras

    if len(model.outputs) == 1:
        return model
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, model.outputs[0], name=model.name)


def weights_dtype(model) -> str:
    """``"float16"`` when any of ``model``'s layers keeps float16 variables (a model
    saved by :func:`with_weights_dtype` to halve its file), else ``"float32"``."""
    variable_dtypes = {layer.dtype_policy.variable_dtype for layer in model.layers}
    return "float16" if "float16" in variable_dtypes else "float32"


def with_weights_dtype(model, dtype: str):
    """``model`` with every layer's variables (and arithmetic) in ``dtype``, its weights
    cast: ``"float16"`` to save it in half the bytes, ``"float32"`` to compute with
    such a model again (:func:`load_model` does this). float16 keeps 11 significant
    bits (a relative rounding of at most 2^-11) and values up to 65504; casting back
    to float32 is exact. A model already in ``dtype`` is returned as it is.

    Raises:
        ValueError: ``dtype`` not one of ``WEIGHTS_DTYPES``, or weights too large
            for float16.
    """
    import numpy as np

    if dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights dtype {dtype!r}; expected one of {WEIGHTS_DTYPES}")
    if all(layer.dtype_policy.name == dtype for layer in model.layers):
        return model
    weights = model.get_weights()
    if dtype == "float16":
        largest = max((float(np.abs(w).max()) for w in weights if w.size), default=0)
        if largest > float(np.finfo(np.float16).max):
            raise ValueError(
                f"a weight of {largest:g} does not fit float16 (at most 65504)"
            )
    return with_precision(model, dtype, outputs_float32=False)


def with_precision(model, policy: str, *, outputs_float32: bool = True):
    """A copy of ``model`` computing under a Keras dtype policy, with its weights.

    ``policy`` is a Keras policy name (``"float32"``, ``"mixed_bfloat16"``,
    ``"mixed_float16"``). The layers producing the model's outputs stay float32
    (unless ``outputs_float32`` is false), so logits (and the softmax after them) are
    computed and returned in float32; the variables stay float32 under the mixed
    policies. For ``"float32"`` on a float32 model, the model itself is returned.
    """
    import keras

    if policy == "float32" and all(
        layer.dtype_policy.name == "float32" for layer in model.layers
    ):
        return model
    outputs = {id(tensor) for tensor in model.outputs}
    final = set()
    for layer in model.layers:
        try:
            if id(layer.output) in outputs:
                final.add(layer.name)
        except (AttributeError, ValueError):  # a layer called more than once
            continue

    def clone(layer):
        config = layer.get_config()
        keep = outputs_float32 and layer.name in final
        config["dtype"] = "float32" if keep else policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy
