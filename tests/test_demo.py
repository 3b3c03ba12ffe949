from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from medseg.demo import dice_table, held_out_cases, mean_dice, sample_dir
from tests.conftest import SAMPLE
from tests.conftest import run_medseg as medseg
from tests.reference import hard_dice


def test_sample_dir_is_the_shipped_sample_of_a_checkout():
    assert sample_dir().resolve() == SAMPLE.resolve()


def test_held_out_cases_are_the_unseen_ones_when_enough_are_left_to_train():
    ids = [f"c{i}" for i in range(8)]
    assert held_out_cases(ids, {"c0", "c1", "c2", "c3", "c4"}) == ["c5", "c6", "c7"]
    # one seen case left to train on: not enough, every fourth case instead
    assert held_out_cases(ids, {"c0"}) == ["c0", "c4"]
    assert held_out_cases(ids, set()) == ["c0", "c4"]
    assert held_out_cases(ids, set(ids)) == ["c0", "c4"]


def test_mean_dice_skips_undefined_values_and_filters_cases():
    rows = [
        {"case": "a", "label": 1, "dice": 0.5},
        {"case": "b", "label": 1, "dice": math.nan},
        {"case": "c", "label": 1, "dice": 0.9},
        {"case": "a", "label": 2, "dice": math.nan},
    ]
    means = mean_dice(rows)
    assert means[1] == pytest.approx(0.7)
    assert math.isnan(means[2])
    assert mean_dice(rows, {"a", "b"})[1] == pytest.approx(0.5)
    table = dice_table(rows, ["a", "b", "c"], {"c"}, {1: "one", 2: "two"})
    assert "c (trained on)" in table
    assert "mean, 2 unseen" in table  # a and b
    assert table.splitlines()[-1].split()[-2] == "0.500"


@pytest.mark.slow
def test_demo_scores_match_the_reference_and_the_quick_model_is_compared_fairly(
    bundle, tmp_path
):
    out = tmp_path / "demo"
    result = medseg(
        "demo", "--model", bundle, "--output", out, "--train", "--epochs", "1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    trained = set(json.loads((bundle / "medseg.json").read_text())["split"]["train"])
    ids = sorted(p.name.split(".")[0] for p in (SAMPLE / "labelsTr").iterdir())
    assert summary["cases"] == ids
    assert set(summary["seen_in_training"]) == trained & set(ids)
    unseen = [c for c in ids if c not in trained]
    assert unseen  # the tiny bundle holds out a fold

    def reference_dice(folder, cases):
        per_label = {1: [], 2: []}
        for case in cases:
            truth = np.asarray(nib.load(SAMPLE / "labelsTr" / f"{case}.nii.gz").dataobj)
            predicted = nib.load(folder / f"{case}.nii.gz")
            assert np.allclose(
                predicted.affine,
                nib.load(SAMPLE / "labelsTr" / f"{case}.nii.gz").affine,
            )
            for k in per_label:
                d = hard_dice(truth, np.asarray(predicted.dataobj), k)
                if not math.isnan(d):
                    per_label[k].append(d)
        return {str(k): np.mean(v) for k, v in per_label.items()}

    for key, cases in (("dice_all", ids), ("dice_unseen", unseen)):
        expected = reference_dice(out / "predictions", cases)
        for label, value in expected.items():
            assert summary[key][label] == pytest.approx(value, abs=1e-4), key
    with open(out / "metrics.csv") as handle:
        assert {row["case"] for row in csv.DictReader(handle)} == set(ids)
    # the quick model never saw the cases it is compared on, nor did the bundle
    train = summary["train"]
    assert set(train["compared_on"]) == set(unseen)
    assert set(train["trained_on"]) == set(ids) - set(unseen)
    assert train["compared_on_unseen_by_both"] is True
    assert set(
        json.loads((out / "train_run" / "medseg.json").read_text())["split"]["train"]
    ) == set(train["trained_on"])
    expected = reference_dice(out / "train_predictions", unseen)
    for label, value in expected.items():
        assert train["dice_trained"][label] == pytest.approx(value, abs=1e-4)
        assert train["dice_model"][label] == summary["dice_unseen"][label]
    for picture in summary["pictures"]:
        with open(picture, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(summary["pictures"]) == 4  # box plot, best, median, worst
    assert "neither model trained on" in result.stdout


def test_demo_names_a_missing_model(tmp_path):
    result = medseg("demo", "--model", tmp_path / "nope", "--output", tmp_path / "o")
    assert result.returncode == 2
    assert f"{tmp_path / 'nope'}: no such bundle folder" in result.stderr
    assert "Traceback" not in result.stderr
