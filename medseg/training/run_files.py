"""The files of a run folder: history.csv, progress.png, the checkpoint, resuming.

Checkpoints are written to a temporary folder and swapped in whole; history rows past
the checkpoint are dropped on resume, so a run killed at any moment continues after its
last completed epoch with exactly the requested epochs in history.csv.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

from medseg.config import Config, format_duration
from medseg.errors import InputFileError, some_of
from medseg.io.files import atomic_output

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
#: the checkpoint's record of what the run was planned on, checked on resume
PLANNED_FILE = "planned.json"
#: ... its bundle metadata's keys: the cases of each part, the plan, preprocessing
PLANNED = ("split", "plan", "preprocessing", "dataset")


def append_history(path: Path, epoch: int, logs: dict) -> None:
    columns = [
        "epoch",
        *sorted(k for k in logs if k not in ("lr", "seconds", "elapsed")),
        "lr",
        "seconds",
        "elapsed",
    ]
    exists = path.is_file()
    if exists:
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), columns)
        columns = header + [c for c in columns if c not in header]
        if columns != header:  # a new metric (e.g. the first validation): rewrite
            rows = read_history(path)
            write_history(path, columns, rows)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        if not exists:
            writer.writeheader()
        writer.writerow({"epoch": epoch, **logs})


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_history(path: Path, columns: list[str], rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_progress(folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(folder / "history.csv")
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [float(r["loss"]) for r in rows], label="training loss")
    left.set_xlabel("epoch")
    left.legend()
    scored = ("dice", "accuracy", "auc", "mse")
    for key in sorted(k for k in rows[0] if any(word in k for word in scored)):
        points = [
            (e, float(r[key]))
            for e, r in zip(epochs, rows, strict=True)
            if r.get(key) not in ("", None, "nan")
        ]
        if points:
            right.plot(*zip(*points, strict=True), marker=".", label=key)
    right.set_xlabel("epoch")
    right.set_ylabel("metric")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize="small")
    figure.tight_layout()
    with atomic_output(folder / "progress.png") as tmp:
        figure.savefig(tmp, dpi=80)
    plt.close(figure)


def save_checkpoint(
    folder: Path,
    model,
    epoch: int,
    best: float | None,
    metadata: dict | None = None,
    *,
    seconds: float = 0.0,
) -> None:
    """Saves weights, optimizer state, epoch and the seconds the run has spent, and
    what the run was planned on (the :data:`PLANNED` keys of its bundle
    ``metadata``, for :func:`check_resumable`); the new copy replaces the old
    whole."""
    target = folder / CHECKPOINT
    tmp = folder / f".{CHECKPOINT}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_weights(tmp / "model.weights.h5")
    variables = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    with open(tmp / "optimizer.npz", "wb") as handle:
        np.savez(handle, *variables)
    seeds = [keras.ops.convert_to_numpy(v) for v in _seed_states(model)]
    with open(tmp / "seeds.npz", "wb") as handle:  # dropout's random state
        np.savez(handle, *seeds)
    if metadata is not None:
        (tmp / PLANNED_FILE).write_text(json.dumps(_planned(metadata), sort_keys=True))
    (tmp / "state.json").write_text(
        json.dumps({"epoch": epoch, "best": best, "seconds": round(seconds, 3)})
    )
    old = folder / f".{CHECKPOINT}.old"
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def _seed_states(model) -> list:
    """The random-number state of layers such as dropout, which Keras' weight files
    leave out."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def check_resumable(folder: Path, metadata: dict) -> None:
    """Refuses to resume a run whose dataset has changed since its checkpoint: its
    cases (a fold would train and validate on others: cases seen in validation would
    be trained on), or its scans (planned or normalised otherwise), from the bundle
    ``metadata`` the run would have now. A checkpoint without the record (an older
    medseg's) is not checked.

    Raises:
        InputFileError: what changed, and what to do.
    """
    source = checkpoint_folder(folder)
    if source is None or not (source / PLANNED_FILE).is_file():
        return
    try:
        saved = _planned(json.loads((source / PLANNED_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return  # the checkpoint's weights are whole (swapped in whole); no record

    def text(value) -> str:
        return json.dumps(value, sort_keys=True)

    now = _planned(metadata)
    changed = [k for k in saved if text(saved[k]) != text(now.get(k))]
    if not changed:
        return
    fix = "restore the dataset as it was, or start a new run in another folder"
    if "split" in changed:
        before, after = saved["split"], now.get("split") or {}
        had = set(before.get("train", []) + before.get("validation", []))
        has = set(after.get("train", []) + after.get("validation", []))
        what = "; ".join(
            f"{name} since: {some_of(sorted(cases))}"
            for name, cases in (("added", has - had), ("gone", had - has))
            if cases
        )
        fold = before.get("fold")
        would = (
            f"fold {fold} would train and validate on other cases"
            if fold not in (None, "all")
            else "it would train on other cases"
        )
        raise InputFileError(
            folder,
            "cannot resume: the dataset has changed since this run started"
            + (f" (cases {what})" if what else "")
            + f", so {would}; {fix}",
        )
    raise InputFileError(
        folder,
        "cannot resume: the dataset's scans have changed since this run started "
        f"(its {' and '.join(changed)} would now differ); {fix}",
    )


def _planned(metadata: dict) -> dict:
    """The :data:`PLANNED` keys of bundle metadata; a dataset's path left out (a
    dataset moved elsewhere is the same)."""
    planned = {k: metadata[k] for k in PLANNED if k in metadata}
    if isinstance(planned.get("dataset"), dict):
        planned["dataset"] = {
            k: v for k, v in planned["dataset"].items() if k != "path"
        }
    return planned


def checkpoint_folder(folder: Path) -> Path | None:
    for candidate in (folder / CHECKPOINT, folder / f".{CHECKPOINT}.old"):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def take_chief_checkpoint(chief: Path, scratch: Path) -> None:
    """Puts the chief's checkpoint (or none, where the chief has none) in a worker's
    scratch folder, so that every worker of a resumed run starts from the same epoch
    and weights, however far its own scratch copy had got."""
    import shutil

    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        if (scratch / name).exists():
            shutil.rmtree(scratch / name)
    source = checkpoint_folder(chief)
    if source is not None:
        shutil.copytree(source, scratch / CHECKPOINT)


def checkpoint_epoch(folder: Path) -> int:
    """The epoch the run's checkpoint ends with (0 without one)."""
    source = checkpoint_folder(folder)
    if source is None:
        return 0
    return int(json.loads((source / "state.json").read_text())["epoch"])


def checkpoint_seconds(folder: Path) -> float:
    """The wall-clock seconds the run had spent at its checkpoint (0 without one, or
    from a checkpoint of a medseg that did not record them)."""
    source = checkpoint_folder(folder)
    if source is None:
        return 0.0
    return float(json.loads((source / "state.json").read_text()).get("seconds", 0.0))


def restore_checkpoint(folder: Path, model) -> tuple[int, float | None]:
    source = checkpoint_folder(folder)
    state = json.loads((source / "state.json").read_text())
    # built first, so that the weights file's optimizer entries have variables to go
    # to (else Keras warns that it skips them); optimizer.npz then sets them
    model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(source / "model.weights.h5")
    except ValueError as error:  # Keras names the layers that did not fit
        raise InputFileError(
            source,
            "its weights do not fit the network built from the run's config.yaml "
            "(a run of an earlier medseg version, or an edited config?); train a new "
            f"run, or use the run's bundle as it is ({str(error).splitlines()[0]})",
        ) from None
    with np.load(source / "optimizer.npz", allow_pickle=False) as stored:
        values = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    if len(values) != len(model.optimizer.variables):
        raise InputFileError(source, "optimizer state does not match the model")
    for variable, value in zip(model.optimizer.variables, values, strict=True):
        variable.assign(value)
    if (source / "seeds.npz").is_file():
        with np.load(source / "seeds.npz", allow_pickle=False) as stored:
            seeds = [stored[f"arr_{i}"] for i in range(len(stored.files))]
        states = _seed_states(model)
        if len(seeds) != len(states):
            raise InputFileError(source, "random state does not match the model")
        for variable, value in zip(states, seeds, strict=True):
            variable.assign(value)
    return int(state["epoch"]), state.get("best")


def prepare_run(folder: Path, config: Config, *, resume: bool) -> Config:
    """Checks the run folder and returns the config to use (the saved one on resume,
    with ``config``'s epochs, time budget and, if it asks, calibration).
    ``resume`` in a folder without a checkpoint starts the run from its first epoch
    (with a warning), as a job its scheduler starts again passes it from the start;
    a folder holding a bundle but no checkpoint is refused (nothing to resume, and a
    new run would replace the bundle)."""
    has_run = checkpoint_folder(folder) is not None
    if resume and not has_run:
        if (folder / "medseg.json").is_file():
            raise InputFileError(
                folder,
                "holds a bundle but no checkpoint: nothing to resume, and a new run "
                "would replace the bundle; choose a new output folder",
            )
        logger.warning(
            "%s: no checkpoint to resume from; starting the run from its first epoch",
            folder,
        )
        return config
    if resume:
        from medseg.config import Config as ConfigClass
        from medseg.config import load_yaml

        saved = ConfigClass.from_dict(load_yaml(folder / "config.yaml"))
        if config.train.epochs != saved.train.epochs:
            logger.warning(
                "resuming with %d epochs instead of %d: the learning-rate schedule "
                "continues as if the run had been started with %d",
                config.train.epochs,
                saved.train.epochs,
                config.train.epochs,
            )
        budget = config.train.time_budget or saved.train.time_budget
        if budget != saved.train.time_budget:
            logger.warning(
                "resuming with a time budget of %s instead of %s: the learning rate "
                "continues as if the run had been started with it",
                format_duration(budget),
                format_duration(saved.train.time_budget)
                if saved.train.time_budget
                else "none",
            )
        return saved.replace(
            train=replace(
                saved.train,
                epochs=config.train.epochs,
                time_budget=budget,
                # a finished run can be calibrated afterwards (--resume --calibrate)
                calibrate=config.train.calibrate or saved.train.calibrate,
            )
        )
    if has_run:
        raise InputFileError(
            folder,
            "holds a training run already; pass --resume to "
            "continue it, or choose a new output folder",
        )
    return config


def resume_run(folder: Path, model) -> tuple[int, float | None]:
    """Restores the checkpoint and trims history.csv to the epochs it covers."""
    start_epoch, best = restore_checkpoint(folder, model)
    rows = [
        r
        for r in read_history(folder / "history.csv")
        if int(r["epoch"]) <= start_epoch
    ]
    if rows:
        write_history(folder / "history.csv", list(rows[0]), rows)
    logger.info("resuming after epoch %d", start_epoch)
    return start_epoch, best
