"""Property-based fuzzing of the readers and the config loader: any bytes give a
volume or an ``InputFileError`` (one line naming the file), never another exception
and never a hang."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.config import load_config
from medseg.errors import InputFileError
from medseg.io import read_volume
from tests.conftest import SAMPLE

FUZZ = settings(
    max_examples=300,
    deadline=5000,  # a hang shows as a deadline error
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
MAX_VOXELS = 10_000_000

#: offsets of the NIfTI-1 header fields worth breaking: dim, intent, datatype,
#: bitpix, pixdim, vox_offset, scl_slope/inter, xyzt_units, qform/sform codes,
#: quaternion, srow
FIELDS = {
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl": (112, "2f"),
    "xyzt_units": (123, "B"),
    "codes": (252, "2h"),
    "quatern": (256, "6f"),
    "srow": (280, "12f"),
}

odd_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1e-30, 1e30]),
)
odd_ints = st.one_of(
    st.integers(-32768, 32767), st.sampled_from([0, 1, 2, 3, 4, 7, 8, -1])
)


def _value(kind: str):
    count = int(kind[:-1]) if len(kind) > 1 else 1
    base = odd_floats if kind.endswith("f") else odd_ints
    if kind.endswith("B"):
        base = st.integers(0, 255)
    return st.lists(base, min_size=count, max_size=count)


@st.composite
def nifti_bytes(draw):
    """A small valid NIfTI with some of its header fields set to odd values and its
    data cut or padded."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=4)))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
    image = nib.Nifti1Image(np.ones(shape, dtype), np.eye(4))
    blob = bytearray(image.to_bytes())
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4)):
        offset, kind = FIELDS[name]
        values = draw(_value(kind))
        fmt = "<" + (kind if len(kind) == 1 else f"{int(kind[:-1])}{kind[-1]}")
        blob[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    cut = draw(st.one_of(st.none(), st.integers(0, len(blob))))
    if cut is not None:
        blob = blob[:cut]
    return bytes(blob)


def _read(path):
    try:
        volume = read_volume(path, max_voxels=MAX_VOXELS)
    except InputFileError as error:
        assert str(error).startswith(f"{path}: ")
        assert "\n" not in str(error)
        return None
    np.asarray(volume.array)  # the data, not the header alone
    assert volume.affine.shape == (4, 4)
    return volume


@FUZZ
@given(blob=nifti_bytes(), compressed=st.booleans())
def test_a_nifti_with_odd_header_fields_is_read_or_refused_by_name(
    tmp_path_factory, blob, compressed
):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / ("scan.nii.gz" if compressed else "scan.nii")
    path.write_bytes(gzip.compress(blob) if compressed else blob)
    _read(path)


@pytest.fixture(scope="module")
def sample_bytes():
    return sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0].read_bytes()


@FUZZ
@given(fraction=st.floats(0, 1), raw=st.booleans())
def test_a_scan_cut_at_any_byte_is_read_or_refused_by_name(
    tmp_path_factory, sample_bytes, fraction, raw
):
    blob = gzip.decompress(sample_bytes) if raw else sample_bytes
    folder = tmp_path_factory.mktemp("cut")
    path = folder / ("scan.nii" if raw else "scan.nii.gz")
    path.write_bytes(blob[: int(fraction * len(blob))])
    _read(path)


settings_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=3),
    ),
    max_leaves=8,
)
KEYS = {
    "model": ["name", "spatial_dims", "in_channels", "filters", "patch_size", "norm",
              "dropout", "padding", "deep_supervision", "architecture"],
    "data": ["task", "target_spacing_mm", "normalization", "labels", "nonfinite",
             "foreground_oversample", "crop_nonzero"],
    "train": ["epochs", "steps_per_epoch", "batch_size", "optimizer", "learning_rate",
              "momentum", "fold", "folds", "augment", "time_budget", "freeze",
              "unfreeze_after", "val_overlap", "precision", "keep"],
}  # fmt: skip


@st.composite
def configs(draw):
    config = {}
    for section, keys in KEYS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
            config[section] = {k: draw(settings_values) for k in chosen}
    if "model" in config and draw(st.booleans()):
        config["model"]["name"] = draw(st.sampled_from(["unet", "classifier", "x"]))
    return draw(st.one_of(st.just(config), settings_values))


@FUZZ
@given(config=configs())
def test_any_yaml_config_loads_or_is_one_line_naming_the_file(tmp_path_factory, config):
    path = tmp_path_factory.mktemp("config") / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        loaded = load_config(path)
    except InputFileError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    # what loads is what training takes: numbers finite, lists of the right kind
    assert loaded.to_dict()["train"]["epochs"] >= 1


def test_the_header_fields_fuzzing_found_are_read_or_refused_by_name(tmp_path):
    """An unknown spatial unit code is millimetres (as unknown units are), and a
    qform quaternion that is not a rotation is ignored beside a sform, refused
    alone (by nibabel, as unreadable)."""
    image = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.diag([2, 3, 4, 1]))
    image.header["xyzt_units"] = 4  # no unit has code 4
    nib.save(image, tmp_path / "units.nii")
    assert np.allclose(
        read_volume(tmp_path / "units.nii").affine, np.diag([2, 3, 4, 1])
    )

    def with_bad_quaternion(name, sform_code):
        image = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.diag([2, 3, 4, 1]))
        image.header.set_qform(np.diag([2, 3, 4, 1]), code=1)
        image.header.set_sform(np.diag([2, 3, 4, 1]), code=sform_code)
        blob = bytearray(image.to_bytes())
        offset, _ = FIELDS["quatern"]
        blob[offset : offset + 4] = struct.pack("<f", 2.0)  # b^2 + c^2 + d^2 > 1
        (tmp_path / name).write_bytes(bytes(blob))
        return tmp_path / name

    volume = read_volume(with_bad_quaternion("quaternion.nii", 1))
    assert np.allclose(volume.affine, np.diag([2, 3, 4, 1]))  # by the sform
    assert any("its qform is not a rotation" in note for note in volume.notes)
    alone = with_bad_quaternion("alone.nii", 0)
    with pytest.raises(InputFileError) as caught:
        read_volume(alone)
    assert str(caught.value).startswith(f"{alone}: unreadable (w2 should be positive")
