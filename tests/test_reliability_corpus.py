"""Hostile inputs, each once found to give a silent wrong result or a traceback: values
the network cannot take, models whose output is NaN, configs that train nothing, long
file names, damaged outputs and NaN options. Each now gets one line naming the file
and the problem, and the rest of a batch goes on."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import InputFileError
from medseg.preprocessing.intensity import ZScoreNormalization, check_normalised
from tests import reference
from tests.conftest import SAMPLE, assert_failures_named
from tests.conftest import run_medseg as medseg


def test_z_score_statistics_do_not_overflow_in_float32(rng):
    image = rng.normal(300, 50, (20, 20, 20)).astype(np.float32)
    scaled = image * np.float32(1e20)  # its float32 sum of squares is inf
    expected = reference.zscore(image.astype(np.float64))
    np.testing.assert_allclose(ZScoreNormalization()(scaled), expected, atol=1e-4)
    big = image.astype(np.float64) * 1e30  # float64 data near float32's top
    np.testing.assert_allclose(ZScoreNormalization()(big), expected, atol=1e-4)


def test_a_channel_flattened_by_one_outlier_is_refused(rng):
    image = rng.normal(300, 50, (20, 20, 20, 1)).astype(np.float32)
    check_normalised(ZScoreNormalization()(image[..., 0])[..., None], "s.nii",
                     [ZScoreNormalization()])  # fmt: skip
    image[0, 0, 0] = 1e20
    normalised = ZScoreNormalization()(image[..., 0])[..., None]
    with pytest.raises(InputFileError, match="s.nii: channel 0: a few extreme voxels"):
        check_normalised(normalised, "s.nii", [ZScoreNormalization()])
    sparse = np.zeros((20, 20, 20, 1), np.float32)  # ten bright voxels: anatomy
    sparse.flat[::800] = 1000.0
    check_normalised(ZScoreNormalization()(sparse[..., 0])[..., None], "s.nii",
                     [ZScoreNormalization()])  # fmt: skip


@pytest.mark.slow
def test_scans_the_network_cannot_take_are_refused_and_scaled_ones_agree(
    bundle, tmp_path
):
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(source)
    data = np.asanyarray(img.dataobj).astype(np.float64)
    inputs = tmp_path / "in"
    inputs.mkdir()
    huge = data.copy()
    huge[0, 0, 0] = 1e39  # finite in float64, Inf in float32
    nib.save(nib.Nifti1Image(huge, img.affine), inputs / "huge.nii.gz")
    spike = data.astype(np.float32)
    spike[0, 0, 0] = 1e20
    nib.save(nib.Nifti1Image(spike, img.affine), inputs / "spike.nii.gz")
    scaled = data.astype(np.float32) * np.float32(1e20)
    nib.save(nib.Nifti1Image(scaled, img.affine), inputs / "scaled.nii.gz")
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), inputs / "as.nii.gz")
    out = tmp_path / "out"
    result = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 segmented, 0 skipped (output existed), 2 failed" in result.stdout
    assert_failures_named(
        result.stderr,
        inputs,
        [
            ("huge.nii.gz", "values up to 1e+39 do not fit float32"),
            ("spike.nii.gz", "a few extreme voxels hold most of its intensity"),
        ],
    )
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "as.nii.gz",
        "scaled.nii.gz",
    ]
    labels = [
        np.asanyarray(nib.load(out / n).dataobj) for n in ("as.nii.gz", "scaled.nii.gz")
    ]
    np.testing.assert_array_equal(labels[0], labels[1])


WRITE_NAN_BUNDLE = """
import sys
import numpy as np
from medseg.bundle import write_bundle
from medseg.models import build_unet
from tests.conftest import bundle_record

model = build_unet(spatial_dims=3, in_channels=1, num_classes=3, filters=(4, 8))
model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
write_bundle(sys.argv[1], model, bundle_record(spatial_dims=3, num_classes=3))
"""


@pytest.mark.slow
def test_a_model_whose_output_is_nan_is_named_and_nothing_is_written(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    nan_bundle = tmp_path / "nan"
    subprocess.run([sys.executable, "-c", WRITE_NAN_BUNDLE, str(nan_bundle)],
                   check=True, cwd=REPO, capture_output=True)  # fmt: skip
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    result = medseg("predict", "--model", nan_bundle, "--input", scan, "--output", out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "0 segmented, 0 skipped (output existed), 1 failed" in result.stdout
    assert f"{nan_bundle}: the network's output holds" in result.stderr
    assert "NaN/Inf values on this scan" in result.stderr
    assert not list(out.glob("*.nii.gz"))


@pytest.mark.slow
def test_a_run_whose_loss_becomes_nan_stops_with_one_line_and_no_bundle(tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text(
        "model: {name: unet, spatial_dims: 3, filters: [4, 8], "
        "patch_size: [16, 16, 16]}\n"
        "train: {epochs: 2, steps_per_epoch: 3, batch_size: 2, optimizer: sgd, "
        "learning_rate: 1.0e+30, folds: 4}\n"
    )
    run = tmp_path / "run"
    result = medseg("train", "--config", config, "--data", SAMPLE, "--output", run)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {config}: the training loss became nan in epoch 1 (learning rate "
        "1e+30 too high for this network and data?); nothing of this epoch is kept"
    )
    assert not (run / "medseg.json").exists() and not (run / "checkpoint").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "--prediction", ".", "--truth", ".", "--tolerance-mm", "nan"],
        ["predict", "--model", "m", "--input", ".", "--output", "o",
         "--overlap", "nan"],
        ["predict", "--model", "m", "--input", ".", "--output", "o",
         "--min-size-mm3", "nan"],
        ["train", "--config", "c.yaml", "--output", "o", "--memory-gb", "inf"],
        ["finetune", "--model", "m", "--output", "o", "--lr", "nan"],
    ],
)  # fmt: skip
def test_numeric_options_refuse_nan_and_infinity_as_usage_errors(args):
    from click.testing import CliRunner

    from medseg_cli.main import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "is not a finite number" in result.output


@pytest.mark.slow
def test_a_long_input_name_is_segmented_and_a_damaged_output_is_not_done(
    bundle, tmp_path
):
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    long_name = "a" * 245 + ".nii.gz"  # the output's name is legal, ".NAME.*" is not
    shutil.copy(source, inputs / long_name)
    shutil.copy(source, inputs / "short.nii.gz")
    out = tmp_path / "out"
    result = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 segmented, 0 skipped (output existed), 0 failed" in result.stdout
    assert (out / long_name).is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    whole = (out / "short.nii.gz").read_bytes()
    (out / "short.nii.gz").write_bytes(whole[:-60])  # header whole, data cut
    again = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert again.returncode == 1
    assert "0 segmented, 1 skipped (output existed), 1 failed" in again.stdout
    assert f"{out / 'short.nii.gz'}: truncated file" in again.stderr
    assert "--overwrite redoes it" in again.stderr


def test_hidden_names_beside_a_long_name_stay_within_the_limit(tmp_path):
    import os

    from medseg.io.files import hidden_sibling, hidden_stem

    short = tmp_path / "case.nii.gz"
    assert hidden_sibling(short, ".in-hand").name == ".case.nii.gz.in-hand"
    long_a, long_b = tmp_path / ("a" * 250 + "x"), tmp_path / ("a" * 250 + "y")
    marker = hidden_sibling(long_a, ".0123abcd.partial.nii.gz")
    assert len(os.fsencode(marker.name)) <= 255
    assert marker.parent == tmp_path and marker.name.startswith(".aaaa")
    assert hidden_stem(long_a) == hidden_stem(long_a) != hidden_stem(long_b)
    marker.write_text("fits")  # the file system takes it


def _label_files(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), folder / name)


def test_summary_json_holds_null_not_nan_and_negative_labels_fail_by_name(tmp_path):
    import json

    truth = np.zeros((10, 10, 10), np.int16)
    truth[2:5, 2:5, 2:5] = 1
    _label_files(tmp_path / "p", "empty.nii.gz", np.zeros_like(truth))
    _label_files(tmp_path / "t", "empty.nii.gz", truth)
    negative = truth.copy()
    negative[7, 7, 7] = -3
    _label_files(tmp_path / "p", "negative.nii.gz", negative)
    _label_files(tmp_path / "t", "negative.nii.gz", truth)
    summary = tmp_path / "summary.json"
    result = medseg(
        "evaluate", "--prediction", tmp_path / "p", "--truth", tmp_path / "t",
        "--summary", summary,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert (
        f"{tmp_path / 'p' / 'negative.nii.gz'}: negative values (-3): label values "
        "are 0 (background) and up"
    ) in result.stderr

    def refuse(constant):
        raise ValueError(f"bare {constant} in the summary")

    record = json.loads(summary.read_text(), parse_constant=refuse)
    label = record["labels"]["1"]
    assert label["dice"]["mean"] == 0.0  # nothing predicted where truth has a label
    assert label["hd95_mm"]["mean"] is None  # undefined: no predicted surface
    assert record["failed"] and record["cases"] == 1


@pytest.mark.slow
def test_case_nii_and_case_nii_gz_are_told_apart_in_the_volumes_table(bundle, tmp_path):
    import csv

    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(source, inputs / "case.nii.gz")
    nib.save(nib.load(source), inputs / "case.nii")
    out = tmp_path / "out"
    result = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "medseg_volumes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({row["case"] for row in rows}) == ["case.nii", "case.nii.gz"]
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append((row["label"], row["voxels"]))
    assert by_case["case.nii"] == by_case["case.nii.gz"]  # the same scan


@pytest.mark.slow
def test_a_bundle_spacing_far_finer_than_the_scan_is_one_line_not_an_allocation(
    bundle, tmp_path
):
    import json

    fine = tmp_path / "fine"
    shutil.copytree(bundle, fine)
    record = json.loads((fine / "medseg.json").read_text())
    record.pop("metadata_sha256")  # edited on purpose
    record["preprocessing"]["target_spacing_mm"] = [0.005, 0.005, 0.005]
    (fine / "medseg.json").write_text(json.dumps(record))
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = medseg(
        "predict", "--model", fine, "--input", scan, "--output", tmp_path / "o"
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{scan}: resampling its 1 x 1 x 1 mm voxels to the model's 0.005 x " in (
        result.stderr
    )
    assert "more than the 1,073,741,824 medseg takes in one scan" in result.stderr
    assert "Unable to allocate" not in result.stderr
    info = medseg("info", scan, "--model", fine)
    assert "resampling its 1 x 1 x 1 mm voxels" in info.stdout + info.stderr


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("x.png", "a .png picture cannot hold the 3D label map of"),
        ("x.jpg", "JPEG is lossy and would change label values; name it .png"),
    ],
)
def test_an_output_format_that_cannot_hold_the_result_is_refused_first(
    tmp_path, name, problem
):
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    output = tmp_path / "out" / name
    result = medseg("predict", "--model", "hippocampus", "--input", scan,
                    "--output", output)  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"Error: {output}: {problem}")
    )
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_the_python_api_refuses_nan_sizes_and_overlaps():
    import medseg

    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    with pytest.raises(ValueError, match="min_size_mm3 must be a finite size >= 0"):
        medseg.segment(scan, model="hippocampus", min_size_mm3=float("nan"))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got nan"):
        medseg.segment(scan, model="hippocampus", overlap=float("nan"))
