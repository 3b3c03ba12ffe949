from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.io import Volume
from medseg.io import grid as grids
from medseg.io.itk import SLICER_CROP_KEY
from medseg.io.volume import orientation_codes
from medseg.preprocessing import geometry
from tests import reference
from tests.conftest import OBLIQUE_LPS, stored_in_another_order

PROPERTY = settings(max_examples=40, deadline=None)


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@st.composite
def oblique_affines(draw):
    """Random oblique affines: rotation, axis order, flips, anisotropic spacing."""
    angle = st.floats(-0.6, 0.6)
    rotation = _rotation([draw(angle) for _ in range(3)])
    permutation = draw(st.permutations([0, 1, 2]))
    flips = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    spacing = [draw(st.floats(0.3, 5.0)) for _ in range(3)]
    linear = rotation[:, permutation] * np.array(flips) * np.array(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    return affine


shapes = st.tuples(*(st.integers(1, 6) for _ in range(3)))


def _volume(shape, affine, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    return Volume(rng.random((*shape, channels)).astype(np.float32), affine)


# orientation


@PROPERTY
@given(affine=oblique_affines(), shape=shapes)
def test_reorient_then_undo_is_identity(affine, shape):
    volume = _volume(shape, affine)
    canonical, record = geometry.reorient_to_canonical(volume)
    assert orientation_codes(canonical.affine) == "RAS"
    back = record.undo(canonical)
    assert back.spatial_shape == volume.spatial_shape
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_array_equal(back.array, volume.array)


@PROPERTY
@given(affine=oblique_affines(), shape=shapes)
def test_reorient_keeps_every_voxel_at_its_world_position(affine, shape):
    volume = _volume(shape, affine, channels=1)
    canonical, _ = geometry.reorient_to_canonical(volume)
    expected = reference.world_lookup(
        volume.array, affine, canonical.spatial_shape, canonical.affine
    )
    np.testing.assert_array_equal(canonical.array, expected)


def test_lps_becomes_ras_by_flipping_two_axes():
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    volume = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1), lps)
    canonical, record = geometry.reorient_to_canonical(volume)
    np.testing.assert_array_equal(canonical.array, volume.array[::-1, ::-1])
    # voxel (0, 0, 0) of the flipped grid is old voxel (1, 2, 0): world (-1, -2, 0)
    np.testing.assert_array_equal(canonical.affine[:3, 3], [-1.0, -2.0, 0.0])
    assert record.transform == ((0, -1), (1, -1), (2, 1))


def test_2d_volumes_pass_through_reorientation():
    volume = Volume(np.ones((4, 5, 1)), np.diag([-1.0, 1.0, 1.0, 1.0]))
    same, record = geometry.reorient_to_canonical(volume)
    assert same is volume and record.transform == ()
    assert record.undo(same).spatial_shape == (4, 5)


@PROPERTY
@given(
    affine=oblique_affines(),
    shape=shapes,
    permutation=st.permutations([0, 1, 2]),
    flips=st.sets(st.integers(0, 2)),
)
def test_a_grid_stored_in_another_voxel_order_is_read_in_the_references(
    affine, shape, permutation, flips
):
    reference_volume = _volume(shape, affine, channels=1)
    array, stored_affine = stored_in_another_order(
        reference_volume.array, affine, permutation, sorted(flips)
    )
    stored = Volume(array, stored_affine)
    # the stored file's voxels are where the reference's are, found one by one
    np.testing.assert_array_equal(
        reference.world_lookup(array, stored_affine, shape, affine),
        reference_volume.array,
    )
    ordered = grids.in_voxel_order_of(stored, reference_volume)
    np.testing.assert_array_equal(ordered.array, reference_volume.array)
    np.testing.assert_allclose(ordered.affine, affine, atol=1e-9)
    assert grids.in_voxel_order_of(reference_volume, reference_volume) is (
        reference_volume
    )


@PROPERTY
@given(
    affine=oblique_affines(),
    shape=st.tuples(*(st.integers(2, 7) for _ in range(3))),
    box=st.tuples(
        *(st.tuples(st.integers(-2, 6), st.integers(1, 5)) for _ in range(3))
    ),
    permutation=st.permutations([0, 1, 2]),
    flips=st.sets(st.integers(0, 2)),
)
def test_a_label_map_saved_on_a_box_of_the_grid_is_placed_in_it(
    affine, shape, box, permutation, flips
):
    # a label map on the box starting at voxel `start` of the reference's grid (maybe
    # reaching past it), with labels only where the grid is, stored in another order
    start = np.array([s for s, _ in box])
    size = tuple(n for _, n in box)
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 3, size=(*size, 1)).astype(np.uint8)
    for axis in range(3):
        outside = (np.arange(size[axis]) + start[axis] < 0) | (
            np.arange(size[axis]) + start[axis] >= shape[axis]
        )
        index = [slice(None)] * 3
        index[axis] = outside
        labels[tuple(index)] = 0
    box_affine = affine.copy()
    box_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    array, stored_affine = stored_in_another_order(
        labels, box_affine, permutation, sorted(flips)
    )
    grid = Volume(np.zeros((*shape, 1), np.float32), affine)
    placed, offset = grids.in_box_of(Volume(array, stored_affine), grid)
    want = reference.world_lookup_or_zero(array, stored_affine, shape, affine)
    np.testing.assert_array_equal(placed.array, want)
    np.testing.assert_allclose(placed.affine, affine, atol=1e-9)
    assert int(placed.array.sum()) == int(labels.sum())  # no label lost
    assert offset == tuple(start)
    # taken for a crop only from a file that says it is one (a 3D Slicer .seg.nrrd)
    declared = {SLICER_CROP_KEY: " ".join(map(str, start))}
    slicer = grids.label_on_grid_of(Volume(array, stored_affine, declared), grid)
    np.testing.assert_array_equal(slicer.array, want)
    if size != shape or start.any():
        assert grids.label_on_grid_of(Volume(array, stored_affine), grid) is None
    # a label outside the grid cannot be placed; nor a box half a voxel off
    corner = tuple(0 if s < 0 else n - 1 for s, n in zip(start, size, strict=True))
    if not all(0 <= c + s < n for c, s, n in zip(corner, start, shape, strict=True)):
        outside = labels.copy()
        outside[corner] = 1
        assert grids.in_box_of(Volume(outside, box_affine), grid) is None
    shifted = box_affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 1]
    assert grids.in_box_of(Volume(labels, shifted), grid) is None


def test_another_grid_is_not_taken_for_one_in_another_voxel_order():
    affine = OBLIQUE_LPS
    volume = _volume((5, 6, 7), affine, channels=1)
    array, stored_affine = stored_in_another_order(volume.array, affine, (2, 0, 1), [1])
    shifted = stored_affine.copy()
    shifted[:3, 3] += 0.5 * stored_affine[:3, 0]  # half a voxel along one axis
    assert grids.in_voxel_order_of(Volume(array, shifted), volume) is None
    finer = stored_affine.copy()
    finer[:3, 2] *= 0.9  # another spacing
    assert grids.in_voxel_order_of(Volume(array, finer), volume) is None
    assert grids.in_voxel_order_of(Volume(array[:-1], stored_affine), volume) is None
    # a 2D picture stored transposed is another picture, not another order
    picture = Volume(np.arange(12.0).reshape(3, 4, 1), np.eye(4))
    transposed = Volume(picture.array.transpose(1, 0, 2), np.eye(4))
    assert grids.in_voxel_order_of(transposed, picture) is None


# cropping


@PROPERTY
@given(affine=oblique_affines(), shape=shapes, data=st.data())
def test_crop_then_pad_is_identity(affine, shape, data):
    array = np.zeros((*shape, 2), np.float32)
    start = [data.draw(st.integers(0, n - 1)) for n in shape]
    stop = [data.draw(st.integers(a + 1, n)) for a, n in zip(start, shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    rng = np.random.default_rng(len(shape))
    array[box] = rng.random(array[box].shape) + 0.5
    volume = Volume(array, affine)
    cropped, record = geometry.crop_to_nonzero(volume)
    assert (record.start, record.stop) == reference.nonzero_bbox(array)
    # the first kept voxel sits where it sat before
    np.testing.assert_allclose(
        cropped.affine @ [0, 0, 0, 1], affine @ [*record.start, 1], atol=1e-9
    )
    back = record.undo(cropped)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_array_equal(back.affine, affine)


def test_crop_applies_the_same_box_to_labels_and_handles_empty():
    image = np.zeros((6, 6, 6, 1))
    image[1:3, 2:5, 3:4] = 1
    labels = Volume(np.arange(216).reshape(6, 6, 6, 1), np.eye(4))
    cropped, record = geometry.crop_to_nonzero(Volume(image, np.eye(4)))
    assert cropped.spatial_shape == (2, 3, 1)
    np.testing.assert_array_equal(
        record.apply(labels).array, labels.array[1:3, 2:5, 3:4]
    )
    empty, record = geometry.crop_to_nonzero(Volume(np.zeros((3, 4, 5, 1)), np.eye(4)))
    assert empty.spatial_shape == (3, 4, 5) and record.start == (0, 0, 0)


# resampling


def test_resampled_shape_and_anisotropy_rules():
    # 100 x 0.8 = 80 mm -> 80 voxels; 30 x 3 = 90 mm -> 90 voxels
    assert geometry.resampled_shape((100, 100, 30), (0.8, 0.8, 3.0), (1, 1, 1)) == (
        80,
        80,
        90,
    )
    assert geometry.out_of_plane_axis((0.8, 0.8, 3.0)) == 2  # ratio 3.75 > 3
    assert geometry.out_of_plane_axis((1.0, 1.0, 2.9)) is None
    assert geometry.out_of_plane_axis((3.0, 1.0, 1.0)) is None  # ratio exactly 3
    assert geometry.out_of_plane_axis((4.0, 4.0, 1.0)) is None  # two thick axes
    assert geometry.out_of_plane_axis((1.0, 1.0, 1.0), (1.0, 5.0, 1.0)) == 1
    with pytest.raises(ValueError, match="target spacing must be positive"):
        geometry.resampled_shape((4, 4, 4), (1, 1, 1), (1, 0, 1))


@PROPERTY
@given(
    affine=oblique_affines(), shape=shapes, target=st.tuples(*[st.floats(0.4, 4)] * 3)
)
def test_resample_then_undo_restores_shape_and_affine(affine, shape, target):
    volume = _volume(shape, affine)
    resampled, record = geometry.resample_to_spacing(volume, target, order=1)
    assert resampled.spatial_shape == geometry.resampled_shape(
        shape, volume.spacing, target
    )
    back = record.undo(resampled)
    assert back.spatial_shape == volume.spatial_shape
    np.testing.assert_array_equal(back.affine, affine)


@PROPERTY
@given(
    affine=oblique_affines(), shape=shapes, target=st.tuples(*[st.floats(0.4, 4)] * 3)
)
def test_resampled_affine_maps_each_voxel_to_the_point_it_samples(
    affine, shape, target
):
    volume = _volume(shape, affine, channels=1)
    resampled, _ = geometry.resample_to_spacing(volume, target, order=1)
    for index in [(0, 0, 0), tuple(n - 1 for n in resampled.spatial_shape)]:
        source = [
            (i + 0.5) * n_in / n_out - 0.5
            for i, n_in, n_out in zip(
                index, shape, resampled.spatial_shape, strict=True
            )
        ]
        np.testing.assert_allclose(
            resampled.affine @ [*index, 1], affine @ [*source, 1], atol=1e-9
        )


@pytest.mark.parametrize(
    ("shape", "new_shape"),
    [((4, 5, 3), (7, 3, 6)), ((6, 6, 2), (3, 9, 5)), ((5, 4), (9, 2))],
)
def test_linear_resampling_matches_reference(rng, shape, new_shape):
    array = rng.random((*shape, 2)).astype(np.float32)
    out = geometry.resample_array(array, new_shape, order=1)
    for c in range(2):
        np.testing.assert_allclose(
            out[..., c], reference.linear_resample(array[..., c], new_shape), atol=1e-5
        )


def test_label_resampling_per_class_linear_matches_reference(rng):
    labels = rng.integers(0, 3, size=(5, 4, 3, 1)).astype(np.uint8)
    new_shape = (8, 7, 5)
    out = geometry.resample_array(labels, new_shape, is_label=True)
    assert out.dtype == np.uint8
    expected = reference.labels_by_class_linear(labels[..., 0], new_shape)
    # compare away from exact ties between two classes, where rounding decides
    scores = np.sort(
        np.stack(
            [
                reference.linear_resample(
                    (labels[..., 0] == c).astype(float), new_shape
                )
                for c in range(3)
            ]
        ),
        axis=0,
    )
    clear = scores[-1] - scores[-2] > 1e-5
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(out[..., 0][clear], expected[clear])


def test_label_resampling_nearest_keeps_values(rng):
    labels = rng.integers(0, 4, size=(4, 4, 4, 1)).astype(np.int16)
    # doubling each axis with nearest: output voxel i samples input (i + 0.5) / 2 - 0.5
    out = geometry.resample_array(
        labels, (8, 8, 8), is_label=True, label_mode="nearest"
    )
    np.testing.assert_array_equal(out, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_anisotropic_scan_uses_nearest_along_thick_axis():
    # 4 slices 4 mm thick (ratio 4 > 3), values vary only along z; in-plane 1 mm
    slices = np.array([10.0, 20.0, 40.0, 80.0], np.float32)
    array = np.broadcast_to(slices, (6, 6, 4))[..., None].copy()
    volume = Volume(array, np.diag([1.0, 1.0, 4.0, 1.0]))
    out, record = geometry.resample_to_spacing(volume, (1.0, 1.0, 1.0))
    assert record.separate_axis == 2 and out.spatial_shape == (6, 6, 16)
    # output slice k samples z = (k + 0.5) / 4 - 0.5 = (k - 1.5) / 4, never a tie;
    # nearest picks round(z) clamped to the 4 slices, not a blend of two
    picks = np.clip(np.rint((np.arange(16) - 1.5) / 4), 0, 3).astype(int)
    np.testing.assert_allclose(out.array[2, 3, :, 0], slices[picks], atol=1e-4)
    np.testing.assert_allclose(out.array[..., 5, 0], slices[picks[5]], atol=1e-4)
    # linear along z instead blends neighbouring slices
    out, _ = geometry.resample_to_spacing(volume, (1.0, 1.0, 1.0), order_out_of_plane=1)
    assert not np.isin(out.array[2, 3, 2:14, 0], slices).all()


def test_cubic_resampling_of_a_linear_ramp_is_exact_inside():
    ramp = np.arange(40, dtype=np.float32)[:, None, None] * np.ones(
        (40, 5, 5), np.float32
    )
    out = geometry.resample_array(ramp[..., None], (80, 5, 5), order=3)
    # a cubic spline reproduces a linear function away from the edges (where the
    # edge-repeat boundary bends it): value at (i + 0.5) / 2 - 0.5
    inside = slice(24, 56)
    expected = (np.arange(80)[inside] + 0.5) / 2 - 0.5
    np.testing.assert_allclose(out[inside, 2, 2, 0], expected, atol=1e-3)


# records and chains


def test_full_chain_returns_to_the_original_grid_and_records_survive_json():
    rng = np.random.default_rng(7)
    array = np.zeros((12, 10, 6, 1), np.float32)
    array[2:9, 3:8, 1:5] = rng.random((7, 5, 4, 1)) + 1
    volume = Volume(array, OBLIQUE_LPS)
    ras, r1 = geometry.reorient_to_canonical(volume)
    iso, r2 = geometry.resample_to_spacing(ras, (1.5, 1.5, 1.5))
    crop, r3 = geometry.crop_to_nonzero(iso)
    records = [
        geometry.record_from_dict(json.loads(json.dumps(r.to_dict())))
        for r in (r1, r2, r3)
    ]
    assert records == [r1, r2, r3]
    back = geometry.undo(crop, records)
    assert back.spatial_shape == volume.spatial_shape
    np.testing.assert_array_equal(back.affine, OBLIQUE_LPS)

    labels = volume.with_array((array > 1.5).astype(np.uint8))
    ras_labels, r1 = geometry.reorient_to_canonical(labels)
    crop_labels, r3 = geometry.crop_to_nonzero(ras_labels)
    back = geometry.undo(crop_labels, [r1, r3], is_label=True)
    np.testing.assert_array_equal(back.array, labels.array)


def test_bad_records_and_shapes_raise():
    with pytest.raises(ValueError, match="unknown geometry step"):
        geometry.record_from_dict({"step": "rotate"})
    volume = Volume(np.ones((4, 4, 4, 1)), np.eye(4))
    _, record = geometry.crop_to_nonzero(volume)
    with pytest.raises(ValueError, match="undo crop"):
        record.undo(Volume(np.ones((3, 4, 4, 1)), np.eye(4)))
    with pytest.raises(ValueError, match="label_mode"):
        geometry.resample_array(volume.array, (2, 2, 2), is_label=True, label_mode="x")
