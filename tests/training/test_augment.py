from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from medseg.training import augment
from tests import reference


@pytest.fixture
def pair(rng):
    image = rng.random((7, 6, 5, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=(7, 6, 5, 1)).astype(np.int32)
    return image, label


def test_flip_matches_numpy(pair):
    image, label = pair
    out_image, out_label = augment.flip(image, label, [0, 2])
    np.testing.assert_array_equal(out_image, np.flip(image, (0, 2)))
    np.testing.assert_array_equal(out_label, np.flip(label, (0, 2)))


def test_affine_matches_reference_interpolation(pair):
    image, label = pair
    angle = 0.4
    matrix = (
        np.array(
            [
                [np.cos(angle), -np.sin(angle), 0],
                [np.sin(angle), np.cos(angle), 0],
                [0, 0, 1],
            ]
        )
        * 1.1
    )
    out_image, out_label = augment.affine(image, label, matrix)
    coords = reference.affine_coords(image.shape[:-1], matrix)
    np.testing.assert_allclose(
        out_image, reference.sample_linear_zero(image, coords), atol=1e-5
    )
    # nearest: skip points within rounding noise of a half-voxel tie
    frac = np.abs(coords - np.floor(coords) - 0.5).min(axis=-1)
    clear = frac > 1e-4
    np.testing.assert_array_equal(
        np.asarray(out_label)[clear],
        reference.sample_nearest_zero(label, coords)[clear],
    )


def test_identity_and_quarter_turn(pair, rng):
    image, label = pair
    same_image, same_label = augment.affine(image, label, np.eye(3))
    np.testing.assert_allclose(same_image, image, atol=1e-6)
    np.testing.assert_array_equal(same_label, label)
    square = rng.random((6, 6, 1)).astype(np.float32)
    square_label = (square > 0.5).astype(np.int32)
    # input at R (x - c) + c with R the +90 degree rotation: numpy's clockwise rot90
    turned, turned_label = augment.affine(square, square_label, [[0, -1], [1, 0]])
    np.testing.assert_allclose(turned, np.rot90(square, -1), atol=1e-6)
    np.testing.assert_array_equal(turned_label, np.rot90(square_label, -1))


def test_elastic_with_a_constant_shift_moves_by_whole_voxels(pair):
    image, label = pair
    shift = np.zeros((*image.shape[:-1], 3), np.float32)
    shift[..., 0] = 1.0  # each voxel takes its neighbour along axis 0; last slice -> 0
    out_image, out_label = augment.elastic(image, label, shift)
    np.testing.assert_allclose(out_image[:-1], image[1:], atol=1e-6)
    assert np.all(np.asarray(out_image)[-1] == 0) and np.all(
        np.asarray(out_label)[-1] == 0
    )
    np.testing.assert_array_equal(out_label[:-1], label[1:])


def test_intensity_twins_match_formulas(pair):
    image, _ = pair
    low, high = image.min(axis=(0, 1, 2)), image.max(axis=(0, 1, 2))
    expected = ((image - low) / (high - low)) ** 1.7 * (high - low) + low
    np.testing.assert_allclose(augment.adjust_gamma(image, 1.7), expected, rtol=1e-5)
    np.testing.assert_allclose(augment.adjust_brightness(image, 1.2), image * 1.2)
    mean = image.mean(axis=(0, 1, 2))
    expected = np.clip((image - mean) * 1.3 + mean, low, high)
    np.testing.assert_allclose(augment.adjust_contrast(image, 1.3), expected, rtol=1e-5)


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_blur_matches_scipy_gaussian_filter(pair, sigma):
    image, _ = pair
    expected = np.stack(
        [
            ndimage.gaussian_filter(
                image[..., c], sigma, mode="reflect", truncate=3 / sigma
            )
            for c in range(image.shape[-1])
        ],
        -1,
    )
    np.testing.assert_allclose(augment.gaussian_blur(image, sigma), expected, atol=1e-5)


def _box(shape):
    label = np.zeros((*shape, 1), np.int32)
    label[4:12, 5:14, 3:9] = 1
    return label.astype(np.float32), label


def test_random_spatial_transforms_keep_image_and_label_aligned():
    image, label = _box((16, 18, 12))
    config = augment.AugmentConfig(
        p_rotate=1.0,
        p_scale=1.0,
        p_elastic=1.0,
        p_gamma=0,
        p_brightness=0,
        p_contrast=0,
        p_noise=0,
        p_blur=0,
    )
    augmenter = augment.Augmenter(config, spatial_dims=3)
    for s in range(4):
        out_image, out_label = augmenter(image, label, tf.constant([s, 7]))
        out_image, out_label = np.asarray(out_image), np.asarray(out_label)
        assert np.all(out_label[out_image > 0.999] == 1)
        assert np.all(out_label[out_image < 0.001] == 0)
        assert not np.array_equal(out_label, label)


def test_augmenter_is_deterministic_per_seed_and_respects_mirror_axes(pair):
    image, label = pair
    augmenter = augment.Augmenter(augment.AugmentConfig(), spatial_dims=3)
    run = tf.function(augmenter)
    a = run(image, label, tf.constant([3, 4]))
    b = run(image, label, tf.constant([3, 4]))
    c = run(image, label, tf.constant([5, 4]))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    only_axis_0 = augment.Augmenter(
        augment.AugmentConfig(
            mirror_axes=(0,),
            p_rotate=0,
            p_scale=0,
            p_gamma=0,
            p_brightness=0,
            p_contrast=0,
            p_noise=0,
            p_blur=0,
        ),
        spatial_dims=3,
    )
    seen = set()
    for s in range(12):
        out, _ = only_axis_0(image, label, tf.constant([s, 0]))
        if np.array_equal(out, image):
            seen.add("none")
        else:
            np.testing.assert_array_equal(out, np.flip(image, 0))
            seen.add("axis 0")
    assert seen == {"none", "axis 0"}


def test_bad_augment_config():
    with pytest.raises(
        ValueError, match=r"train.augment.p_gamma must be in \[0.0, 1.0\], got 1.5"
    ):
        augment.AugmentConfig(p_gamma=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        augment.AugmentConfig(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match=r"mirror_axes \[2\] out of range for 2D"):
        augment.Augmenter(augment.AugmentConfig(mirror_axes=(0, 2)), spatial_dims=2)
    # left out, the mirror axes are every spatial axis of the data
    assert augment.Augmenter(augment.AugmentConfig(), 2).config.mirror_axes == (0, 1)
