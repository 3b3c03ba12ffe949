"""Bad input through the command line: each bad file named with its problem in one
line, no traceback, the right exit status, and the good cases still done."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO, SAMPLE, TINY_CONFIG, assert_failures_named
from tests.conftest import run_medseg as medseg


@pytest.mark.slow
def test_a_folder_of_bad_scans_names_each_and_finishes_the_good_ones(bundle, tmp_path):
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(source)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = ["with space.nii.gz", "caf\u00e9.nii.gz"]
    for name in good:
        shutil.copy(source, inputs / name)
    raw_name = os.fsencode(inputs) + b"/latin1 \xff.nii.gz"  # not UTF-8
    shutil.copy(source, raw_name)
    (inputs / "wrong_magic.nii.gz").write_bytes(gzip.compress(bytes(range(256)) * 8))
    nan = data.copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), inputs / "nan.nii.gz")
    nib.save(
        nib.Nifti1Image(np.stack([data, data], -1), img.affine),
        inputs / "two_channels.nii.gz",
    )
    nib.save(nib.Nifti1Image(data, img.affine), inputs / "short.nii")
    whole = (inputs / "short.nii").read_bytes()
    (inputs / "short.nii").write_bytes(whole[: len(whole) // 2])
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.float32)
    (inputs / "bomb.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    os.symlink(inputs / "loop_b.nii.gz", inputs / "loop_a.nii.gz")
    os.symlink(inputs / "loop_a.nii.gz", inputs / "loop_b.nii.gz")
    os.symlink(inputs / "gone.nii.gz", inputs / "dangling.nii.gz")
    out = tmp_path / "out"
    result = medseg("predict", "--model", bundle, "--input", inputs, "--output", out)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "3 segmented, 0 skipped (output existed), 8 failed" in result.stdout
    assert_failures_named(
        result.stderr,
        inputs,
        [
            ("wrong_magic.nii.gz", "not a NIfTI file"),
            ("nan.nii.gz", "1 NaN/Inf voxels; refused"),
            (
                "two_channels.nii.gz",
                "3D scan with 2 channel(s), but the model segments",
            ),
            ("short.nii", "truncated file: header declares"),
            ("bomb.nii", "a damaged header or a decompression bomb"),
            ("loop_a.nii.gz", "symlink loop"),
            ("loop_b.nii.gz", "symlink loop"),
            ("dangling.nii.gz", "broken symlink"),
        ],
    )
    written = sorted(os.listdir(os.fsencode(out)))
    assert written == sorted(
        [os.fsencode(n) for n in good]
        + [b"latin1 \xff.nii.gz", b"medseg_predict_report.json"]
        + [b"medseg_predict_settings.json", b"medseg_volumes.csv"]
    )
    table = (out / "medseg_volumes.csv").read_bytes()  # names as the files' bytes
    assert b"\nlatin1 \xff,1,Anterior," in table and b"\ncaf\xc3\xa9,2," in table
    for name in written:
        if name.endswith(b".nii.gz"):
            labels = nib.load(os.fsdecode(os.fsencode(out) + b"/" + name))
            assert labels.shape == img.shape
            np.testing.assert_array_equal(labels.affine, img.affine)
    report = json.loads((out / "medseg_predict_report.json").read_text())
    assert report["counts"] == {"done": 3, "skipped": 0, "failed": 8}


@pytest.mark.slow
def test_scans_refused_for_nan_are_segmented_on_a_rerun_with_nonfinite_replace(
    tmp_path,
):
    sources = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(sources[0], inputs / "good.nii.gz")
    img = nib.load(sources[1])
    data = np.asanyarray(img.dataobj).astype(np.float32)
    broken = data.copy()
    broken[0:2, 0:2, 0] = np.nan  # a corner outside the field of view, as after
    broken[5, 6, 7] = np.inf  # a registration, and one voxel inside
    nib.save(nib.Nifti1Image(broken, img.affine), inputs / "nan.nii.gz")
    filled = broken.copy()  # the reference: filled by hand with the finite minimum
    filled[~np.isfinite(filled)] = data[np.isfinite(broken)].min()
    nib.save(nib.Nifti1Image(filled, img.affine), tmp_path / "filled.nii.gz")
    common = ("--model", "hippocampus", "--no-tta", "--precision", "float32")

    first = medseg("predict", *common, "--input", inputs, "--output", out)
    assert first.returncode == 1
    assert "1 segmented, 0 skipped (output existed), 1 failed" in first.stdout
    assert_failures_named(
        first.stderr,
        inputs,
        [("nan.nii.gz", "5 NaN/Inf voxels; refused (medseg predict --nonfinite")],
    )
    assert not (out / "nan.nii.gz").exists()
    rerun = medseg(
        "predict", *common, "--input", inputs, "--output", out, "--nonfinite", "replace"
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 segmented, 1 skipped (output existed), 0 failed" in rerun.stdout
    assert f"{inputs / 'nan.nii.gz'}: 5 NaN/Inf voxels replaced" in rerun.stderr
    report = json.loads((out / "medseg_predict_report.json").read_text())
    replaced = {c["input"]: c["nonfinite_replaced"] for c in report["cases"]}
    assert replaced == {str(inputs / "good.nii.gz"): 0, str(inputs / "nan.nii.gz"): 5}
    assert report["settings"]["nonfinite"] == "replace"
    reference = medseg(
        "predict",
        *common,
        "--input",
        tmp_path / "filled.nii.gz",
        "--output",
        tmp_path / "filled_labels.nii.gz",
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = np.asanyarray(nib.load(tmp_path / "filled_labels.nii.gz").dataobj)
    labels = nib.load(out / "nan.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj), expected)
    np.testing.assert_array_equal(labels.affine, img.affine)
    assert set(np.unique(expected)) == {0, 1, 2}  # a real segmentation to compare


@pytest.mark.slow
def test_a_rerun_report_keeps_the_warning_of_a_scan_the_first_run_did(tmp_path):
    # a job stopped after a scan it warned about, and run again: the second
    # report still warns about that scan, whose label map it only skipped
    sources = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    img = nib.load(sources[0])  # the same voxels said to be 0.25 mm: a sliver
    sliver = nib.Nifti1Image(
        np.asanyarray(img.dataobj), img.affine @ np.diag([0.25, 0.25, 0.25, 1])
    )
    nib.save(sliver, inputs / "a_sliver.nii.gz")
    common = ("--model", "hippocampus", "--no-tta", "--precision", "float32")
    first = medseg("predict", *common, "--input", inputs, "--output", out)
    assert first.returncode == 0, first.stderr[-3000:]
    warned = json.loads((out / "medseg_predict_report.json").read_text())["cases"]
    assert "field of view" in warned[0]["warnings"][0]  # the test can fail
    shutil.copy(sources[1], inputs / "b.nii.gz")
    rerun = medseg("predict", *common, "--input", inputs, "--output", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 segmented, 1 skipped (output existed), 0 failed" in rerun.stdout
    cases = json.loads((out / "medseg_predict_report.json").read_text())["cases"]
    assert [(c["status"], c["earlier_run"]) for c in cases] == [
        ("skipped", True),
        ("done", False),
    ]
    for key in ("warnings", "seconds", "input_shape", "spacing_mm"):
        assert cases[0][key] == warned[0][key], key
    assert cases[1]["warnings"] == []


@pytest.mark.slow
def test_a_list_of_scans_is_segmented_and_a_line_naming_no_file_fails_alone(tmp_path):
    sources = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    job = tmp_path / "job"
    job.mkdir()
    (job / "scans.txt").write_text(
        f"# two scans and a typo\n{sources[0]}\n{sources[1]}\nmissing.nii.gz\n"
    )
    out = tmp_path / "out"
    result = medseg(
        "predict", "--model", "hippocampus", "--no-tta", "--input", job / "scans.txt",
        "--output", out,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 segmented, 0 skipped (output existed), 1 failed" in result.stdout
    assert_failures_named(result.stderr, job, [("missing.nii.gz", "file not found")])
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [s.name for s in sources[:2]]


def _limit_file_size(limit):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_write_that_fails_midway_leaves_no_partial_file_and_the_rest_finish(
    bundle, tmp_path
):
    # a full disk, simulated by a 20 kB file-size limit: the uncompressed output
    # (about 60 kB) cannot be written, the compressed one (a few kB) can
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(source, inputs / "small.nii.gz")
    img = nib.load(source)
    nib.save(
        nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), inputs / "big.nii"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.nii.gz").write_bytes(b"kept")  # a file from before is untouched
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medseg_cli",
            "predict",
            "--model",
            str(bundle),
            "--input",
            str(inputs),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(20_000),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "1 segmented, 0 skipped (output existed), 1 failed" in result.stdout
    failure = [line for line in result.stderr.splitlines() if "big.nii" in line]
    assert failure and "File too large" in failure[-1]
    assert sorted(p.name for p in out.iterdir()) == [
        "earlier.nii.gz",
        "medseg_predict_report.json",
        "medseg_predict_settings.json",
        "medseg_volumes.csv",
        "small.nii.gz",
    ]  # no partial big.nii, nor its temporary file
    assert (out / "earlier.nii.gz").read_bytes() == b"kept"
    assert nib.load(out / "small.nii.gz").shape == img.shape


def test_an_output_that_cannot_be_a_folder_is_one_line_and_exit_2(bundle, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the output folder should go")
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = medseg(
        "predict", "--model", bundle, "--input", source, "--output", blocker / "out"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{blocker / 'out'}: cannot create the output folder" in result.stderr
    assert blocker.read_text() == "a file where the output folder should go"
    # the output a file already (a name without a scan suffix for one scan): said so
    result = medseg(
        "predict", "--model", bundle, "--input", source, "--output", blocker
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {blocker}: a file is there, where the output folder should be (for "
        "one scan, give a file name with a scan suffix such as .nii.gz)"
    )
    assert blocker.read_text() == "a file where the output folder should go"


def test_an_output_folder_that_is_not_writable_keeps_what_it_has(
    bundle, tmp_path, monkeypatch
):
    """Read-only is simulated (os.access), since root may write anywhere."""
    from click.testing import CliRunner

    from medseg_cli.main import main

    output = tmp_path / "out"
    output.mkdir()
    (output / "earlier.nii.gz").write_bytes(b"an earlier result")
    real = os.access

    def access(path, mode, **kwargs):
        if os.fspath(path) == str(output) and mode & os.W_OK:
            return False
        return real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    source = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = CliRunner().invoke(
        main,
        ["predict", "--model", str(bundle), "--input", str(source), "--output",
         str(output)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: {output}: output folder is not writable\n"
    assert sorted(p.name for p in output.iterdir()) == ["earlier.nii.gz"]
    assert (output / "earlier.nii.gz").read_bytes() == b"an earlier result"


WRITER = """
import sys
from medseg.bundle import write_bundle
from medseg.models import build_unet
from tests.conftest import bundle_record

model = build_unet(spatial_dims=2, in_channels=1, num_classes=2, filters=(4, 8))
generation = int(sys.argv[2])
while True:  # each bundle's weights all equal its generation number
    model.set_weights([w * 0 + generation for w in model.get_weights()])
    write_bundle(sys.argv[1], model, bundle_record(generation=generation))
    print(generation, flush=True)
    generation += 1
"""


def _check_bundle(folder):
    from medseg.bundle import verify
    from medseg.models import load_model

    metadata = verify(folder)
    weights = load_model(folder).get_weights()
    assert all((w == metadata["generation"]).all() for w in weights)
    return metadata["generation"]


@pytest.mark.slow
def test_sigkill_while_writing_bundles_always_leaves_a_complete_one(tmp_path):
    import random
    import signal
    import time

    rng = random.Random(0)
    folder = tmp_path / "bundle"
    generation = 0
    for _ in range(6):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder), str(generation)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        process.stdout.readline()  # one bundle written in this round
        time.sleep(rng.uniform(0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        found = _check_bundle(folder)
        assert found >= generation
        generation = found + 1000  # later rounds are told apart


def test_a_write_stopped_between_its_renames_is_completed_on_load(
    tmp_path, monkeypatch
):
    import medseg.bundle as bundles
    from medseg.models import build_unet
    from tests.conftest import bundle_record

    model = build_unet(spatial_dims=2, in_channels=1, num_classes=2, filters=(4, 8))
    model.set_weights([w * 0 + 1 for w in model.get_weights()])
    bundles.write_bundle(tmp_path, model, bundle_record(generation=1))
    model.set_weights([w * 0 + 2 for w in model.get_weights()])
    real_replace = os.replace

    def killed_before_metadata(src, dst):
        if str(dst).endswith(bundles.METADATA_FILE) and "next" in str(src):
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(bundles.os, "replace", killed_before_metadata)
    with pytest.raises(KeyboardInterrupt):
        bundles.write_bundle(tmp_path, model, bundle_record(generation=2))
    monkeypatch.setattr(bundles.os, "replace", real_replace)
    old = json.loads((tmp_path / "medseg.json").read_text())
    assert old["generation"] == 1  # the new model is in place, its metadata is not
    assert _check_bundle(tmp_path) == 2
    assert not (tmp_path / bundles.PENDING_FILE).exists()  # the swap was completed
    assert json.loads((tmp_path / "medseg.json").read_text())["generation"] == 2


@pytest.mark.slow
def test_training_on_a_broken_dataset_names_every_defect_and_writes_no_model(
    tmp_path,
):
    from tests.conftest import save_nifti
    from tests.test_cli import make_broken_sample

    root = make_broken_sample(tmp_path / "broken")
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["training"][0]["image"] = "./imagesTr/hippocampus_003.nii.gz"
    (root / "dataset.json").write_text(json.dumps(manifest))  # the case defects only
    label = root / "labelsTr" / "hippocampus_020.nii.gz"
    img = nib.load(label)
    fractional = np.asanyarray(img.dataobj).astype(np.float32)
    fractional[5, 5, 5] = 0.5
    save_nifti(label, fractional, img.affine)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    result = medseg(
        "train",
        "--config",
        tmp_path / "tiny.yaml",
        "--data",
        root,
        "--output",
        tmp_path / "run",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert errors == [
        f"Error: {root / 'imagesTr' / 'hippocampus_008.nii.gz'}: case hippocampus_008: "
        "file not found (7 problem(s); run 'medseg data check')"
    ]
    check = medseg("data", "check", root)  # which lists every one of them
    assert check.returncode == 2
    for case, problem in [
        ("hippocampus_008", "not found"),
        ("hippocampus_011", "checksum"),
        ("hippocampus_014", "7"),
        ("hippocampus_015", "shape"),
        ("hippocampus_017", "affine"),
        ("hippocampus_019", "NaN"),
        ("hippocampus_020", "non-integer values"),
    ]:
        output = check.stdout + check.stderr
        lines = [line for line in output.splitlines() if case in line]
        assert lines and problem in " ".join(lines), (case, output[-3000:])
    assert not (tmp_path / "run" / "model.keras").exists()
