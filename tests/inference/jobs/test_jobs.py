"""Batch bookkeeping of medseg.batch: shards, and the record of the settings an
output folder's label maps were made with (a re-run must not keep another model's)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import InputFileError
from medseg.inference.jobs import claims, tables
from medseg.inference.jobs import inputs as job_inputs
from medseg.inference.jobs import outputs as job_outputs
from medseg.inference.jobs import run as jobs
from medseg.inference.jobs import settings as job_settings
from tests import reference

SETTINGS = {
    "model_sha256": "a" * 64,
    "preprocessing": {"target_spacing_mm": [1.0, 1.0, 1.0], "crop_nonzero": True},
    "label_values": [0, 1, 2],
    "patch_size": [40, 56, 40],
    "tta": [0, 2],
    "overlap": 0.5,
    "keep_largest": False,
    "min_size_mm3": 0.0,
    "precision": "float32",
    "model": "/somewhere/hippocampus",
}


@pytest.mark.parametrize("files", [0, 1, 7, 12])
@pytest.mark.parametrize("shards", [1, 3, 8])
def test_shards_are_disjoint_and_cover_every_file_in_order(files, shards):
    names = [f"case_{i:02d}" for i in range(files)]
    taken = [job_inputs.take_shard(names, (k, shards)) for k in range(1, shards + 1)]
    assert sorted(sum(taken, [])) == names
    for k, part in enumerate(taken):  # every shards-th name from the k-th
        assert part == [n for i, n in enumerate(names) if i % shards == k]
    assert job_inputs.take_shard(names, None) == names


def test_shard_text_is_k_of_n():
    assert job_inputs.parse_shard("2/8") == (2, 8)
    for bad in ("0/3", "4/3", "2", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match=repr(bad)):
            job_inputs.parse_shard(bad)


def test_a_folder_records_its_settings_and_refuses_others(tmp_path):
    record = tmp_path / job_settings.SETTINGS_FILE
    job_settings.check_settings(tmp_path, SETTINGS, skipping=0, overwrite=False)
    assert json.loads(record.read_text()) == SETTINGS
    # the same settings again, from another path to the bundle: outputs may be kept
    moved = {**SETTINGS, "model": "/elsewhere/hippocampus"}
    job_settings.check_settings(tmp_path, moved, skipping=3, overwrite=False)
    assert json.loads(record.read_text()) == moved
    other = {**moved, "model_sha256": "b" * 64, "keep_largest": True}
    with pytest.raises(InputFileError) as error:
        job_settings.check_settings(tmp_path, other, skipping=0, overwrite=False)
    assert str(error.value) == (
        f"{record}: the label maps here were made with other settings (model_sha256 "
        f'"{"a" * 64}", now "{"b" * 64}"; keep_largest false, now true); '
        "--overwrite redoes this run's scans, or choose another output folder"
    )
    assert json.loads(record.read_text()) == moved  # unchanged
    # the same network with other preprocessing (an edited medseg.json) is refused too
    spacing = {**moved, "preprocessing": {"target_spacing_mm": [1.5, 1.5, 1.5]}}
    with pytest.raises(InputFileError, match=r"\(preprocessing \{.*, now \{"):
        job_settings.check_settings(tmp_path, spacing, skipping=0, overwrite=False)
    job_settings.check_settings(tmp_path, other, skipping=3, overwrite=True)
    assert json.loads(record.read_text()) == other


def test_outputs_without_a_record_are_not_kept_unchecked(tmp_path):
    job_settings.check_settings(
        tmp_path, SETTINGS, skipping=0, overwrite=False
    )  # no outputs
    (tmp_path / job_settings.SETTINGS_FILE).unlink()
    with pytest.raises(InputFileError, match="2 of this run's outputs exist, but no"):
        job_settings.check_settings(tmp_path, SETTINGS, skipping=2, overwrite=False)
    assert not (tmp_path / job_settings.SETTINGS_FILE).exists()
    (tmp_path / job_settings.SETTINGS_FILE).write_text(
        '{"model_sha256": "a'
    )  # cut short
    with pytest.raises(InputFileError, match="unreadable record"):
        job_settings.check_settings(tmp_path, SETTINGS, skipping=0, overwrite=False)
    job_settings.check_settings(tmp_path, SETTINGS, skipping=2, overwrite=True)
    assert json.loads((tmp_path / job_settings.SETTINGS_FILE).read_text()) == SETTINGS


def scans(folder, count):
    """``count`` small NIfTI scans in ``folder``; case i is i everywhere."""
    folder.mkdir()
    for i in range(count):
        image = np.full((4, 5, 6), i, np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"case_{i}.nii.gz")
    return sorted(folder.iterdir())


def test_segment_all_refuses_other_settings_before_touching_a_scan(tmp_path):
    files = scans(tmp_path / "in", 3)
    out = tmp_path / "out"
    calls = []

    def segment(volume):
        calls.append(volume.path)
        return volume.with_array((volume.array > 0).astype(np.uint8))

    def run(settings, overwrite=False, files=files):
        return jobs.segment_all(
            segment, files, out, settings=settings, overwrite=overwrite
        )

    assert [r.status for r in run(SETTINGS, files=files[:2])] == ["done"] * 2
    assert [r.status for r in run(SETTINGS)] == ["skipped", "skipped", "done"]
    assert len(calls) == 3
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = {**SETTINGS, "overlap": 0.25}
    with pytest.raises(InputFileError, match="overlap 0.5, now 0.25"):
        run(other)
    assert len(calls) == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert [r.status for r in run(other, overwrite=True)] == ["done"] * 3
    assert len(calls) == 6
    assert json.loads((out / job_settings.SETTINGS_FILE).read_text())["overlap"] == 0.25
    labels = nib.load(out / "case_2.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj), 1)


def test_jobs_starting_together_agree_on_one_record(tmp_path, monkeypatch):
    record = tmp_path / job_settings.SETTINGS_FILE
    assert job_settings._create_once(record, "first\n")
    assert not job_settings._create_once(record, "second\n")
    assert record.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == [
        job_settings.SETTINGS_FILE
    ]  # no temp
    record.unlink()
    other = {**SETTINGS, "precision": "bfloat16"}
    real = job_settings._create_once

    def another_job_first(path, text):  # its record lands between check and write
        assert real(path, json.dumps(other))
        return real(path, text)

    monkeypatch.setattr(job_settings, "_create_once", another_job_first)
    with pytest.raises(InputFileError, match='precision "bfloat16", now "float32"'):
        job_settings.check_settings(tmp_path, SETTINGS, skipping=0, overwrite=False)
    assert json.loads(record.read_text()) == other


def test_label_maps_an_overwrite_run_left_behind_stop_later_skipping(tmp_path):
    files = scans(tmp_path / "in", 4)
    out = tmp_path / "out"

    def run(settings, files, overwrite=False):
        results = jobs.segment_all(
            lambda v: v.with_array((v.array > 0).astype(np.uint8)),
            files,
            out,
            settings=settings,
            overwrite=overwrite,
        )
        return [r.status for r in results]

    def kept():
        return json.loads((out / job_settings.SETTINGS_FILE).read_text()).get(
            job_settings.KEPT
        )

    other = {**SETTINGS, "model_sha256": "b" * 64}
    assert run(SETTINGS, files[:2]) == ["done"] * 2
    # another model redoes case 2 only: cases 0 and 1 stay as the first model made them
    assert run(other, files[2:3], overwrite=True) == ["done"]
    assert kept() == 2
    for subset in (files[:3], files[2:3]):  # a skip could keep either model's labels
        with pytest.raises(InputFileError, match="2 label maps here were made with"):
            run(other, subset)
    assert run(other, files[3:]) == ["done"] and kept() == 2  # nothing skipped: fine
    # an overwrite run over every label map in the folder makes it one model's again
    assert run(other, files, overwrite=True) == ["done"] * 4
    assert kept() is None
    assert run(other, files) == ["skipped"] * 4
    # the same settings with overwrite leave nothing kept from other settings
    assert run(other, files[:1], overwrite=True) == ["done"] and kept() is None


def test_no_label_map_is_written_over_its_own_scan(tmp_path):
    import os

    files = scans(tmp_path / "in", 3)
    before = {p: p.read_bytes() for p in files}
    calls = []

    def segment(volume):
        calls.append(volume.path)
        return volume.with_array((volume.array > 0).astype(np.uint8))

    def run(output_dir, inputs=files, rename=None):
        return jobs.segment_all(
            segment, inputs, output_dir, settings=SETTINGS, overwrite=True,
            rename=rename,
        )  # fmt: skip

    # the input folder as the output folder, even with overwrite
    with pytest.raises(InputFileError, match=r"case_0.nii.gz: an input scan.*2 more"):
        run(tmp_path / "in")
    # a single scan named as its own output
    with pytest.raises(InputFileError, match="case_1.nii.gz: an input scan"):
        run(tmp_path / "in", [files[1]], {files[1]: files[1].name})
    # an output folder holding a hard link to a scan: the same file by another path
    linked = tmp_path / "linked"
    linked.mkdir()
    os.link(files[2], linked / files[2].name)
    with pytest.raises(InputFileError, match="case_2.nii.gz: an input scan"):
        run(linked)
    assert calls == [] and {p: p.read_bytes() for p in files} == before
    # the same scans into another folder, or renamed beside themselves, are done
    assert [r.status for r in run(tmp_path / "out")] == ["done"] * 3
    renamed = run(tmp_path / "in", [files[0]], {files[0]: "case_0_labels.nii.gz"})
    assert [r.status for r in renamed] == ["done"]
    assert {p: p.read_bytes() for p in files} == before


def test_an_unexpected_error_on_one_scan_fails_that_scan_only(tmp_path):
    files = scans(tmp_path / "in", 3)

    def segment(volume):
        if float(volume.array.max()) == 1:  # case_1: a bug met on one scan
            raise IndexError("index 7 is out of bounds for axis 0 with size 7")
        return volume.with_array((volume.array > 0).astype(np.uint8))

    results = jobs.segment_all(segment, files, tmp_path / "out")
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert results[1].error == (
        f"{files[1]}: unexpected error (IndexError: index 7 is out of bounds for "
        "axis 0 with size 7; --debug shows where)"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case_0.nii.gz",
        "case_2.nii.gz",
    ]

    def interrupted(volume):  # Ctrl-C still stops the job
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs.segment_all(interrupted, files, tmp_path / "again")


_DIES_ON = """
import json, os, signal, sys
from pathlib import Path
import numpy as np
from medseg.inference.jobs.run import segment_all

def segment(volume):  # killed as the kernel kills a process out of memory
    if float(volume.array.max()) == float(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return volume.with_array((volume.array >= 0).astype(np.uint8))

inputs = sorted(Path(sys.argv[1]).iterdir())
results = segment_all(segment, inputs, Path(sys.argv[2]))
rows = [[Path(r.input).name, r.status, r.error, r.warnings] for r in results]
print(json.dumps(rows))
"""


def test_a_scan_that_kills_every_run_costs_no_other_scan_and_is_named(tmp_path):
    import subprocess
    import sys

    files = scans(tmp_path / "in", 5)  # case_2 kills the process
    out = tmp_path / "out"

    def run(dies_on=2, inputs=tmp_path / "in", output=out):
        done = subprocess.run(
            [sys.executable, "-c", _DIES_ON, inputs, output, str(dies_on)],
            capture_output=True,
            text=True,
        )
        return done.returncode, json.loads(done.stdout) if done.returncode == 0 else []

    def written():
        return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))

    def marked():
        return sorted(p.name for p in out.glob(".*.in-hand"))

    assert run()[0] == -9  # killed on case_2, case_3 being read beside it
    assert written() == ["case_0.nii.gz", "case_1.nii.gz"]
    assert marked() == [".case_2.nii.gz.in-hand", ".case_3.nii.gz.in-hand"]
    # again: the scans it had in hand go last, one at a time: case_4 is done, and
    # the run dies on case_2 alone
    assert run()[0] == -9
    assert written() == ["case_0.nii.gz", "case_1.nii.gz", "case_4.nii.gz"]
    assert marked() == [".case_2.nii.gz.in-hand", ".case_3.nii.gz.in-hand"]
    # again: case_2, on which a run died alone, is named and not tried; case_3 done
    marker = out / ".case_2.nii.gz.in-hand"
    refused = (
        f"{files[2]}: a run died while segmenting it alone (killed for memory, or a "
        f"crash?); not tried again: delete {marker} to try it again"
    )
    aside = f"{files[3]}: a run died while it or the scan read beside it was in hand"
    code, results = run()
    assert code == 0
    assert results == [
        ["case_0.nii.gz", "skipped", None, []],
        ["case_1.nii.gz", "skipped", None, []],
        ["case_4.nii.gz", "skipped", None, []],
        ["case_2.nii.gz", "failed", refused, []],
        ["case_3.nii.gz", "done", None, [f"{aside}; segmented alone"]],
    ]
    assert written() == [f"case_{i}.nii.gz" for i in (0, 1, 3, 4)]
    assert marked() == [".case_2.nii.gz.in-hand"]
    code, results = run()  # and so on, till the marker goes
    assert code == 0 and [r[1] for r in results] == ["skipped"] * 4 + ["failed"]
    assert results[-1][2] == refused
    marker.unlink()  # tried again (here it no longer kills)
    code, results = run(dies_on=-1)
    assert code == 0 and results[-1][:2] == ["case_2.nii.gz", "done"]
    assert written() == [f"case_{i}.nii.gz" for i in range(5)] and marked() == []
    # a run of that scan alone (an array job's task, say) names it at once on the
    # next run: nothing else was in hand when it died
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "case_2.nii.gz").write_bytes(files[2].read_bytes())
    assert run(inputs=tmp_path / "alone", output=tmp_path / "out2")[0] == -9
    code, results = run(inputs=tmp_path / "alone", output=tmp_path / "out2")
    assert code == 0 and [r[1] for r in results] == ["failed"]
    assert results[0][2].startswith(
        f"{tmp_path / 'alone' / 'case_2.nii.gz'}: a run died while segmenting it alone"
    )


def test_a_detached_header_and_its_voxels_make_the_inputs_content_id(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    for name in ("one.mhd", "two.nhdr"):
        path = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), path)
        header, before = (
            path.read_bytes(),
            job_inputs.source_id(job_inputs.input_files(path)),
        )
        assert len(job_inputs.input_files(path)) == 2  # the header and the voxels' file
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.int16)), path)
        assert path.read_bytes() == header  # other voxels under the same header
        assert job_inputs.source_id(job_inputs.input_files(path)) != before


def test_the_report_keeps_what_reading_and_segmenting_a_scan_noted(tmp_path):
    from medseg.inference import Prediction

    files = scans(tmp_path / "in", 2)
    img = nib.Nifti1Image(nib.load(files[1]).get_fdata(), None)
    img.header["pixdim"][1] = 0.0  # no voxel size along x, and no sform/qform to say it
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    nib.save(img, files[1])

    def segment(volume):
        labels = volume.with_array((volume.array > 0).astype(np.uint8))
        return Prediction(labels, notes=(f"{volume.path}: a note",))

    results = jobs.segment_all(segment, files, tmp_path / "out")
    assert [r.status for r in results] == ["done", "done"]
    assert results[0].warnings == [f"{files[0]}: a note"]
    assert len(results[1].warnings) == 3
    assert results[1].warnings[0].startswith(f"{files[1]}: header fixed on reading:")
    assert results[1].warnings[1].startswith(f"{files[1]}: stores no orientation")
    assert results[1].warnings[2] == f"{files[1]}: a note"
    assert results[1].spacing_mm == [1.0, 1.0, 1.0]
    cases = tables.report(results)["cases"]
    assert [c["warnings"] for c in cases] == [results[0].warnings, results[1].warnings]


def test_a_rerun_reports_what_the_run_that_made_a_label_map_noted(tmp_path):
    from medseg.inference import Prediction

    files = scans(tmp_path / "in", 3)
    out = tmp_path / "out"

    def segment(volume):
        labels = volume.with_array((volume.array > 0).astype(np.uint8))
        return Prediction(labels, nonfinite_replaced=2, notes=(f"{volume.path}: seen",))

    def write(results, name):
        path = out / name
        path.write_text(json.dumps(tables.report(results)))
        return path

    first = jobs.segment_all(segment, files[:1], out)  # stopped after one scan
    reports = [write(first, "medseg_predict_report.json")]
    (out / "medseg_predict_report-2-of-2.json").write_text("{not json")
    reports.append(out / "medseg_predict_report-2-of-2.json")
    second = jobs.segment_all(segment, files[:2], out)
    assert tables.carry_earlier_records(second, reports) == 1
    assert [(r.status, r.earlier_run) for r in second] == [
        ("skipped", True),
        ("done", False),
    ]
    for field in ("seconds", "input_shape", "spacing_mm", "warnings"):
        assert getattr(second[0], field) == getattr(first[0], field), field
    assert second[0].nonfinite_replaced == 2
    assert second[0].warnings == [f"{files[0]}: seen"]
    # the next run, from another folder and with one more scan: both records carried
    moved = tmp_path / "moved"
    (tmp_path / "in").rename(moved)
    third = jobs.segment_all(segment, sorted(moved.glob("*.nii.gz")), out)
    reports.append(write(second, "medseg_predict_report.json"))
    assert tables.carry_earlier_records(third, reports) == 2
    assert [(r.status, r.earlier_run) for r in third] == [
        ("skipped", True),
        ("skipped", True),
        ("done", False),
    ]
    assert third[0].warnings == [f"{files[0]}: seen"]
    assert third[1].warnings == [f"{files[1]}: seen"]
    assert third[2].warnings == [f"{moved / files[2].name}: seen"]
    # skipped with no label map there (left to another run that has it in hand): its
    # record is not the old one's
    (out / files[0].name).unlink()
    left = tables.CaseResult(str(files[0]), str(out / files[0].name), "skipped")
    assert tables.carry_earlier_records([left], reports) == 0
    assert not left.earlier_run and left.warnings == []


def test_outputs_drop_nnunet_channel_suffix_only_when_every_input_has_it(tmp_path):
    files = [tmp_path / "a_0000.nii.gz", tmp_path / "b_0000.png"]
    assert job_inputs.case_names(files) == {files[0]: "a.nii.gz", files[1]: "b.png"}
    mixed = [*files, tmp_path / "scan.nii.gz"]
    assert job_inputs.case_names(mixed) == {}
    assert job_inputs.case_names([*files, tmp_path / "c_0001.nii.gz"]) == {}
    assert job_inputs.case_names([]) == {}
    # each case's first file when a case is one file per channel: any channel
    firsts = [tmp_path / "a_0000.nii.gz", tmp_path / "b_0001.nii.gz"]
    assert job_inputs.case_names(firsts, grouped=True) == {
        firsts[0]: "a.nii.gz",
        firsts[1]: "b.nii.gz",
    }
    out = tmp_path / "out"
    assert job_outputs.output_for(files[0], out, job_inputs.case_names(files)) == (
        out / "a.nii.gz"
    )


def test_channel_files_are_grouped_into_cases_and_one_name_one_output(tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name in ("b_0001", "a_0000", "a_0001", "b_0000", "c_0001"):
        nib.save(
            nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)),
            folder / f"{name}.nii.gz",
        )
    files = job_inputs.collect_inputs(folder)
    groups = job_inputs.channel_groups(files, 2)
    f = {p.name[: -len(".nii.gz")]: p for p in files}
    assert groups == {
        f["a_0000"]: (f["a_0000"], f["a_0001"]),
        f["b_0000"]: (f["b_0000"], f["b_0001"]),
        f["c_0001"]: (f["c_0001"],),  # incomplete: refused when read, by name
    }
    assert (
        job_inputs.channel_groups(files, 1) == {}
    )  # a one-channel model: file by file
    other = folder / "notes.nii.gz"
    other.write_bytes(f["a_0000"].read_bytes())
    assert job_inputs.channel_groups(job_inputs.collect_inputs(folder), 2) == {}
    other.unlink()
    # a multi-channel file per case, named like a channel file: not grouped
    four_d = tmp_path / "four_d"
    four_d.mkdir()
    for name in ("p_0001", "p_0002"):
        nib.save(
            nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)),
            four_d / f"{name}.nii.gz",
        )
    assert job_inputs.channel_groups(job_inputs.collect_inputs(four_d), 2) == {}
    # one channel's file given alone names its whole case
    assert job_inputs.with_sibling_channels([f["b_0001"]], 2) == [
        f["b_0000"],
        f["b_0001"],
    ]
    assert job_inputs.with_sibling_channels([f["b_0001"]], 1) == [f["b_0001"]]
    assert job_inputs.with_sibling_channels([f["a_0000"], f["b_0000"]], 2) == [
        f["a_0000"],
        f["b_0000"],
    ]
    # reading: a grouped case from all its files, any other file by itself
    read = job_inputs.channel_reader(groups, 2)
    assert read(f["a_0000"]).array.shape == (3, 3, 3, 2)
    with pytest.raises(InputFileError, match="channel files _0001, but the model"):
        read(f["c_0001"])
    assert read(four_d / "p_0001.nii.gz").array.shape == (3, 3, 3, 2)
    # scans of one name in two folders would have one output: refused by name
    twins = [folder / "a_0000.nii.gz", four_d / "a_0000.nii.gz"]
    with pytest.raises(InputFileError) as clash:
        job_outputs.check_unique_outputs(twins, tmp_path / "out")
    assert str(clash.value) == (
        f"{tmp_path / 'out' / 'a_0000.nii.gz'}: the label map of both {twins[0]} and "
        f"{twins[1]}; segment scans of one name into separate output folders"
    )
    with pytest.raises(InputFileError, match="the label map of both"):
        job_settings.check_folder(twins, tmp_path / "out", SETTINGS)


def test_an_existing_output_on_another_grid_is_not_skipped_as_done(tmp_path):
    files = scans(tmp_path / "in", 3)

    def segment(volume):
        return volume.with_array((volume.array > 0).astype(np.uint8))

    out = tmp_path / "out"
    assert [r.status for r in jobs.segment_all(segment, files, out)] == ["done"] * 3
    # another job's scans of the same names: one of another shape, one moved in space
    nib.save(nib.Nifti1Image(np.ones((4, 5, 7), np.float32), np.eye(4)), files[1])
    moved = np.eye(4)
    moved[:3, 3] = [10.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), moved), files[2])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    results = jobs.segment_all(segment, files, out)
    assert [r.status for r in results] == ["skipped", "failed", "failed"]
    assert results[1].error == (
        f"{out / 'case_1.nii.gz'}: an existing label map on another grid than "
        f"{files[1]} (shape (4, 5, 6) differs from the scan's (4, 5, 7)): another "
        "scan's; "
        "--overwrite redoes it, or choose another output folder"
    )
    assert "(affine differs from the scan's (not on the same grid))" in results[2].error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # an unreadable output is not taken as done either
    (out / "case_0.nii.gz").write_bytes(b"not a scan")
    results = jobs.segment_all(segment, files[:1], out)
    assert results[0].status == "failed"
    assert results[0].error.startswith(f"{out / 'case_0.nii.gz'}: not gzip-compressed")
    redone = jobs.segment_all(segment, files, out, overwrite=True)
    assert [r.status for r in redone] == ["done"] * 3
    assert nib.load(out / "case_1.nii.gz").shape == (4, 5, 7)


def test_a_folder_of_subfolders_says_how_to_take_their_scans(tmp_path):
    study = tmp_path / "study"
    for subject in ("sub-01", "sub-02"):
        (study / subject / "anat").mkdir(parents=True)
        nib.save(
            nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)),
            study / subject / "anat" / f"{subject}_T1w.nii.gz",
        )
    with pytest.raises(InputFileError) as info:
        job_inputs.collect_inputs(study)
    assert str(info.value) == (
        f"{study}: no scan files found (its subfolders are not searched; a pattern "
        f"such as '{study}/**/*.nii.gz' takes the scans in every subfolder)"
    )
    assert job_inputs.collect_inputs(study / "**" / "*.nii.gz") == [
        study / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
        study / "sub-02" / "anat" / "sub-02_T1w.nii.gz",
    ]


def test_a_list_file_names_scans_relative_to_its_folder_each_once(tmp_path):
    files = scans(tmp_path / "in", 3)
    listing = tmp_path / "scans.txt"
    listing.write_text(
        "# the scans of this job\n"
        "in/case_2.nii.gz\n"
        "\n"
        f"  {files[0]}  \n"  # absolute, with spaces around
        "in/missing.nii.gz\n"
        "in/../in/case_2.nii.gz\n"  # the same scan again
    )
    assert job_inputs.collect_inputs(listing) == sorted(
        [tmp_path / "in/case_2.nii.gz", files[0], tmp_path / "in/missing.nii.gz"]
    )
    listing.write_text("# nothing\n")
    with pytest.raises(InputFileError, match="no scan files found"):
        job_inputs.collect_inputs(listing)
    listing.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(InputFileError, match="cannot read the list"):
        job_inputs.collect_inputs(listing)


def test_an_inputs_content_id_samples_large_files_and_ignores_names(tmp_path, rng):
    small = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    large = rng.integers(0, 256, (3 << 20) + 123, dtype=np.uint8).tobytes()
    files = []
    for name, data in (("a.nii", small), ("b.nii", large)):
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    for chosen in ([files[0]], [files[1]], files):
        contents = [p.read_bytes() for p in chosen]
        for ordered in (True, False):
            assert job_inputs.source_id(tuple(chosen), ordered) == (
                reference.sampled_content_id(contents, ordered)
            )
    whole = job_inputs.source_id((files[1],))
    assert job_inputs.source_id(tuple(files)) != job_inputs.source_id(
        tuple(files[::-1])
    )
    assert job_inputs.source_id(tuple(files), False) == job_inputs.source_id(
        tuple(files[::-1]), False
    )  # a DICOM series' files, whatever their names
    (tmp_path / "renamed.nii").write_bytes(large)
    assert job_inputs.source_id((tmp_path / "renamed.nii",)) == whole
    start = round(15 * (len(large) - 4096) / 31)  # of the 16th sampled block
    changed = bytearray(large)
    changed[start + 4096 + 10] ^= 1  # between two sampled blocks: not seen
    (tmp_path / "c.nii").write_bytes(bytes(changed))
    assert job_inputs.source_id((tmp_path / "c.nii",)) == whole
    changed[start + 7] ^= 1  # within one: seen
    (tmp_path / "c.nii").write_bytes(bytes(changed))
    assert job_inputs.source_id((tmp_path / "c.nii",)) != whole
    (tmp_path / "c.nii").write_bytes(large + b"\0")  # another size: seen
    assert job_inputs.source_id((tmp_path / "c.nii",)) != whole


def test_an_existing_output_of_another_scan_on_the_same_grid_is_not_skipped(
    tmp_path,
):
    from PIL import Image

    from medseg.io import Volume, read_source_id, write_volume

    files = scans(tmp_path / "in", 2)
    for i in range(2):  # pictures of one size, and a TIFF
        Image.fromarray(np.full((5, 7), 10 * i, np.uint8)).save(
            tmp_path / "in" / f"tile_{i}.png"
        )
    write_volume(
        Volume(np.full((5, 7, 1), 3, np.uint16), np.eye(4)), tmp_path / "in" / "t.tif"
    )
    files = sorted((tmp_path / "in").iterdir())
    names = [p.name for p in files]

    def segment(volume):
        return volume.with_array((volume.array > 0).astype(np.uint8))

    out = tmp_path / "out"
    assert [r.status for r in jobs.segment_all(segment, files, out)] == ["done"] * 5
    for path in files:  # each label map keeps its input's content id
        assert read_source_id(out / path.name) == job_inputs.source_id((path,))
    # another job's scans of the same names and grids, other content
    changed = {"case_1.nii.gz", "tile_0.png", "t.tif"}
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), 7, np.float32), np.eye(4)), files[1])
    Image.fromarray(np.full((5, 7), 99, np.uint8)).save(files[3])
    write_volume(Volume(np.full((5, 7, 1), 4, np.uint16), np.eye(4)), files[2])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    results = {Path(r.input).name: r for r in jobs.segment_all(segment, files, out)}
    assert {n for n, r in results.items() if r.status == "failed"} == changed
    assert {n for n, r in results.items() if r.status == "skipped"} == set(names) - (
        changed
    )
    assert results["case_1.nii.gz"].error == (
        f"{out / 'case_1.nii.gz'}: an existing label map made from other content "
        f"than {files[1]} (on the same grid): another scan's; --overwrite redoes it, "
        "or choose another output folder"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a label map that keeps no content id (another tool's) is judged by its grid
    write_volume(Volume(np.zeros((4, 5, 6, 1), np.uint8), np.eye(4)), out / names[1])
    assert read_source_id(out / names[1]) is None
    assert jobs.segment_all(segment, files[1:2], out)[0].status == "skipped"
    redone = jobs.segment_all(segment, files, out, overwrite=True)
    assert [r.status for r in redone] == ["done"] * 5
    assert read_source_id(out / "case_1.nii.gz") == job_inputs.source_id((files[1],))
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / names[1]).dataobj), 1)


def test_a_label_map_keeps_one_content_id_and_its_scans_other_extensions(tmp_path):
    from medseg.io import read_source_id, read_volume, write_volume

    image = nib.Nifti1Image(np.ones((3, 4, 5), np.float32), np.eye(4))
    image.header["descrip"] = b"TE=3.1"
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"site 4"))
    nib.save(image, tmp_path / "scan.nii.gz")
    scan = read_volume(tmp_path / "scan.nii.gz")
    write_volume(scan, tmp_path / "a.nii.gz", is_label=True, source_id="1" * 32)
    again = read_volume(tmp_path / "a.nii.gz")  # segmented again, say
    write_volume(again, tmp_path / "b.nii.gz", is_label=True, source_id="2" * 32)
    written = nib.load(tmp_path / "b.nii.gz").header
    assert read_source_id(tmp_path / "b.nii.gz") == "2" * 32
    assert [e.get_content() for e in written.extensions] == [
        b"site 4",
        b"medseg-source " + b"2" * 32,
    ]
    assert written["descrip"].item() == b"TE=3.1"
    write_volume(again, tmp_path / "c.nii.gz", is_label=True)  # none given: none kept
    assert read_source_id(tmp_path / "c.nii.gz") is None


def test_label_sizes_count_each_declared_labels_voxels_in_ml_or_mm2(rng):
    labels = rng.choice(np.array([0, 3, 7], np.uint8), size=(4, 5, 6))
    spacing = (0.5, 0.8, 1.2)
    names = ("background", "a", "b", "c")
    sizes = tables.label_sizes(labels, spacing, (0, 3, 7, 9), names)
    counted = {0: 0, 3: 0, 7: 0, 9: 0}
    for index in np.ndindex(labels.shape):  # voxel by voxel
        if int(labels[index]) in counted:
            counted[int(labels[index])] += 1
    assert sizes == {
        name: {"label": v, "voxels": counted[v], "volume_ml": pytest.approx(
            counted[v] * 0.5 * 0.8 * 1.2 / 1000)}
        for v, name in ((3, "a"), (7, "b"), (9, "c"))
    }  # fmt: skip
    # with the scan: each channel's mean and standard deviation in each label, NaN
    # voxels left out, none for an empty label
    image = rng.normal(50, 20, size=(*labels.shape, 2))
    image[0, 0, 0, 1] = np.nan
    measured = tables.label_sizes(labels, spacing, (0, 3, 7, 9), names, image)
    for value, name in ((3, "a"), (7, "b")):
        for channel in (0, 1):
            inside = [  # voxel by voxel
                image[index][channel]
                for index in np.ndindex(labels.shape)
                if labels[index] == value and not np.isnan(image[index][channel])
            ]
            mean = sum(inside) / len(inside)
            sd = (sum((x - mean) ** 2 for x in inside) / len(inside)) ** 0.5
            assert measured[name]["intensity_mean"][channel] == pytest.approx(
                mean, abs=1e-4
            )
            assert measured[name]["intensity_sd"][channel] == pytest.approx(
                sd, abs=1e-4
            )
    assert (
        measured["c"]["intensity_mean"]
        == measured["c"]["intensity_sd"]
        == [
            None,
            None,
        ]
    )
    # a first label not named background (the membranes' 0) is measured too
    flat = tables.label_sizes(labels[..., 0], (0.25, 2.0), (0, 3), ("membrane", "a"))
    assert flat == {
        name: {
            "label": value,
            "voxels": int((labels[..., 0] == value).sum()),
            "area_mm2": pytest.approx(0.5 * int((labels[..., 0] == value).sum())),
        }
        for value, name in ((0, "membrane"), (3, "a"))
    }


def test_the_volumes_table_keeps_skipped_cases_from_the_last_one(tmp_path):
    from medseg.io import Volume, write_volume

    values, names = (0, 1), ("background", "tumour")
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    for name, count in (("a", 5), ("b", 7), ("c", 9), ("d", 2), ("e", 3)):
        labels = np.zeros((4, 4, 4, 1), np.uint8)
        labels.flat[:count] = 1
        write_volume(Volume(labels, affine), tmp_path / f"{name}.nii.gz")

    def result(name, status, sizes=None):
        return tables.CaseResult(
            f"in/{name}.nii.gz", str(tmp_path / f"{name}.nii.gz"), status, sizes=sizes
        )

    done = {"tumour": {"label": 1, "voxels": 5, "volume_ml": 0.015}}
    previous = tmp_path / "medseg_volumes.csv"
    previous.write_text(
        "case,label,name,voxels,volume_ml\nb,1,tumour,70,0.21\nc,1,other,1,0.003\n"
        "e,1,tumour,3,0.009\nd,1,tumour,2,0.006\n"  # cases of earlier runs
        "g,1,tumour,4,0.012\n"  # its label map deleted since
    )
    results = [
        result("a", "done", done),
        result("b", "skipped"),  # from the earlier table (even where it is stale)
        result("c", "skipped"),  # the earlier table's labels differ: measured again
        result("d", "failed"),
    ]
    table = tables.sizes_table(results, previous, values, names)
    assert table == (
        "case,label,name,voxels,volume_ml\n"
        "a,1,tumour,5,0.015\n"
        "b,1,tumour,70,0.21\n"
        "c,1,tumour,9,0.027\n"
        "d,1,tumour,2,0.006\n"  # failed now: its earlier label map's row stays
        "e,1,tumour,3,0.009\n"
    )
    assert results[2].sizes == {"tumour": {"label": 1, "voxels": 9, "volume_ml": 0.027}}
    previous.write_text("not, a table\n")
    results[1].sizes = None
    assert "b,1,tumour,7,0.021\n" in tables.sizes_table(
        results, previous, values, names
    )
    assert tables.sizes_table([result("d", "failed")], None, values, names) is None
    previous.write_text("case,label,name,voxels,area_mm2\nf,1,tumour,2,2.0\n")
    table = tables.sizes_table(results, previous, values, names)  # a 2D model's row
    assert "area_mm2" not in table and "\nf," not in table


def test_skipped_cases_take_their_rows_from_the_newest_table_that_has_them(tmp_path):
    import os

    from medseg.io import Volume, write_volume

    values, names = (0, 1), ("background", "tumour")
    for name in "abz":
        labels = np.zeros((4, 4, 4, 1), np.uint8)
        labels.flat[:3] = 1
        write_volume(Volume(labels, np.eye(4)), tmp_path / f"{name}.nii.gz")
    header = "case,label,name,voxels,volume_ml\n"
    shards = [tmp_path / f"medseg_volumes-{k}-of-2.csv" for k in (1, 2)]
    shards[0].write_text(header + "a,1,tumour,11,0.011\nb,1,tumour,21,0.021\n")
    shards[1].write_text(header + "b,1,tumour,22,0.022\nz,1,tumour,5,0.005\n")
    os.utime(shards[0], (1000, 1000))
    os.utime(shards[1], (2000, 2000))  # the newer: its row of b counts
    results = [
        tables.CaseResult(f"in/{n}.nii.gz", str(tmp_path / f"{n}.nii.gz"), "skipped")
        for n in "ab"
    ]
    whole = tmp_path / "medseg_volumes.csv"
    table = tables.sizes_table(results, whole, values, names, others=shards)
    # (z is no case of this run: a shard's other rows are not carried)
    assert table == header + "a,1,tumour,11,0.011\nb,1,tumour,22,0.022\n"
    os.utime(shards[0], (3000, 3000))
    results[1].sizes = None
    table = tables.sizes_table(results, whole, values, names, others=shards)
    assert "b,1,tumour,21,0.021\n" in table
    # without them, each skipped case is measured from its label map
    results = [
        tables.CaseResult(f"in/{n}.nii.gz", str(tmp_path / f"{n}.nii.gz"), "skipped")
        for n in "ab"
    ]
    table = tables.sizes_table(results, whole, values, names)
    assert table == header + "a,1,tumour,3,0.003\nb,1,tumour,3,0.003\n"


def test_two_runs_ending_together_write_the_volumes_table_in_turn(tmp_path):
    # two runs into one folder: the one that writes last must not write over the
    # other's rows with the table it read before the other wrote it
    import subprocess
    import sys

    from medseg.io import Volume, write_volume
    from tests.conftest import REPO

    values, names = (0, 1), ("background", "tumour")
    for name, count in (("a", 5), ("b", 7)):
        labels = np.zeros((4, 4, 4, 1), np.uint8)
        labels.flat[:count] = 1
        write_volume(Volume(labels, np.eye(4)), tmp_path / f"{name}.nii.gz")
    table = tmp_path / "medseg_volumes.csv"

    def result(name, count):
        sizes = {"tumour": {"label": 1, "voxels": count, "volume_ml": count / 1000}}
        return tables.CaseResult(
            f"in/{name}.nii.gz", str(tmp_path / f"{name}.nii.gz"), "done", sizes=sizes
        )

    script = (  # the other run: slow between reading the table and writing it
        "import time\n"
        "from pathlib import Path\n"
        "from medseg.inference.jobs import tables as batch\n"
        "measure = batch.sizes_table\n"
        "def slowly(*args):\n"
        "    text = measure(*args)\n"
        "    print('measured', flush=True)\n"
        "    time.sleep(1.5)\n"
        "    return text\n"
        "batch.sizes_table = slowly\n"
        f"result = batch.CaseResult('in/b.nii.gz', {str(tmp_path / 'b.nii.gz')!r}, "
        "'done', sizes={'tumour': {'label': 1, 'voxels': 7, 'volume_ml': 0.007}})\n"
        f"batch.write_sizes([result], Path({str(table)!r}), {values}, {names})\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert other.stdout.readline().strip() == "measured"
    assert tables.write_sizes([result("a", 5)], table, values, names) == table
    assert other.wait(timeout=60) == 0
    other.stdout.close()
    assert table.read_text() == (
        "case,label,name,voxels,volume_ml\na,1,tumour,5,0.005\nb,1,tumour,7,0.007\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.nii.gz", "b.nii.gz", "medseg_volumes.csv"  # no lock file left
    ]  # fmt: skip


def test_a_stop_while_a_label_map_is_written_comes_after_it_is_recorded(
    tmp_path, monkeypatch
):
    import os
    import signal

    files = scans(tmp_path / "in", 3)
    out = tmp_path / "out"
    written = job_outputs.write_volume

    def write_then_stop(*args, **kwargs):  # Ctrl-C just as the file is complete
        path = written(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(job_outputs, "write_volume", write_then_stop)
    seen = []

    def segment(volume):
        return volume.with_array((volume.array > 0).astype(np.uint8))

    # Python's own Ctrl-C handler, whatever an earlier test in this process left
    earlier = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            jobs.segment_all(segment, files, out, progress=seen.append)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, earlier)
    assert [Path(r.output).name for r in seen] == ["case_0.nii.gz"]
    assert [p.name for p in out.iterdir()] == ["case_0.nii.gz"]  # nothing partial


def test_the_volumes_table_keeps_intensities_and_measures_them_when_missing(tmp_path):
    from medseg.io import Volume, write_volume

    values, names = (0, 1), ("background", "tumour")
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    scans = {}
    for name, count in (("a", 5), ("b", 7), ("c", 9)):
        labels = np.zeros((4, 4, 4, 1), np.uint8)
        labels.flat[:count] = 1
        write_volume(Volume(labels, affine), tmp_path / f"{name}.nii.gz")
        scans[name] = np.arange(64, dtype=np.float32).reshape(4, 4, 4, 1) * count

    def result(name, status, sizes=None):
        return tables.CaseResult(
            f"in/{name}.nii.gz", str(tmp_path / f"{name}.nii.gz"), status, sizes=sizes
        )

    previous = tmp_path / "medseg_volumes.csv"
    previous.write_text(
        "case,label,name,voxels,volume_ml,intensity_mean,intensity_sd\n"
        "b,1,tumour,7,0.021,-3.5,2.25\n"
    )
    done = tables.label_sizes(
        np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj), (2.0, 1.0, 1.5), values,
        names, scans["a"],
    )  # fmt: skip
    results = [
        result("a", "done", done),
        result("b", "skipped"),  # its intensities from the earlier table
        result("c", "skipped"),  # none there: measured from its label map and scan
    ]
    table = tables.sizes_table(
        results,
        previous,
        values,
        names,
        lambda path: Volume(scans[path.stem[:1]], affine),
    )
    c = scans["c"].ravel()[:9]  # the first 9 voxels in C order are labelled
    assert table == (
        "case,label,name,voxels,volume_ml,intensity_mean,intensity_sd\n"
        f"a,1,tumour,5,0.015,10.0,{round(float(np.std(scans['a'].ravel()[:5])), 4)}\n"
        "b,1,tumour,7,0.021,-3.5,2.25\n"
        f"c,1,tumour,9,0.027,{float(c.mean())},{round(float(c.std()), 4)}\n"
    )
    # several channels: a column of each per channel, read back as the lists
    results = [result("a", "done", {"tumour": {**done["tumour"]}})]
    results[0].sizes["tumour"]["intensity_mean"] = [1.5, None]
    results[0].sizes["tumour"]["intensity_sd"] = [0.5, None]
    previous.write_text(tables.sizes_table(results, None, values, names))
    assert previous.read_text().splitlines() == [
        "case,label,name,voxels,volume_ml,intensity_mean_0,intensity_mean_1,"
        "intensity_sd_0,intensity_sd_1",
        "a,1,tumour,5,0.015,1.5,,0.5,",
    ]
    assert tables._read_sizes(previous)["a"]["tumour"]["intensity_mean"] == [1.5, None]


def _other_run(files, out, then: str):
    """Another run into ``out`` in its own process: it segments ``files`` (marking
    each in hand), says so, and then runs ``then`` in place of returning labels."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "import os, signal, time\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from medseg.inference.jobs import run as batch\n"
        "def segment(volume):\n"
        "    print('segmenting', flush=True)\n"
        f"    {then}\n"
        "    return volume.with_array((volume.array > 0).astype(np.uint8))\n"
        f"files = [Path(f) for f in {[str(f) for f in files]!r}]\n"
        f"batch.segment_all(segment, files, Path({str(out)!r}))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "segmenting"
    return process


def test_a_scan_another_living_run_has_in_hand_is_waited_for_or_left_to_it(tmp_path):
    # two runs into one folder at once over some of the same scans (a job submitted
    # again while the first still runs): the second leaves the first's scan in hand
    # to it, files and all, and waits for it at its end
    import os
    import signal
    import socket

    files = scans(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    busy = out / files[1].name
    partial = out / f".{files[1].name}.0123abcd.partial.nii.gz"
    calls = []

    def segment(volume):
        calls.append(volume.path)
        return volume.with_array((volume.array > 0).astype(np.uint8))

    # left to the other run (not waited for)
    other = _other_run([files[1]], out, "time.sleep(600)")
    try:
        partial.write_bytes(b"being written by the other run")
        results = jobs.segment_all(segment, files, out, wait_for_others=False)
        assert [(r.input, r.status) for r in results] == [
            (str(files[1]), "skipped"),
            (str(files[0]), "done"),
            (str(files[2]), "done"),
        ]
        assert results[0].warnings == [
            f"{files[1]}: in hand by another living run (pid {other.pid} on "
            f"{socket.gethostname()}); left to it"
        ]
        assert partial.exists() and not busy.exists()  # the other run's, untouched
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
    partial.unlink()
    claims._in_hand_marker(busy).unlink()
    # waited for: the other run writes it, and this one counts it done
    calls.clear()
    other = _other_run([files[1]], out, "time.sleep(1.5)")
    results = jobs.segment_all(segment, files, out)
    assert other.wait() == 0 and busy.exists()
    assert calls == []
    assert [(r.input, r.status) for r in results] == [
        (str(files[0]), "skipped"),
        (str(files[2]), "skipped"),
        (str(files[1]), "skipped"),
    ]
    # waited for, and the other run killed on it (alone): named, as a dead run's
    busy.unlink()
    other = _other_run([files[1]], out, "time.sleep(1); os.kill(os.getpid(), 9)")
    (result,) = jobs.segment_all(segment, files, out)[2:]
    assert other.wait() == -signal.SIGKILL
    assert (result.input, result.status) == (str(files[1]), "failed")
    assert result.error.startswith(f"{files[1]}: a run died while segmenting it alone")
    assert calls == [] and not busy.exists()


@pytest.mark.parametrize("other", ["writes", "takes"])
def test_a_scan_another_run_writes_or_takes_meanwhile_is_not_segmented_twice(
    tmp_path, other
):
    files = scans(tmp_path / "in", 3)
    out = tmp_path / "out"
    calls, others = [], []

    def plain(volume):
        return volume.with_array((volume.array > 0).astype(np.uint8))

    def segment(volume):
        calls.append(volume.path)
        if volume.path == files[0]:  # meanwhile another run does the third
            if other == "writes":  # all of it, now
                (written,) = jobs.segment_all(plain, [files[2]], out)
                assert written.status == "done"
            else:  # takes it in hand, and writes it 1.5 s later: waited for
                others.append(_other_run([files[2]], out, "time.sleep(1.5)"))
        return plain(volume)

    results = jobs.segment_all(segment, files, out)
    assert [process.wait() for process in others] == [0] * len(others)
    assert calls == [files[0], files[1]]  # the third was the other run's
    assert [(r.input, r.status) for r in results] == [
        (str(files[0]), "done"),
        (str(files[1]), "done"),
        (str(files[2]), "skipped"),
    ]
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in files]


def test_a_label_map_is_also_written_as_a_slicer_segmentation_when_asked(tmp_path):
    pytest.importorskip("SimpleITK")
    from matplotlib.colors import to_rgb

    from medseg.evaluation.scoring import pair_files
    from medseg.figures import COLOURS
    from medseg.inference import Prediction
    from medseg.io import read_volume
    from medseg.io.itk import Segment, segments_against_labels, slicer_segments

    affine = np.diag([0.8, 1.1, 2.5, 1.0])
    affine[:3, 3] = [-7.0, 3.0, 11.0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    scan = np.zeros((9, 8, 7), np.float32)
    scan[1:4, 2:6, 1:3] = 1  # label 1 in this box
    scan[5:9, 0:2, 4:7] = 2  # label 2 in that one
    nib.save(nib.Nifti1Image(scan, affine), inputs / "case.nii.gz")
    nib.save(nib.Nifti1Image(scan, affine), inputs / "empty.nii.gz")

    def segment(volume):
        labels = volume.array.astype(np.uint8)
        if volume.path.name == "empty.nii.gz":
            labels[labels == 2] = 0  # no label 2 found here
        return Prediction(
            volume.with_array(labels),
            values=(0, 1, 2),
            names=("background", "anterior", "posterior"),
        )

    out = tmp_path / "out"
    beside = job_outputs.Beside(seg_nrrd=True)
    files = sorted(inputs.iterdir())
    jobs.segment_all(segment, files, out, beside=beside)
    seg = read_volume(out / "slicer" / "case.seg.nrrd")
    np.testing.assert_array_equal(seg.array[..., 0], scan)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-9)
    assert slicer_segments(seg.header) == [
        Segment("anterior", 1, 0),
        Segment("posterior", 2, 0),
    ]
    for number, value in enumerate((1, 2)):  # each segment's box, Slicer's extent
        voxels = np.argwhere(scan == value)
        low, high = voxels.min(0), voxels.max(0)
        assert seg.header[f"Segment{number}_Extent"] == " ".join(
            f"{a} {b}" for a, b in zip(low, high, strict=True)
        )
        assert seg.header[f"Segment{number}_ID"] == f"Segment_{value}"
        colour = [float(c) for c in seg.header[f"Segment{number}_Color"].split()]
        np.testing.assert_allclose(colour, to_rgb(COLOURS[number]), atol=1e-6)
    empty = read_volume(out / "slicer" / "empty.seg.nrrd")
    assert empty.header["Segment1_Extent"] == "0 -1 0 -1 0 -1"  # Slicer's empty one
    # it checks against the labels it was named from; the label maps still pair alone
    assert segments_against_labels(seg.header, {1: "Anterior", 2: "Posterior"}) == []
    assert [case for case, _, _ in pair_files(out, inputs)] == ["case", "empty"]
    # a case is done when its segmentation is there too
    (out / "slicer" / "case.seg.nrrd").unlink()
    results = jobs.segment_all(segment, files, out, beside=beside)
    assert [(Path(r.input).name, r.status) for r in results] == [
        ("empty.nii.gz", "skipped"),
        ("case.nii.gz", "done"),
    ]
    assert (out / "slicer" / "case.seg.nrrd").exists()
    # a label of value 0 that is not background (the membrane model's membrane) is no
    # segment: Slicer reads 0 as none

    def membrane(volume):
        cells = np.where(volume.array > 0, 255, 0).astype(np.uint8)
        return Prediction(
            volume.with_array(cells), values=(0, 255), names=("membrane", "cell")
        )

    jobs.segment_all(membrane, files[:1], tmp_path / "em", beside=beside)
    em = read_volume(tmp_path / "em" / "slicer" / "case.seg.nrrd")
    assert slicer_segments(em.header) == [Segment("cell", 255, 0)]
    assert em.header["Segment0_ID"] == "Segment_255"


def test_mask_names_are_the_labels_made_safe_for_file_names():
    assert job_outputs.mask_names(
        (0, 1, 2), ("background", "Anterior", "Posterior")
    ) == (
        (1, "Anterior"),
        (2, "Posterior"),
    )
    assert job_outputs.mask_names((0, 255), ("membrane", "cell")) == (
        (0, "membrane"),
        (255, "cell"),
    )
    assert job_outputs.mask_names(
        (0, 1, 2, 3, 4), ("Background", "left kidney", "left/kidney", "a*b", "..")
    ) == ((1, "1_left_kidney"), (2, "2_left_kidney"), (3, "a_b"), (4, "4_"))


def test_masks_of_each_label_are_written_with_the_label_map_and_count_for_done(
    tmp_path,
):
    from medseg.inference import Prediction

    affine = np.diag([0.8, 1.1, 2.5, 1.0])
    affine[:3, 3] = [-7.0, 3.0, 11.0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    scan = np.zeros((9, 8, 7), np.float32)
    scan[1:4, 2:6, 1:3] = 1
    scan[5:9, 0:2, 4:7] = 2
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(scan, affine), inputs / f"{name}.nii.gz")

    def segment(volume):
        return Prediction(
            volume.with_array(volume.array.astype(np.uint8)),
            values=(0, 1, 2),
            names=names,
        )

    out = tmp_path / "out"
    names = ("background", "left lobe", "right")
    beside = job_outputs.Beside(masks=job_outputs.mask_names((0, 1, 2), names))
    files = sorted(inputs.iterdir())
    jobs.segment_all(segment, files, out, beside=beside)
    for case in ("a", "b"):
        labels = nib.load(out / f"{case}.nii.gz")
        for value, name in ((1, "left_lobe"), (2, "right")):
            mask = nib.load(out / "masks" / case / f"{name}.nii.gz")
            np.testing.assert_array_equal(np.asarray(mask.dataobj), scan == value)
            np.testing.assert_allclose(mask.affine, labels.affine)
            assert mask.get_data_dtype() == np.uint8
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a", "b"]
    # a case is done when its masks are there too; a killed run's partial mask goes
    (out / "masks" / "b" / "right.nii.gz").unlink()
    stale = out / "masks" / "b" / ".right.nii.gz.1234.partial"
    stale.write_bytes(b"half")
    results = jobs.segment_all(segment, files, out, beside=beside)
    assert [(Path(r.input).name, r.status) for r in results] == [
        ("a.nii.gz", "skipped"),
        ("b.nii.gz", "done"),
    ]
    assert (out / "masks" / "b" / "right.nii.gz").exists() and not stale.exists()
