"""A bundle's medseg.json read into a validated BundleMetadata: the shipped bundles
load, and a missing or mistyped field is one line naming it."""

from __future__ import annotations

import json
import shutil

import pytest

from medseg.bundle import BundleMetadata, Label, read_metadata, resolve
from medseg.errors import InputFileError
from tests.conftest import SAMPLE
from tests.conftest import run_medseg as medseg


def test_the_shipped_bundles_read_into_typed_fields():
    hippocampus = read_metadata(resolve("hippocampus"))
    assert hippocampus.format_version == 1
    assert hippocampus.task == "segmentation"
    assert hippocampus.labels == (
        Label(0, "background"),
        Label(1, "Anterior"),
        Label(2, "Posterior"),
    )
    assert (hippocampus.in_channels, hippocampus.spatial_dims) == (1, 3)
    assert hippocampus.patch_size == hippocampus.window == (48, 64, 48)
    assert hippocampus.slice_axis is None
    assert hippocampus.mirror_axes == (0,)  # left-right only: not along axis 1
    assert hippocampus.preprocessor.target_spacing_mm == (1.0, 1.0, 1.0)
    # the record stays readable as it was written
    record = json.loads((resolve("hippocampus") / "medseg.json").read_text())
    assert hippocampus.to_dict() == record
    assert hippocampus["fingerprint"] == record["fingerprint"]
    membrane = read_metadata(resolve("membrane"))
    assert membrane.label_values == (0, 255)
    assert membrane.label_names == ("membrane", "cell")


def test_a_2d_network_on_volumes_has_a_window_one_slice_deep():
    record = json.loads((resolve("hippocampus") / "medseg.json").read_text())
    record.update(spatial_dims=2, patch_size=[36, 50], plan={"slice_axis": 2})
    metadata = BundleMetadata(record)
    assert metadata.window == (36, 50, 1)
    record["plan"]["slice_axis"] = 0
    assert BundleMetadata(record).window == (1, 36, 50)


def _shipped_record() -> dict:
    return json.loads((resolve("hippocampus") / "medseg.json").read_text())


def _without(key):
    def edit(record):
        del record[key]

    return edit


def _set(key, value):
    def edit(record):
        record[key] = value

    return edit


def _labels_twice(record):
    record["labels"]["2"]["value"] = 1


BROKEN = [
    (_without("labels"), "labels: missing"),
    (_without("patch_size"), "patch_size: missing"),
    (_without("preprocessing"), "preprocessing: missing"),
    (_without("in_channels"), "in_channels: missing"),
    (_without("task"), "task: missing"),
    (_set("in_channels", "1"), "in_channels: '1' is not a whole number"),
    (_set("in_channels", True), "in_channels: True is not a whole number"),
    (_set("in_channels", 0), "in_channels: 0, less than 1"),
    (_set("spatial_dims", 4), "spatial_dims: 4, not 2 or 3"),
    (_set("task", "detection"), "task: 'detection' is not one of segmentation"),
    (_set("patch_size", [40, 56]), "patch_size: [40, 56] is not 3 positive whole"),
    (_set("patch_size", [40, 56, 0]), "patch_size: [40, 56, 0] is not 3 positive"),
    (_set("patch_size", "40"), "patch_size: '40' is not a list"),
    (_set("labels", {}), "labels: empty"),
    (_set("labels", {"0": "bg", "2": "x"}), "labels: no class 1 (classes are"),
    (_labels_twice, "labels: value 1 given twice (Anterior, Posterior): their classes"),
    (_set("preprocessing", {"normalizers": 3}), "preprocessing: cannot be read"),
    (_set("model_sha256", "abc"), "model_sha256: 'abc' is not a sha256"),
    (_set("plan", {"slice_axis": 5}), "plan.slice_axis: 5 is not 0, 1 or 2"),
    (_set("format_version", 9), "bundle format 9 is newer than this medseg reads"),
]


@pytest.mark.parametrize(("edit", "problem"), BROKEN)
def test_a_broken_field_is_one_line_naming_it(tmp_path, edit, problem):
    record = _shipped_record()
    edit(record)
    path = tmp_path / "medseg.json"
    path.write_text(json.dumps(record))
    with pytest.raises(InputFileError) as raised:
        BundleMetadata.from_json(path)
    assert str(raised.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(raised.value)


def test_a_json_list_or_bad_json_is_refused_by_name(tmp_path):
    path = tmp_path / "medseg.json"
    path.write_text("[1, 2]")
    with pytest.raises(InputFileError, match="a list, not a JSON object"):
        BundleMetadata.from_json(path)
    path.write_text("{not json")
    with pytest.raises(InputFileError, match="unreadable bundle metadata"):
        BundleMetadata.from_json(path)


def _broken_bundle(folder, edit):
    shutil.copytree(resolve("hippocampus"), folder)
    record = json.loads((folder / "medseg.json").read_text())
    record.pop("metadata_sha256", None)  # edited on purpose: no checksum to keep
    edit(record)
    (folder / "medseg.json").write_text(json.dumps(record))
    return folder


@pytest.mark.slow
def test_predict_and_info_refuse_a_broken_bundle_in_one_line(tmp_path):
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    missing = _broken_bundle(tmp_path / "missing", _without("labels"))
    for args in (
        ("predict", "--model", missing, "--input", scan, "--output", tmp_path / "o"),
        ("info", missing),
        ("info", scan, "--model", missing),
    ):
        result = medseg(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert f"{missing / 'medseg.json'}: labels: missing" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_labels_that_do_not_match_the_networks_classes_are_refused(tmp_path):
    def two_labels(record):
        del record["labels"]["2"]

    bundle = _broken_bundle(tmp_path / "two", two_labels)
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = medseg(
        "predict", "--model", bundle, "--input", scan, "--output", tmp_path / "o"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"{bundle}: medseg.json names 2 labels, but the network outputs 3 classes"
        in result.stderr
    )


def test_an_edit_to_medseg_json_is_caught_by_its_checksum(tmp_path, caplog):
    import keras

    from medseg.bundle import verify, write_bundle
    from tests.conftest import bundle_record

    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(2, 1)])
    folder = write_bundle(tmp_path / "b", model, bundle_record())
    record = json.loads((folder / "medseg.json").read_text())
    assert len(record["metadata_sha256"]) == 64
    assert verify(folder)["labels"]["1"]["name"] == "class 1"
    # the same content written otherwise (indent, key order) is the same bundle
    (folder / "medseg.json").write_text(json.dumps(dict(reversed(record.items()))))
    verify(folder)
    record["labels"]["1"]["name"] = "tumour"
    (folder / "medseg.json").write_text(json.dumps(record, indent=1))
    with pytest.raises(InputFileError) as caught:
        verify(folder)
    assert str(caught.value) == (
        f"{folder / 'medseg.json'}: edited since the bundle was written (its content "
        "no longer matches its metadata_sha256; --allow-modified-model uses it anyway)"
    )
    with caplog.at_level("WARNING"):
        assert verify(folder, allow_modified=True).label_names == ("class 0", "tumour")
    assert "edited since the bundle was written; used anyway" in caplog.text
