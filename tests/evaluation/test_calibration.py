"""Calibration: reliability counts, the ECE, temperature scaling, and ``medseg
evaluate --probabilities``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from medseg.errors import InputFileError
from medseg.evaluation.calibration import (
    Reliability,
    case_reliability,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from medseg.inference.segmenter import write_probabilities
from medseg_cli.main import main
from tests import reference
from tests.conftest import save_nifti


def _case(rng, shape=(6, 7, 5), classes=3, sharpness=2.0):
    """Probabilities of a network that is right more often than chance, and its
    truth (class indices)."""
    truth = rng.integers(0, classes, shape)
    logits = rng.normal(size=(*shape, classes))
    logits[..., 0] += 1.0  # background is commoner
    logits += sharpness * np.eye(classes)[truth] * rng.random(shape)[..., None]
    return softmax(logits), truth


def test_the_ece_is_the_voxel_by_voxel_one_per_class_and_of_the_top_class(rng):
    p, truth = _case(rng)
    again, truth_again = _case(rng, shape=(4, 4, 4))
    counts = Reliability.of(p, truth, bins=10)
    counts += Reliability.of(again, truth_again, bins=10)
    flat = np.concatenate([p.reshape(-1, 3), again.reshape(-1, 3)])
    labels = np.concatenate([truth.reshape(-1), truth_again.reshape(-1)])
    for k in range(3):
        expected = reference.expected_calibration_error(flat[:, k], labels == k, 10)
        assert counts.ece(k) == pytest.approx(expected, abs=1e-6)
    expected_top = reference.expected_calibration_error(
        flat.max(1), flat.argmax(1) == labels, 10
    )
    assert counts.ece() == pytest.approx(expected_top, abs=1e-6)
    assert counts.voxels == len(labels) and counts.count[0].sum() == len(labels)
    mean, frequency, n = counts.curve()
    assert n.sum() == len(labels) and np.all((mean >= 0) & (mean <= 1))
    assert np.all((frequency >= 0) & (frequency <= 1))


def test_probabilities_that_are_frequencies_have_no_calibration_error():
    # two bins' worth of voxels: p = 0.25 right a quarter of the time, p = 0.75
    # right three quarters of it
    p1 = np.array([0.25] * 8 + [0.75] * 8)
    probabilities = np.stack([1 - p1, p1], -1)
    truth = np.array([1, 0, 0, 0] * 2 + [1, 1, 1, 0] * 2)
    counts = Reliability.of(probabilities, truth, bins=4)
    assert counts.ece(1) == pytest.approx(0.0, abs=1e-7)
    assert counts.ece(0) == pytest.approx(0.0, abs=1e-7)
    # the same probabilities, always right: the class-1 bins are 0.25 and 0.75 short
    always = np.array([1] * 8 + [1] * 8)
    assert Reliability.of(probabilities, always, bins=4).ece(1) == pytest.approx(0.5)


def test_the_fitted_temperature_is_the_likeliest_and_undoes_overconfidence(rng):
    # truth drawn from softmax(z); the network says 3 z: the fitted temperature
    # is about 3, the reference's grid search agrees on a small sample
    z = rng.normal(size=(20000, 3)) * 1.5
    truth = np.array([rng.choice(3, p=q) for q in softmax(z)])
    temperature = fit_temperature(3 * z, truth)
    assert temperature == pytest.approx(3.0, rel=0.08)
    small_z, small_truth = 3 * z[:300], truth[:300]
    grid = np.round(np.arange(1.0, 6.0, 0.01), 2)
    best = reference.temperature_by_grid(small_z.tolist(), small_truth.tolist(), grid)
    assert fit_temperature(small_z, small_truth) == pytest.approx(best, abs=0.011)
    before = negative_log_likelihood(3 * z, truth)
    after = negative_log_likelihood(3 * z, truth, temperature)
    assert after < before
    # the labels do not change
    assert np.array_equal(
        softmax(3 * z).argmax(1), softmax(3 * z, temperature).argmax(1)
    )


def _write_case(folder, case, p, truth, values=(0, 1, 2)):
    save_nifti(
        folder / "truth" / f"{case}.nii.gz", np.asarray(values)[truth].astype(np.uint8)
    )
    save_nifti(
        folder / "pred" / f"{case}.nii.gz",
        np.asarray(values)[p.argmax(-1)].astype(np.uint8),
    )
    write_probabilities(
        folder / "pred" / f"{case}_probabilities.npz",
        p.astype(np.float16),
        np.eye(4),
        list(values),
        ["background", "anterior", "posterior"],
    )


def test_evaluate_reports_the_calibration_of_probability_files(tmp_path, rng):
    cases = {f"case_{i}": _case(rng) for i in range(3)}
    for case, (p, truth) in cases.items():
        _write_case(tmp_path, case, p, truth)
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(
        main,
        ["evaluate", "--prediction", str(tmp_path / "pred"), "--truth",
         str(tmp_path / "truth"), "--probabilities", str(tmp_path / "pred"),
         "--bins", "10", "--summary", str(summary), "--report",
         str(tmp_path / "report")],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # as stored: float16
    flat = np.concatenate(
        [
            p.astype(np.float16).astype(np.float32).reshape(-1, 3)
            for p, _ in cases.values()
        ]
    )
    labels = np.concatenate([t.reshape(-1) for _, t in cases.values()])
    record = json.loads(summary.read_text())["calibration"]
    expected = reference.expected_calibration_error(
        flat.max(1), flat.argmax(1) == labels, 10
    )
    assert record["ece"] == pytest.approx(expected, abs=1e-5)
    assert record["ece_per_label"]["posterior"] == pytest.approx(
        reference.expected_calibration_error(flat[:, 2], labels == 2, 10), abs=1e-5
    )
    assert record["voxels"] == len(labels) and record["cases"] == 3
    assert sorted(record["ece_per_case"]) == sorted(cases)
    assert f"ECE (top class) {record['ece']:.4f}" in result.output
    assert (tmp_path / "report" / "reliability.png").stat().st_size > 10_000


def test_a_case_without_usable_probabilities_fails_alone(tmp_path, rng):
    for i in range(3):
        _write_case(tmp_path, f"case_{i}", *_case(rng))
    (tmp_path / "pred" / "case_1_probabilities.npz").unlink()
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(
        main,
        ["evaluate", "--prediction", str(tmp_path / "pred"), "--truth",
         str(tmp_path / "truth"), "--probabilities", str(tmp_path / "pred"),
         "--summary", str(summary)],
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        "case_1_probabilities.npz: no probability file for this case" in result.output
    )
    record = json.loads(summary.read_text())
    assert record["calibration"]["cases"] == 2 and record["cases"] == 3
    assert list(record["failed"]) == ["case_1"]


def test_a_probability_file_on_another_grid_or_without_a_truth_class_is_named(
    tmp_path, rng
):
    p, truth = _case(rng)
    _write_case(tmp_path, "a", p, truth)
    other = save_nifti(tmp_path / "other.nii.gz", np.zeros((3, 3, 3), np.uint8))
    probabilities = tmp_path / "pred" / "a_probabilities.npz"
    with pytest.raises(
        InputFileError, match="a_probabilities.npz: probabilities on a grid"
    ):
        case_reliability(probabilities, other)
    unknown = save_nifti(tmp_path / "unknown.nii.gz", np.full(truth.shape, 7, np.uint8))
    with pytest.raises(
        InputFileError, match=r"label values \[7\] that the probabilities"
    ):
        case_reliability(probabilities, unknown)
