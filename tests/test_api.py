"""The Python API exported from ``medseg``: the command line's defaults, in a call."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, SAMPLE, save_nifti
from tests.reference import hard_dice


def test_importing_medseg_loads_no_tensorflow_and_lists_the_api():
    script = (
        "import sys, medseg\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
        "print(sorted(set(medseg.__all__) - set(dir(medseg))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["False False", "[]"]


def test_an_unknown_name_is_an_attribute_error():
    import medseg

    with pytest.raises(AttributeError, match="no attribute 'segmnet'"):
        medseg.segmnet  # noqa: B018


@pytest.mark.slow
def test_segment_is_the_shipped_models_prediction_with_its_mirroring():
    import medseg
    from medseg.bundle import resolve
    from medseg.inference import Segmenter

    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    prediction = medseg.segment(scan, model="hippocampus")
    # the command line's --tta: the axes the bundle was trained to mirror
    expected = Segmenter(resolve("hippocampus"), mirror_axes=(0,)).predict(
        medseg.read_volume(scan)
    )
    np.testing.assert_array_equal(prediction.labels.array, expected.labels.array)
    np.testing.assert_array_equal(prediction.labels.affine, expected.labels.affine)
    assert prediction.probabilities is None
    assert prediction.names == ("background", "Anterior", "Posterior")
    # a Volume in, and the probabilities when asked for: one per class, summing to 1
    without_tta = medseg.segment(
        medseg.read_volume(scan), "hippocampus", tta=False, probabilities=True
    )
    assert without_tta.probabilities.shape == (*prediction.labels.spatial_shape, 3)
    np.testing.assert_allclose(
        without_tta.probabilities.astype(float).sum(-1), 1.0, atol=3e-3
    )
    assert (without_tta.labels.array != prediction.labels.array).mean() < 0.01
    shape = " x ".join(map(str, prediction.labels.spatial_shape))
    anterior = np.count_nonzero(prediction.labels.array == 1)
    assert anterior > 100
    assert repr(prediction).startswith(f"Prediction(labels on {shape} voxels of 1 x")
    assert f"voxels per label: Anterior {anterior}, Posterior" in repr(prediction)


def test_evaluate_scores_a_pair_of_files_or_volumes_against_a_reference(tmp_path, rng):
    import medseg

    truth = rng.integers(0, 3, size=(12, 10, 8)).astype(np.uint8)
    prediction = truth.copy()
    prediction[:4] = rng.integers(0, 3, size=(4, 10, 8))
    affine = np.diag([0.5, 0.8, 2.0, 1.0])
    paths = [
        save_nifti(tmp_path / f"{name}.nii.gz", array, affine)
        for name, array in (("prediction", prediction), ("truth", truth))
    ]
    rows = medseg.evaluate(*paths)
    assert [row["label"] for row in rows] == [1, 2]
    for row in rows:
        assert row["dice"] == pytest.approx(hard_dice(truth, prediction, row["label"]))
    same = medseg.evaluate(medseg.read_volume(paths[1]), paths[1], labels=[2])
    assert [(row["label"], row["dice"], row["hd95_mm"]) for row in same] == [
        (2, 1.0, 0.0)
    ]
