"""The output folder's record of the settings its label maps were made with: a run with
other settings is refused before it would skip outputs made otherwise."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from medseg.errors import InputFileError
from medseg.inference.jobs.outputs import (
    Beside,
    _same_file,
    check_outside_series,
    check_unique_outputs,
    is_done,
    label_files,
    output_for,
)
from medseg.io.files import atomic_write_text, hidden_sibling

logger = logging.getLogger(__name__)


SETTINGS_FILE = "medseg_predict_settings.json"


# what makes one label map differ from another of the same scan
COMPARED_SETTINGS = (
    "model_sha256",
    "preprocessing",
    "label_values",
    "patch_size",
    "tta",
    "overlap",
    "keep_largest",
    "min_size_mm3",
    "precision",
)


def check_settings(
    output_dir: Path,
    settings: dict,
    *,
    skipping: int,
    overwrite: bool,
    others: int = 0,
) -> None:
    """Records in ``output_dir`` the settings its label maps are made with, and refuses
    to add to outputs made with others, so a re-run cannot keep another model's labels.

    Args:
        output_dir: the output folder (exists).
        settings: JSON-ready; the keys of :data:`COMPARED_SETTINGS` are compared with
            the folder's record, the others (the bundle's path, say) only recorded.
        skipping: how many of this run's outputs exist and would be skipped.
        overwrite: this run redoes its outputs; its settings become the record.
        others: label files in the folder that this run does not write
            (:func:`label_files`). An ``overwrite`` run with other settings keeps
            them as they are, so the record then counts them (:data:`KEPT`), and no
            later run may skip outputs there until an ``overwrite`` run covers them.

    Raises:
        InputFileError: without ``overwrite``, the record differs, cannot be read, or
            is missing or counts kept label maps while outputs would be skipped.
    """
    record = Path(output_dir) / SETTINGS_FILE
    redo = _REDO
    if overwrite:
        kept = 0
        if others:
            try:
                recorded = _read_record(record)
            except InputFileError:
                recorded = None
            if recorded is None or _changes(recorded, settings) or recorded.get(KEPT):
                kept = others
        atomic_write_text(record, _record_text(settings, kept))
        return
    if not record.exists():
        if skipping:
            raise InputFileError(
                output_dir,
                f"{skipping} of this run's outputs exist, but no {SETTINGS_FILE} "
                f"says which model made them; {redo}",
            )
        if _create_once(record, _record_text(settings)):
            return
        # another job (a shard of the same batch) wrote it first: compare with theirs
    recorded = _read_record(record)
    changed = _changes(recorded, settings)
    if changed:
        raise InputFileError(
            record,
            "the label maps here were made with other settings "
            f"({'; '.join(changed)}); {redo}",
        )
    kept = recorded.get(KEPT, 0)
    if kept and skipping:
        raise InputFileError(
            record,
            f"{kept} label maps here were made with earlier settings and kept by a run "
            "with --overwrite that redid only its own scans, so existing outputs "
            f"cannot be told apart; {redo}",
        )
    text = _record_text(settings, kept)
    if json.loads(text) != recorded:  # the same label maps; the bundle moved, say
        atomic_write_text(record, text)


def check_folder(
    inputs: list[Path],
    output_dir: Path,
    settings: dict,
    *,
    overwrite: bool = False,
    rename: dict | None = None,
    beside: Beside = Beside(),
) -> None:
    """:func:`check_settings` for a run that writes ``inputs``' outputs (named as
    :func:`segment_all` names them) into ``output_dir``.

    Raises:
        InputFileError: an output would be written over one of the inputs (the output
            folder is the input folder, or an output file is the input file), even
            with ``overwrite``; the output folder is in a DICOM series folder given
            as input; two inputs would have one output (scans of one name in two
            folders); or see :func:`check_settings`.
    """
    check_unique_outputs(inputs, output_dir, rename)
    clashes = [
        path
        for path in inputs
        if _same_file(output_for(path, output_dir, rename), path)
    ]
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise InputFileError(
            output_for(clashes[0], output_dir, rename),
            f"an input scan, which its label map would be written over{more}; "
            "choose another output folder or file name",
        )
    check_outside_series(inputs, output_dir)
    targets = {output_for(path, output_dir, rename) for path in inputs}
    check_settings(
        output_dir,
        settings,
        skipping=0 if overwrite else sum(is_done(t, beside) for t in targets),
        overwrite=overwrite,
        others=len(set(label_files(output_dir)) - targets),
    )


#: key of the record: label maps left from other settings by an ``overwrite`` run
KEPT = "label_maps_kept_from_other_settings"


_REDO = "--overwrite redoes this run's scans, or choose another output folder"


def _read_record(record: Path) -> dict | None:
    if not record.exists():
        return None
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise InputFileError(record, f"unreadable record ({exc}); {_REDO}") from None
    return recorded


def _changes(recorded: dict, settings: dict) -> list[str]:
    was, now = recorded.get, settings.get
    return [
        f"{key} {json.dumps(was(key))}, now {json.dumps(now(key))}"
        for key in COMPARED_SETTINGS
        if was(key) != now(key)
    ]


def _record_text(settings: dict, kept: int = 0) -> str:
    record = {k: v for k, v in settings.items() if k != KEPT}
    return json.dumps({**record, **({KEPT: kept} if kept else {})}, indent=2) + "\n"


def _create_once(path: Path, text: str) -> bool:
    """Writes ``path`` complete, only if no other process has created it: the text goes
    to a temporary file that is then hard-linked to ``path`` (atomic, and refused when
    ``path`` exists). False when it exists. Where hard links are not supported, a plain
    atomic write."""
    tmp = hidden_sibling(path, f".{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            os.replace(tmp, path)
        return True
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
