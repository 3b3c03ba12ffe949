"""``train.calibrate``: a softmax temperature fitted on the validation cases, kept in
the bundle, used by predict and the serving endpoint."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from medseg import bundle
from medseg.bundle import resolve
from medseg.datasets.layouts import load_dataset
from medseg.inference import Segmenter
from medseg.io import read_volume
from medseg.training import data as training_data
from tests.conftest import SAMPLE
from tests.training.test_training import _history


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _nll(log_p: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    scaled = _log_softmax(log_p / temperature)
    return float(-np.take_along_axis(scaled, truth[:, None], 1).mean())


def _uncalibrated(run, folder):
    """A copy of the bundle in ``run`` without its temperature."""
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoint*"))
    record = json.loads((folder / "medseg.json").read_text())
    del record["calibration"]
    bundle.write_metadata(folder, record)
    return folder


def _finetune(run, *extra):
    import sys

    return [sys.executable, "-m", "medseg_cli", "finetune", "--model", "hippocampus",
            "--data", str(SAMPLE), "--output", str(run), "--epochs", "1",
            "--steps-per-epoch", "2", "--fold", "0", "--calibrate", *extra]  # fmt: skip


@pytest.mark.slow
def test_the_fitted_temperature_is_the_likeliest_and_predict_applies_it(tmp_path):
    # the shipped network, fine-tuned for two steps: probabilities worth calibrating
    run = tmp_path / "run"
    result = subprocess.run(_finetune(run), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = bundle.verify(run)
    record = metadata["calibration"]
    assert record["cases"] == len(metadata["split"]["validation"]) == 3
    assert record["fitted_on"] == "validation cases"
    temperature = metadata.temperature
    assert temperature == record["temperature"] and 0.05 < temperature < 20
    assert f"temperature {temperature:.3f}" in result.stderr
    assert record["nll"]["after"] <= record["nll"]["before"]

    # the validation cases, preprocessed as predict does, through the network
    # without the temperature: its log-probabilities are the logits up to a shift
    plain = Segmenter(_uncalibrated(run, tmp_path / "plain"), precision="float32")
    tempered = Segmenter(run, precision="float32")
    cases = {c.case_id: c for c in load_dataset(SAMPLE).cases}
    log_p, truth = [], []
    for case_id in metadata["split"]["validation"]:
        case = cases[case_id]
        image, _ = plain.preprocessor.image(read_volume(case.images[0]))
        p1 = plain.probabilities(image).astype(np.float64)
        # predict divides the logits by the temperature before the one softmax
        expected = np.exp(_log_softmax(np.log(p1) / temperature))
        np.testing.assert_allclose(tempered.probabilities(image), expected, atol=2e-5)
        prepared = training_data.prepare_case(case, plain.preprocessor, [0, 1, 2], None)
        log_p.append(np.log(np.maximum(p1, 1e-30)).reshape(-1, 3))
        truth.append(prepared.label.reshape(-1).astype(np.int64))
    log_p, truth = np.concatenate(log_p), np.concatenate(truth)
    assert len(truth) == record["voxels"]
    best = _nll(log_p, truth, temperature)
    assert best == pytest.approx(record["nll"]["after"], abs=1e-4)
    assert _nll(log_p, truth, 1.0) == pytest.approx(record["nll"]["before"], abs=1e-4)
    for nearby in (0.97 * temperature, 1.03 * temperature):
        assert _nll(log_p, truth, nearby) >= best - 1e-6

    # killed after the last epoch, before the temperature and the training scans'
    # profile were written: a resume makes them, training nothing more
    rows = _history(run / "history.csv")
    without = metadata.to_dict()
    profile = without.pop("ood")
    del without["calibration"]
    bundle.write_metadata(run, without)
    again = subprocess.run(_finetune(run, "--resume"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _history(run / "history.csv") == rows
    again = bundle.verify(run)
    assert again.temperature == pytest.approx(temperature, abs=1e-3)
    assert again["ood"]["scans"] == profile["scans"] == 9
    assert again["ood"]["features"]["threshold"] == pytest.approx(
        profile["features"]["threshold"], rel=1e-3
    )


@pytest.mark.slow
def test_the_segment_endpoint_applies_the_bundles_temperature(tmp_path):
    from medseg.export import export_bundle

    source = tmp_path / "hippocampus"
    shutil.copytree(resolve("hippocampus"), source)
    record = json.loads((source / "medseg.json").read_text())
    record["calibration"] = {"temperature": 2.5}
    bundle.write_metadata(source, record)
    metadata = bundle.verify(source)
    export_bundle(source, tmp_path / "served")
    served = tf.saved_model.load(str(tmp_path / "served"))
    volume = read_volume(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0])
    on_grid, _ = metadata.preprocessor.on_grid(volume)
    image, _ = metadata.preprocessor.image(volume)
    segmenter = Segmenter(source, mirror_axes=metadata.mirror_axes, precision="float32")
    expected = segmenter.probabilities(image)
    untempered = Segmenter(
        resolve("hippocampus"), mirror_axes=metadata.mirror_axes, precision="float32"
    ).probabilities(image)
    assert np.max(np.abs(expected - untempered)) > 0.05  # the temperature tells
    got = served.segment(tf.constant(np.asarray(on_grid.array, np.float32)))
    assert np.max(np.abs(got["probabilities"].numpy() - expected)) <= 1e-4


def test_a_temperature_that_is_no_positive_number_is_named(tmp_path):
    from medseg.errors import InputFileError

    source = tmp_path / "hippocampus"
    shutil.copytree(resolve("hippocampus"), source)
    record = json.loads((source / "medseg.json").read_text())
    for bad in (0, -1.5, "2", True):
        record["calibration"] = {"temperature": bad}
        bundle.write_metadata(source, record)
        with pytest.raises(
            InputFileError, match="calibration.temperature: .* is not a"
        ):
            bundle.verify(source)
