from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

#: An oblique, anisotropic affine in LPS-like orientation (rotated ~20 degrees, 0.8 x
#: 0.9 x
#: 3.5 mm voxels), the kind of geometry that breaks tools that assume RAS.
OBLIQUE_LPS = np.array(
    [
        [-0.75, 0.31, 0.20, 90.5],
        [-0.27, -0.84, 0.35, 120.25],
        [0.05, 0.09, 3.47, -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def oblique_nifti(tmp_path, rng):
    """An int16 NIfTI with an oblique LPS affine, sform code 2, qform code 1,
    mm/msec."""
    import nibabel as nib

    data = rng.integers(-1000, 2000, size=(9, 7, 5)).astype(np.int16)
    img = nib.Nifti1Image(data, OBLIQUE_LPS)
    img.set_sform(OBLIQUE_LPS, code=2)
    img.set_qform(OBLIQUE_LPS, code=1)
    img.header.set_xyzt_units("mm", "msec")
    img.header["descrip"] = b"medseg test volume"
    path = tmp_path / "oblique.nii.gz"
    nib.save(img, path)
    return path, data
