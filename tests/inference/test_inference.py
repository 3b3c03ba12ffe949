from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import inference
from tests import reference
from tests.conftest import SAMPLE, assert_failures_named
from tests.conftest import run_medseg as medseg


def test_window_starts_textbook_case():
    # image 110, patch 64, overlap 0.5: step <= 32 -> ceil(46 / 32) + 1 = 3 windows
    assert inference.window_starts(110, 64, 0.5) == [0, 23, 46]
    assert inference.window_starts(64, 64, 0.5) == [0]
    assert inference.window_starts(40, 64, 0.5) == [0]
    assert inference.window_starts(100, 10, 0.0) == list(range(0, 91, 10))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        inference.window_starts(100, 10, 1.0)


@pytest.mark.parametrize("blend", inference.BLENDS)
@pytest.mark.parametrize("shape", [(30, 27, 11), (9, 40)])
def test_plus_one_predictor_returns_input_plus_one(blend, shape, rng):
    image = rng.random((*shape, 1)).astype(np.float32)
    patch = (16,) * len(shape)
    out = inference.sliding_window_predict(
        image, lambda batch: batch + 1, patch_size=patch, blend=blend, batch_size=3
    )
    assert out.shape == image.shape
    np.testing.assert_allclose(out, image + 1, rtol=1e-6)


def test_sliding_window_progress_counts_each_forward_pass(rng):
    # 10 x 12 in windows of 4 at overlap 0.5: starts 0, 2, 4, 6 and 0, 2, ..., 8:
    # 4 x 5 = 20 windows, 3 a pass (and its mirrored passes)
    calls, seen = [], []

    def predict(batch):
        calls.append(len(batch))
        return batch

    inference.sliding_window_predict(
        rng.random((10, 12, 1)).astype(np.float32), predict, patch_size=(4, 4),
        batch_size=3, mirror_axes=(0,),
        progress=lambda done, total: seen.append((done, total, len(calls))),
    )  # fmt: skip
    assert seen == [(min(3 * k, 20), 20, 2 * k) for k in range(1, 8)]


def test_blending_matches_voxel_by_voxel_reference(rng):
    image = rng.random((13, 10, 1)).astype(np.float32)
    patch = (8, 6)
    ramp = np.arange(48, dtype=np.float32).reshape(8, 6, 1) / 48

    def predict(batch):  # not shift-invariant, so wrong placement would show
        return np.concatenate([batch * ramp, batch + ramp], axis=-1)

    out = inference.sliding_window_predict(
        image, predict, patch_size=patch, overlap=0.5, batch_size=2
    )
    starts = [inference.window_starts(13, 8, 0.5), inference.window_starts(10, 6, 0.5)]
    expected = reference.stitch(
        image, predict, patch, starts, inference.gaussian_importance(patch)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("axes", [(0,), (0, 2)])
def test_mirroring_each_window_matches_reference(axes, rng):
    image = rng.random((11, 9, 7, 1)).astype(np.float32)
    patch = (6, 5, 4)
    ramp = np.arange(120, dtype=np.float32).reshape(6, 5, 4, 1) / 120

    def predict(batch):  # position-dependent, so mirroring changes its output
        return np.concatenate([batch * ramp, np.sin(batch + ramp)], axis=-1)

    out = inference.sliding_window_predict(
        image, predict, patch_size=patch, batch_size=3, mirror_axes=axes
    )
    starts = [
        inference.window_starts(n, p, 0.5)
        for n, p in zip((11, 9, 7), patch, strict=True)
    ]
    expected = reference.stitch(
        image,
        reference.mirror_averaged(predict, axes),
        patch,
        starts,
        inference.gaussian_importance(patch),
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    plain = inference.sliding_window_predict(image, predict, patch_size=patch)
    assert np.abs(plain - out).max() > 1e-2  # the mirrored windows did count


def test_a_window_one_voxel_deep_visits_each_slice_once():
    assert inference.window_starts(5, 1, 0.5) == [0, 1, 2, 3, 4]
    assert inference.window_starts(12, 4, 0.9) == list(range(9))


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_a_2d_network_segments_a_volume_slice_by_slice(slice_axis, rng):
    from medseg.inference import window_of

    image = rng.random((18, 20, 17, 1)).astype(np.float32)
    patch = (16, 16)
    ramp = np.arange(256, dtype=np.float32).reshape(16, 16, 1) / 256

    def predict(batch):  # a 2D network: (B, 16, 16, 1) only, position-dependent
        assert batch.shape[1:] == (16, 16, 1)
        return np.concatenate([batch * ramp, np.sin(batch + ramp)], axis=-1)

    out = inference.sliding_window_predict(
        image,
        inference.slicewise(predict, slice_axis),
        patch_size=window_of(patch, slice_axis),
        batch_size=5,
        mirror_axes=[a for a in range(3) if a != slice_axis][:1],
    )
    assert out.shape == (18, 20, 17, 2)
    windows = {18: [0, 2], 20: [0, 4], 17: [0, 1]}  # 16-pixel windows, overlap 0.5
    for k in range(image.shape[slice_axis]):
        cut = np.take(image, k, axis=slice_axis)
        expected = reference.stitch(
            cut,
            reference.mirror_averaged(predict, (0,)),
            patch,
            [windows[n] for n in cut.shape[:-1]],
            inference.gaussian_importance(patch),
        )
        np.testing.assert_allclose(
            np.take(out, k, axis=slice_axis), expected, rtol=1e-5, atol=1e-6
        )


def test_small_windows_are_predicted_more_to_a_forward_pass(rng):
    assert inference.windows_per_pass((40, 56, 40)) == 4  # the shipped models' ...
    assert inference.windows_per_pass((256, 256)) == 4  # ... windows, as before
    assert inference.windows_per_pass((128, 128)) == 16
    assert inference.windows_per_pass((1, 36, 50)) == 64  # slices of a volume
    assert inference.windows_per_pass((36, 50)) == 64
    assert inference.windows_per_pass((40, 56, 40), least=8) == 8
    for _ in range(200):  # never more voxels a pass than 4 large windows or 2^18
        window = tuple(int(n) for n in rng.integers(1, 200, rng.integers(2, 4)))
        count = inference.windows_per_pass(window)
        voxels = count * math.prod(window)
        assert 4 <= count <= 64
        assert voxels <= max(4 * math.prod(window), 2**18)


def test_gaussian_importance_peaks_at_the_centre():
    weights = inference.gaussian_importance((9, 9))
    assert weights[4, 4] == 1.0 and weights.min() > 0
    assert weights[0, 4] < weights[2, 4] < weights[4, 4]


@pytest.mark.slow
def test_predict_a_folder_with_bad_files_keeps_going_and_skips_on_rerun(
    bundle, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[:2]
    for path in good:
        (inputs / path.name).write_bytes(path.read_bytes())
    moved = nib.load(inputs / good[1].name)  # its qform 3 mm from its sform
    qform = moved.affine.copy()
    qform[:3, 3] += [0.0, 3.0, 0.0]
    moved.set_qform(qform, code=1)
    nib.save(moved, inputs / good[1].name)
    whole = good[0].read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (inputs / "random.nii.gz").write_bytes(bytes(range(256)) * 4)
    (inputs / "empty.nii.gz").write_bytes(b"")
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(inputs / "slice.png")
    one = nib.load(good[0])  # a 2D NIfTI: one slice of a scan, which a 3D network
    # would see between zero slices and label as if it were a volume
    nib.save(nib.Nifti1Image(one.get_fdata()[:, :, 10], one.affine), inputs / "z.nii")
    out = tmp_path / "out"
    result = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "2 segmented, 0 skipped (output existed), 5 failed" in result.stdout
    assert_failures_named(
        result.stderr,
        inputs,
        [
            ("truncated.nii.gz", "truncated"),
            ("random.nii.gz", "not gzip-compressed"),
            ("empty.nii.gz", "empty file"),
            ("slice.png", "2D scan with 1 channel(s), but the model segments 3D scans"),
            (
                "z.nii",
                f"a single slice (shape {' x '.join(map(str, one.shape[:2]))} x 1), "
                "but the model segments 3D volumes",
            ),
        ],
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in good]
        + [
            "medseg_predict_report.json",
            "medseg_predict_settings.json",
            "medseg_volumes.csv",
        ]
    )
    report = json.loads((out / "medseg_predict_report.json").read_text())
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 5}

    def volumes_written():  # the table, and each label's voxels in each label map
        with open(out / "medseg_volumes.csv", newline="") as handle:
            table = list(csv.DictReader(handle))
        expected = []
        for path in good:
            labels = nib.load(out / path.name)
            scan = nib.load(path).get_fdata()
            voxel_ml = float(np.prod(labels.header.get_zooms()[:3])) / 1000
            for value, name in ((1, "Anterior"), (2, "Posterior")):
                inside = np.asanyarray(labels.dataobj) == value
                count = int(inside.sum())
                expected.append((path.name[:-7], str(value), name, count))
                row = table[len(expected) - 1]
                assert float(row["volume_ml"]) == pytest.approx(count * voxel_ml)
                for column, function in (("mean", np.mean), ("sd", np.std)):
                    if not count:  # a barely trained network may label none
                        assert row[f"intensity_{column}"] == ""
                        continue
                    assert float(row[f"intensity_{column}"]) == pytest.approx(
                        function(scan[inside]), abs=1e-4
                    )
        assert [
            (r["case"], r["label"], r["name"], int(r["voxels"])) for r in table
        ] == (expected)
        return table

    first_table = volumes_written()
    assert "label volumes: " + str(out / "medseg_volumes.csv") in result.stdout
    for path in good:  # labels on the input's own grid, its sform and qform kept
        image, labels = nib.load(inputs / path.name), nib.load(out / path.name)
        assert labels.shape == image.shape
        np.testing.assert_array_equal(labels.affine, image.affine)
        for form in ("get_sform", "get_qform"):
            stored, code = getattr(labels, form)(coded=True)
            np.testing.assert_array_equal(stored, getattr(image, form)())
            assert code == getattr(image, form)(coded=True)[1] == 1
        assert labels.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(labels.dataobj))) <= {0, 1, 2}
    warned = {c["input"]: c["warnings"] for c in report["cases"] if c["warnings"]}
    assert warned == {
        str(inputs / good[1].name): [
            f"{inputs / good[1].name}: its sform and qform disagree (voxels up to 3 mm "
            "apart): read by the sform, as nibabel and FSL read it; a tool that reads "
            "the qform sees the scan elsewhere (outputs keep both)"
        ]
    }
    again = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert again.returncode == 1
    assert "0 segmented, 2 skipped (output existed), 5 failed" in again.stdout
    # another option that changes label maps: refused in one line, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = medseg(
        "predict", "--model", bundle, "--input", inputs, "--output", out,
        "--keep-largest",
    )  # fmt: skip
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert (
        f"{out / 'medseg_predict_settings.json'}: the label maps here were made with "
        "other settings (keep_largest false, now true); --overwrite"
    ) in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # a run killed while writing leaves only a hidden temporary file, cleaned next time
    (out / good[0].name).unlink()
    stale = out / f".{good[0].name}.0badcafe.partial.nii.gz"
    stale.write_bytes(b"half a file")
    third = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert "1 segmented, 1 skipped (output existed), 5 failed" in third.stdout
    assert volumes_written() == first_table  # the skipped case's rows kept
    assert (
        not stale.exists()
        and nib.load(out / good[0].name).shape == nib.load(good[0]).shape
    )


def test_nnunet_named_scans_get_case_named_outputs_that_evaluate_pairs(
    bundle, tmp_path
):
    from click.testing import CliRunner

    from medseg_cli.main import main

    images, truth = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    truth.mkdir()
    cases = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[:2]
    for path in cases:  # nnU-Net's layout: CASE_0000.nii.gz, labels CASE.nii.gz
        case = path.name[: -len(".nii.gz")]
        (images / f"{case}_0000.nii.gz").write_bytes(path.read_bytes())
        (truth / path.name).write_bytes((SAMPLE / "labelsTr" / path.name).read_bytes())
    out = tmp_path / "out"
    for shard in ("1/2", "2/2"):
        result = medseg(
            "predict", "--model", bundle, "--input", images, "--output", out,
            "--shard", shard, "--no-tta",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [p.name for p in cases]
    # a run over the whole input after the shards: one table of every case, its rows
    # taken from the shards' tables (a row marked in one is carried as it is), no
    # scan measured again
    tables = [out / f"medseg_volumes-{k}-of-2.csv" for k in (1, 2)]
    rows = [t.read_text().splitlines() for t in tables]
    marked = rows[0][1].split(",")
    marked[3] = "123456"  # voxels
    rows[0][1] = ",".join(marked)
    tables[0].write_text("\n".join(rows[0]) + "\n")
    result = medseg(
        "predict", "--model", bundle, "--input", images, "--output", out, "--no-tta"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 segmented, 2 skipped" in result.stdout
    whole = (out / "medseg_volumes.csv").read_text().splitlines()
    assert whole[0] == rows[0][0] == rows[1][0]
    assert sorted(whole[1:]) == sorted(rows[0][1:] + rows[1][1:])
    assert any(",123456," in row for row in whole)
    scored = CliRunner().invoke(
        main, ["evaluate", "--prediction", str(out), "--truth", str(truth)]
    )
    assert scored.exit_code == 0, scored.output
    assert "2 case(s) scored" in scored.output


@pytest.mark.slow
def test_a_two_channel_model_reads_cases_stored_one_file_per_channel(tmp_path):
    """nnU-Net's layout for several channels: CASE_0000, CASE_0001 are one case."""
    from medseg.io import read_volume
    from tests.conftest import TINY_CONFIG

    def second(array):  # a second channel that is not the first one again
        return (array.max() - array).astype(np.float32)

    data = tmp_path / "two"
    cases = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[:6]
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (data / folder).mkdir(parents=True)
    for path in cases:
        case = path.name[: -len(".nii.gz")]
        image = nib.load(path)
        array = image.get_fdata().astype(np.float32)
        nib.save(image, data / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(
            nib.Nifti1Image(second(array), image.affine),
            data / "imagesTr" / f"{case}_0001.nii.gz",
        )
        (data / "labelsTr" / path.name).write_bytes(
            (SAMPLE / "labelsTr" / path.name).read_bytes()
        )
    (data / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "inverted"},
                "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                "file_ending": ".nii.gz",
            }
        )
    )
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    trained = medseg(
        "train", "--config", tmp_path / "tiny.yaml", "--data", data,
        "--output", tmp_path / "run",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    tests = data / "imagesTs"
    train_images = sorted((data / "imagesTr").iterdir())
    for path in train_images[:4]:  # two whole cases
        (tests / path.name).write_bytes(path.read_bytes())
    (tests / "lone_0000.nii.gz").write_bytes(train_images[4].read_bytes())
    (tests / "apart_0000.nii.gz").write_bytes(train_images[4].read_bytes())
    (tests / "apart_0001.nii.gz").write_bytes(train_images[7].read_bytes())
    out = tmp_path / "out"
    result = medseg(  # float32, as the Segmenter it is compared with below
        "predict", "--model", tmp_path / "run", "--input", tests, "--output", out,
        "--no-tta", "--precision", "float32",
    )  # fmt: skip
    assert result.returncode == 1
    assert "2 segmented, 0 skipped (output existed), 2 failed" in result.stdout
    other = nib.load(train_images[7]).shape
    first = nib.load(train_images[4]).shape
    assert_failures_named(
        result.stderr,
        tests,
        [
            ("lone_0000.nii.gz", "channel files _0000, but the model takes 2 channels"),
            (
                "apart_0001.nii.gz",
                f"shape {other} differs from apart_0000.nii.gz's {first}",
            ),
        ],
    )
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [p.name for p in cases[:2]]
    # each label map keeps its case's content, its channel files in order: a re-run
    # skips them
    from medseg.inference.jobs.inputs import source_id
    from medseg.io import read_source_id

    for path in cases[:2]:
        case = path.name[: -len(".nii.gz")]
        files = (tests / f"{case}_0000.nii.gz", tests / f"{case}_0001.nii.gz")
        assert read_source_id(out / path.name) == source_id(files)
    again = medseg(
        "predict", "--model", tmp_path / "run", "--input", tests, "--output", out,
        "--no-tta", "--precision", "float32",
    )  # fmt: skip
    assert "0 segmented, 2 skipped (output existed), 2 failed" in again.stdout
    # the case's label map is the model's on its two channels, in channel order
    segmenter = inference.Segmenter(tmp_path / "run", precision="float32")
    for path in cases[:2]:
        volume = read_volume(path)
        both = volume.with_array(
            np.concatenate([volume.array, second(np.asarray(volume.array))], -1)
        )
        expected = segmenter.segment(both).array[..., 0]
        written = np.asanyarray(nib.load(out / path.name).dataobj)
        np.testing.assert_array_equal(written, expected)
        swapped = both.with_array(both.array[..., ::-1])
        assert not np.array_equal(segmenter.segment(swapped).array[..., 0], expected)
    # one channel's file given alone: the case is read from all its files
    case = cases[0].name[: -len(".nii.gz")]
    alone = medseg(
        "predict", "--model", tmp_path / "run", "--input",
        tests / f"{case}_0001.nii.gz", "--output", tmp_path / "one.nii.gz", "--no-tta",
        "--precision", "float32",
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-2000:]
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "one.nii.gz").dataobj),
        np.asanyarray(nib.load(out / cases[0].name).dataobj),
    )


@pytest.mark.slow
def test_same_scan_in_another_voxel_order_gets_the_same_segmentation(bundle, tmp_path):
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(source)
    data = np.asanyarray(img.dataobj)
    # store the voxels as (z, x, y) with x flipped; the affine keeps world positions
    reordered = np.flip(data, 0).transpose(2, 0, 1)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    permute = np.eye(4)[:, [2, 0, 1, 3]]
    affine = img.affine @ flip @ permute
    nib.save(nib.Nifti1Image(reordered, affine), tmp_path / "reordered.nii.gz")
    # and stored in metres (xyzt_units): the same scan, as ITK reads it
    in_metres = nib.Nifti1Image(data, np.diag([1e-3] * 3 + [1.0]) @ img.affine)
    in_metres.header.set_xyzt_units("meter", "sec")
    nib.save(in_metres, tmp_path / "metres.nii.gz")
    # and as MetaImage and as NRRD with a detached header, converted by ITK
    import SimpleITK as sitk

    itk = tmp_path / "itk"
    itk.mkdir()
    for name in ("scan.mha", "scan2.nhdr"):
        sitk.WriteImage(sitk.ReadImage(str(source)), str(itk / name))
    out = tmp_path / "out"
    for path in (
        source,
        tmp_path / "reordered.nii.gz",
        tmp_path / "metres.nii.gz",
        itk,
    ):
        result = medseg("predict", "--model", bundle, "--input", path, "--output", out)
        assert result.returncode == 0, result.stderr[-2000:]
    original = np.asanyarray(nib.load(out / source.name).dataobj)
    other = nib.load(out / "reordered.nii.gz")
    np.testing.assert_array_equal(other.affine, affine)  # written on its own grid
    back = np.flip(np.asanyarray(other.dataobj).transpose(1, 2, 0), 0)
    np.testing.assert_array_equal(back, original)
    metres = nib.load(out / "metres.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(metres.dataobj), original)
    np.testing.assert_array_equal(
        metres.affine, nib.load(tmp_path / "metres.nii.gz").affine
    )
    assert metres.header.get_xyzt_units() == ("meter", "sec")
    for name, written in (("scan.mha", "scan.mha"), ("scan2.nhdr", "scan2.nrrd")):
        scan, labels = (
            sitk.ReadImage(str(itk / name)),
            sitk.ReadImage(str(out / written)),
        )
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(labels).transpose(2, 1, 0), original
        )
        for what in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(
                getattr(labels, what)(), getattr(scan, what)(), atol=1e-9
            )


@pytest.mark.slow
def test_2d_bundle_segments_png_images_into_png_masks(tmp_path, rng):
    from PIL import Image

    for folder in ("images", "labels"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + i : 20 + i, 6:22] = 255
        image = (mask // 2 + rng.integers(0, 60, (32, 32))).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "labels" / f"{i}.png")
    (tmp_path / "2d.yaml").write_text(
        "model: {name: unet, spatial_dims: 2, filters: [4, 8], patch_size: [16, 16]}\n"
        "data: {labels: {0: background, 255: cell}}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 2, optimizer: adam, "
        "folds: 4, augment: {mirror_axes: [0, 1]}}\n"
    )
    result = medseg(
        "train",
        "--config",
        tmp_path / "2d.yaml",
        "--data",
        tmp_path / "data",
        "--output",
        tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    result = medseg(
        "predict",
        "--model",
        tmp_path / "run",
        "--input",
        tmp_path / "data" / "images",
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(4):
        mask = np.asarray(Image.open(out / f"{i}.png"))
        assert mask.shape == (32, 32) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}  # declared values, not classes


def _batch_under_way(bundle, tmp_path, **popen):
    """``medseg predict`` started on 36 copies of the sample scans, once 3 label maps
    are written: ``(process, output folder, command)``."""
    import time

    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    for copy in range(3):
        for path in sources:
            (inputs / f"{copy}_{path.name}").write_bytes(path.read_bytes())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medseg_cli", "predict", "--model", str(bundle),
               "--input", str(inputs), "--output", str(out)]  # fmt: skip
    process = subprocess.Popen(command, **popen)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if out.is_dir() and len(list(out.glob("[0-9]*.nii.gz"))) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the batch finished before it could be stopped"
    return process, out, command


def _rerun_does_the_rest(command, finished) -> None:
    """The same command again segments the 36 scans but ``finished``, skipping those."""
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (
        f"{36 - len(finished)} segmented, {len(finished)} skipped (output existed), "
        "0 failed"
    ) in rerun.stdout


@pytest.mark.slow
def test_killed_batch_leaves_no_partial_output_and_rerun_does_the_rest(
    bundle, tmp_path
):
    import os
    import signal

    process, out, command = _batch_under_way(
        bundle,
        tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in out.glob("[0-9]*.nii.gz"))
    assert 3 <= len(finished) < 36
    for name in finished:  # every file under a final name is complete
        labels = nib.load(out / name)
        assert np.asanyarray(labels.dataobj).shape == labels.shape
    # the scans in hand (one predicted, perhaps the next being read) are marked, and
    # the re-run does them last, alone
    in_hand = sorted(p.name[1:-8] for p in out.glob(".*.in-hand"))
    assert 1 <= len(in_hand) <= 2 and not set(in_hand) & set(finished)
    _rerun_does_the_rest(command, finished)
    assert not list(out.glob(".*partial*")) and not list(out.glob(".*.in-hand"))
    assert len(list(out.glob("[0-9]*.nii.gz"))) == 36


@pytest.mark.slow
def test_a_batch_ended_by_sigterm_drops_the_scan_in_hand_and_reports(bundle, tmp_path):
    import os
    import signal

    process, out, command = _batch_under_way(
        bundle, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.kill(process.pid, signal.SIGTERM)  # as a scheduler ends a job at its limit
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    finished = sorted(p.name for p in out.glob("[0-9]*.nii.gz"))
    assert 3 <= len(finished) < 36
    assert not list(out.glob(".*partial*"))  # the scan in hand left nothing
    assert not list(out.glob(".*.in-hand"))  # nor a mark: it was not its doing
    report = json.loads((out / "medseg_predict_report.json").read_text())
    assert report["counts"] == {"done": len(finished), "skipped": 0, "failed": 0}
    assert report["settings"]["stopped_by"] == "SIGTERM"
    assert report["settings"]["not_done"] == 36 - len(finished)
    assert sorted(Path(c["output"]).name for c in report["cases"]) == finished
    assert (
        f"stopped by SIGTERM after {len(finished)} scans, {36 - len(finished)} not "
        "done; the label maps written are complete, and the same command does the rest"
    ) in stderr
    assert "Traceback" not in stderr
    _rerun_does_the_rest(command, finished)


def test_field_of_view_far_outside_the_training_scans_is_noted():
    from medseg.io import Volume

    # training scans 31..43 x 40..58 x 24..47 voxels of 1 mm: longest side 40..58 mm,
    # shortest at least 24 mm
    fingerprint = {
        "shape": {"min": [31, 40, 24], "max": [43, 58, 47]},
        "spacing_mm": {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]},
    }

    def note(shape, spacing):
        volume = Volume(np.zeros((*shape, 1)), np.diag([*spacing, 1.0]), path="s.nii")
        return inference.field_of_view_note(volume, fingerprint)

    assert note((35, 50, 36), (1, 1, 1)) is None
    assert note((116, 20, 20), (1, 1, 1)) is None  # twice 58 mm: still within
    assert note((20, 20, 20), (1, 1, 1)) is None  # half of 40 mm: still within
    assert note((197, 233, 189), (1, 1, 1)) == (
        "s.nii: field of view 197 x 233 x 189 mm, while the longest side of the "
        "model's training scans was at most 58 mm: it has not seen scans like this "
        "one; check its labels"
    )
    assert "at most 58 mm" in note((20, 20, 30), (1, 1, 4))  # 120 mm along z
    assert "at least 40 mm" in note((19, 10, 10), (1, 1, 1))
    assert note((40, 50, 12), (1, 1, 1)) is None  # half of 24 mm: still within
    assert note((40, 50, 3), (1, 1, 1)) == (  # a slab of three slices
        "s.nii: field of view 40 x 50 x 3 mm, while the shortest side of the "
        "model's training scans was at least 24 mm: it has not seen scans like this "
        "one; check its labels"
    )
    assert note((6, 50, 40), (2, 1, 1)) is None  # 12 mm along x
    assert "x 50 x 40 mm, while the shortest side" in note((6, 50, 40), (1.9, 1, 1))
    picture = Volume(np.zeros((2000, 2000, 1)), np.eye(4), path="tile.png")
    assert (
        inference.field_of_view_note(
            picture,
            {
                "shape": {"min": [512, 512], "max": [512, 512]},
                "spacing_mm": {"min": [1, 1], "max": [1, 1]},
            },
        )
        is None
    )
    assert (
        inference.field_of_view_note(Volume(np.zeros((9, 9, 9, 1)), np.eye(4)), None)
        is None
    )


def test_a_blank_channel_is_noted():
    from medseg.io import Volume
    from medseg.preprocessing.intensity import blank_note

    def note(array):
        return blank_note(Volume(array, np.eye(4), path="s.nii"))

    rng = np.random.default_rng(0)
    scan = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
    assert note(scan) is None
    assert note(np.zeros((4, 5, 6, 1), np.int16)) == (
        "s.nii: every voxel is 0, a blank scan: its labels mean nothing"
    )
    scan[..., 1] = -1024.0
    scan[0, 0, 0, 1] = np.nan  # NaN aside (filled, or refused, elsewhere)
    assert note(scan) == (
        "s.nii: every voxel of channel 1 is -1024, a blank channel: check its file"
    )
    assert note(np.ones((3, 3, 3, 2))) == (
        "s.nii: every voxel of channel 0 is 1; every voxel of channel 1 is 1, a "
        "blank scan: its labels mean nothing"
    )
    scan[1, 1, 1, 1] = -1000.0
    assert note(scan) is None


@pytest.mark.slow
def test_shipped_model_notes_a_scan_unlike_its_training_scans(caplog):
    from medseg.bundle import resolve
    from medseg.io import read_volume

    # the out-of-distribution check (tests/inference/test_ood.py) flags the sliver
    # too; these are the notes from the scan's header and voxels alone
    segmenter = inference.Segmenter(
        resolve("hippocampus"), precision="float32", ood="off"
    )
    volume = read_volume(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0])
    with caplog.at_level("WARNING", logger="medseg"):
        assert segmenter.predict(volume).notes == ()
    assert [r for r in caplog.records if r.name.startswith("medseg")] == []
    # the same voxels said to be 0.25 mm: a sliver of 8.5 x 13 x 8.75 mm
    sliver = volume.with_array(volume.array, volume.affine @ np.diag([0.25] * 3 + [1]))
    with caplog.at_level("WARNING", logger="medseg"):
        notes = segmenter.predict(sliver).notes
    assert notes == (
        f"{volume.path}: field of view 8 x 13 x 9 mm, while the longest side of the "
        "model's training scans was at least 40 mm: it has not seen scans like this "
        "one; check its labels",
    )
    said = [r.getMessage() for r in caplog.records if r.name.startswith("medseg")]
    assert said == list(notes)
    blank = volume.with_array(np.zeros_like(volume.array))
    assert segmenter.predict(blank).notes == (
        f"{volume.path}: every voxel is 0, a blank scan: its labels mean nothing",
    )


@pytest.mark.slow
def test_way_back_class_by_class_equals_resampling_all_classes_at_once():
    from medseg.bundle import resolve
    from medseg.io import read_volume
    from medseg.preprocessing import geometry

    # the shipped model, which finds both labels (a barely trained test bundle may
    # give background everywhere, and then the comparison would prove little)
    segmenter = inference.Segmenter(
        resolve("hippocampus"), probabilities=True, precision="float32"
    )
    volume = read_volume(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[1])
    # the same voxels said to be 0.7 x 1.3 x 0.9 mm: the bundle (1 mm) resamples them
    volume = volume.with_array(
        volume.array, volume.affine @ np.diag([0.7, 1.3, 0.9, 1])
    )
    prediction = segmenter.predict(volume)
    image, records = segmenter.preprocessor.image(volume)
    assert any(isinstance(r, geometry.ResampleRecord) for r in records)
    assert image.shape[:-1] != volume.spatial_shape
    scores = volume.with_array(segmenter.probabilities(image))
    for record in reversed(records):  # every class together, as before
        if isinstance(record, geometry.ResampleRecord):
            scores = record.undo(scores, order=1)
        else:
            scores = record.undo(scores, fill=0)
    whole = np.array(scores.array)
    outside = whole.sum(-1) == 0  # padded back by a crop: background
    whole[outside, 0] = 1
    np.testing.assert_allclose(prediction.probabilities, whole, atol=1e-3)
    expected = segmenter.values[np.argmax(whole, axis=-1)]
    np.testing.assert_array_equal(prediction.labels.array[..., 0], expected)
    np.testing.assert_array_equal(prediction.labels.affine, volume.affine)
    assert len(np.unique(expected)) == 3  # every class present: the test can fail


@pytest.mark.slow
def test_a_batch_log_tells_the_windows_of_a_scan_in_hand(bundle, tmp_path, monkeypatch):
    # stderr not a terminal: a line a minute while a scan takes long (here a line a
    # forward pass), numbered as the scan's own line will be
    import re

    from click.testing import CliRunner

    import medseg_cli.predict
    from medseg_cli.main import main

    monkeypatch.setattr(medseg_cli.predict, "PACE_EVERY_S", 0.0)
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[2]
    result = CliRunner().invoke(
        main,
        ["predict", "--model", str(bundle), "--input", str(source), "--output",
         str(tmp_path / "out"), "--batch-size", "1", "--no-tta"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    told = re.findall(
        r"^\[1/1\] (.*): (\d+) of (\d+) windows, about \d+ (?:s|min) left$",
        result.stderr,
        re.MULTILINE,
    )
    windows = int(told[0][2])
    # one a pass but the first (the pace is timed from its end) and the last
    assert told == [(str(source), str(k), str(windows)) for k in range(2, windows)]
    assert f"[1/1] {source}: segmented in " in result.stderr


def test_a_terminal_shows_the_windows_of_the_scan_in_hand_beside_the_bar(tmp_path):
    # a person at a terminal sees the scan in hand's windows and the time left
    # beside the bar (once a second; here after each forward pass, so that a fast
    # machine shows them too), cleared when it is done
    import os
    import pty
    import re
    import sys

    from medseg.io import read_volume, write_volume

    scan = read_volume(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[1])
    big = tmp_path / "big.nii.gz"  # the sample scan twice over along each axis
    pads = [(0, n) for n in scan.array.shape[:3]] + [(0, 0)]
    write_volume(scan.with_array(np.pad(scan.array, pads, mode="reflect")), big)
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", "import medseg_cli.predict as p; "
         "p.TERMINAL_EVERY_S = 0.0; from medseg_cli.main import main; main()",
         "predict", "--model", "hippocampus", "--input", big, "--output",
         tmp_path / "out", "--batch-size", "1", "--no-tta"],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert process.wait(timeout=60) == 0, shown[-2000:]
    frames = shown.decode(errors="replace").split("\r")
    told = [
        re.search(r" 0/1  big\.nii\.gz: (\d+) of (\d+) windows, about \d+ s left", f)
        for f in frames
    ]
    told = [(int(m.group(1)), int(m.group(2))) for m in told if m]
    assert told, shown[-2000:]
    windows = told[0][1]
    # one a pass but the first (the pace is timed from its end) and the last
    assert told == [(k, windows) for k in range(2, windows)], shown[-2000:]
    last = next(f for f in reversed(frames) if "segmenting" in f)
    assert "1/1" in last and "windows" not in last


def test_probabilities_and_post_processing_from_the_command_line(bundle, tmp_path):
    from scipy import ndimage

    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[2]
    plain, cleaned = tmp_path / "plain", tmp_path / "clean"
    result = medseg(
        "predict",
        "--model",
        bundle,
        "--input",
        source,
        "--output",
        plain,
        "--probabilities",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    result = medseg(
        "predict",
        "--model",
        bundle,
        "--input",
        source,
        "--output",
        cleaned,
        "--keep-largest",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stem = source.name[: -len(".nii.gz")]
    archive = np.load(plain / f"{stem}_probabilities.npz")
    probabilities = archive["probabilities"]
    labels = np.asanyarray(nib.load(plain / source.name).dataobj)
    assert probabilities.dtype == np.float16
    assert probabilities.shape == (*labels.shape, 3)
    np.testing.assert_array_equal(archive["affine"], nib.load(source).affine)
    assert archive["label_values"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(-1), 1, atol=3e-3)
    top2 = np.sort(probabilities.astype(np.float32), axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2e-3  # float16 cannot order closer ones
    np.testing.assert_array_equal(np.argmax(probabilities, -1)[clear], labels[clear])
    kept = np.asanyarray(nib.load(cleaned / source.name).dataobj)
    structure = np.ones((3, 3, 3), bool)
    for value in (1, 2):
        parts, count = ndimage.label(labels == value, structure)
        if count == 0:
            assert not (kept == value).any()
            continue
        sizes = np.bincount(parts.ravel())[1:]
        np.testing.assert_array_equal(kept == value, parts == 1 + np.argmax(sizes))
    assert set(np.unique(labels[kept != labels])) <= {1, 2}
    assert (kept[kept != labels] == 0).all()  # removed voxels became background
    # a size limit above any component clears every label
    result = medseg(
        "predict",
        "--model",
        bundle,
        "--input",
        source,
        "--output",
        tmp_path / "none",
        "--min-size-mm3",
        "1e9",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not np.asanyarray(nib.load(tmp_path / "none" / source.name).dataobj).any()


@pytest.fixture(scope="module")
def classifier_bundle(tmp_path_factory):
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("classifier")
    np.savez(
        folder / "tiny.npz",
        train_images=rng.integers(0, 255, (24, 16, 16), dtype=np.uint8),
        train_labels=rng.integers(0, 3, (24, 1)),
        val_images=rng.integers(0, 255, (6, 16, 16), dtype=np.uint8),
        val_labels=np.array([[0], [1], [2]] * 2),
        test_images=rng.integers(0, 255, (5, 16, 16), dtype=np.uint8),
        test_labels=np.array([[0], [1], [2], [0], [1]]),
    )
    (folder / "cls.yaml").write_text(
        "model: {name: classifier, spatial_dims: 2, architecture: simple}\n"
        "data: {task: classification}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 8, optimizer: adam}\n"
    )
    result = medseg(
        "train",
        "--config",
        folder / "cls.yaml",
        "--data",
        folder / "tiny.npz",
        "--output",
        folder / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_classification_bundles_predict_as_an_ensemble(classifier_bundle, tmp_path):
    import csv

    import keras

    from medseg.models import load_model

    data = classifier_bundle / "tiny.npz"
    second = tmp_path / "second"
    trained = medseg(
        "train", "--config", classifier_bundle / "cls.yaml", "--data", data,
        "--output", second, "--seed", "7",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = medseg(
        "predict", "--model", classifier_bundle / "run", "--model", second,
        "--input", data, "--output", tmp_path / "p.csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "an ensemble of 2 models" in result.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    images = np.load(data)["test_images"].astype(np.float64)
    inputs = np.stack([reference.zscore(x) for x in images])[..., None]
    each = [
        np.asarray(
            keras.ops.softmax(load_model(run).predict(inputs, verbose=0), axis=-1)
        )
        for run in (classifier_bundle / "run", second)
    ]
    assert np.abs(each[0] - each[1]).max() > 1e-3  # two different models
    expected = (each[0] + each[1]) / 2
    got = np.array([[float(r[f"prob_{k}"]) for k in range(3)] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [int(r["predicted"]) for r in rows] == expected.argmax(-1).tolist()


@pytest.mark.slow
def test_classification_bundle_predicts_a_npz_split_and_image_files(
    classifier_bundle, tmp_path
):
    import csv

    import keras
    from PIL import Image

    from medseg.models import load_model

    run, data = classifier_bundle / "run", classifier_bundle / "tiny.npz"
    result = medseg(
        "predict", "--model", run, "--input", data, "--output", tmp_path / "p.csv"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["case"] for r in rows] == [f"test_{i}" for i in range(5)]
    assert list(rows[0]) == ["case", "predicted", "prob_0", "prob_1", "prob_2"]
    images = np.load(data)["test_images"].astype(np.float64)
    inputs = np.stack([reference.zscore(x) for x in images])[..., None]
    logits = load_model(run).predict(inputs.astype(np.float32), verbose=0)
    expected = np.asarray(keras.ops.softmax(logits, axis=-1))
    got = np.array([[float(r[f"prob_{k}"]) for k in range(3)] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [int(r["predicted"]) for r in rows] == expected.argmax(-1).tolist()
    # scored against the npz's test labels
    result = medseg(
        "evaluate",
        "--prediction",
        tmp_path / "p.csv",
        "--truth",
        data,
        "--summary",
        tmp_path / "s.json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    truth = np.array([0, 1, 2, 0, 1])
    hits = expected.argmax(-1) == truth
    assert summary["accuracy"] == pytest.approx(hits.mean())
    recalls = [hits[truth == k].mean() for k in range(3)]
    assert summary["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    for k in range(3):
        auc = reference.pairwise_auc(expected[:, k], truth == k)
        assert summary["auc_per_class"][str(k)] == pytest.approx(auc, abs=1e-4)
    assert f"accuracy {hits.mean():.4f}" in result.stdout
    # a truth CSV with a case the predictions lack is named
    (tmp_path / "truth.csv").write_text("case,label\ntest_0,0\nextra_9,1\n")
    result = medseg(
        "evaluate",
        "--prediction",
        tmp_path / "p.csv",
        "--truth",
        tmp_path / "truth.csv",
    )
    assert result.returncode == 2 and "no prediction for extra_9" in result.stderr
    # image files: a 16 x 16 PNG, a 32 x 32 PNG (resized), and one that is broken
    files = tmp_path / "images"
    files.mkdir()
    Image.fromarray(np.load(data)["test_images"][0]).save(files / "a.png")
    big = np.kron(np.load(data)["test_images"][1], np.ones((2, 2), np.uint8))
    Image.fromarray(big).save(files / "b.png")
    (files / "c.png").write_bytes(b"not a png")
    result = medseg("predict", "--model", run, "--input", files, "--output", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and f"{files / 'c.png'}: " in result.stderr
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b"]
    assert float(rows[0]["prob_1"]) == pytest.approx(expected[0, 1], abs=1e-5)
    assert "1 failed" in result.stdout


def test_model_names_resolve_to_shipped_bundles(tmp_path, monkeypatch):
    from medseg import bundle as bundles
    from medseg.errors import InputFileError

    (tmp_path / "brain").mkdir()
    (tmp_path / "brain" / "medseg.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # not a bundle: not listed
    monkeypatch.setattr(bundles, "PRETRAINED_DIR", tmp_path)
    assert bundles.shipped_models() == {"brain": tmp_path / "brain"}
    assert bundles.resolve("brain") == tmp_path / "brain"
    assert bundles.resolve(tmp_path / "notes") == tmp_path / "notes"  # a path wins
    with pytest.raises(InputFileError, match=r"not a shipped model \(shipped: brain\)"):
        bundles.resolve("liver")


def test_models_lists_shipped_bundles(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from medseg import bundle as bundles
    from medseg_cli.main import main

    (tmp_path / "hippo").mkdir()
    (tmp_path / "hippo" / "medseg.json").write_text(
        json.dumps(
            {
                "task": "segmentation",
                "spatial_dims": 3,
                "in_channels": 1,
                "patch_size": [40, 56, 40],
                "labels": {
                    "0": {"value": 0, "name": "background"},
                    "1": {"value": 1, "name": "Anterior"},
                },
                "preprocessing": {
                    "normalizers": [{"scheme": "zscore"}],
                    "target_spacing_mm": [1.0, 1.0, 1.5],
                },
                "validation": {"val_dice_1": 0.8912},
            }
        )
    )
    monkeypatch.setattr(bundles, "PRETRAINED_DIR", tmp_path)
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "hippo: segmentation, 3D, labels 0=background, 1=Anterior, "
        "spacing 1 x 1 x 1.5 mm; validation val_dice_1 0.891\n"
    )
    record = json.loads((tmp_path / "hippo" / "medseg.json").read_text())
    record["evaluation"] = {
        "cases": 42,
        "what": "fold 0 of 5",
        "dice": {"Anterior": 0.8761},
    }
    (tmp_path / "hippo" / "medseg.json").write_text(json.dumps(record))
    assert (
        CliRunner()
        .invoke(main, ["models"])
        .output.endswith("; Dice Anterior 0.876 on 42 unseen cases (fold 0 of 5)\n")
    )
    record["weights_dtype"] = "float16"
    (tmp_path / "hippo" / "medseg.json").write_text(json.dumps(record))
    output = CliRunner().invoke(main, ["models"]).output
    assert "spacing 1 x 1 x 1.5 mm, float16 weights; Dice" in output
    monkeypatch.setattr(bundles, "PRETRAINED_DIR", tmp_path / "none")
    assert "no models are shipped" in CliRunner().invoke(main, ["models"]).output


def test_unknown_model_name_is_one_line_and_exit_2(tmp_path):
    result = medseg(
        "predict",
        "--model",
        "no-such-model",
        "--input",
        SAMPLE / "imagesTr",
        "--output",
        tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no-such-model: no such bundle folder, and not a shipped model" in (
        result.stderr
    )


@pytest.mark.slow
def test_modified_model_file_is_refused_unless_allowed(bundle, tmp_path):
    import shutil

    from medseg.models import load_model

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    model = load_model(copy)
    weights = model.get_weights()
    model.set_weights([w + 0.01 for w in weights])
    model.save(copy / "model.keras")  # changed after bundling
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = medseg(
        "predict", "--model", copy, "--input", scan, "--output", tmp_path / "a"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{copy / 'model.keras'}: sha256 differs from the one in medseg.json" in (
        result.stderr
    )
    assert not (tmp_path / "a" / scan.name).exists()
    result = medseg(
        "predict",
        "--model",
        copy,
        "--input",
        scan,
        "--output",
        tmp_path / "b",
        "--allow-modified-model",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "used anyway" in result.stderr
    assert (tmp_path / "b" / scan.name).exists()


def test_precision_auto_is_bfloat16_only_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.delenv(inference.AUTO_PRECISION_VARIABLE, raising=False)
    assert inference.inference_precision("float32") == "float32"
    assert inference.inference_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        inference.inference_precision("float16")
    monkeypatch.setattr("medseg.inference.precision.cpu_has_amx_bf16", lambda: False)
    assert inference.inference_precision("auto") == "float32"
    monkeypatch.setattr("medseg.inference.precision.cpu_has_amx_bf16", lambda: True)
    assert inference.inference_precision("auto") == "bfloat16"  # no GPU here


def test_auto_precision_keeps_float32_for_a_light_network(monkeypatch):
    import keras

    from medseg.inference.precision import BFLOAT16_MIN_FLOPS_PER_VOXEL
    from medseg.models.info import flops_per_voxel

    monkeypatch.delenv(inference.AUTO_PRECISION_VARIABLE, raising=False)
    monkeypatch.setattr("medseg.inference.precision.cpu_has_amx_bf16", lambda: True)
    light, heavy = BFLOAT16_MIN_FLOPS_PER_VOXEL - 1, BFLOAT16_MIN_FLOPS_PER_VOXEL
    assert inference.inference_precision("auto", lambda: light) == "float32"
    assert inference.inference_precision("auto", lambda: heavy) == "bfloat16"
    asked = []
    assert inference.inference_precision("float32", lambda: asked.append(1)) == (
        "float32"
    )
    assert not asked  # the network is only counted where it decides
    # one 3x3x3 convolution from 2 channels to 4: 2 x 27 x 2 x 4 FLOPs a voxel
    model = keras.Sequential(
        [keras.Input((None, None, None, 2)), keras.layers.Conv3D(4, 3, padding="same")]
    )
    assert flops_per_voxel(model, (6, 8, 10)) == 2 * 27 * 2 * 4


def test_the_environment_sets_what_auto_precision_means_on_any_cpu(monkeypatch):
    variable = inference.AUTO_PRECISION_VARIABLE
    for amx in (False, True):
        monkeypatch.setattr(
            "medseg.inference.precision.cpu_has_amx_bf16", lambda amx=amx: amx
        )
        for forced in ("float32", "bfloat16"):
            monkeypatch.setenv(variable, forced)
            assert inference.inference_precision("auto") == forced
            assert inference.inference_precision("float32") == "float32"
    monkeypatch.setenv(variable, "float16")
    with pytest.raises(ValueError, match="MEDSEG_AUTO_PRECISION must be float32 or"):
        inference.inference_precision("auto")


@pytest.mark.slow
def test_predicts_auto_route_is_bfloat16_where_the_environment_says_so(
    tmp_path, monkeypatch
):
    """The bfloat16 route of ``medseg predict`` (``auto`` on an AMX CPU), run on
    any CPU: its labels are those of a bfloat16 Segmenter here."""
    from medseg.bundle import resolve
    from medseg.io import read_volume

    monkeypatch.setenv(inference.AUTO_PRECISION_VARIABLE, "bfloat16")
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[4]
    out = tmp_path / "out"
    result = medseg("predict", "--model", "hippocampus", "--input", source,
                    "--output", out, "--no-tta")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "medseg_predict_report.json").read_text())
    assert report["settings"]["precision"] == "bfloat16"
    segmenter = inference.Segmenter(
        resolve("hippocampus"), mirror_axes=(), precision="bfloat16"
    )
    expected = segmenter.segment(read_volume(source))
    np.testing.assert_array_equal(read_volume(out / source.name).array, expected.array)


def test_bfloat16_is_slow_on_a_cpu_without_avx512(monkeypatch, caplog):
    flags = {"flags": "fpu avx2 fma"}
    monkeypatch.setattr(
        "medseg.inference.precision.cpu_info", lambda field: flags.get(field)
    )
    assert inference.cpu_lacks_onednn_bfloat16()
    flags["flags"] = "fpu avx2 avx512f avx512bw"
    assert not inference.cpu_lacks_onednn_bfloat16()
    flags.clear()  # no /proc/cpuinfo: cannot tell, no warning
    assert not inference.cpu_lacks_onednn_bfloat16()

    import tensorflow as tf

    from medseg.bundle import resolve

    shipped = resolve("hippocampus")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    for lacks, warned in ((True, True), (False, False)):
        monkeypatch.setattr(
            "medseg.inference.precision.cpu_lacks_onednn_bfloat16", lambda x=lacks: x
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="medseg"):
            segmenter = inference.Segmenter(shipped, precision="bfloat16")
        assert segmenter.precision == "bfloat16"
        assert ("no AVX-512" in caplog.text) is warned
        caplog.clear()
        with caplog.at_level("WARNING", logger="medseg"):
            inference.Segmenter(shipped, precision="float32")
        assert caplog.text == ""


def test_cpu_info_reads_the_first_line_of_a_field(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU: 2 GHz\n"
        "flags\t\t: fpu avx2 amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    assert inference.cpu_info("model name", cpuinfo) == "Some CPU: 2 GHz"
    assert inference.cpu_info("flags", cpuinfo).split() == ["fpu", "avx2", "amx_bf16"]
    assert inference.cpu_info("microcode", cpuinfo) is None
    assert inference.cpu_info("flags", tmp_path / "missing") is None


def _labels_and_probabilities(model, source, out, precision):
    """``medseg predict --probabilities`` of one scan, one forward pass (the precision
    is in question, not the mirroring): its label map and class probabilities; the
    report's precision is checked."""
    result = medseg(
        "predict", "--model", model, "--input", source, "--output", out,
        "--precision", precision, "--probabilities", "--no-tta",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "medseg_predict_report.json").read_text())
    assert report["settings"]["precision"] == precision
    stem = source.name[: -len(".nii.gz")]
    return (
        np.asanyarray(nib.load(out / source.name).dataobj),
        np.load(out / f"{stem}_probabilities.npz")["probabilities"].astype(float),
    )


def _assert_near_same_segmentation(reference, other, *, at_most, clear, agree):
    """``(labels, probabilities)`` of two predictions of a scan: the probabilities
    differ, by at most ``at_most``; the labels are the same wherever the reference's
    two best classes are further apart than twice the largest difference (at least a
    ``clear`` fraction of voxels) and agree on an ``agree`` fraction overall."""
    (labels, p), (other_labels, other_p) = reference, other
    difference = np.abs(p - other_p).max()
    assert 0 < difference < at_most
    top = np.sort(p, axis=-1)
    apart = (top[..., -1] - top[..., -2]) > 2 * difference
    assert apart.mean() > clear
    np.testing.assert_array_equal(other_labels[apart], labels[apart])
    assert (labels == other_labels).mean() > agree


def test_bfloat16_and_float32_predictions_agree_and_reports_say_which(tmp_path):
    # the shipped model: a trained network's predictions are confident, so the
    # comparison does not hinge on near ties that differ from one CPU to another
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[4]
    outputs = {
        precision: _labels_and_probabilities(
            "hippocampus", source, tmp_path / precision, precision
        )
        for precision in ("float32", "bfloat16")
    }
    _assert_near_same_segmentation(
        outputs["float32"], outputs["bfloat16"], at_most=0.1, clear=0.95, agree=0.995
    )
    labels32, labels16 = outputs["float32"][0], outputs["bfloat16"][0]
    for value in (1, 2):
        assert (labels32 == value).sum() > 500
        np.testing.assert_allclose(
            (labels16 == value).sum(), (labels32 == value).sum(), rtol=0.02
        )


def test_a_bundle_with_float16_weights_predicts_as_its_float32_original(tmp_path):
    from medseg.bundle import read_metadata, resolve, write_bundle
    from medseg.models import load_model

    shipped = resolve("hippocampus")
    half = tmp_path / "half"
    write_bundle(
        half, load_model(shipped), read_metadata(shipped), weights_dtype="float16"
    )
    assert (half / "model.keras").stat().st_size < 0.55 * (
        shipped / "model.keras"
    ).stat().st_size
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[4]
    full, rounded = (
        _labels_and_probabilities(model, source, tmp_path / name, "float32")
        for name, model in (("full", shipped), ("half", half))
    )
    # rounded weights: close, not the same
    _assert_near_same_segmentation(full, rounded, at_most=0.02, clear=0.99, agree=0.999)


@pytest.mark.slow
def test_a_2d_network_trained_on_volumes_segments_them_slice_by_slice(tmp_path):
    import keras

    from medseg.io import read_volume

    (tmp_path / "slices.yaml").write_text(
        "model: {name: unet, spatial_dims: 2, filters: [4, 8]}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 4, optimizer: adam,\n"
        "        learning_rate: 0.001, folds: 4, augment: {mirror_axes: [0]}}\n"
    )
    run = tmp_path / "run"
    trained = medseg(
        "train", "--config", tmp_path / "slices.yaml", "--data", SAMPLE,
        "--output", run, "--fold", "0",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "(2D slices across axis 2)" in trained.stderr
    metadata = json.loads((run / "medseg.json").read_text())
    assert metadata["spatial_dims"] == 2 and metadata["plan"]["slice_axis"] == 2
    assert metadata["patch_size"] == [36, 50]  # the median case's 36 x 49 axial plane
    assert metadata["validation"]["val_dice_mean"] >= 0
    described = medseg("info", run)
    assert described.returncode == 0, described.stderr[-2000:]
    assert "model: unet, input (36, 50, 1)" in described.stdout
    assert described.stdout.strip().endswith(
        "segments a volume slice by slice, across axis 2 of the scan in RAS order"
    )
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out.nii.gz"
    result = medseg(  # float32, as the Segmenter it is compared with below
        "predict", "--model", run, "--input", scan, "--output", out,
        "--precision", "float32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written, source = nib.load(out), nib.load(scan)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    # each axial slice of the preprocessed scan through the 2D network, mirrored along
    # its first axis too, the logits of windows of 36 x 50 blended, then the softmax
    segmenter = inference.Segmenter(run, mirror_axes=(0,), precision="float32")
    assert segmenter.batch_size == 64  # 36 x 50 windows: more to a forward pass
    image, _ = segmenter.preprocessor.image(read_volume(scan))
    model = segmenter.model

    def network(batch):
        return keras.ops.convert_to_numpy(model(batch, training=False))

    probabilities = segmenter.probabilities(image)
    for k in range(image.shape[2]):
        cut = image[:, :, k]
        plane = cut.shape[:-1]
        size = [max(n, p) for n, p in zip(plane, (36, 50), strict=True)]
        pads = [
            ((s - n) // 2, s - n - (s - n) // 2)
            for n, s in zip(plane, size, strict=True)
        ]
        padded = np.pad(cut, [*pads, (0, 0)])
        expected = reference.softmax(
            reference.stitch(
                padded,
                reference.mirror_averaged(network, (0,)),
                (36, 50),
                [
                    inference.window_starts(s, p, 0.5)
                    for s, p in zip(size, (36, 50), strict=True)
                ],
                inference.gaussian_importance((36, 50)),
            )
        )
        crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, plane, strict=True))
        np.testing.assert_allclose(
            probabilities[:, :, k], expected[crop], rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(
        np.asanyarray(written.dataobj),
        segmenter.segment(read_volume(scan)).array[..., 0],
    )
    # one slice saved as a volume one voxel deep is segmented too, on its own grid
    data = np.asanyarray(source.dataobj)
    one = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, 17:18], source.affine), one)
    single = medseg(
        "predict", "--model", run, "--input", one, "--output", tmp_path / "o"
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert nib.load(tmp_path / "o" / "one_slice.nii.gz").shape == (*data.shape[:2], 1)
    # in an ensemble with a 3D network, as nnU-Net ensembles its 2D and 3D models
    from medseg.bundle import resolve

    members = [
        inference.Segmenter(bundle, probabilities=True, precision="float32")
        for bundle in (run, resolve("hippocampus"))
    ]
    volume = read_volume(scan)
    mean = sum(m.predict(volume).probabilities.astype(np.float64) for m in members)
    both = inference.Ensemble(members, probabilities=True).predict(volume)
    np.testing.assert_allclose(both.probabilities, mean / 2, atol=2e-3)


def _respaced_copy(folder, spacing):
    """The shipped hippocampus bundle said to be trained at ``spacing``: the same
    network with other preprocessing (its model file, and so its sha256, unchanged)."""
    import shutil

    from medseg.bundle import resolve, write_metadata

    shutil.copytree(resolve("hippocampus"), folder)
    record = json.loads((folder / "medseg.json").read_text())
    record["preprocessing"]["target_spacing_mm"] = list(spacing)
    write_metadata(folder, record)  # its checksum made anew
    return folder


def test_an_ensemble_labels_each_voxel_by_its_members_mean_probabilities(tmp_path):
    from medseg.bundle import resolve
    from medseg.io import read_volume

    shipped = resolve("hippocampus")
    respaced = _respaced_copy(tmp_path / "respaced", (1.2, 0.9, 1.1))
    volume = read_volume(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[1])

    def member(bundle, mirror_axes):
        return inference.Segmenter(
            bundle, mirror_axes=mirror_axes, probabilities=True, precision="float32"
        )

    # two members preprocess alike (averaged before the way back), one otherwise
    members = [member(shipped, ()), member(shipped, (0, 1, 2)), member(respaced, ())]
    ensemble = inference.Ensemble(members, probabilities=True)
    prediction = ensemble.predict(volume)
    own = [m.predict(volume) for m in members]
    mean = sum(p.probabilities.astype(np.float64) for p in own) / len(own)
    np.testing.assert_allclose(prediction.probabilities, mean, atol=2e-3)
    top2 = np.sort(mean, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 5e-3  # beyond float16 rounding
    labels = prediction.labels.array[..., 0]
    np.testing.assert_array_equal(labels[clear], np.argmax(mean, -1)[clear])
    np.testing.assert_array_equal(prediction.labels.affine, volume.affine)
    assert prediction.values == (0, 1, 2)
    # each member labels some voxels otherwise, so returning one would fail
    for p in own:
        assert (p.labels.array[..., 0] != labels).sum() > 0
    assert len(np.unique(labels)) == 3
    # post-processing applies to the mean
    cleaned = inference.Ensemble(members, min_size_mm3=1e9).predict(volume)
    assert not cleaned.labels.array.any()


def test_segmenters_and_ensembles_tell_the_windows_done_as_they_go(tmp_path):
    from medseg.bundle import resolve
    from medseg.io import read_volume

    scan = read_volume(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[1])
    # a scan larger than a window, even respaced to 1.5 mm: the sample scan three
    # times over along two axes, twice along the third
    shape = scan.array.shape
    pads = [(0, 2 * shape[0]), (0, 2 * shape[1]), (0, shape[2]), (0, 0)]
    volume = scan.with_array(np.pad(scan.array, pads, mode="reflect"))
    members = [
        inference.Segmenter(bundle, batch_size=2, precision="float32")
        for bundle in (
            resolve("hippocampus"),
            resolve("hippocampus"),
            _respaced_copy(tmp_path / "respaced", (1.5, 1.5, 1.5)),
        )
    ]
    told, alone = [], []
    for member in members:  # the ensemble's members do not tell: the ensemble does
        member.on_windows = lambda *args: alone.append(args)
    ensemble = inference.Ensemble(members)
    ensemble.on_windows = lambda *args: told.append(args)
    ensemble.predict(volume)
    assert alone == []
    counts = []
    for member in members:  # alone, each tells its own windows, two a pass
        member.predict(volume)
        windows = alone[-1][2]
        assert alone == [
            (str(volume.path), min(2 * k, windows), windows)
            for k in range(1, (windows + 1) // 2 + 1)
        ]
        counts.append(windows)
        alone.clear()
    assert counts[0] == counts[1] > counts[2] > 1  # the respaced one has fewer
    # the ensemble: the windows done of the three together as each pass ends; in
    # all, the members' done and the one in hand's for each to come
    assert {scan for scan, _, _ in told} == {str(volume.path)}
    done = [done for _, done, _ in told]
    assert done == sorted(set(done)) and done[-1] == sum(counts)
    third = [d > 2 * counts[0] for d in done]  # the respaced member's passes
    assert [total for _, _, total in told] == [
        2 * counts[0] + counts[2] if last else 3 * counts[0] for last in third
    ]


def test_bundles_that_segment_otherwise_are_refused_as_an_ensemble(tmp_path):
    import copy

    from medseg.bundle import BundleMetadata, read_metadata, resolve

    hippocampus = read_metadata(resolve("hippocampus"))
    bundles = [Path("a"), Path("b")]
    assert inference.ensemble_problem(bundles, [hippocampus, hippocampus]) is None
    cases = []
    other = hippocampus.to_dict()
    other["labels"]["2"]["name"] = "Tail"
    cases.append((other, "labels 0 background, 1 Anterior, 2 Tail, but the first "
                  "model (a) has 0 background, 1 Anterior, 2 Posterior"))  # fmt: skip
    other = hippocampus.to_dict()
    other["in_channels"] = 2
    cases.append((other, "segments 3D scans with 2 channel(s), but the first model "
                  "(a) 3D scans with 1 channel(s)"))  # fmt: skip
    other = hippocampus.to_dict()
    other["patch_size"] = other["patch_size"][:2]  # a 2D network ...
    other["spatial_dims"] = 2
    cases.append((other, "segments 2D scans"))
    other = copy.deepcopy(other)
    other["plan"] = {"slice_axis": 2}  # ... on slices of volumes: alike
    cases.append((other, None))
    other = hippocampus.to_dict()
    other["task"] = "classification"
    cases.append((other, "a classification bundle, but the first model (a) is a "
                  "segmentation bundle; an ensemble's models must do one "
                  "task"))  # fmt: skip
    other = hippocampus.to_dict()
    other["task"] = "reconstruction"
    cases.append((other, "a reconstruction bundle; an ensemble of models takes "
                  "segmentation or classification bundles"))  # fmt: skip
    for metadata, problem in cases:
        metadata = BundleMetadata(metadata)
        found = inference.ensemble_problem(bundles, [hippocampus, metadata])
        if problem is None:
            assert found is None
        else:
            assert found[0] == Path("b") and problem in found[1], found
    for models, problem in (
        (["hippocampus", "membrane"], "membrane: labels 0 membrane, 255 cell, but "),
        (["hippocampus", str(resolve("hippocampus"))], "given twice as --model"),
    ):
        args = [a for m in models for a in ("--model", m)]
        result = medseg("predict", *args, "--input", SAMPLE / "imagesTr",
                        "--output", tmp_path / "out")  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert problem in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
def test_predict_with_several_models_writes_their_ensembles_labels(tmp_path):
    from medseg.bundle import resolve
    from medseg.io import read_volume

    respaced = _respaced_copy(tmp_path / "respaced", (1.2, 0.9, 1.1))
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    args = ("--model", "hippocampus", "--model", respaced, "--input", source)
    args += ("--precision", "float32")  # as the members it is compared with below
    result = medseg("predict", *args, "--output", out, "--keep-largest")
    assert result.returncode == 0, result.stderr[-2000:]
    members = [  # the bundles' own mirroring, as the command's --tta
        inference.Segmenter(bundle, mirror_axes=(0,), precision="float32")
        for bundle in (resolve("hippocampus"), respaced)
    ]
    ensemble = inference.Ensemble(members, keep_largest=True)
    expected = ensemble.segment(read_volume(source))
    written = read_volume(out / source.name)
    np.testing.assert_array_equal(written.array, expected.array)
    np.testing.assert_array_equal(written.affine, expected.affine)
    settings = json.loads((out / "medseg_predict_settings.json").read_text())
    assert settings["model"] == [str(resolve("hippocampus")), str(respaced)]
    assert [p["target_spacing_mm"] for p in settings["preprocessing"]] == [
        [1.0, 1.0, 1.0],
        [1.2, 0.9, 1.1],
    ]
    assert settings["tta"] == [[0], [0]]
    # the folder's label maps are the ensemble's: one model alone may not add to them
    result = medseg("predict", "--model", "hippocampus", "--input", source,
                    "--output", out, "--precision", "float32")  # fmt: skip
    assert result.returncode == 2
    assert "made with other settings (model_sha256" in result.stderr
    # the same ensemble again skips the scan
    result = medseg("predict", *args, "--output", out, "--keep-largest")
    assert result.returncode == 0 and "1 skipped" in result.stdout
    # a folder of bundles (a cross-validation's runs) is the ensemble of them
    import shutil

    runs = tmp_path / "cv"
    shutil.copytree(resolve("hippocampus"), runs / "fold_0")
    respaced.rename(runs / "fold_1")
    (runs / "notes").mkdir()  # no bundle: left out
    result = medseg("predict", "--model", runs, "--input", source,
                    "--output", tmp_path / "by_folder", "--keep-largest",
                    "--precision", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    folds = f"{runs / 'fold_0'}, {runs / 'fold_1'}"
    assert f"an ensemble of 2 models: {folds}" in result.stderr
    by_folder = read_volume(tmp_path / "by_folder" / source.name)
    np.testing.assert_array_equal(by_folder.array, expected.array)


def _plan_metadata(patch, *, slice_axis=None, spacing=(1.0, 1.0, 1.0), channels=1):
    """A segmentation bundle's medseg.json as scan_plan reads it (no network)."""
    from medseg.bundle import BundleMetadata

    return BundleMetadata(
        {
            "task": "segmentation",
            "spatial_dims": len(patch),
            "patch_size": list(patch),
            "plan": {"slice_axis": slice_axis},
            "in_channels": channels,
            "labels": {str(k): {"value": k, "name": f"c{k}"} for k in range(3)},
            "preprocessing": {
                "normalizers": [{"scheme": "zscore"}] * channels,
                "target_spacing_mm": list(spacing),
                "crop_nonzero": True,
                "nonfinite": "error",
            },
            "config": {"train": {"augment": {"mirror_axes": [0, 1]}}},
            "fingerprint": {
                "shape": {"min": [20, 20, 20], "max": [30, 30, 30]},
                "spacing_mm": {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]},
            },
        }
    )


@pytest.mark.parametrize("slice_axis", [None, 2])
def test_scan_plan_is_what_prediction_does(slice_axis, rng):
    """The grid, windows and forward passes scan_plan finds without resampling or a
    network are those of the real preprocessing and sliding-window prediction."""
    from medseg.inference import window_of
    from medseg.io import Volume
    from medseg.preprocessing import Preprocessor

    # an LPS oblique scan of 0.8 x 1.5 x 2.5 mm voxels, zero around its content
    array = np.zeros((50, 31, 17, 1), np.float32)
    array[3:47, 2:30, 1:16] = rng.normal(100, 10, (44, 28, 15, 1))
    turn = np.radians(10)
    rotation = np.array(
        [[-1, 0, 0], [0, -np.cos(turn), np.sin(turn)], [0, np.sin(turn), np.cos(turn)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation.T * [0.8, 1.5, 2.5]
    volume = Volume(array, affine, path="scan.nii.gz")
    patch = (24, 16) if slice_axis is not None else (24, 16, 8)
    metadata = _plan_metadata(patch, slice_axis=slice_axis, spacing=(1.1, 1.2, 1.3))
    for overlap, tta in [(0.5, True), (0.25, False)]:
        plan = inference.scan_plan(volume, metadata, overlap=overlap, tta=tta)
        image, records = Preprocessor.from_dict(metadata["preprocessing"]).image(volume)
        resampled = geometry_spacing(records, image.shape[:-1])
        assert plan["refused"] is None and plan["warnings"] == []
        assert plan["grid_shape"] == list(image.shape[:-1])
        np.testing.assert_allclose(plan["grid_spacing_mm"], resampled, rtol=1e-9)
        window = window_of(patch, slice_axis)
        assert plan["window"] == list(window)
        calls = []

        def count(batch, calls=calls):
            calls.append(len(batch))
            return np.zeros((*batch.shape[:-1], 3), np.float32)

        in_plane = [a for a in range(3) if a != slice_axis]
        mirror = [in_plane[a] for a in (0, 1)] if tta else []
        inference.sliding_window_predict(
            image,
            inference.slicewise(count, slice_axis),
            patch_size=window,
            overlap=overlap,
            batch_size=plan["batch_size"],
            mirror_axes=mirror,
        )
        assert plan["forward_passes"] == len(calls)
        assert plan["mirrored"] == (4 if tta else 1)
        assert plan["windows"] * plan["mirrored"] == sum(calls)
        padded = [max(n, p) for n, p in zip(image.shape[:-1], window, strict=True)]
        assert plan["probabilities_mib"] == pytest.approx(
            np.prod(padded) * 3 * 4 / 2**20
        )


def geometry_spacing(records, shape) -> list[float]:
    """The spacing of a preprocessed image from its resampling record: the cropped
    extent (in mm, from the record's affine) over the resampled voxel counts."""
    from medseg.preprocessing.geometry import ResampleRecord

    (record,) = [r for r in records if isinstance(r, ResampleRecord)]
    axes = np.linalg.norm(np.asarray(record.original_affine)[:3, :3], axis=0)
    return list(np.asarray(record.original_shape) * axes / np.asarray(shape))


def test_scan_plan_refuses_and_warns_as_prediction_does():
    from medseg.io import Volume

    metadata = _plan_metadata((8, 8, 8))
    volume = Volume(np.ones((40, 40, 40, 2), np.float32), np.eye(4), path="two.nii")
    plan = inference.scan_plan(volume, metadata)
    assert plan["refused"] == (
        "3D scan with 2 channel(s), but the model segments 3D scans with 1 channel(s)"
    )
    assert plan["windows"] is None and plan["warnings"] == []
    array = np.ones((40, 40, 40, 1), np.float32)
    array[1, 2, 3] = np.nan
    plan = inference.scan_plan(Volume(array, np.eye(4), path="nan.nii"), metadata)
    assert plan["refused"].startswith("1 NaN/Inf voxel")
    # 120 mm across, where the training scans were at most 30 mm, and blank: the
    # warnings predict gives
    volume = Volume(np.ones((120, 30, 30, 1), np.float32), np.eye(4), path="big.nii")
    plan = inference.scan_plan(volume, metadata)
    assert plan["refused"] is None
    assert plan["warnings"] == [
        "big.nii: every voxel is 1, a blank scan: its labels mean nothing",
        inference.field_of_view_note(volume, metadata["fingerprint"]),
    ]
    assert "field of view 120 x 30 x 30 mm" in plan["warnings"][1]


@pytest.mark.parametrize("axes", [(), (1,), (0, 2)])
def test_blended_logits_take_their_softmax_once_at_the_end(axes, rng):
    """With ``softmax``, the logits of the windows (and their mirrors) are blended
    first and the softmax taken of the blend, not of each window."""
    image = rng.random((13, 11, 9, 1)).astype(np.float32)
    patch = (6, 5, 4)
    ramp = np.arange(120, dtype=np.float32).reshape(6, 5, 4, 1) / 12

    def logits(batch):  # position-dependent, large enough that the order matters
        return np.concatenate(
            [
                batch * ramp,
                3 * np.sin(batch + ramp),
                np.broadcast_to(-ramp, batch.shape),
            ],
            -1,
        )

    out = inference.sliding_window_predict(
        image, logits, patch_size=patch, batch_size=4, mirror_axes=axes, softmax=True
    )
    starts = [
        inference.window_starts(n, p, 0.5)
        for n, p in zip((13, 11, 9), patch, strict=True)
    ]
    expected = reference.softmax(
        reference.stitch(
            image,
            reference.mirror_averaged(logits, axes),
            patch,
            starts,
            inference.gaussian_importance(patch),
        )
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    averaged_probabilities = reference.stitch(
        image,
        reference.mirror_averaged(lambda b: reference.softmax(logits(b)), axes),
        patch,
        starts,
        inference.gaussian_importance(patch),
    )
    assert np.abs(out - averaged_probabilities).max() > 1e-3  # not the same thing


def test_an_error_in_the_network_stops_the_sliding_window(rng):
    calls = []

    def predict(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return batch

    with pytest.raises(RuntimeError, match="out of memory"):
        inference.sliding_window_predict(
            rng.random((20, 20, 1)).astype(np.float32), predict, patch_size=(4, 4),
            batch_size=2,
        )  # fmt: skip
    assert len(calls) == 3  # no pass after it
