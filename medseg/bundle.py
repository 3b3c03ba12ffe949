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

import copy
import hashlib
import json
import logging
import math
import os
import platform
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.errors import InputFileError
from medseg.io.files import atomic_output, atomic_write_text, json_text, without_nan

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "medseg.json"
PENDING_FILE = ".medseg.json.next"
#: Bundles shipped inside the package, addressable by folder name.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


TASKS = ("segmentation", "classification", "reconstruction")


def window_of(patch_size, slice_axis: int | None) -> tuple[int, ...]:
    """The window a patch makes over a scan: ``patch_size`` with a 1 inserted at
    ``slice_axis`` (a 2D network on volumes; unchanged for ``None``)."""
    patch = [int(p) for p in patch_size]
    if slice_axis is not None:
        patch.insert(slice_axis, 1)
    return tuple(patch)


@dataclass(frozen=True)
class Label:
    """One class of a bundle: the value it has in label maps, and its name."""

    value: int
    name: str


class BundleMetadata(Mapping):
    """A bundle's ``medseg.json``, validated, with typed fields.

    Read with :meth:`from_json` (or :func:`read_metadata`). Every field prediction
    needs is checked when it is read, and a problem is one line naming the file, the
    field and what is wrong with it. The record stays readable as the mapping it was
    written as (``metadata["fingerprint"]``), so the fields it holds for the record
    only (fingerprint, config, split, validation, versions, ...) keep their JSON form.

    Attributes:
        task: ``"segmentation"``, ``"classification"`` or ``"reconstruction"``.
        labels: the classes in the network's output order (none for
            reconstruction).
        in_channels: the channels a scan must have.
        channel_names: their names, where the dataset gave them.
        spatial_dims: 2 or 3.
        patch_size: the training patch (the window of sliding-window prediction).
        slice_axis: for a 2D network on volumes, the axis it slices across.
        preprocessing: the recorded preprocessing, as JSON holds it.
        preprocessor: the :class:`~medseg.preprocessing.Preprocessor` it describes.
        model_sha256: the sha256 of ``model.keras``.
        format_version: the bundle format.
        temperature: the softmax temperature of its probabilities (``train.calibrate``
            fits it on the validation cases); 1 when none was fitted.
    """

    def __init__(self, record: Mapping[str, Any], source: str | Path = METADATA_FILE):
        self.source = Path(source)
        if not isinstance(record, Mapping):
            kind = "a list" if isinstance(record, list) else type(record).__name__
            self._fail(None, f"{kind}, not a JSON object")
        self._record = dict(record)
        self.format_version = self._int("format_version", default=1, least=0)
        if self.format_version > FORMAT_VERSION:
            self._fail(
                None,
                f"bundle format {self.format_version} is newer than this medseg "
                f"reads ({FORMAT_VERSION})",
            )
        self.task = self._field("task", str)
        if self.task not in TASKS:
            self._fail("task", f"{self.task!r} is not one of {', '.join(TASKS)}")
        self.spatial_dims = self._int("spatial_dims")
        if self.spatial_dims not in (2, 3):
            self._fail("spatial_dims", f"{self.spatial_dims}, not 2 or 3")
        self.in_channels = self._int("in_channels", least=1)
        self.patch_size = self._patch_size()
        self.slice_axis = self._slice_axis()
        self.labels = self._labels()
        self.channel_names = tuple(
            str(name) for name in self._field("channel_names", list, default=[])
        )
        self.preprocessing = self._field("preprocessing", dict)
        self.preprocessor = self._preprocessor()
        sha = self._field("model_sha256", str, default=None)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            self._fail("model_sha256", f"{sha!r} is not a sha256 in hexadecimal")
        self.model_sha256 = sha
        self.temperature = self._temperature()

    @classmethod
    def from_json(cls, path: str | Path) -> BundleMetadata:
        """The metadata in the JSON file ``path``.

        Raises:
            InputFileError: naming ``path``: unreadable, not JSON, or a field missing
                or of the wrong type or value.
        """
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputFileError(path, f"unreadable bundle metadata ({exc})") from None
        return cls(record, path)

    def to_dict(self) -> dict:
        """The record as JSON holds it (a copy)."""
        return copy.deepcopy(self._record)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(label.value for label in self.labels)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def window(self) -> tuple[int, ...]:
        """The patch as a window over the preprocessed scan (one voxel deep across
        ``slice_axis`` for a 2D network on volumes)."""
        return window_of(self.patch_size, self.slice_axis)

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The axes training mirrored along, and so test-time mirroring does."""
        augment = (self._record.get("config") or {}).get("train", {}).get("augment", {})
        return tuple(augment.get("mirror_axes") or ())

    # the mapping of the JSON record
    def __getitem__(self, key: str) -> Any:
        return self._record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record)

    def __len__(self) -> int:
        return len(self._record)

    def __repr__(self) -> str:
        return (
            f"BundleMetadata({self.task}, {self.spatial_dims}D, "
            f"{self.in_channels} channel(s), labels {list(self.label_names)}, "
            f"patch {list(self.patch_size)})"
        )

    # checks, each naming the field
    def _fail(self, field: str | None, problem: str):
        where = f"{field}: " if field else ""
        raise InputFileError(self.source, f"{where}{problem}")

    _MISSING = object()

    def _field(self, name: str, kind: type, default: Any = _MISSING) -> Any:
        if name not in self._record or self._record[name] is None:
            if default is self._MISSING:
                self._fail(name, "missing")
            return default
        value = self._record[name]
        if not isinstance(value, kind) or (
            kind is not bool and isinstance(value, bool)
        ):
            self._fail(name, f"{value!r} is not {_KIND_NAMES.get(kind, kind.__name__)}")
        return value

    def _int(self, name: str, *, default: Any = _MISSING, least: int | None = None):
        value = self._field(name, int, default)
        if least is not None and value < least:
            self._fail(name, f"{value}, less than {least}")
        return value

    def _temperature(self) -> float:
        calibration = self._field("calibration", dict, default={})
        value = calibration.get("temperature", 1.0)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            self._fail("calibration.temperature", f"{value!r} is not a positive number")
        return float(value)

    def _patch_size(self) -> tuple[int, ...]:
        patch = self._field("patch_size", list)
        whole = all(isinstance(n, int) and not isinstance(n, bool) for n in patch)
        if len(patch) != self.spatial_dims or not whole or min(patch) < 1:
            self._fail(
                "patch_size",
                f"{patch!r} is not {self.spatial_dims} positive whole numbers",
            )
        return tuple(patch)

    def _slice_axis(self) -> int | None:
        plan = self._field("plan", dict, default={})
        axis = plan.get("slice_axis")
        if axis is None:
            return None
        if isinstance(axis, bool) or axis not in (0, 1, 2):
            self._fail("plan.slice_axis", f"{axis!r} is not 0, 1 or 2")
        return axis

    def _preprocessor(self):
        from medseg.preprocessing.preprocessor import Preprocessor

        try:
            return Preprocessor.from_dict(self.preprocessing)
        except InputFileError as exc:
            self._fail("preprocessing", exc.problem)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problem = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            self._fail("preprocessing", f"cannot be read ({problem})")

    def _labels(self) -> tuple[Label, ...]:
        if self.task == "reconstruction" and self._record.get("labels") is None:
            return ()
        labels = self._field("labels", dict)
        if not labels:
            self._fail("labels", "empty")
        found = []
        for k in range(len(labels)):
            entry = labels.get(str(k))
            if entry is None:
                self._fail("labels", f"no class {k} (classes are numbered from 0)")
            if isinstance(entry, str):  # a name alone: its class number is its value
                entry = {"value": k, "name": entry}
            if not isinstance(entry, dict):
                self._fail(f"labels.{k}", f"{entry!r} is not an object")
            value = entry.get("value")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self._fail(f"labels.{k}.value", f"{value!r} is not a whole number >= 0")
            found.append(Label(value, str(entry.get("name", value))))
        seen: dict[int, str] = {}
        for label in found:
            if label.value in seen:
                self._fail(
                    "labels",
                    f"value {label.value} given twice ({seen[label.value]}, "
                    f"{label.name}): their classes would merge",
                )
            seen[label.value] = label.name
        return tuple(found)


_KIND_NAMES = {
    int: "a whole number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


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


#: the key of ``medseg.json``'s checksum over the rest of its content
METADATA_CHECKSUM = "metadata_sha256"


def metadata_checksum(record: Mapping[str, Any]) -> str:
    """The sha256 of a ``medseg.json`` record's content (its checksum key left out),
    written canonically (sorted keys, no spaces), so formatting does not count."""
    content = {k: v for k, v in record.items() if k != METADATA_CHECKSUM}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        record = without_nan(
            {
                "format_version": FORMAT_VERSION,
                **metadata,
                "weights_dtype": weights_dtype,
                "versions": versions(),
                "model_sha256": sha256(tmp),
            }
        )  # a validation score of NaN (no case with the label) is null
        record[METADATA_CHECKSUM] = metadata_checksum(record)
        text = json_text(record)
        atomic_write_text(folder / PENDING_FILE, text)  # then the model is renamed
    os.replace(folder / PENDING_FILE, folder / METADATA_FILE)
    return folder


def write_metadata(folder: str | Path, record: Mapping[str, Any]) -> None:
    """Writes ``record`` as the ``medseg.json`` of the bundle in ``folder`` (an
    edited record of a bundle), with its checksum made anew."""
    record = dict(record)
    record[METADATA_CHECKSUM] = metadata_checksum(record)
    atomic_write_text(Path(folder) / METADATA_FILE, json_text(record))


def _without_optimizer(model):
    """The model without its training state, so a bundle holds the weights alone
    (checkpoints keep the optimizer for resuming)."""
    if getattr(model, "optimizer", None) is None:
        return model
    copy = type(model).from_config(model.get_config())  # built, not compiled
    copy.set_weights(model.get_weights())
    return copy


def _pending_metadata(folder: Path, actual_sha: str) -> BundleMetadata | None:
    """The metadata a killed :func:`write_bundle` left for the model now in place, if
    any; the swap is completed when the folder is writable."""
    path = folder / PENDING_FILE
    try:
        pending = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(pending, dict) or pending.get("model_sha256") != actual_sha:
        return None
    pending = BundleMetadata(pending, path)
    try:
        os.replace(path, folder / METADATA_FILE)
    except OSError:
        pass  # a read-only bundle: use the pending record as it is
    return pending


def read_metadata(folder: str | Path) -> BundleMetadata:
    """Reads and validates a bundle's ``medseg.json`` (:class:`BundleMetadata`).

    Raises:
        InputFileError: not a bundle, unreadable JSON, a newer format, or a field
            missing or mistyped (named).
    """
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise InputFileError(folder, f"not a model bundle (no {METADATA_FILE})")
    return BundleMetadata.from_json(path)


def verify(folder: str | Path, *, allow_modified: bool = False) -> BundleMetadata:
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
    kept = metadata.get(METADATA_CHECKSUM)
    if kept is not None and kept != metadata_checksum(metadata.to_dict()):
        if not allow_modified:
            raise InputFileError(
                folder / METADATA_FILE,
                "edited since the bundle was written (its content no longer matches "
                f"its {METADATA_CHECKSUM}; --allow-modified-model uses it anyway)",
            )
        logging.getLogger(__name__).warning(
            "%s: edited since the bundle was written; used anyway "
            "(--allow-modified-model)",
            folder / METADATA_FILE,
        )
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
