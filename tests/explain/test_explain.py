"""Explanations against references: occlusion, saliency and Grad-CAM of tiny networks
whose answers are known, kernels as the layer holds them, and maps on the scan's own
grid."""

from __future__ import annotations

import json

import keras
import nibabel as nib
import numpy as np
import pytest

from medseg import explain
from medseg.explain.subject import Subject
from medseg.io.volume import Volume
from tests import reference
from tests.conftest import SAMPLE, tiny_classification
from tests.conftest import run_medseg as medseg

REGION = (slice(2, 4), slice(3, 6))


def _linear_subject(inputs: np.ndarray, weights: np.ndarray) -> Subject:
    """A classifier whose class-1 logit is ``sum(weights * x)`` (class 0: 0), so its
    score is ``sigmoid(sum(weights * x))``."""
    shape = inputs.shape
    model = keras.Sequential([
        keras.Input(shape), keras.layers.Flatten(),
        keras.layers.Dense(2, use_bias=False, name="head"),
    ])  # fmt: skip
    kernel = np.zeros((inputs.size, 2), np.float32)
    kernel[:, 1] = weights.reshape(-1)
    model.get_layer("head").set_weights([kernel])
    volume = Volume(inputs, np.eye(4), None, None)
    return Subject("tiny", "classification", model, volume, inputs.astype(np.float32),
                   1, "one", None, lambda m: m, 0.0)  # fmt: skip


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_occlusion_of_a_network_that_sees_one_region_peaks_there_and_only_there():
    inputs = np.ones((8, 8, 1), np.float32)
    weights = np.zeros((8, 8, 1), np.float32)
    weights[REGION] = 0.5
    subject = _linear_subject(inputs, weights)
    result = explain.occlusion(subject, box=2, stride=2, batch_size=5)
    base = _sigmoid(float((weights * inputs).sum()))
    expected = np.zeros((8, 8))
    for i in range(0, 8, 2):  # the boxes tile the input: one box covers each voxel
        for j in range(0, 8, 2):
            occluded = inputs.copy()
            occluded[i : i + 2, j : j + 2] = 0
            expected[i : i + 2, j : j + 2] = base - _sigmoid((weights * occluded).sum())
    np.testing.assert_allclose(result.on_input, expected, atol=1e-6)
    assert (result.on_input[2:4, 2:6] > 0).all()
    assert (result.on_input[:2] == 0).all() and (result.on_input[4:] == 0).all()
    assert result.settings["positions"] == 16 and result.settings["forward_passes"] == 4
    passes, seconds = explain.occlusion_estimate(subject, box=2, stride=2, batch_size=5)
    assert passes == 4 and 0 < seconds < 60


def test_saliency_of_a_linear_network_is_its_weights_times_the_sigmoid_slope(rng):
    inputs = rng.random((6, 7, 1)).astype(np.float32)
    weights = rng.normal(0, 0.3, (6, 7, 1)).astype(np.float32)
    subject = _linear_subject(inputs, weights)
    score = _sigmoid(float((weights * inputs).sum()))
    result = explain.saliency(subject)
    np.testing.assert_allclose(
        result.on_input, score * (1 - score) * np.abs(weights[..., 0]), rtol=1e-4
    )
    assert result.score == pytest.approx(score, rel=1e-5)


def test_gradcam_of_a_one_convolution_network_matches_numpy(rng):
    inputs = rng.random((6, 6, 1)).astype(np.float32)
    image = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv")
    pooled = keras.layers.GlobalAveragePooling2D()(conv(image))
    model = keras.Model(image, keras.layers.Dense(2, name="head")(pooled))
    kernel = rng.normal(0, 0.5, (3, 3, 1, 3)).astype(np.float32)
    head = rng.normal(0, 0.5, (3, 2)).astype(np.float32)
    model.get_layer("conv").set_weights([kernel])
    model.get_layer("head").set_weights([head, np.zeros(2, np.float32)])
    volume = Volume(inputs, np.eye(4), None, None)
    subject = Subject("tiny", "classification", model, volume, inputs, 1, "one", None,
                      lambda m: m, 0.0)  # fmt: skip
    result = explain.gradcam(subject, layer="conv")
    features = reference.conv_same_2d(inputs, kernel)
    logits = features.mean(axis=(0, 1)) @ head
    p = reference.softmax(logits)
    # d p1 / d A_c(i, j): the same at every (i, j), so it is also its mean
    weights = (
        np.array(
            [
                sum(p[1] * ((k == 1) - p[k]) * head[c, k] for k in range(2))
                for c in range(3)
            ]
        )
        / 36
    )
    expected = np.maximum((features * weights).sum(axis=-1), 0)
    np.testing.assert_allclose(result.on_input, expected, rtol=1e-4, atol=1e-7)


def test_the_kernel_grid_holds_exactly_the_layers_weights():
    model = keras.Sequential([
        keras.Input((5, 5, 5, 2)),
        keras.layers.Conv3D(4, 3, name="first"), keras.layers.Conv3D(2, 1, name="next"),
    ])  # fmt: skip
    kernels = explain.kernels(model)
    np.testing.assert_array_equal(
        kernels.weights, model.get_layer("first").get_weights()[0]
    )
    tiles = kernels.tiles()
    assert len(tiles) == 4 and tiles[0].shape == (3, 9)
    # output channel 2, input channel 0, the kernel's slice 1 of its last axis
    np.testing.assert_array_equal(tiles[2][:, 3:6], kernels.weights[:, :, 1, 0, 2])
    assert explain.kernels(model, "next").layer == "next"
    with pytest.raises(ValueError, match="no convolution 'x'; its convolutions: first"):
        explain.kernels(model, "x")


def _oblique_lps(path, folder):
    """The scan with its first two voxel axes reversed and its affine turned a little
    about the third, so that its voxel order is LPS and its grid oblique."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)[::-1, ::-1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [data.shape[0] - 1, data.shape[1] - 1, 0]
    angle = np.deg2rad(10)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine = turn @ img.affine @ flip
    nib.save(nib.Nifti1Image(data, affine), folder / "lps.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), turn @ img.affine),
             folder / "ras.nii.gz")  # fmt: skip
    return folder / "lps.nii.gz", folder / "ras.nii.gz"


@pytest.mark.slow
def test_maps_land_on_the_scans_own_grid_for_an_oblique_lps_scan(tmp_path):
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    lps, ras = _oblique_lps(scan, tmp_path)
    one = explain.saliency(explain.prepare("hippocampus", lps, label="Anterior"))
    other = explain.saliency(explain.prepare("hippocampus", ras, label="Anterior"))
    assert one.on_scan.shape == nib.load(lps).shape
    # the same voxels stored in another order: the same map, in that order
    np.testing.assert_allclose(one.on_scan[::-1, ::-1], other.on_scan, atol=1e-6)
    written = explain.write_explanation(one, tmp_path / "out", "lps")
    saved = nib.load(written[0])
    np.testing.assert_allclose(saved.affine, nib.load(lps).affine, atol=1e-5)
    np.testing.assert_allclose(saved.get_fdata(), one.on_scan, rtol=1e-6)
    record = json.loads(written[2].read_text())
    assert record["method"] == "saliency" and record["label"] == "Anterior"


@pytest.mark.slow
def test_the_command_writes_each_method_and_names_bad_choices(tmp_path):
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    for method, extra in (("gradcam", ()), ("activations", ("--layer", "enc1_conv2")),
                          ("filters", ())):  # fmt: skip
        result = medseg("explain", "--model", "hippocampus", "--input", scan,
                        "--output", out, "--method", method, *extra)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "hippocampus_003_gradcam.nii.gz", "hippocampus_003_gradcam.json",
        "hippocampus_003_gradcam_overlay.png", "hippocampus_003_activations.png",
        "hippocampus_003_activations.json", "hippocampus_filters.png",
        "hippocampus_filters.json",
    ])  # fmt: skip
    bad = medseg("explain", "--model", "hippocampus", "--input", scan, "--output", out,
                 "--method", "gradcam", "--layer", "nope")  # fmt: skip
    assert bad.returncode == 2
    assert "no layer 'nope'; its layers are image, enc0_conv1" in bad.stderr
    wrong = medseg("explain", "--model", "hippocampus", "--input", scan, "--output",
                   out, "--method", "saliency", "--label", "tail")  # fmt: skip
    assert wrong.returncode == 2
    assert (
        "no label 'tail'; its labels are 0 (background), 1 (Anterior)" in wrong.stderr
    )


@pytest.mark.slow
def test_a_classifiers_maps_are_on_the_scans_grid(tmp_path, rng):
    npz, config = tiny_classification(tmp_path, rng)
    run = tmp_path / "run"
    result = medseg("train", "--config", config, "--data", npz,
                    "--output", run)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scan = tmp_path / "image.nii.gz"  # another size: resized to 12^3 and back
    nib.save(nib.Nifti1Image(rng.random((16, 14, 12)).astype(np.float32), np.eye(4)),
             scan)  # fmt: skip
    subject = explain.prepare(run, scan, label="1")
    assert subject.task == "classification" and subject.inputs.shape == (12, 12, 12, 1)
    probabilities = keras.ops.softmax(subject.model(subject.inputs[None]))
    assert subject.base_score() == pytest.approx(float(probabilities[0, 1]), rel=1e-5)
    for method in (explain.occlusion, explain.saliency, explain.gradcam):
        made = method(subject)
        assert made.on_input.shape == (12, 12, 12)
        assert made.on_scan.shape == (16, 14, 12)
        assert np.isfinite(made.on_scan).all()


def test_a_scan_smaller_than_the_window_is_padded_as_the_network_was_trained():
    """Zeros around the preprocessed scan, as the sliding window and training pad it,
    not a value the network never saw there."""
    from medseg.bundle import resolve
    from medseg.inference import Segmenter
    from medseg.io import read_volume

    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    subject = explain.prepare("hippocampus", scan, label="Anterior")
    segmenter = Segmenter(resolve("hippocampus"), precision="float32")
    image, _ = segmenter.preprocessor.image(read_volume(scan))
    window = segmenter.window
    assert all(n < w for n, w in zip(image.shape[:-1], window, strict=True))
    inner = tuple(
        slice((w - n) // 2, (w - n) // 2 + n)
        for n, w in zip(image.shape[:-1], window, strict=True)
    )
    np.testing.assert_array_equal(subject.inputs[inner], image)
    outside = np.ones(window, bool)
    outside[inner] = False
    assert (subject.inputs[outside] == 0).all()
