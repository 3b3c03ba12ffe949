"""The SavedModel's ``segment`` endpoint: normalisation, sliding window, mirroring
and softmax in one graph, against ``Segmenter``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from medseg.bundle import resolve, verify
from medseg.export import export_bundle
from medseg.inference import Segmenter
from medseg.io import read_volume
from medseg.preprocessing.intensity import (
    CTNormalization,
    PercentileNormalization,
    WindowNormalization,
    ZScoreNormalization,
)
from medseg.serving import _normalise
from tests.conftest import SAMPLE


def _served(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("served") / name
    export_bundle(resolve(name), folder)
    return folder, tf.saved_model.load(str(folder))


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    return _served(tmp_path_factory, "hippocampus")


@pytest.mark.slow
def test_segment_is_predict_on_the_bundle_grid_for_every_sample_case(hippocampus):
    folder, served = hippocampus
    metadata = verify(resolve("hippocampus"))
    record = json.loads((folder / "medseg.json").read_text())["export"]
    assert record["endpoints"]["segment"]["mirror_axes"] == [0]
    segmenter = Segmenter(
        resolve("hippocampus"), mirror_axes=metadata.mirror_axes, precision="float32"
    )
    cases = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    assert len(cases) == 12
    for path in cases:
        volume = read_volume(path)
        on_grid, _ = metadata.preprocessor.on_grid(volume)
        image, _ = metadata.preprocessor.image(volume)
        expected = segmenter.probabilities(image)
        result = served.segment(tf.constant(np.asarray(on_grid.array, np.float32)))
        probabilities = result["probabilities"].numpy()
        assert probabilities.shape == expected.shape
        assert np.max(np.abs(probabilities - expected)) <= 1e-4, path.name
        labels = np.asarray(metadata.label_values)[expected.argmax(-1)]
        np.testing.assert_array_equal(result["labels"].numpy(), labels)
        assert set(np.unique(labels)) == {0, 1, 2}  # it segmented something


@pytest.mark.slow
def test_a_2d_bundle_serves_its_label_values_on_a_picture_larger_than_a_window(
    tmp_path_factory,
):
    _, served = _served(tmp_path_factory, "membrane")
    metadata = verify(resolve("membrane"))
    rows, cols = np.mgrid[0:300, 0:280]
    picture = (
        128 + 60 * np.sin(rows / 9.0) * np.cos(cols / 13.0) + (rows + cols) / 8
    ).astype(np.float32)[..., None]
    segmenter = Segmenter(
        resolve("membrane"), mirror_axes=metadata.mirror_axes, precision="float32"
    )
    image = np.stack(
        [n(picture[..., 0]) for n in metadata.preprocessor.normalizers], -1
    )
    expected = segmenter.probabilities(image)
    result = served.segment(tf.constant(picture))
    assert np.max(np.abs(result["probabilities"].numpy() - expected)) <= 1e-4
    labels = result["labels"].numpy()
    np.testing.assert_array_equal(
        labels, np.asarray(metadata.label_values)[expected.argmax(-1)]
    )
    assert set(np.unique(labels)) == {0, 255}


@pytest.mark.parametrize(
    "normalizer",
    [
        ZScoreNormalization(),
        ZScoreNormalization(nonzero_mask=True),
        CTNormalization(-100.0, 300.0, 40.0, 80.0),
        WindowNormalization(-50.0, 150.0),
        PercentileNormalization(2.0, 97.5),
    ],
    ids=lambda n: f"{n.scheme}{'-masked' if getattr(n, 'nonzero_mask', 0) else ''}",
)
def test_each_normalisation_in_the_graph_is_numpys(normalizer, rng):
    channel = rng.normal(60, 90, size=(17, 13, 11)).astype(np.float32)
    channel[:4] = 0  # background for the masked z-score
    got = _normalise(tf.constant(channel), normalizer).numpy()
    np.testing.assert_allclose(got, normalizer(channel), rtol=1e-5, atol=1e-5)
