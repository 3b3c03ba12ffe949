"""The original, unpadded ("valid") U-Net: its output is the centre of its input, so
windows overlap until their outputs tile the scan, and training crops the labels."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg import inference
from tests.conftest import SAMPLE
from tests.conftest import run_medseg as medseg


def _valid_mean(batch: np.ndarray, radius: int) -> np.ndarray:
    """A (2r+1)-wide mean over each window, without padding: the centre of the
    window, as a valid convolution gives it (slow and obvious)."""
    out_shape = [n - 2 * radius for n in batch.shape[1:-1]]
    out = np.zeros((batch.shape[0], *out_shape, batch.shape[-1]), np.float64)
    width = 2 * radius + 1
    for offset in np.ndindex(*(width,) * len(out_shape)):
        box = tuple(slice(o, o + n) for o, n in zip(offset, out_shape, strict=True))
        out += batch[(slice(None), *box)]
    return (out / width ** len(out_shape)).astype(np.float32)


@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(23, 17, 9), (5, 30, 12)])
def test_valid_outputs_tile_the_scan_with_its_edges_mirrored(rng, overlap, shape):
    image = rng.random((*shape, 1)).astype(np.float32)
    radius = 2
    result = inference.sliding_window_predict(
        image,
        lambda batch: _valid_mean(batch, radius),
        patch_size=(12, 12, 12),
        output_size=(8, 8, 8),
        overlap=overlap,
        batch_size=3,
    )
    # every voxel's mean over its neighbourhood, the scan mirrored past its edges
    expected = ndimage.uniform_filter(image[..., 0], 2 * radius + 1, mode="mirror")
    if min(shape) >= 8:  # else the scan is first padded to one output window
        np.testing.assert_allclose(result[..., 0], expected, atol=1e-5)
    assert result.shape == image.shape


def test_test_time_mirroring_of_a_valid_network_maps_outputs_back(rng):
    image = rng.random((20, 20, 20, 1)).astype(np.float32)

    def skewed(batch):  # not symmetric: a mirrored window gives another output
        weights = np.linspace(0.5, 1.5, batch.shape[1])[None, :, None, None, None]
        return (batch * weights)[:, 2:-2, 2:-2, 2:-2]

    plain = inference.sliding_window_predict(
        image, skewed, patch_size=(12, 12, 12), output_size=(8, 8, 8)
    )
    mirrored = inference.sliding_window_predict(
        image, skewed, patch_size=(12, 12, 12), output_size=(8, 8, 8),
        mirror_axes=(0,),
    )  # fmt: skip
    # mirroring along axis 0 averages the weights w(i) and w(11 - i): all 1
    np.testing.assert_allclose(mirrored, image, atol=1e-5)
    assert not np.allclose(plain, image, atol=1e-3)


def test_an_output_that_is_not_the_windows_centre_is_refused():
    with pytest.raises(ValueError, match="is not the centre of window"):
        inference.sliding_window_predict(
            np.zeros((10, 10, 1), np.float32),
            lambda b: b,
            patch_size=(8, 8),
            output_size=(5, 8),
        )


def test_training_labels_are_cut_to_the_centre_the_network_labels(rng):
    from medseg.training import data as training_data

    label = np.zeros((20, 20, 20, 1), np.uint8)
    label[5:15, 6:14, 7:13] = 1
    image = rng.random((20, 20, 20, 1)).astype(np.float32)
    case = training_data._indexed("c", image, label)
    sampler = training_data.PatchSampler(
        [case], (12, 12, 12), foreground_oversample=0, seed=0, samples_per_epoch=4
    )
    plain = training_data.make_dataset(sampler, None, 2, 0)
    cut = training_data.make_dataset(sampler, None, 2, 0, label_margins=(2, 3, 1))
    (images, labels), (same_images, cut_labels) = next(iter(plain)), next(iter(cut))
    np.testing.assert_array_equal(images, same_images)
    np.testing.assert_array_equal(cut_labels, labels[:, 2:-2, 3:-3, 1:-1])


@pytest.mark.slow
def test_a_valid_unet_trains_validates_and_predicts_on_the_sample(tmp_path):
    config = tmp_path / "valid.yaml"
    config.write_text(
        "model: {name: unet, spatial_dims: 3, filters: [4, 8], padding: valid}\n"
        "train: {epochs: 2, steps_per_epoch: 3, batch_size: 2, optimizer: adam, "
        "learning_rate: 0.001, folds: 4}\n"
    )
    run = tmp_path / "run"
    result = medseg("train", "--config", config, "--data", SAMPLE, "--output", run)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((run / "medseg.json").read_text())
    from medseg.models import unet_output_size

    # each patch size: the smallest input a valid depth-1 network takes that is at
    # least the median case (rounded up to even)
    median = metadata["plan"]["median_shape"]
    expected = [
        next(
            v
            for v in range(2 * math.ceil(m / 2), 1000)
            if unet_output_size(v, depth=1) is not None
        )
        for m in median
    ]
    assert metadata["patch_size"] == expected
    assert metadata["config"]["model"]["padding"] == "valid"
    assert 0 <= metadata["validation"]["val_dice_mean"] <= 1
    out = tmp_path / "out"
    scans = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[:2]
    for scan in scans:
        result = medseg("predict", "--model", run, "--input", scan, "--output", out)
        assert result.returncode == 0, result.stderr[-3000:]
        labels = np.asanyarray(nib.load(out / scan.name).dataobj)
        assert labels.shape == nib.load(scan).shape
        assert set(np.unique(labels)) <= {0, 1, 2}
