"""Model bundles: a folder with ``model.keras`` and ``medseg.json``.

``medseg.json`` holds everything prediction needs to repeat the training-time
preprocessing (nothing is guessed at predict time) plus the record of how the model
was made: format version, task, labels, channels, spatial dims, patch size,
preprocessing with its statistics, the dataset fingerprint, the plan, the resolved
config, validation metrics, versions, and the sha256 of ``model.keras``.

Both files are written to temporary names and renamed, ``medseg.json`` last. The new
metadata is first written beside the old as ``.medseg.json.next``: a writer killed
between the two renames leaves the new model with its metadata there, and
:func:`verify` completes the swap. So a bundle is always either the old complete one or
the new complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

from medseg import __version__
from medseg.errors import InputFileError
from medseg.io.files import atomic_output, atomic_write_text

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "medseg.json"
PENDING_FILE = ".medseg.json.next"
#: Bundles shipped inside the package, addressable by folder name.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def shipped_models() -> dict[str, Path]:
    """Name -> folder of each bundle shipped with medseg."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(PRETRAINED_DIR.iterdir())
        if (p / METADATA_FILE).is_file()
    }


def resolve(model: str | Path) -> Path:
    """A bundle folder from a path or the name of a shipped model.

    Raises:
        InputFileError: neither an existing folder nor a shipped model's name.
    """
    path = Path(model)
    if path.exists():
        return path
    shipped = shipped_models()
    if str(model) in shipped:
        return shipped[str(model)]
    names = ", ".join(shipped) or "none"
    raise InputFileError(
        model, f"no such bundle folder, and not a shipped model (shipped: {names})"
    )


def bundles_in(folder: Path) -> list[Path]:
    """``folder`` when it is a bundle; else the bundles among its subfolders (the
    fold runs of a cross-validation), sorted, when there are any; else ``folder``
    (which :func:`read_metadata` then names as no bundle)."""
    folder = Path(folder)
    if (folder / METADATA_FILE).is_file() or not folder.is_dir():
        return [folder]
    inner = sorted(p for p in folder.iterdir() if (p / METADATA_FILE).is_file())
    return inner or [folder]


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "medseg": __version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def write_bundle(
    folder: str | Path, model, metadata: dict, *, weights_dtype: str = "float32"
) -> Path:
    """Saves ``model`` and ``metadata`` (plus format version, versions, the dtype the
    weights are stored in and sha256). ``weights_dtype="float16"`` stores the weights
    rounded to float16, in half the bytes; loading computes in float32 again."""
    from medseg.models import with_weights_dtype

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MODEL_FILE
    with atomic_output(target) as tmp:
        with_weights_dtype(_without_optimizer(model), weights_dtype).save(tmp)
        record = {
            "format_version": FORMAT_VERSION,
            **metadata,
            "weights_dtype": weights_dtype,
            "versions": versions(),
            "model_sha256": sha256(tmp),
        }
        text = json.dumps(record, indent=2) + "\n"
        atomic_write_text(folder / PENDING_FILE, text)  # then the model is renamed
    os.replace(folder / PENDING_FILE, folder / METADATA_FILE)
    return folder


def _without_optimizer(model):
    """The model without its training state, so a bundle holds the weights alone
    (checkpoints keep the optimizer for resuming)."""
    if getattr(model, "optimizer", None) is None:
        return model
    copy = type(model).from_config(model.get_config())  # built, not compiled
    copy.set_weights(model.get_weights())
    return copy


def _pending_metadata(folder: Path, actual_sha: str) -> dict | None:
    """The metadata a killed :func:`write_bundle` left for the model now in place, if
    any; the swap is completed when the folder is writable."""
    path = folder / PENDING_FILE
    try:
        pending = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if pending.get("model_sha256") != actual_sha:
        return None
    try:
        os.replace(path, folder / METADATA_FILE)
    except OSError:
        pass  # a read-only bundle: use the pending record as it is
    return pending


def read_metadata(folder: str | Path) -> dict:
    """Reads and checks a bundle's ``medseg.json``.

    Raises:
        InputFileError: not a bundle, unreadable JSON, or a newer format.
    """
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise InputFileError(folder, f"not a model bundle (no {METADATA_FILE})")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"unreadable bundle metadata ({exc})") from None
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise InputFileError(
            path,
            f"bundle format {metadata.get('format_version')} is "
            f"newer than this medseg reads ({FORMAT_VERSION})",
        )
    return metadata


def verify(folder: str | Path, *, allow_modified: bool = False) -> dict:
    """Metadata of a bundle whose ``model.keras`` matches its recorded sha256.

    Args:
        allow_modified: accept a model file that differs from the recorded sha256
            (with a warning), for users who changed it on purpose. It is still loaded
            in Keras safe mode.

    Raises:
        InputFileError: missing model, or a model file changed since it was bundled.
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise InputFileError(model_path, "model file not found")
    actual = sha256(model_path)
    if actual != metadata.get("model_sha256"):
        pending = _pending_metadata(folder, actual)
        if pending is not None:  # a write stopped between its two renames
            return pending
    if actual != metadata.get("model_sha256"):
        if allow_modified:
            logging.getLogger(__name__).warning(
                "%s: sha256 differs from the one in medseg.json; used anyway "
                "(--allow-modified-model)",
                model_path,
            )
            return metadata
        raise InputFileError(
            model_path,
            "sha256 differs from the one in medseg.json "
            "(modified or corrupted model file; --allow-modified-model uses it anyway)",
        )
    return metadata
