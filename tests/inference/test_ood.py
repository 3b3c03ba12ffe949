"""Predict's out-of-distribution check: the profiles, the thresholds, and real scans
against corrupted ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from medseg.bundle import resolve, verify
from medseg.errors import InputFileError
from medseg.inference import Segmenter
from medseg.inference.ood import (
    FEATURE_NOTE,
    INTENSITY_NOTE,
    PERCENTILES,
    Profile,
    ScanCheck,
    held_out_profile,
    intensity_point,
)
from medseg.io import read_volume, write_volume
from medseg_cli.main import main
from tests import reference
from tests.conftest import SAMPLE


def _cloud(rng, n, d):
    """Correlated points whose standardised covariance has no direction of variance
    under the profile's floor (0.01)."""
    common = rng.normal(size=(n, 1))
    points = rng.normal(size=(n, d)) + 0.8 * common
    return points * rng.uniform(0.5, 20, d) + rng.normal(size=d) * 5


def test_a_profile_with_every_component_is_the_mahalanobis_distance(rng):
    points = _cloud(rng, 200, 5)
    profile = Profile.fit(points)
    assert len(profile.variances) == 5 and profile.variances.min() > 0.1
    for x in (points[0], points.mean(0) + 3, rng.normal(size=5) * 10):
        assert profile.distance(x) == pytest.approx(
            reference.mahalanobis_rms(points, x), rel=1e-9
        )
    assert profile.distance(points.mean(0)) == pytest.approx(0, abs=1e-12)


def test_the_threshold_is_the_largest_distance_from_the_other_folds(rng):
    points = _cloud(rng, 60, 3)
    profile = held_out_profile(points, folds=5, seed=0)
    order = np.random.default_rng(0).permutation(60)
    largest = max(
        reference.mahalanobis_rms(points[np.setdiff1d(order, part)], points[i])
        for part in np.array_split(order, 5)
        for i in part
    )
    assert profile.threshold == pytest.approx(largest, rel=1e-9)
    # the profile itself is of all the points
    assert profile.distance(points[7]) == pytest.approx(
        reference.mahalanobis_rms(points, points[7]), rel=1e-9
    )
    record = Profile.from_record(json.loads(json.dumps(profile.to_record())))
    assert record.distance(points[3]) == pytest.approx(
        profile.distance(points[3]), rel=1e-4
    )


def test_the_intensity_point_is_each_channels_percentiles(rng):
    image = rng.normal(size=(9, 8, 7, 2)).astype(np.float32)
    image[..., 1] = image[..., 1] ** 3
    expected = np.concatenate(
        [np.percentile(image[..., c], PERCENTILES) for c in range(2)]
    )
    np.testing.assert_allclose(intensity_point(image), expected, rtol=1e-6)


class _Record(dict):
    source = "medseg.json"


def test_a_bundle_without_a_profile_checks_ct_values_against_its_fingerprint():
    record = _Record(
        preprocessing={"normalizers": [{"scheme": "ct"}]},
        fingerprint={
            "foreground_intensity": [
                {"percentile_0.5": -80.0, "percentile_99.5": 250.0}
            ]
        },
    )
    check = ScanCheck(record)
    assert check.intensity is None and check.features is None
    ct = np.linspace(-1000, 1500, 1000).reshape(10, 10, 10, 1)
    mri = np.linspace(300, 4000, 1000).reshape(10, 10, 10, 1)
    assert check.verdict("ct.nii.gz", ct, ct, None).notes == ()
    (note,) = check.verdict("mr.nii.gz", mri, mri, None).notes
    assert note.startswith(f"mr.nii.gz: {INTENSITY_NOTE} (channel 0: values 318.5 to")
    assert "none within the training scans' foreground -80 to 250" in note
    # a z-scored MRI bundle has no such absolute range
    record["preprocessing"] = {"normalizers": [{"scheme": "zscore"}]}
    assert ScanCheck(record).verdict("x", mri, mri, None).notes == ()


def test_a_malformed_profile_is_named(tmp_path):
    bundle = tmp_path / "hippocampus"
    shutil.copytree(resolve("hippocampus"), bundle)
    metadata = verify(bundle)
    broken = metadata.to_dict()
    broken["ood"]["features"]["threshold"] = -1
    from medseg.bundle import write_metadata

    write_metadata(bundle, broken)
    with pytest.raises(
        InputFileError, match="medseg.json: ood: an out-of-distribution"
    ):
        Segmenter(bundle)


@pytest.fixture(scope="module")
def shipped():
    return Segmenter(resolve("hippocampus"), mirror_axes=(0,), precision="float32")


def test_the_features_are_the_same_with_test_time_mirroring_or_without(shipped):
    # the profile is of the windows as they are; a scan's features must not move
    # with --tta (a training scan was flagged at 1.1 once its mirrored windows'
    # features were averaged in with mirroring and left out without)
    volume = read_volume(SAMPLE / "imagesTr" / "hippocampus_008.nii.gz")
    image, _ = shipped.preprocessor.image(volume)
    plain = Segmenter(resolve("hippocampus"), precision="float32")
    shipped.probabilities(image)
    plain.probabilities(image)
    assert shipped.passes == 2 and plain.passes == 1
    np.testing.assert_allclose(shipped.features, plain.features, rtol=1e-5, atol=1e-6)
    assert plain.predict(volume).ood.features < 1


@pytest.mark.slow
def test_the_sample_passes_and_corrupted_copies_are_flagged(shipped, rng):
    from scipy.ndimage import gaussian_filter

    scans = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    for path in scans:
        verdict = shipped.predict(read_volume(path)).ood
        assert verdict.notes == () and verdict.intensity < 1 and verdict.features < 1
    volume = read_volume(scans[0])
    array = np.asarray(volume.array, np.float32)
    for changed in (
        rng.normal(array.mean(), array.std(), array.shape),
        array.max() + array.min() - array,
        gaussian_filter(array, sigma=(3, 3, 3, 0)),
    ):
        prediction = shipped.predict(volume.with_array(changed.astype(np.float32)))
        assert prediction.ood.features > 1
        assert any(FEATURE_NOTE in note for note in prediction.notes)
        assert all(note.startswith(str(scans[0])) for note in prediction.ood.notes)


@pytest.mark.slow
def test_predict_flags_or_refuses_a_scan_of_noise(tmp_path, rng, caplog):
    scans = tmp_path / "scans"
    scans.mkdir()
    good = SAMPLE / "imagesTr" / "hippocampus_003.nii.gz"
    shutil.copy(good, scans / "good.nii.gz")
    volume = read_volume(good)
    array = np.asarray(volume.array, np.float32)
    noise = rng.normal(array.mean(), array.std(), array.shape).astype(np.float32)
    write_volume(volume.with_array(noise), scans / "noise.nii.gz")

    def predict(output, *extra):
        return CliRunner().invoke(
            main,
            ["predict", "--model", "hippocampus", "--input", str(scans), "--output",
             str(output), *extra],
        )  # fmt: skip

    warned = predict(tmp_path / "warn")
    assert warned.exit_code == 0, warned.output
    assert f"noise.nii.gz: {FEATURE_NOTE}" in caplog.text
    assert f"good.nii.gz: {FEATURE_NOTE}" not in caplog.text
    report = json.loads((tmp_path / "warn" / "medseg_predict_report.json").read_text())
    cases = {c["input"].rsplit("/", 1)[-1]: c for c in report["cases"]}
    assert cases["noise.nii.gz"]["ood"]["ood_features"] > 1
    assert cases["good.nii.gz"]["ood"]["ood_features"] < 1
    assert any(FEATURE_NOTE in w for w in cases["noise.nii.gz"]["warnings"])
    assert not cases["good.nii.gz"]["warnings"]
    table = (tmp_path / "warn" / "medseg_volumes.csv").read_text().splitlines()
    header = table[0].split(",")
    assert header[-2:] == ["ood_intensity", "ood_features"]
    rows = [dict(zip(header, line.split(","), strict=True)) for line in table[1:]]
    assert {float(r["ood_features"]) > 1 for r in rows if r["case"] == "noise"} == {
        True
    }

    refused = predict(tmp_path / "error", "--ood", "error")
    assert refused.exit_code == 1
    line = next(x for x in refused.output.splitlines() if "noise.nii.gz:" in x)
    assert "FAILED" in line
    assert f"noise.nii.gz: {INTENSITY_NOTE} (distance" in line
    assert line.endswith("refused (--ood warn segments it anyway)")
    assert FEATURE_NOTE in line
    assert sorted(p.name for p in (tmp_path / "error").glob("*.nii.gz")) == [
        "good.nii.gz"
    ]
    assert not list((tmp_path / "error").glob("*.part*"))
    caplog.clear()
    off = predict(tmp_path / "off", "--ood", "off")
    assert off.exit_code == 0 and FEATURE_NOTE not in caplog.text
    assert INTENSITY_NOTE not in caplog.text
