"""The demo: a shipped model on the shipped sample, end to end, offline.

Segments every labelled case of a dataset (by default the 12 hippocampus MRI scans
shipped with medseg) with a bundle (by default the shipped ``hippocampus`` model),
scores them against their labels, and draws the report. Cases the bundle was trained
on are marked, and the means are given separately for the cases it never saw. With
``train=True`` a small U-Net is also trained briefly on the other cases and compared
with the bundle on the same unseen cases.

Everything is written under one folder: ``predictions/``, ``metrics.csv``,
``summary.json``, ``report/`` (overlays and the Dice box plot), and with training
``train_data/``, ``train_run/`` (a bundle), ``train_predictions/`` and
``train_metrics.csv``; ``demo.json`` holds the scores and timings.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError

#: The network trained by ``--train``: small enough for a minute or two on a laptop
#: CPU. Anterior/posterior lie along axis 1 of the RAS scans, so it is not mirrored.
TRAIN_CONFIG = {
    "model": {
        "name": "unet",
        "spatial_dims": 3,
        "filters": [8, 16, 32, 64],
        "norm": "instance",
        "activation": "leaky_relu",
        "patch_size": [40, 56, 40],
    },
    "data": {"normalization": [{"scheme": "zscore"}]},
    "train": {
        "epochs": 6,
        "steps_per_epoch": 20,
        "batch_size": 2,
        "optimizer": "adam",
        "learning_rate": 0.003,
        "loss": "dice_ce",
        "fold": "all",
        "augment": {"mirror_axes": [0, 2]},
    },
}


def sample_dir() -> Path:
    """The sample shipped with medseg: inside the installed package, or ``data/sample``
    of a source checkout (an editable install).

    Raises:
        InputFileError: neither is there.
    """
    package = Path(__file__).parent
    candidates = (package / "sample", package.parent / "data" / "sample")
    for folder in candidates:
        if (folder / "dataset.json").is_file():
            return folder
    raise InputFileError(
        candidates[0],
        "the shipped sample is missing (reinstall medseg, or give --data)",
    )


def mean_dice(rows: list[dict], cases=None) -> dict[int, float]:
    """Label -> mean Dice over ``cases`` (all when None) with a defined Dice."""
    by_label: dict[int, list[float]] = {}
    for row in rows:
        if cases is not None and row["case"] not in cases:
            continue
        by_label.setdefault(row["label"], [])
        if not math.isnan(row["dice"]):
            by_label[row["label"]].append(row["dice"])
    return {
        label: float(np.mean(v)) if v else math.nan
        for label, v in sorted(by_label.items())
    }


def _segment_and_score(bundle, cases, folder: Path, metrics_csv: Path, echo):
    """Segments ``cases`` with ``bundle`` into ``folder`` (named as their label files)
    and scores them; returns the evaluation rows and the file pairs."""
    from medseg.bundle import read_metadata
    from medseg.evaluation.scoring import evaluate_pairs, to_csv
    from medseg.inference.jobs import run as jobs
    from medseg.inference.scan_plan import bundle_mirror_axes
    from medseg.inference.segmenter import Segmenter
    from medseg.io.files import atomic_write_text

    segmenter = Segmenter(bundle, mirror_axes=bundle_mirror_axes(read_metadata(bundle)))
    rename = {case.images[0]: case.label.name for case in cases}
    results = jobs.segment_all(
        segmenter.predict,
        [case.images[0] for case in cases],
        folder,
        overwrite=True,
        rename=rename,
        progress=lambda r: echo(f"  {Path(r.input).name}: {r.status}"),
    )
    failed = [r.error for r in results if r.status == "failed"]
    if failed:
        raise InputFileError(folder, f"{len(failed)} case(s) failed: {failed[0]}")
    pairs = [(case.case_id, folder / case.label.name, case.label) for case in cases]
    rows = evaluate_pairs(pairs)
    atomic_write_text(metrics_csv, to_csv(rows))
    return rows, pairs


def _training_copy(dataset, cases, folder: Path) -> Path:
    """A Decathlon-layout copy of ``cases`` in ``folder`` (a dataset may only name
    files inside itself)."""
    from medseg.io.files import atomic_write_text

    if folder.exists():
        shutil.rmtree(folder)
    entries = []
    for case in cases:
        for sub, source in (("imagesTr", case.images[0]), ("labelsTr", case.label)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / sub / source.name)
        entries.append(
            {
                "image": f"./imagesTr/{case.images[0].name}",
                "label": f"./labelsTr/{case.label.name}",
            }
        )
    manifest = {
        "name": f"{dataset.name or 'demo'} (demo training cases)",
        "labels": {str(k): v for k, v in (dataset.labels or {}).items()},
        "modality": {
            str(i): name for i, name in enumerate(dataset.channel_names or ("image",))
        },
        "training": entries,
    }
    atomic_write_text(folder / "dataset.json", json.dumps(manifest, indent=1) + "\n")
    return folder


def held_out_cases(case_ids: list[str], seen: set[str]) -> list[str]:
    """The cases to compare on: those the bundle never saw, as long as at least two
    others are left to train on; otherwise every fourth case."""
    unseen = [c for c in case_ids if c not in seen]
    if unseen and len(case_ids) - len(unseen) >= 2:
        return unseen
    return case_ids[::4]


def run_demo(
    output: str | Path,
    *,
    model: str | Path = "hippocampus",
    data: str | Path | None = None,
    train: bool = False,
    train_epochs: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Runs the demo into ``output`` and returns what ``demo.json`` holds.

    Raises:
        InputFileError: no such bundle or dataset, a dataset without labelled
            single-file cases, or a case that could not be segmented.
    """
    from medseg.bundle import read_metadata, resolve
    from medseg.datasets.layouts import load_dataset
    from medseg.evaluation.scoring import summarize
    from medseg.figures import write_report
    from medseg.inference.jobs import outputs as job_outputs
    from medseg.io.files import atomic_write_text, json_text

    started = time.perf_counter()
    output = job_outputs.make_output_dir(Path(output))
    data = Path(data) if data is not None else sample_dir()
    dataset = load_dataset(data)
    cases = [c for c in dataset.cases if c.label is not None and len(c.images) == 1]
    if not cases:
        raise InputFileError(data, "no labelled single-file cases to run the demo on")
    bundle = resolve(model)
    metadata = read_metadata(bundle)
    seen = set((metadata.get("split") or {}).get("train") or ())
    ids = [c.case_id for c in cases]
    unseen = [c for c in ids if c not in seen]
    echo(
        f"segmenting {len(cases)} case(s) of {data} with {bundle} "
        f"({len(ids) - len(unseen)} of them were in its training data)"
    )
    timings = {}
    t = time.perf_counter()
    rows, pairs = _segment_and_score(
        bundle, cases, output / "predictions", output / "metrics.csv", echo
    )
    timings["segment_and_score_s"] = round(time.perf_counter() - t, 2)
    summary = summarize(rows)
    atomic_write_text(
        output / "summary.json",
        json_text({"cases": len(cases), "labels": summary}),
    )
    t = time.perf_counter()
    names = {label.value: label.name for label in metadata.labels}
    pictures = write_report(
        output / "report",
        rows,
        pairs,
        {c.case_id: c.images[0] for c in cases},
        names,
    )
    timings["report_s"] = round(time.perf_counter() - t, 2)
    result = {
        "model": str(bundle),
        "data": str(data),
        "cases": ids,
        "seen_in_training": [c for c in ids if c in seen],
        "labels": {str(k): names.get(k, str(k)) for k in mean_dice(rows)},
        "dice_all": _keyed(mean_dice(rows)),
        "dice_unseen": _keyed(mean_dice(rows, set(unseen))) if unseen else None,
        "pictures": [str(p) for p in pictures],
    }
    echo("")
    echo(dice_table(rows, ids, seen, names))
    if train:
        result["train"] = _train_and_compare(
            dataset, cases, seen, output, rows, names, train_epochs, echo
        )
        timings.update(result["train"].pop("timings"))
    timings["total_s"] = round(time.perf_counter() - started, 2)
    result["timings"] = timings
    atomic_write_text(output / "demo.json", json_text(result))
    return result


def _keyed(dice: dict[int, float]) -> dict[str, float]:
    return {str(k): round(v, 4) for k, v in dice.items()}


def dice_table(rows, ids, seen, names) -> str:
    """Per case Dice per label, cases seen in training marked, and the means."""
    labels = sorted({r["label"] for r in rows})
    dice = {(r["case"], r["label"]): r["dice"] for r in rows}
    header = f"{'case':<30}" + "".join(
        f"{names.get(k, str(k))[:12]:>13}" for k in labels
    )
    lines = [header]
    for case in ids:
        mark = " (trained on)" if case in seen else ""
        lines.append(
            f"{case + mark:<30}"
            + "".join(f"{dice.get((case, k), math.nan):>13.3f}" for k in labels)
        )
    unseen = {c for c in ids if c not in seen}
    groups = [("mean, all cases", None)]
    if unseen and len(unseen) < len(ids):
        groups.append((f"mean, {len(unseen)} unseen", unseen))
    for title, group in groups:
        means = mean_dice(rows, group)
        lines.append(f"{title:<30}" + "".join(f"{means[k]:>13.3f}" for k in labels))
    return "Dice per case and label\n" + "\n".join(lines)


def _train_and_compare(dataset, cases, seen, output, rows, names, epochs, echo):
    """Trains TRAIN_CONFIG on the cases not held out and scores both models on the
    held-out ones."""
    from medseg.config import Config
    from medseg.training.trainer import train as run_training

    ids = [c.case_id for c in cases]
    held_out = set(held_out_cases(ids, seen))
    training = [c for c in cases if c.case_id not in held_out]
    compare = [c for c in cases if c.case_id in held_out]
    timings = {}
    config = Config.from_dict(TRAIN_CONFIG)
    data = _training_copy(dataset, training, output / "train_data")
    train = {"epochs": epochs} if epochs else {}
    config = config.replace(
        data=replace(config.data, dataset=str(data)),
        train=replace(config.train, **train),
    )
    run = output / "train_run"
    if run.exists():
        shutil.rmtree(run)
    echo(
        f"\ntraining a small U-Net on {len(training)} case(s) for "
        f"{config.train.epochs} epoch(s) of {config.train.steps_per_epoch} steps"
    )
    t = time.perf_counter()
    run_training(config, run, verbose=2)
    timings["train_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    trained_rows, _ = _segment_and_score(
        run, compare, output / "train_predictions", output / "train_metrics.csv", echo
    )
    timings["train_segment_and_score_s"] = round(time.perf_counter() - t, 2)
    ours = mean_dice(trained_rows)
    theirs = mean_dice(rows, held_out)
    labels = sorted(theirs)
    fair = not held_out & set(seen)
    echo(
        f"\nDice on the {len(compare)} case(s) "
        + ("neither model trained on" if fair else "held out from the new training")
    )
    echo(f"{'model':<24}" + "".join(f"{names.get(k, str(k))[:12]:>13}" for k in labels))
    echo(f"{'shipped':<24}" + "".join(f"{theirs[k]:>13.3f}" for k in labels))
    echo(
        f"{'trained just now':<24}"
        + "".join(f"{ours.get(k, math.nan):>13.3f}" for k in labels)
    )
    return {
        "run": str(run),
        "trained_on": [c.case_id for c in training],
        "compared_on": sorted(held_out),
        "compared_on_unseen_by_both": fair,
        "epochs": config.train.epochs,
        "dice_trained": _keyed(ours),
        "dice_model": _keyed(theirs),
        "timings": timings,
    }
