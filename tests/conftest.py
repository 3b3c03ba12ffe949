from __future__ import annotations

import os
import subprocess
import sys
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


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Writes a small NIfTI for a test (parents created)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def save_slicer_segmentation(
    path: Path, layers: np.ndarray, segments, affine: np.ndarray | None = None
) -> Path:
    """Writes a 3D Slicer segmentation (``.seg.nrrd``) by hand, as Slicer lays it out:
    ``layers`` ``(X, Y, Z)`` or ``(X, Y, Z, L)`` of uint8 on the RAS ``affine``
    (identity by default), a list axis first where there are layers, and
    ``segments`` ``[(name, label value, layer), ...]`` as ``SegmentN_`` fields."""
    layers = np.asarray(layers, np.uint8)
    affine = np.eye(4) if affine is None else np.asarray(affine, float)
    spatial = layers.shape[:3]
    list_axis = layers.ndim == 4
    vectors = " ".join(
        "(" + ",".join(f"{v:.17g}" for v in affine[:3, axis]) + ")" for axis in range(3)
    )
    lines = [
        "NRRD0004",
        "type: unsigned char",
        f"dimension: {3 + list_axis}",
        "space: right-anterior-superior",
        "sizes: " + " ".join(map(str, (layers.shape[3:] + spatial))),
        "space directions: " + ("none " if list_axis else "") + vectors,
        "kinds: " + ("list " if list_axis else "") + "domain domain domain",
        "encoding: raw",
        "space origin: (" + ",".join(f"{v:.17g}" for v in affine[:3, 3]) + ")",
    ]
    for number, (name, value, layer) in enumerate(segments):
        lines += [
            f"Segment{number}_ID:=Segment_{number + 1}",
            f"Segment{number}_Name:={name}",
            f"Segment{number}_LabelValue:={value}",
            f"Segment{number}_Layer:={layer}",
        ]
    # the fastest axis first in the file: the list axis, then x, y, z
    data = np.transpose(layers, (2, 1, 0, 3)[: layers.ndim]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n\n").encode() + data)
    return path


def stored_in_another_order(array: np.ndarray, affine, permutation, flips):
    """The same voxels stored another way: new axis ``a`` is old axis
    ``permutation[a]``, the new axes in ``flips`` reversed; the affine keeps each voxel
    where it was in the world. ``array`` is ``(X, Y, Z)`` or ``(X, Y, Z, C)``."""
    affine = np.asarray(affine, dtype=float)
    stored = array.transpose(*permutation, *range(3, array.ndim))
    if flips:
        stored = np.flip(stored, axis=tuple(flips))
    new = np.eye(4)
    new[:3, 3] = affine[:3, 3]
    for a, old in enumerate(permutation):
        new[:3, a] = affine[:3, old]
        if a in flips:  # new index j is old index n - 1 - j
            new[:3, a] = -affine[:3, old]
            new[:3, 3] += affine[:3, old] * (array.shape[old] - 1)
    return np.ascontiguousarray(stored), new


@pytest.fixture
def msd_dataset(tmp_path):
    """A three-case Decathlon-layout dataset with labels 0, 1, 2 in a fresh folder."""
    import json

    root = tmp_path / "msd"
    rng = np.random.default_rng(5)
    entries = []
    for i in range(3):
        image = rng.normal(100, 20, size=(8, 9, 7)).astype(np.float32)
        label = np.zeros((8, 9, 7), np.uint8)
        label[2:5, 3:6, 2:4] = 1
        label[5:7, 3:6, 2:4] = 2
        save_nifti(root / "imagesTr" / f"case_{i}.nii.gz", image)
        save_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label)
        entries.append(
            {
                "image": f"./imagesTr/case_{i}.nii.gz",
                "label": f"./labelsTr/case_{i}.nii.gz",
            }
        )
    manifest = {
        "name": "Tiny",
        "labels": {"0": "background", "1": "a", "2": "b"},
        "modality": {"0": "MRI"},
        "training": entries,
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def pytest_configure(config):
    # quieten TensorFlow's C++ start-up logging in test output
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # precision "auto" is bfloat16 on a CPU with AMX and float32 elsewhere: the suite
    # pins it so that no result depends on the CPU it runs on (a test of the bfloat16
    # route says so); MEDSEG_AUTO_PRECISION=bfloat16 runs it as an AMX CPU would
    os.environ.setdefault("MEDSEG_AUTO_PRECISION", "float32")
    import medseg  # noqa: F401  (its TensorFlow defaults, before any test imports TF)


#: A 3D U-Net small enough to train in seconds on the sample (end-to-end tests).
TINY_CONFIG = """\
model: {name: unet, spatial_dims: 3, filters: [4, 8], patch_size: [16, 16, 16]}
train: {epochs: 1, steps_per_epoch: 2, batch_size: 2, optimizer: adam,
        learning_rate: 0.001, folds: 4, augment: {mirror_axes: [0, 2]}}
"""


def bundle_record(spatial_dims=2, in_channels=1, num_classes=2, **fields) -> dict:
    """The least ``medseg.json`` a bundle of a ``build_unet`` network needs (task,
    labels, channels, dimensions, patch, preprocessing), and ``fields``, for tests
    that write bundles by hand."""
    labels = {str(k): {"value": k, "name": f"class {k}"} for k in range(num_classes)}
    return {
        "task": "segmentation",
        "labels": labels,
        "in_channels": in_channels,
        "spatial_dims": spatial_dims,
        "patch_size": [16] * spatial_dims,
        "preprocessing": {"normalizers": [{"scheme": "zscore"}] * in_channels},
        **fields,
    }


def run_medseg(*args) -> subprocess.CompletedProcess:
    """``medseg ARGS`` in a fresh process (arguments may be non-UTF-8 paths)."""
    return subprocess.run(
        [sys.executable, "-m", "medseg_cli", *(os.fsdecode(str(a)) for a in args)],
        capture_output=True,
        text=True,
        errors="replace",
    )


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """A bundle trained with TINY_CONFIG on the sample, shared read-only by tests."""
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "tiny.yaml").write_text(TINY_CONFIG)
    result = run_medseg(
        "train",
        "--config",
        folder / "tiny.yaml",
        "--data",
        SAMPLE,
        "--output",
        folder / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def assert_failures_named(stderr: str, folder: Path, problems) -> None:
    """Each ``(file name, problem)`` has an error line naming ``folder / name`` that
    says the problem."""
    for name, problem in problems:
        lines = [line for line in stderr.splitlines() if f"{folder / name}: " in line]
        assert lines and problem in lines[-1], (name, stderr[-3000:])


def tiny_classification(folder, rng, train_extra: str = "") -> tuple:
    """A MedMNIST-style ``tiny.npz`` (40 training and 10 validation 12^3 images, two
    classes) and a config of a small classifier for it, ``train_extra`` added to
    its train section; ``(npz, config)``."""
    npz = folder / "tiny.npz"
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (40, 12, 12, 12), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (40, 1)),
        val_images=rng.integers(0, 255, (10, 12, 12, 12), dtype=np.uint8),
        val_labels=np.array([[0], [1]] * 5),
    )
    config = folder / "cls.yaml"
    config.write_text(
        "model: {name: classifier, spatial_dims: 3, architecture: simple}\n"
        "data: {task: classification}\n"
        "train: {epochs: 2, steps_per_epoch: 2, batch_size: 8, optimizer: adam, "
        f"learning_rate: 0.001{train_extra}}}\n"
    )
    return npz, config
