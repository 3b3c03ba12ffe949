from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import InputFileError
from medseg.io.pictures import grey_channel
from medseg.preprocessing.intensity import (
    CTNormalization,
    PercentileNormalization,
    WindowNormalization,
    ZScoreNormalization,
    count_nonfinite,
    handle_nonfinite,
    normalize,
    normalizer_from_dict,
    normalizer_to_dict,
    replace_nonfinite,
)
from tests import reference


def test_zscore_matches_reference(rng):
    channel = rng.normal(300, 40, size=(6, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(
        ZScoreNormalization()(channel), reference.zscore(channel), atol=1e-5
    )


def test_zscore_inside_nonzero_mask(rng):
    channel = rng.normal(300, 40, size=(6, 5, 4)).astype(np.float32)
    channel[:2] = 0
    out = ZScoreNormalization(nonzero_mask=True)(channel)
    np.testing.assert_allclose(out, reference.zscore(channel, channel != 0), atol=1e-5)
    assert np.all(out[:2] == 0)


def test_zscore_constant_image_gives_zeros_not_nan():
    out = ZScoreNormalization()(np.full((3, 3, 3), 7.0))
    np.testing.assert_array_equal(out, np.zeros((3, 3, 3)))


def test_ct_fit_and_apply_match_reference(rng):
    foreground = rng.normal(40, 200, size=5000)
    ct = CTNormalization.fit(foreground)
    assert ct.lower == pytest.approx(reference.percentile_linear(foreground, 0.5))
    assert ct.upper == pytest.approx(reference.percentile_linear(foreground, 99.5))
    assert ct.mean == pytest.approx(sum(foreground) / len(foreground))
    hu = np.array([-3000.0, 0.0, 40.0, 3000.0], np.float32)
    expected = (np.clip(hu, ct.lower, ct.upper) - ct.mean) / ct.std
    np.testing.assert_allclose(ct(hu), expected, rtol=1e-5)


def test_window_maps_to_unit_interval():
    # window -1000..1000: -1000 -> 0, 0 -> 0.5, 500 -> 0.75, beyond -> clipped
    hu = np.array([-2000, -1000, 0, 500, 1000, 4000], np.float32)
    np.testing.assert_allclose(
        WindowNormalization(-1000, 1000)(hu), [0, 0, 0.5, 0.75, 1, 1], atol=1e-7
    )


def test_percentile_normalisation_matches_reference(rng):
    channel = rng.exponential(100, size=(10, 10, 10)).astype(np.float32)
    low = reference.percentile_linear(channel, 1)
    high = reference.percentile_linear(channel, 99)
    expected = (np.clip(channel, low, high) - low) / (high - low)
    out = PercentileNormalization(1, 99)(channel)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.dtype == np.float32
    assert out.min() == 0 and out.max() == pytest.approx(1)


@pytest.mark.parametrize(
    "normalizer",
    [
        ZScoreNormalization(),
        ZScoreNormalization(nonzero_mask=True),
        CTNormalization(-100.0, 300.0, 50.0, 80.0),
        WindowNormalization(),
        PercentileNormalization(),
    ],
)
def test_every_scheme_returns_float32(normalizer, rng):
    channel = rng.integers(-500, 500, size=(5, 5, 5)).astype(np.int16)
    assert normalizer(channel).dtype == np.float32
    assert normalizer(channel.astype(np.float64)).dtype == np.float32


def test_normalize_each_channel_with_its_scheme(rng):
    array = np.stack(
        [rng.normal(5, 2, (4, 4, 4)), rng.uniform(-1000, 1000, (4, 4, 4))], axis=-1
    )
    out = normalize(array, [ZScoreNormalization(), WindowNormalization()])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], reference.zscore(array[..., 0]), atol=1e-5)
    np.testing.assert_allclose(out[..., 1], (array[..., 1] + 1000) / 2000, atol=1e-6)
    with pytest.raises(ValueError, match="1 normaliser"):
        normalize(array, [ZScoreNormalization()])


def test_config_round_trip_and_errors():
    for normalizer in [
        ZScoreNormalization(nonzero_mask=True),
        CTNormalization(-100.0, 300.0, 50.0, 80.0),
        WindowNormalization(-160, 240),
        PercentileNormalization(2, 98),
    ]:
        config = normalizer_to_dict(normalizer)
        assert normalizer_from_dict(config) == normalizer
    assert normalizer_to_dict(CTNormalization(-1, 1, 0, 1)) == {
        "scheme": "ct",
        "lower": -1,
        "upper": 1,
        "mean": 0,
        "std": 1,
    }
    with pytest.raises(ValueError, match="unknown normalisation scheme 'minmax'"):
        normalizer_from_dict({"scheme": "minmax"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nonzero'\]"):
        normalizer_from_dict({"scheme": "zscore", "nonzero": True})
    with pytest.raises(ValueError, match="needs fitted statistics"):
        normalizer_from_dict({"scheme": "ct", "lower": 0})
    with pytest.raises(ValueError, match="must be below"):
        WindowNormalization(10, 10)


def test_nonfinite_policy(tmp_path):
    array = np.array([[[[1.0], [np.nan]], [[-2.0], [np.inf]]]], np.float32)
    assert count_nonfinite(array) == 2
    assert count_nonfinite(np.ones(3, np.int16)) == 0
    with pytest.raises(InputFileError, match="2 NaN/Inf voxels") as info:
        handle_nonfinite(array, tmp_path / "scan.nii.gz")
    assert info.value.path == tmp_path / "scan.nii.gz"
    filled = handle_nonfinite(array, "scan", policy="replace")
    np.testing.assert_array_equal(filled.ravel(), [1.0, -2.0, -2.0, -2.0])
    np.testing.assert_array_equal(replace_nonfinite(array, 0.0).ravel(), [1, 0, -2, 0])
    clean = np.ones((2, 2, 2, 1), np.float32)
    assert replace_nonfinite(clean) is clean
    with pytest.raises(ValueError, match="nonfinite policy"):
        handle_nonfinite(clean, "x", policy="ignore")


def test_grey_channel_takes_grey_stored_as_colour_and_refuses_colour(rng):
    grey = rng.integers(0, 256, (5, 6, 1)).astype(np.uint8)
    alpha = np.full_like(grey, 255)
    for stored in (
        np.concatenate([grey, alpha], -1),
        np.concatenate([grey, grey, grey], -1),
        np.concatenate([grey, grey, grey, alpha], -1),
    ):
        out = grey_channel(stored)
        assert out.shape == (5, 6, 1)
        np.testing.assert_array_equal(out, grey)
    for channel in (1, 2):  # green or blue differs in one pixel
        colour = np.concatenate([grey, grey, grey], -1)
        colour[2, 3, channel] ^= 1
        assert grey_channel(colour) is None
    patchy = alpha.copy()
    patchy[0, 0, 0] = 0  # a transparent pixel: the alpha carries a mask
    assert grey_channel(np.concatenate([grey, patchy], -1)) is None
    assert grey_channel(np.concatenate([grey, grey, grey, patchy], -1)) is None
    assert grey_channel(grey) is None  # one channel already
    assert grey_channel(np.concatenate([grey] * 5, -1)) is None
