"""Uncertainty maps (entropy, mutual information) against NumPy references."""

import csv

import nibabel as nib
import numpy as np
import pytest

from medseg import inference
from medseg.io import Volume, read_volume
from tests import reference
from tests.conftest import SAMPLE, bundle_record
from tests.conftest import run_medseg as medseg


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy over the last axis in units of log K, term by term."""
    k = p.shape[-1]
    terms = [
        np.where(p[..., c] > 0, -p[..., c] * np.log(np.maximum(p[..., c], 1e-300)), 0)
        for c in range(k)
    ]
    return sum(terms) / np.log(k)


@pytest.fixture(scope="module")
def three_class_bundle(tmp_path_factory):
    """A 2D U-Net of three classes with random weights, large enough that its windows
    disagree with their mirrors."""
    import keras

    from medseg.bundle import write_bundle
    from medseg.models import build_unet

    keras.utils.set_random_seed(3)
    model = build_unet(
        spatial_dims=2, in_channels=1, num_classes=3, filters=(4, 8), norm="none"
    )
    model.set_weights([w * 3 for w in model.get_weights()])
    folder = tmp_path_factory.mktemp("uncertain")
    write_bundle(folder, model, bundle_record(num_classes=3))
    return folder


@pytest.mark.parametrize("mirror_axes", [(), (0, 1)])
def test_entropy_and_mutual_information_match_the_passes_by_hand(
    three_class_bundle, mirror_axes, rng
):
    image = rng.normal(size=(27, 21, 1)).astype(np.float32) + 3
    volume = Volume(image, np.eye(4), None, None)
    segmenter = inference.Segmenter(
        three_class_bundle,
        mirror_axes=mirror_axes,
        uncertainty=True,
        precision="float32",
    )
    prediction = segmenter.predict(volume)
    prepared, records = segmenter.preprocessor.image(volume)
    assert prepared.shape == image.shape  # no crop, no resampling: the same grid
    model = segmenter.model

    def passes(batch):  # each pass's probabilities and their entropy
        p = reference.softmax(np.asarray(model(batch, training=False), np.float64))
        return np.concatenate([p, _entropy(p)[..., None]], -1)

    starts = [inference.window_starts(n, 16, 0.5) for n in (27, 21)]
    stitched = reference.stitch(
        prepared,
        reference.mirror_averaged(passes, mirror_axes),
        (16, 16),
        starts,
        inference.gaussian_importance((16, 16)),
    )
    entropy = _entropy(stitched[..., :3])
    np.testing.assert_allclose(prediction.entropy, entropy, atol=2e-5)
    # each label's Dice as the mean probabilities expect it of the argmax
    labels = prediction.labels.array[..., 0]
    for k in (1, 2):
        p, m = stitched[..., k], labels == k
        expected = 2 * p[m].sum() / (p.sum() + m.sum())
        assert prediction.dice_estimate[k] == pytest.approx(expected, abs=1e-5)
    assert set(prediction.dice_estimate) == {1, 2}
    assert 0.05 < prediction.entropy.mean() < 0.95  # neither certain nor uniform
    if not mirror_axes:
        assert prediction.mutual_information is None
        return
    information = entropy - stitched[..., 3]
    assert information.min() > -1e-6  # the entropy of a mean is at least the mean's
    np.testing.assert_allclose(prediction.mutual_information, information, atol=2e-5)
    assert prediction.mutual_information.max() > 0.01  # the mirrors disagree


def test_an_ensemble_counts_its_members_passes(three_class_bundle, rng):
    image = rng.normal(size=(20, 18, 1)).astype(np.float32)
    volume = Volume(image, np.eye(4), None, None)
    members = [
        inference.Segmenter(three_class_bundle, uncertainty=True, precision="float32")
        for _ in range(2)
    ]
    ensemble = inference.Ensemble(members, uncertainty=True)
    assert ensemble.passes == 2
    prediction = ensemble.predict(volume)
    alone = members[0].predict(volume)
    assert alone.mutual_information is None  # one pass
    # two identical members: the same mean; what disagreement there is, is that of
    # the overlapping windows of one member
    prepared, _ = members[0].preprocessor.image(volume)
    channels = members[0].probabilities(prepared)
    assert channels.shape == (20, 18, 7)  # K logits' softmax, K means, 1 entropy
    entropy = _entropy(channels[..., 3:6].astype(np.float64))
    np.testing.assert_allclose(prediction.entropy, alone.entropy, atol=1e-6)
    np.testing.assert_allclose(prediction.entropy, entropy, atol=2e-5)
    np.testing.assert_allclose(
        prediction.mutual_information, entropy - channels[..., 6], atol=2e-5
    )
    with pytest.raises(ValueError, match="uncertainty needs members"):
        inference.Ensemble(
            [inference.Segmenter(three_class_bundle, precision="float32")],
            uncertainty=True,
        )


def test_label_sizes_give_the_mean_entropy_inside_and_on_the_boundary(rng):
    from medseg.inference.jobs.tables import label_sizes

    labels = np.zeros((9, 8, 7), np.uint8)
    labels[2:7, 1:6, 1:5] = 1
    labels[0, 0, 0] = 2  # one voxel at the corner: all boundary
    entropy = rng.random(labels.shape).astype(np.float32)
    sizes = label_sizes(
        labels, (1.0, 1.0, 1.0), (0, 1, 2), ("background", "a", "b"), None, entropy
    )
    for value, name in ((1, "a"), (2, "b")):
        mask = labels == value
        boundary = reference.boundary_voxels(mask)
        expected = np.mean([entropy[v] for v in boundary])
        assert sizes[name]["entropy_mean"] == pytest.approx(entropy[mask].mean(), 1e-3)
        assert sizes[name]["entropy_boundary"] == pytest.approx(expected, abs=1e-4)
    assert len(reference.boundary_voxels(labels == 1)) < (labels == 1).sum()


@pytest.mark.slow
def test_predict_writes_the_maps_on_the_scans_grid_and_their_scores(tmp_path):
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[1]
    out = tmp_path / "out"
    result = medseg(
        "predict", "--model", "hippocampus", "--input", scan, "--output", out,
        "--uncertainty", "--precision", "float32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    case = scan.name.removesuffix(".nii.gz")
    source = nib.load(scan)
    maps = {}
    for name in ("entropy", "mutual_information"):  # the shipped model mirrors
        written = nib.load(out / "uncertainty" / f"{case}_{name}.nii.gz")
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)
        maps[name] = np.asarray(written.dataobj, np.float64)
        assert 0 <= maps[name].min() and maps[name].max() <= 1
    assert (maps["mutual_information"] <= maps["entropy"] + 1e-6).all()
    labels = read_volume(out / scan.name).array[..., 0]
    with open(out / "medseg_volumes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["Anterior", "Posterior"]
    for row in rows:
        mask = labels == int(row["label"])
        inside = maps["entropy"][mask].mean()
        boundary = reference.boundary_voxels(mask)
        on_boundary = np.mean([maps["entropy"][v] for v in boundary])
        assert float(row["entropy_mean"]) == pytest.approx(inside, abs=1e-3)
        assert float(row["entropy_boundary"]) == pytest.approx(on_boundary, abs=1e-3)
        assert float(row["entropy_boundary"]) > float(row["entropy_mean"])
        # a sample case the shipped model trained on: it expects a good Dice
        assert 0.8 < float(row["dice_estimate"]) < 1
    # the maps are part of a done case: run again, it is skipped
    again = medseg(
        "predict", "--model", "hippocampus", "--input", scan, "--output", out,
        "--uncertainty", "--precision", "float32",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "1 skipped" in again.stdout, again.stdout
