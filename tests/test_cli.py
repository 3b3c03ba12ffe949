from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medseg import __version__
from medseg_cli.main import main
from tests.conftest import SAMPLE, save_nifti


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "summary"),
    [
        ([], "medseg: segment medical scans with Keras."),
        (["data"], "Inspect datasets; sort DICOM exports into series; convert DICOM"),
        (["data", "check"], "Check every case of DATASET and print its fingerprint."),
        (["data", "sort-dicom"], "Sort the DICOM files under SOURCE into one folder"),
        (["data", "seg-to-nifti"], "Write the DICOM Segmentation object SEG as a"),
        (["data", "nifti-to-seg"], "Write the label map LABELS (a NIfTI, say one"),
        (["info"], "Describe MODEL_OR_CONFIG: a .keras model, a model bundle"),
        (["train"], "Train a segmentation model; OUTPUT becomes a bundle"),
        (["finetune"], "Fine-tune a pretrained bundle on a new dataset"),
        (["models"], "List the models shipped with medseg"),
        (["export"], "Export a bundle for serving, checked against the bundle"),
        (["predict"], "Segment scans with a bundle; labels are written on each scan"),
        (
            ["evaluate"],
            "Score predicted label maps against the truth, per case and label",
        ),
    ],
)
def test_help_of_every_command(args, summary):
    result = run(*args, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: medseg {' '.join(args)}".rstrip() + " [")
    assert summary in result.output


def test_version():
    result = run("--version")
    assert (
        result.exit_code == 0
        and result.output.strip() == f"medseg, version {__version__}"
    )


def test_help_imports_neither_tensorflow_nor_nibabel():
    code = (
        "import sys\n"
        "from medseg_cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "names = ('tensorflow', 'keras', 'nibabel', 'scipy')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY []" in out


def _sample_truth():
    """Fingerprint numbers computed directly from the sample files."""
    shapes, foreground, fractions = [], [], {0: [], 1: [], 2: []}
    for image_path in sorted((SAMPLE / "imagesTr").glob("*.nii.gz")):
        image = np.asanyarray(nib.load(image_path).dataobj)
        label = np.asanyarray(nib.load(SAMPLE / "labelsTr" / image_path.name).dataobj)
        shapes.append(image.shape)
        foreground.append(image[label > 0].astype(np.float64))
        for value in fractions:
            fractions[value].append(np.count_nonzero(label == value) / label.size)
    return np.array(shapes), np.concatenate(foreground), fractions


@pytest.mark.slow
def test_data_check_passes_the_sample_and_reports_its_fingerprint(tmp_path):
    result = run("data", "check", str(SAMPLE), "--json", str(tmp_path / "fp.json"))
    assert result.exit_code == 0, result.output
    assert "OK: no problems found" in result.output
    report = json.loads((tmp_path / "fp.json").read_text())
    assert report["ok"] is True and report["problems"] == []
    fp = report["fingerprint"]
    shapes, foreground, fractions = _sample_truth()
    assert fp["num_cases"] == 12 and fp["num_readable_cases"] == 12
    assert fp["shape"]["min"] == shapes.min(axis=0).tolist()
    assert fp["shape"]["max"] == shapes.max(axis=0).tolist()
    assert fp["spacing_mm"]["median"] == pytest.approx([1.0, 1.0, 1.0])
    assert fp["orientations"] == {"RAS": 12}
    # each case has fewer than 10,000 foreground voxels, so all of them are pooled
    assert foreground.size < 12 * 10_000
    stats = fp["foreground_intensity"][0]
    assert stats["mean"] == pytest.approx(foreground.mean())
    assert stats["percentile_99.5"] == pytest.approx(np.percentile(foreground, 99.5))
    for value, values in fractions.items():
        assert fp["label_fraction"][str(value)]["mean"] == pytest.approx(
            np.mean(values)
        )
    assert f"label 1: {100 * np.mean(fractions[1]):.2f}% of voxels" in result.output


@pytest.fixture
def broken_sample(tmp_path):
    return make_broken_sample(tmp_path / "broken")


def make_broken_sample(root):
    """A copy of the sample with one defect in each of seven cases."""
    shutil.copytree(SAMPLE, root)
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["training"][0]["image"] = "../escape.nii.gz"  # hippocampus_003
    (root / "dataset.json").write_text(json.dumps(manifest))
    (root / "imagesTr" / "hippocampus_008.nii.gz").unlink()
    corrupt = root / "imagesTr" / "hippocampus_011.nii.gz"
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 32] = bytes(32)
    corrupt.write_bytes(bytes(raw))

    def edit_label(case, change):
        path = root / "labelsTr" / f"{case}.nii.gz"
        img = nib.load(path)
        data, affine = change(np.asanyarray(img.dataobj).copy(), img.affine.copy())
        save_nifti(path, data, affine)

    def wrong_value(data, affine):
        data[0, 0, 0] = 7
        return data, affine

    def shift(data, affine):
        affine[0, 3] += 0.5
        return data, affine

    edit_label("hippocampus_014", wrong_value)
    edit_label("hippocampus_015", lambda d, a: (d[:, :, :-6], a))
    edit_label("hippocampus_017", shift)
    nan_path = root / "imagesTr" / "hippocampus_019.nii.gz"
    img = nib.load(nan_path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[1, 1, 1] = np.nan
    save_nifti(nan_path, data, img.affine)
    return root


@pytest.mark.slow
def test_data_check_names_every_broken_case(broken_sample, tmp_path):
    result = CliRunner().invoke(
        main, ["data", "check", str(broken_sample), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    found = {p["case"]: p["problem"] for p in report["problems"]}
    assert sorted(found) == [
        "escape",
        "hippocampus_008",
        "hippocampus_011",
        "hippocampus_014",
        "hippocampus_015",
        "hippocampus_017",
        "hippocampus_019",
    ]
    assert found["escape"] == "path points outside the dataset folder"
    assert found["hippocampus_008"] == "file not found"
    assert found["hippocampus_011"] == "corrupt compressed data (checksum mismatch)"
    assert (
        "label values [7] not among declared labels [0, 1, 2]"
        in found["hippocampus_014"]
    )
    assert (
        "label shape" in found["hippocampus_015"]
        and "differs" in found["hippocampus_015"]
    )
    assert (
        "label affine differs from the image's by up to 0.5 mm"
        in found["hippocampus_017"]
    )
    assert found["hippocampus_019"] == "1 NaN/Inf voxels"
    for case, problem in found.items():
        assert f"BROKEN {case}: " in result.output and problem in result.output
    # the five intact cases are fingerprinted
    assert report["fingerprint"]["num_readable_cases"] == 5


def test_bad_dataset_path_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"Error: {tmp_path / 'nothing'}: dataset folder not found"
    )
    debug = CliRunner().invoke(main, ["--debug", "data", "check", str(tmp_path / "x")])
    assert debug.exit_code == 1 and type(debug.exception).__name__ == "InputFileError"


def test_data_check_on_medmnist_npz(tmp_path, rng):
    np.savez(
        tmp_path / "m.npz",
        train_images=rng.random((6, 8, 8, 8)).astype(np.float32),
        train_labels=np.array([[0], [1], [1], [0], [1], [1]]),
    )
    result = run("data", "check", str(tmp_path / "m.npz"))
    assert result.exit_code == 0
    assert "train      6 samples of (8, 8, 8, 1) float32, classes {'0': 2, '1': 4}" in (
        result.output
    )


TINY_CONFIG = """\
model:
  name: unet
  spatial_dims: 3
  in_channels: 1
  num_classes: 3
  patch_size: [32, 32, 32]
  filters: [8, 16, 32]
"""


def test_info_on_a_config_prints_counts_field_and_memory(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    result = run(
        "info", str(path), "--batch-size", "2", "--json", str(tmp_path / "i.json")
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["layer", "class", "output", "shape", "params"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.strip()}
    # 3*3*3*1*8 weights, no bias before the instance norm
    assert rows["enc0_conv1"] == ["Conv3D", "(32,", "32,", "32,", "8)", "216"]
    assert "parameters: 85,195 total, 85,195 trainable, 0 non-trainable" in lines
    assert "receptive field: 44 x 44 x 44 voxels" in lines
    summary = json.loads((tmp_path / "i.json").read_text())
    assert summary["total_params"] == 85_195
    memory = summary["memory_bytes"]
    assert memory["parameters"] == memory["gradients"] == 4 * 85_195
    assert memory["optimizer"] == 8 * 85_195
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    fp16 = run(
        "info", str(path), "--mixed-precision", "--json", str(tmp_path / "h.json")
    )
    assert fp16.exit_code == 0
    half = json.loads((tmp_path / "h.json").read_text())["memory_bytes"]["activations"]
    assert 2 * half == memory["activations"]


def test_info_on_a_saved_model_with_an_input_shape(tmp_path):
    from medseg.models import build_unet

    model = build_unet(spatial_dims=2, in_channels=1, num_classes=2, filters=(4, 8))
    model.save(tmp_path / "m.keras")
    (tmp_path / "bundle").mkdir()
    model.save(tmp_path / "bundle" / "model.keras")
    bundle = run("info", str(tmp_path / "bundle"))
    assert bundle.exit_code == 0 and "parameters: " in bundle.output
    any_size = run("info", str(tmp_path / "m.keras"))
    assert any_size.exit_code == 0
    assert "need a fixed input size (--input-shape)" in any_size.output
    fixed = run("info", str(tmp_path / "m.keras"), "--input-shape", "16x16")
    assert fixed.exit_code == 0
    first = fixed.output.splitlines()[1].split()
    assert first == ["image", "InputLayer", "(16,", "16,", "1)", "0"]
    assert "FLOPs per sample" in fixed.output
    wrong = CliRunner().invoke(
        main, ["info", str(tmp_path / "m.keras"), "--input-shape", "16,16,16"]
    )
    assert wrong.exit_code == 2 and "the model is 2D; give 2 sizes" in wrong.output


def test_info_on_a_shipped_model_by_name_at_its_patch_size():
    from medseg.bundle import read_metadata, shipped_models
    from medseg.models import load_model

    folder = shipped_models()["hippocampus"]
    patch = tuple(read_metadata(folder)["patch_size"])
    result = run("info", "hippocampus")
    assert result.exit_code == 0, result.output
    assert f"input ({', '.join(map(str, patch))}, 1)" in result.output
    count = load_model(folder).count_params()
    assert f"parameters: {count:,} total" in result.output
    assert "FLOPs per sample (forward)" in result.output
    unknown = run("info", "no_such_model")
    assert unknown.exit_code == 2 and "a shipped model's name" in unknown.output


def test_info_counts_classes_from_the_labels_or_the_dataset(tmp_path):
    import os

    def logits_channels(text):
        config = tmp_path / "c.yaml"
        config.write_text(text)
        result = CliRunner().invoke(main, ["info", str(config)])
        assert result.exit_code == 0, result.output
        line = next(x for x in result.output.splitlines() if x.startswith("logits"))
        return int(line.split(")")[0].split(",")[-1])

    model = "model:\n  name: unet\n  spatial_dims: 2\n  filters: [4, 8]\n"
    # the sample declares background, anterior, posterior; relative to the config
    relative = os.path.relpath(SAMPLE, tmp_path)
    assert logits_channels(model + f"data:\n  dataset: {relative}\n") == 3
    declared = "data:\n  labels: {0: membrane, 255: cell}\n"
    assert logits_channels(model + declared) == 2
    (tmp_path / "c.yaml").write_text(model)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "num_classes is not set and there is no data.dataset" in result.output


def test_info_bad_inputs_exit_2_with_one_line(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "notes.md")])
    assert result.exit_code == 2
    assert (
        "expected a .keras model, a bundle folder, a shipped model's name or a .yaml "
        "config" in result.output
    )
    (tmp_path / "bad.yaml").write_text(
        "model:\n  name: unet\n  num_classes: 2\n  x: 1\n"
    )
    result = CliRunner().invoke(main, ["info", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(
        f"Error: {tmp_path / 'bad.yaml'}: unknown model key"
    )


def test_info_on_a_scan_gives_its_grid_orientation_and_values(tmp_path):
    from skimage.io import imsave

    rng = np.random.default_rng(0)
    labels = rng.choice([0, 0, 0, 3, 7], size=(6, 5, 4)).astype(np.int16)
    # voxels 0.5 x 2 x 3 mm: x to the left, y rotated 30 degrees about x from
    # posterior toward superior, z likewise from superior toward anterior
    turn = np.radians(30)
    axes = np.array(
        [
            [-1, 0, 0],
            [0, -np.cos(turn), np.sin(turn)],
            [0, np.sin(turn), np.cos(turn)],
        ]
    ).T * [0.5, 2.0, 3.0]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = axes, [10.0, -20.0, 5.5]
    path = save_nifti(tmp_path / "lab.nii.gz", labels, affine)
    result = run("info", str(path), "--json", str(tmp_path / "s.json"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["shape"] == [6, 5, 4] and summary["channels"] == 1
    np.testing.assert_allclose(summary["spacing_mm"], [0.5, 2.0, 3.0])
    np.testing.assert_allclose(summary["field_of_view_mm"], [3.0, 10.0, 12.0])
    np.testing.assert_allclose(summary["affine"], affine, atol=1e-6)
    np.testing.assert_allclose(summary["origin_mm"], [10.0, -20.0, 5.5])
    assert summary["orientation"] == "LPS"  # each axis toward the nearest direction
    assert summary["oblique_deg"] == pytest.approx(30.0, abs=1e-4)
    assert summary["dtype"] == "int16"
    values = summary["values"][0]
    assert values["min"] == 0 and values["max"] == 7 and values["nonfinite"] == 0
    assert values["mean"] == pytest.approx(labels.mean())
    assert values["sd"] == pytest.approx(labels.std())
    found, counts = np.unique(labels, return_counts=True)
    assert values["counts"] == {
        str(v): int(n) for v, n in zip(found, counts, strict=True)
    }
    assert f"{path}: NIfTI, 3D, 1 channel" in result.output
    assert "LPS (the voxel axes point left, posterior, superior)" in result.output
    assert "oblique: an axis 30 degrees off the world axis nearest it" in result.output
    counted = (
        ", ".join(f"{v}: {n:,}" for v, n in zip(found, counts, strict=True)) + " voxels"
    )
    assert counted in result.output

    # a scan with NaN and many values: no counts, the NaN counted and left out
    scan = rng.normal(100, 10, size=(4, 4, 3)).astype(np.float32)
    scan[0, 0, 0] = np.nan
    path = save_nifti(tmp_path / "s.nii", scan)
    assert run("info", str(path), "--json", str(tmp_path / "t.json")).exit_code == 0
    summary = json.loads((tmp_path / "t.json").read_text())
    values = summary["values"][0]
    assert values["nonfinite"] == 1 and values["counts"] is None
    assert values["mean"] == pytest.approx(np.nanmean(scan), rel=1e-6)
    assert values["max"] == pytest.approx(float(np.nanmax(scan)))
    assert summary["oblique_deg"] == 0.0 and summary["orientation"] == "RAS"

    # a picture: pixels, and the spacing it does not store
    picture = np.zeros((8, 9), np.uint8)
    picture[2:4] = 255
    imsave(tmp_path / "p.png", picture, check_contrast=False)
    result = run("info", str(tmp_path / "p.png"))
    assert result.exit_code == 0, result.output
    assert "8 x 9 pixels" in result.output
    assert "0: 54, 255: 18 pixels" in result.output
    assert "a picture stores no spacing or orientation; 1 x 1 mm pixels are" in (
        result.output
    )
    assert "orientation:" not in result.output

    # a single DICOM file, a scan with model options, a scan to data check: one line
    (tmp_path / "IM1").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "IM1")])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {tmp_path / 'IM1'}: one DICOM file: medseg reads a DICOM series as "
        "the folder that holds its files, and only those (medseg data sort-dicom "
        "sorts an export into one folder per series)\n"
    )
    result = CliRunner().invoke(main, ["info", str(path), "--input-shape", "8,8,8"])
    assert result.exit_code == 2 and "is a scan; --input-shape" in result.output
    result = CliRunner().invoke(main, ["data", "check", str(path)])
    assert result.exit_code == 2
    assert "medseg info SCAN describes one scan" in result.output
    # several scans, one not there: the others described, that one named, exit 1
    several = [str(tmp_path / "lab.nii.gz"), str(tmp_path / "gone.nii"), str(path)]
    result = CliRunner().invoke(main, ["info", *several, "--json", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'gone.nii'}: file not found\n"
    assert result.stdout.count(": NIfTI, 3D, 1 channel") == 2
    described = json.loads((tmp_path / "m").read_text())
    assert [d["path"] for d in described] == several
    assert described[1]["error"].endswith("file not found")
    assert described[0]["shape"] == [6, 5, 4]
    result = CliRunner().invoke(main, ["info", "hippocampus", str(path)])
    assert result.exit_code == 2
    assert "hippocampus: not a scan; give one model or config, or scans" in (
        result.output
    )

    # a slice in its series' folder names the series, as for medseg predict
    data = pytest.importorskip("pydicom.data")
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(data.get_testdata_file("CT_small.dcm"), series / "IM1")
    result = run("info", str(series / "IM1"))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{series}: DICOM series, 3D, 1 channel")
    assert "  shape:          128 x 128 x 1 voxels" in result.output


def test_info_on_scans_with_a_model_says_what_predict_would_do(tmp_path):
    from skimage.io import imsave

    from medseg.bundle import read_metadata, resolve
    from medseg.io import read_volume
    from medseg.preprocessing import Preprocessor

    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    # the sample scan at 0.5 mm along its first axis, cropped tighter by a zero margin
    array = np.asanyarray(nib.load(scan).dataobj).astype(np.float32)
    array = np.pad(array, [(4, 0), (0, 3), (0, 0)])
    fine = save_nifti(tmp_path / "fine.nii.gz", array, np.diag([0.5, 1, 1, 1]))
    picture = tmp_path / "p.png"
    imsave(picture, np.zeros((8, 9), np.uint8), check_contrast=False)
    result = CliRunner().invoke(
        main,
        ["info", str(fine), str(picture), "--model", "hippocampus"]
        + ["--json", str(tmp_path / "s.json")],
    )
    assert result.exit_code == 1, result.output  # the picture would be refused
    metadata = read_metadata(resolve("hippocampus")).to_dict()
    image, _ = Preprocessor.from_dict(metadata["preprocessing"]).image(
        read_volume(fine)
    )
    shape = list(image.shape[:-1])  # the real preprocessing's grid
    assert shape[0] < array.shape[0] * 0.5 + 1 and shape[1] == array.shape[1] - 3
    described, pictured = json.loads((tmp_path / "s.json").read_text())
    plan = described["model"]
    assert plan["name"] == "hippocampus" and plan["refused"] is None
    assert plan["grid_shape"] == shape and plan["grid_spacing_mm"] == [1.0, 1.0, 1.0]
    # each side under the 48 x 64 x 48 window: one window, mirrored on one axis
    assert plan["window"] == [48, 64, 48] and plan["windows"] == 1
    assert plan["mirrored"] == 2 and plan["forward_passes"] == 2
    assert plan["probabilities_mib"] == pytest.approx(48 * 64 * 48 * 3 * 4 / 2**20)
    assert pictured["model"]["refused"] == (
        "2D scan with 1 channel(s), but the model segments 3D scans with 1 channel(s)"
    )
    size = " x ".join(map(str, shape))
    assert f"  model grid:     {size} at 1 x 1 x 1 mm" in result.output
    assert (
        "  windows:        1 of 48 x 64 x 48 (overlap 0.5), each also mirrored: 2 "
        "predicted; 2 forward passes of up to 4 windows"
    ) in result.output
    assert "  model:          hippocampus would refuse it: 2D scan" in result.output

    # wider overlap and no mirroring; a scan far larger than the training scans
    big = save_nifti(tmp_path / "big.nii", np.ones((130, 60, 40), np.float32))
    result = run("info", str(big), "--model", "hippocampus", "--no-tta")
    assert result.exit_code == 0, result.output
    # 130 along a 48 window at overlap 0.5: ceil(82 / 24) + 1 = 5; 60 (padded to 64)
    # along 64 and 40 (to 48) along 48: 1
    assert "  windows:        5 of 48 x 64 x 48 (overlap 0.5); 2 forward" in (
        result.output
    )
    assert "  warning:        " in result.output
    assert "field of view 130 x 60 x 40 mm, while the longest side" in result.output
    result = run("info", str(big), "--model", "hippocampus", "--overlap", "0")
    # at no overlap: ceil(82 / 48) + 1 = 3 along the first axis
    assert "  windows:        3 of 48 x 64 x 48 (overlap 0), each also" in (
        result.output
    )
    # predict's --batch-size: 5 windows in one pass, and one for the mirrored copies
    result = run("info", str(big), "--model", "hippocampus", "--batch-size", "5")
    assert "10 predicted; 2 forward passes of up to 5 windows" in result.output
    # a folder: each scan, and totals that name the scans with warnings, refused and
    # unreadable; exit 1
    folder = tmp_path / "batch"
    folder.mkdir()
    for path in (fine, big, picture):
        shutil.copy(path, folder)
    (folder / "broken.nii.gz").write_bytes(b"bad")
    result = CliRunner().invoke(main, ["info", str(folder), "--model", "hippocampus"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {folder / 'broken.nii.gz'}: not gzip-compressed data (corrupt, or "
        "misnamed file)\n"
    )
    # fine: 1 window, 2 with its mirrored copy, in 2 passes; big: 5 windows, 10
    # predictions, 2 passes of up to 4 windows and 2 of their mirrored copies
    assert result.stdout.splitlines()[-1] == (
        f"4 scans: 2 would be segmented, 1 with warnings ({folder / 'big.nii'}); 1 "
        f"refused ({folder / 'p.png'}); 1 unreadable ({folder / 'broken.nii.gz'}); "
        "12 window predictions in 6 forward passes"
    )

    # a list naming a case stored one file per channel, for a two-channel model: one
    # scan of two channels, as predict reads it; so is one of its files alone
    two = tmp_path / "two"
    two.mkdir()
    metadata["in_channels"] = 2
    metadata["preprocessing"]["normalizers"] *= 2
    (two / "medseg.json").write_text(json.dumps(metadata))
    cases = tmp_path / "cases"
    for c in range(2):
        save_nifti(cases / f"case_{c:04d}.nii.gz", array + c)
    (tmp_path / "scans.txt").write_text(
        "cases/case_0000.nii.gz\ncases/case_0001.nii.gz\n"
    )
    for given in [tmp_path / "scans.txt", cases / "case_0001.nii.gz"]:
        result = run(
            "info", str(given), "--model", str(two), "--json", str(tmp_path / "c")
        )
        assert result.exit_code == 0, result.output
        described = json.loads((tmp_path / "c").read_text())
        described = described if isinstance(described, list) else [described]
        assert [d["channels"] for d in described] == [2]
        assert described[0]["model"]["refused"] is None
    result = CliRunner().invoke(
        main, ["info", str(cases / "case_0001.nii.gz"), "--model", "hippocampus"]
    )
    assert result.exit_code == 0, result.output  # one channel: each file itself

    # the options without a scan or without --model, a folder that is no bundle, one
    # that holds no scan but a folder
    nothing = tmp_path / "empty" / "sub"
    nothing.mkdir(parents=True)
    for args, error in [
        (["hippocampus", "--model", "hippocampus"], "hippocampus is not a scan; "),
        ([str(big), "--overlap", "0.2"], "--overlap and --no-tta describe scans with"),
        ([str(big), "--batch-size", "8"], "--batch-size describes a model, or scans"),
        ([str(big), "--model", str(tmp_path)], f"{tmp_path}: "),
        ([str(two), "--model", "hippocampus"], f"{two} is not a scan; --model"),
        ([str(nothing.parent), "--model", "hippocampus"], f"{nothing.parent}: no scan"),
    ]:
        result = CliRunner().invoke(main, ["info", *args])
        assert result.exit_code == 2, result.output
        assert result.output.splitlines()[-1].startswith(f"Error: {error}")


def test_every_package_folder_is_installed():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "medseg").rglob("__init__.py")
    }
    assert found <= listed, f"not installed by `pip install .`: {found - listed}"


def test_a_long_scan_gets_a_line_a_minute_with_the_time_left_at_its_pace():
    from medseg_cli.predict import PACE_EVERY_S, _Pace

    now, said = [0.0], []
    pace = _Pace(said.append, clock=lambda: now[0])
    for at, scan, done in [
        (5.0, "a.nii.gz", 10),  # the first pass (after tracing and reading): timed
        (30.0, "a.nii.gz", 60),
        (5 + PACE_EVERY_S, "a.nii.gz", 130),  # 120 windows in 60 s: 2 a second
        (90.0, "a.nii.gz", 190),
        (5 + 2 * PACE_EVERY_S, "a.nii.gz", 250),  # a minute since the last line
        (5 + 3 * PACE_EVERY_S, "a.nii.gz", 4000),  # all done: no line
        (200.0, "b.nii.gz", 4),  # another scan: its own clock
        (200 + PACE_EVERY_S, "b.nii.gz", 9),  # 5 in 60 s, 3991 left
    ]:
        now[0] = at
        pace(scan, done, 4000)
    assert said == [
        "a.nii.gz: 130 of 4,000 windows, about 32 min left",  # 3870 / 2 s
        "a.nii.gz: 250 of 4,000 windows, about 31 min left",  # 3750 / 2 s
        "b.nii.gz: 9 of 4,000 windows, about 13 h 18 min left",  # 3991 * 12 s
    ]
    pace = _Pace(said.append, clock=lambda: now[0])
    for at, done in [(0.0, 2), (PACE_EVERY_S, 30)]:
        now[0] = at
        pace("c.nii.gz", done, 40)  # 28 in 60 s, 10 left
    assert said[-1] == "c.nii.gz: 30 of 40 windows, about 21 s left"


def test_ctrl_c_while_a_command_starts_exits_130_without_a_traceback(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import SAMPLE

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: unet, spatial_dims: 3, filters: [4, 8]}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "medseg_cli", "train", "--config", str(config),
         "--data", str(SAMPLE), "--output", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job ignores SIGINT; a terminal's does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(2.0)  # inside the command, TensorFlow loading
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    assert not (tmp_path / "run").exists()
