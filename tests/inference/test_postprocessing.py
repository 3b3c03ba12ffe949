from __future__ import annotations

import numpy as np
import pytest

from medseg.inference.postprocessing import clean_labels
from tests import reference


@pytest.mark.parametrize("shape", [(9, 8, 7), (15, 12)])
@pytest.mark.parametrize(
    ("keep_largest", "min_size"), [(True, 0.0), (False, 6.0), (True, 9.0)]
)
def test_clean_labels_matches_flood_fill_reference(shape, keep_largest, min_size, rng):
    labels = (rng.random(shape) < 0.25).astype(np.uint8) * rng.integers(1, 3, shape)
    labels = labels.astype(np.uint8)
    spacing = (1.5, 0.5, 2.0)[: len(shape)]
    voxel = float(np.prod(spacing))
    out = clean_labels(
        labels, spacing, keep_largest=keep_largest, min_size_mm3=min_size
    )
    expected = reference.clean_labels(labels, voxel, 0, keep_largest, min_size)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == labels.dtype
    assert (out != labels).any()  # the case does remove something


def test_diagonal_neighbours_are_one_component_and_background_value_is_kept():
    labels = np.full((6, 6), 255, np.uint8)  # background value 255
    labels[0, 0] = labels[1, 1] = labels[2, 2] = 0  # one diagonal component of 3
    labels[5, 5] = 0  # a single voxel
    out = clean_labels(labels, (1.0, 1.0), background=255, keep_largest=True)
    expected = labels.copy()
    expected[5, 5] = 255
    np.testing.assert_array_equal(out, expected)
    # sizes are in mm^2 here: 3 voxels of 2 x 2 mm = 12 mm^2 stay at a 12 limit
    out = clean_labels(labels, (2.0, 2.0), background=255, min_size_mm3=12.0)
    np.testing.assert_array_equal(out, expected)
    assert labels[5, 5] == 0  # input untouched
