from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medseg.datasets.layouts import load_dataset, load_npz_dataset, read_label_names
from medseg.errors import InputFileError
from medseg_cli.main import main
from tests.conftest import (
    OBLIQUE_LPS,
    SAMPLE,
    save_nifti,
    save_slicer_segmentation,
    stored_in_another_order,
)


def test_shipped_sample_is_a_decathlon_dataset():
    dataset = load_dataset(SAMPLE)
    assert dataset.layout == "msd"
    assert len(dataset.cases) == 12
    assert dataset.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert dataset.channel_names == ("MRI",)
    first = dataset.cases[0]
    assert first.case_id == "hippocampus_003"
    assert first.images == (SAMPLE / "imagesTr" / "hippocampus_003.nii.gz",)
    assert first.label == SAMPLE / "labelsTr" / "hippocampus_003.nii.gz"
    assert load_dataset(SAMPLE / "dataset.json").cases == dataset.cases


def _trains_alike(reports, original, moved) -> None:
    """The two datasets' check reports fingerprint them alike, and case 1 of each is
    prepared for training with the same label."""
    from medseg.preprocessing import Preprocessor, ZScoreNormalization
    from medseg.training.data import prepare_case

    assert reports[1].fingerprint == reports[0].fingerprint  # label fractions too
    pre = Preprocessor((ZScoreNormalization(),), target_spacing_mm=(1.0, 1.0, 2.0))
    want, got = (
        prepare_case(d.cases[1], pre, [0, 1, 2], None) for d in (original, moved)
    )
    assert (want.label > 0).sum() > 20
    np.testing.assert_array_equal(got.label, want.label)


def test_a_label_map_stored_in_another_voxel_order_checks_and_trains_as_its_image(
    msd_dataset,
):
    import shutil

    from medseg.datasets.checks import check_dataset

    for path in sorted(msd_dataset.glob("*Tr/*.nii.gz")):  # oblique, not RAS
        save_nifti(path, np.asanyarray(nib.load(path).dataobj), OBLIQUE_LPS)
    reordered = msd_dataset.parent / "reordered"
    shutil.copytree(msd_dataset, reordered)
    label = msd_dataset / "labelsTr" / "case_1.nii.gz"
    stored, affine = stored_in_another_order(
        np.asanyarray(nib.load(label).dataobj), OBLIQUE_LPS, (1, 2, 0), [0, 2]
    )
    save_nifti(reordered / "labelsTr" / "case_1.nii.gz", stored, affine)
    original, moved = (load_dataset(root) for root in (msd_dataset, reordered))
    reports = [check_dataset(d) for d in (original, moved)]
    assert reports[1].problems == [] and reports[0].notes == []
    assert [str(n) for n in reports[1].notes] == [
        f"case_1: {reordered / 'labelsTr' / 'case_1.nii.gz'}: stored in ASR voxel "
        "order, its image's in LPS: read in its image's"  # P, S, L: A, S, R flipped
    ]
    _trains_alike(reports, original, moved)
    # another grid in another order is still refused
    affine[:3, 3] += 0.5 * affine[:3, 0]
    save_nifti(reordered / "labelsTr" / "case_1.nii.gz", stored, affine)
    (problem,) = check_dataset(load_dataset(reordered)).problems
    assert problem.case_id == "case_1"
    assert problem.problem == "label shape (9, 7, 8) differs from image shape (8, 9, 7)"


def test_a_label_map_saved_on_a_box_of_its_images_grid_checks_and_trains_as_it(
    msd_dataset,
):
    import shutil

    sitk = pytest.importorskip("SimpleITK")
    from medseg.datasets.checks import check_dataset
    from medseg.io import Volume, write_volume

    for path in sorted(msd_dataset.glob("*Tr/*.nii.gz")):  # oblique, not RAS
        save_nifti(path, np.asanyarray(nib.load(path).dataobj), OBLIQUE_LPS)
    boxed = msd_dataset.parent / "boxed"
    shutil.copytree(msd_dataset, boxed)
    # case 1's labels saved on the box around them, as 3D Slicer may save a .seg.nrrd
    full = np.asanyarray(nib.load(msd_dataset / "labelsTr" / "case_1.nii.gz").dataobj)
    start = np.array([1, 2, 1])
    box_affine = OBLIQUE_LPS.copy()
    box_affine[:3, 3] += OBLIQUE_LPS[:3, :3] @ start
    box = full[1:7, 2:7, 1:5, None]
    assert box.sum() == full.sum()
    seg = boxed / "labelsTr" / "case_1.seg.nrrd"
    write_volume(Volume(box, box_affine), seg, is_label=True)
    image = sitk.ReadImage(str(seg))  # and saying so, as Slicer's files do
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "1 2 1")
    sitk.WriteImage(image, str(seg), True)
    # the same box in a NIfTI, which does not say it is a crop, stays refused
    cropped = boxed.parent / "cropped"
    shutil.copytree(boxed, cropped)
    save_nifti(cropped / "labelsTr" / "case_1.nii.gz", box[..., 0], box_affine)
    (problem,) = check_dataset(load_dataset(cropped)).problems
    assert problem.problem == "label shape (6, 5, 4) differs from image shape (8, 9, 7)"
    (boxed / "labelsTr" / "case_1.nii.gz").unlink()
    manifest = json.loads((boxed / "dataset.json").read_text())
    manifest["training"][1]["label"] = "./labelsTr/case_1.seg.nrrd"
    (boxed / "dataset.json").write_text(json.dumps(manifest))
    original, moved = (load_dataset(root) for root in (msd_dataset, boxed))
    reports = [check_dataset(d) for d in (original, moved)]
    assert reports[1].problems == []
    assert [str(n) for n in reports[1].notes] == [
        f"case_1: {boxed / 'labelsTr' / 'case_1.seg.nrrd'}: saved on a box of its "
        "image's grid (6 x 5 x 4 voxels from voxel (1, 2, 1)): placed in it, "
        "background elsewhere"
    ]
    _trains_alike(reports, original, moved)
    # a box reaching past the image with labels there cannot be placed: refused
    past = np.zeros((4, 4, 4, 1), np.uint8)
    past[0, 0, 0] = 1  # at voxel (-1, -1, -1) of the image's grid
    outside = OBLIQUE_LPS.copy()
    outside[:3, 3] -= OBLIQUE_LPS[:3, :3] @ [1, 1, 1]
    write_volume(Volume(past, outside), seg, is_label=True)
    image = sitk.ReadImage(str(seg))
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    sitk.WriteImage(image, str(seg), True)
    (problem,) = check_dataset(load_dataset(boxed)).problems
    assert problem.problem == "label shape (4, 4, 4) differs from image shape (8, 9, 7)"


def test_a_folder_pair_takes_a_slicer_segmentation_as_its_cases_label(tmp_path):
    for folder, names in (
        ("images", ["a.nii.gz", "b.nii.gz"]),
        ("labels", ["a.seg.nrrd", "b.nii.gz", "b.seg.nrrd"]),
    ):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).touch()
    cases = load_dataset(tmp_path).cases
    assert [(c.case_id, c.label.name) for c in cases] == [
        ("a", "a.seg.nrrd"),
        ("b", "b.nii.gz"),  # the name that matches wins
    ]


def test_slicer_label_files_without_a_dataset_json_name_the_labels_by_most_files(
    msd_dataset,
):
    # a folder pair of scans and 3D Slicer segmentations, no dataset.json: the
    # segments name the labels, so a file Slicer numbered otherwise is refused
    pytest.importorskip("SimpleITK")
    from medseg.datasets.checks import check_dataset

    (msd_dataset / "dataset.json").unlink()
    labels = msd_dataset / "labelsTr"
    for i, segments in enumerate(
        [[("Anterior", 1, 0), ("Posterior", 2, 0)], [("posterior", 1, 0),
         ("anterior", 2, 0)], [("anterior", 1, 0), ("posterior", 2, 0)]]
    ):  # fmt: skip
        label = np.asanyarray(nib.load(labels / f"case_{i}.nii.gz").dataobj)
        (labels / f"case_{i}.nii.gz").unlink()
        if i == 1:  # the same voxels, posterior made first: the values swapped
            label = np.choose(label, [0, 2, 1]).astype(np.uint8)
        save_slicer_segmentation(labels / f"case_{i}.seg.nrrd", label, segments)
    dataset = load_dataset(msd_dataset)
    assert (dataset.layout, dataset.labels) == (
        "folder",
        {0: "background", 1: "Anterior", 2: "Posterior"},
    )
    result = CliRunner().invoke(main, ["data", "check", str(msd_dataset)])
    assert result.exit_code == 2, result.output
    assert "labels: 0=background, 1=Anterior, 2=Posterior\n" in result.output
    assert (
        "  NOTE labels named by the label files' 3D Slicer segments (each name at the "
        "value most files hold it at)\n" in result.output
    )
    seg = labels / "case_1.seg.nrrd"
    for line in (
        f"case_1: {seg}: segment 'posterior' holds label value 1, but the other label "
        "files give 'Posterior' the value 2",
        f"case_1: {seg}: segment 'anterior' holds label value 2, but the other label "
        "files give 'Anterior' the value 1",
    ):
        assert line in result.output
    assert [p.case_id for p in check_dataset(dataset).problems] == ["case_1", "case_1"]
    # numbered alike: no problem, and the names go with the labels
    save_slicer_segmentation(
        seg,
        np.asanyarray(nib.load(msd_dataset / "imagesTr" / "case_1.nii.gz").dataobj) * 0,
        [("anterior", 1, 0), ("posterior", 2, 0)],
    )
    assert check_dataset(load_dataset(msd_dataset)).problems == []


def test_msd_path_outside_the_folder_is_refused(msd_dataset):
    manifest = json.loads((msd_dataset / "dataset.json").read_text())
    manifest["training"][1]["image"] = "../../etc/passwd.nii.gz"
    manifest["training"][2]["label"] = "/abs/label.nii.gz"
    (msd_dataset / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(InputFileError, match="outside the dataset folder") as info:
        load_dataset(msd_dataset)
    assert "and 1 more problem" in str(info.value)
    dataset = load_dataset(msd_dataset, strict=False)
    problems = {(p.case_id, p.problem) for p in dataset.problems}
    assert problems == {
        ("passwd", "path points outside the dataset folder"),
        ("case_2", "path points outside the dataset folder"),
    }


def test_msd_missing_file_is_a_problem(msd_dataset):
    (msd_dataset / "labelsTr" / "case_0.nii.gz").unlink()
    with pytest.raises(InputFileError, match="case case_0: file not found"):
        load_dataset(msd_dataset)


def test_nnunet_v2_layout_with_two_channels(tmp_path):
    root = tmp_path / "Dataset001_Tiny"
    for case in ("liver_1", "liver_2"):
        for channel in range(2):
            save_nifti(
                root / "imagesTr" / f"{case}_{channel:04d}.nii.gz",
                np.ones((4, 4, 4), np.float32),
            )
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    (root / "imagesTr" / "._liver_1_0000.nii.gz").write_bytes(b"macos junk")
    manifest = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "liver": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    dataset = load_dataset(root)
    assert dataset.layout == "nnunet"
    assert dataset.channel_names == ("CT", "PET")
    assert dataset.labels == {0: "background", 1: "liver"}
    assert [c.case_id for c in dataset.cases] == ["liver_1", "liver_2"]
    assert [p.name for p in dataset.cases[1].images] == [
        "liver_2_0000.nii.gz",
        "liver_2_0001.nii.gz",
    ]
    (root / "imagesTr" / "liver_2_0001.nii.gz").unlink()
    with pytest.raises(
        InputFileError, match="liver_2_0001.nii.gz: case liver_2: file not"
    ):
        load_dataset(root)


def test_a_channel_stored_in_another_voxel_order_checks_and_trains_as_the_first(
    tmp_path, rng
):
    import shutil

    from medseg.datasets.checks import check_dataset
    from medseg.preprocessing import Preprocessor, ZScoreNormalization
    from medseg.training.data import prepare_case

    root = tmp_path / "Dataset002_Two"
    for case in ("liver_1", "liver_2"):
        for channel in range(2):
            save_nifti(
                root / "imagesTr" / f"{case}_{channel:04d}.nii.gz",
                rng.normal(size=(6, 5, 4)).astype(np.float32),
                OBLIQUE_LPS,
            )
        label = np.zeros((6, 5, 4), np.uint8)
        label[1:4, 2:4, 1:3] = 1
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", label, OBLIQUE_LPS)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "FLAIR"},
                "labels": {"background": 0, "lesion": 1},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    reordered = tmp_path / "reordered"
    shutil.copytree(root, reordered)
    flair = nib.load(root / "imagesTr" / "liver_1_0001.nii.gz")
    stored, affine = stored_in_another_order(
        np.asanyarray(flair.dataobj), OBLIQUE_LPS, (2, 1, 0), [1]
    )
    save_nifti(reordered / "imagesTr" / "liver_1_0001.nii.gz", stored, affine)
    original, moved = (load_dataset(r) for r in (root, reordered))
    reports = [check_dataset(d) for d in (original, moved)]
    assert reports[1].problems == []
    fingerprints = [{**r.fingerprint, "name": None} for r in reports]
    assert fingerprints[1] == fingerprints[0]  # FLAIR's intensities too
    checked = CliRunner().invoke(main, ["data", "check", str(reordered)])
    assert checked.exit_code == 0, checked.output
    assert (
        f"  NOTE liver_1: {reordered / 'imagesTr' / 'liver_1_0001.nii.gz'}: stored in "
        "SAL voxel order, the first's in LPS: read in the first's\n"  # S, P flipped, L
    ) in checked.output
    assert f"OK: no problems found in {reordered}" in checked.output
    pre = Preprocessor((ZScoreNormalization(),) * 2, target_spacing_mm=None)
    want, got = (prepare_case(d.cases[0], pre, [0, 1], None) for d in (original, moved))
    # the same voxels; the z-score's float32 sums run in each array's memory order
    np.testing.assert_allclose(got.image, want.image, rtol=0, atol=1e-6)
    assert np.ptp(want.image[..., 1]) > 1
    # another grid in another order is named
    affine[:3, 3] += 0.5 * affine[:3, 1]
    save_nifti(reordered / "imagesTr" / "liver_1_0001.nii.gz", stored, affine)
    (problem,) = check_dataset(load_dataset(reordered)).problems
    assert problem.path == reordered / "imagesTr" / "liver_1_0001.nii.gz"
    assert (
        problem.problem
        == "shape (4, 5, 6) differs from liver_1_0000.nii.gz's (6, 5, 4)"
    )


def test_data_check_names_every_channel_file_off_the_first_ones_grid(tmp_path, rng):
    from medseg.datasets.checks import check_dataset

    root = tmp_path / "Dataset003_Three"
    shifted = np.eye(4)
    shifted[:3, 3] = [0.0, 0.5, 0.0]
    for channel, (shape, affine) in enumerate(
        [((6, 5, 4), None), ((6, 5, 3), None), ((6, 5, 4), shifted)]
    ):
        image = rng.normal(size=shape).astype(np.float32)
        save_nifti(root / "imagesTr" / f"a_{channel:04d}.nii.gz", image, affine)
    save_nifti(root / "labelsTr" / "a.nii.gz", np.zeros((6, 5, 4), np.uint8))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"},
                "labels": {"background": 0, "lesion": 1},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            }
        )
    )
    problems = check_dataset(load_dataset(root)).problems
    assert [(p.case_id, p.path.name, p.problem) for p in problems] == [
        (
            "a",
            "a_0001.nii.gz",
            "shape (6, 5, 3) differs from a_0000.nii.gz's (6, 5, 4)",
        ),
        (
            "a",
            "a_0002.nii.gz",
            "affine differs from a_0000.nii.gz's (not on the same grid)",
        ),
    ]


def test_data_check_notes_a_scan_whose_sform_and_qform_disagree(msd_dataset, caplog):
    path = msd_dataset / "imagesTr" / "case_1.nii.gz"
    img = nib.load(path)
    moved = np.eye(4)
    moved[:3, 3] = [2.0, 0.0, 0.0]  # the qform 2 mm along x from the sform
    img.set_qform(moved, code=1)
    nib.save(img, path)
    report = msd_dataset.parent / "check.json"
    with caplog.at_level("WARNING"):
        checked = CliRunner().invoke(
            main, ["data", "check", str(msd_dataset), "--json", str(report)]
        )
    assert checked.exit_code == 0, checked.output
    note = (
        f"{path}: its sform and qform disagree (voxels up to 2 mm apart): read by the "
        "sform, as nibabel and FSL read it; a tool that reads the qform sees the scan "
        "elsewhere (outputs keep both)"
    )
    assert f"  NOTE case_1: {note}\n" in checked.output
    assert caplog.records == []  # a NOTE line, not also the reader's warning
    assert f"OK: no problems found in {msd_dataset}" in checked.output
    notes = json.loads(report.read_text())["notes"]
    assert [(n["case"], n["path"], n["problem"]) for n in notes] == [
        ("case_1", str(path), note.removeprefix(f"{path}: "))
    ]


def test_nnunet_region_labels_are_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T1"}, "labels": {"bg": 0, "whole": [1, 2]}})
    )
    with pytest.raises(InputFileError, match="region-based labels are not supported"):
        load_dataset(tmp_path)


def test_label_names_from_either_manifest_form(tmp_path):
    assert read_label_names(SAMPLE / "dataset.json") == {
        0: "background",
        1: "Anterior",
        2: "Posterior",
    }
    nnunet = tmp_path / "dataset.json"
    nnunet.write_text(
        json.dumps(
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}}
        )
    )
    assert read_label_names(nnunet) == {0: "background", 1: "liver"}
    nnunet.write_text(json.dumps({"channel_names": {"0": "CT"}}))
    assert read_label_names(nnunet) == {}
    nnunet.write_text(json.dumps({"labels": {"one": "liver"}}))  # MSD form, bad key
    with pytest.raises(InputFileError, match="labels must map integer values"):
        read_label_names(nnunet)
    with pytest.raises(InputFileError, match="file not found"):
        read_label_names(tmp_path / "missing.json")


def test_folder_pair_of_pngs_matched_by_name(tmp_path):
    for folder in ("image", "label"):
        (tmp_path / folder).mkdir()
    for name in ("0", "1", "2"):
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(
            tmp_path / "image" / f"{name}.png"
        )
    for name in ("0", "1"):
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(
            tmp_path / "label" / f"{name}.tif"
        )
    dataset = load_dataset(tmp_path, strict=False)
    assert dataset.layout == "folder" and dataset.labels is None
    assert [c.case_id for c in dataset.cases] == ["0", "1", "2"]
    assert dataset.cases[0].label == tmp_path / "label" / "0.tif"
    assert [str(p) for p in dataset.problems] == [
        f"2: {tmp_path / 'label'}: no label file for 2.png"
    ]


def test_folder_without_a_dataset_is_an_error(tmp_path):
    with pytest.raises(InputFileError, match="no dataset found"):
        load_dataset(tmp_path)
    with pytest.raises(InputFileError, match="dataset folder not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputFileError, match="unreadable dataset.json"):
        load_dataset(tmp_path)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_2d_and_3d(tmp_path, rng):
    path = _npz(
        tmp_path / "breast.npz",
        train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (10, 1)),
        val_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        val_labels=np.array([[0], [1], [1], [0]]),
    )
    dataset = load_npz_dataset(path)
    assert dataset.spatial_dims == 2 and dataset.num_classes == 2
    images, labels = dataset.splits["val"]
    assert images.shape == (4, 28, 28, 1) and labels.tolist() == [0, 1, 1, 0]
    assert set(dataset.splits) == {"train", "val"}

    path = _npz(
        tmp_path / "adrenal.npz",
        train_images=rng.random((3, 28, 28, 28)),
        train_labels=np.array([[0], [2], [1]]),
    )
    dataset = load_npz_dataset(path)
    assert dataset.spatial_dims == 3 and dataset.num_classes == 3
    assert dataset.splits["train"][0].shape == (3, 28, 28, 28, 1)


def test_bad_npz_files(tmp_path, rng):
    with pytest.raises(InputFileError, match="needs train_images and train_labels"):
        load_npz_dataset(_npz(tmp_path / "a.npz", images=np.zeros((2, 4, 4))))
    with pytest.raises(InputFileError, match="3 images but 2 labels"):
        load_npz_dataset(
            _npz(
                tmp_path / "b.npz",
                train_images=np.zeros((3, 4, 4)),
                train_labels=[0, 1],
            )
        )
    with pytest.raises(InputFileError, match="non-negative integer classes"):
        load_npz_dataset(
            _npz(
                tmp_path / "c.npz",
                train_images=np.zeros((2, 4, 4)),
                train_labels=np.array([0.5, 1.0]),
            )
        )
    np.savez(
        tmp_path / "d.npz",
        train_images=np.array([{"x": 1}], dtype=object),
        train_labels=np.zeros(1, int),
    )
    with pytest.raises(InputFileError, match="pickled"):
        load_npz_dataset(tmp_path / "d.npz")


def test_slicer_segments_named_as_the_datasets_labels_must_hold_their_values(
    msd_dataset,
):
    pytest.importorskip("SimpleITK")
    from medseg.datasets.checks import check_dataset

    original = check_dataset(load_dataset(msd_dataset))
    nifti = msd_dataset / "labelsTr" / "case_1.nii.gz"
    label = np.asanyarray(nib.load(nifti).dataobj)
    nifti.unlink()
    manifest = json.loads((msd_dataset / "dataset.json").read_text())
    manifest["training"][1]["label"] = "./labelsTr/case_1.seg.nrrd"
    (msd_dataset / "dataset.json").write_text(json.dumps(manifest))
    seg = msd_dataset / "labelsTr" / "case_1.seg.nrrd"
    # named as the dataset names its labels (case aside): as the NIfTI was
    save_slicer_segmentation(seg, label, [("A", 1, 0), ("b", 2, 0)])
    report = check_dataset(load_dataset(msd_dataset))
    assert report.ok and report.notes == []
    assert report.fingerprint == original.fingerprint
    # the same voxels, but 'b' made first in this case's file: their values swapped
    swapped = np.choose(label, [0, 2, 1]).astype(np.uint8)
    save_slicer_segmentation(seg, swapped, [("b", 1, 0), ("a", 2, 0)])
    result = CliRunner().invoke(main, ["data", "check", str(msd_dataset)])
    assert result.exit_code == 2
    for line in (
        f"case_1: {seg}: segment 'b' holds label value 1, but the dataset's labels "
        "give 'b' the value 2",
        f"case_1: {seg}: segment 'a' holds label value 2, but the dataset's labels "
        "give 'a' the value 1",
    ):
        assert line in result.output
    # segments that do not name a label are not compared
    save_slicer_segmentation(seg, swapped, [("Segment_1", 1, 0), ("Segment_2", 2, 0)])
    assert check_dataset(load_dataset(msd_dataset)).ok
    # in two layers: one label map where they do not overlap, refused where they do
    layers = np.stack([np.where(label == 1, 1, 0), np.where(label == 2, 2, 0)], -1)
    save_slicer_segmentation(seg, layers, [("a", 1, 0), ("b", 2, 1)])
    assert check_dataset(load_dataset(msd_dataset)).fingerprint == original.fingerprint
    layers[4, 3:6, 2:4, 1] = 2  # b's first slab drawn over a's last
    save_slicer_segmentation(seg, layers, [("a", 1, 0), ("b", 2, 1)])
    (problem,) = check_dataset(load_dataset(msd_dataset)).problems
    assert problem.problem == (
        "segments 'a' and 'b' overlap in 6 voxels (saved in 2 layers); a label map "
        "holds one label a voxel"
    )


def test_a_case_listed_twice_fails_the_check_naming_both_entries(tmp_path):
    import shutil

    from medseg.datasets.checks import check_dataset
    from tests.conftest import SAMPLE

    root = tmp_path / "dup"
    shutil.copytree(SAMPLE, root)
    manifest = json.loads((root / "dataset.json").read_text())
    entries = manifest["training"]
    first, second = dict(entries[0]), dict(entries[1])
    second["image"] = second["image"].replace("imagesTr/", "imagesTr/../imagesTr/")
    manifest["training"] = entries + [first, second]
    (root / "dataset.json").write_text(json.dumps(manifest))
    report = check_dataset(load_dataset(root, strict=False))
    count = len(entries)
    assert [(p.case_id, p.problem) for p in report.problems] == [
        (
            entries[0]["image"].split("/")[-1].removesuffix(".nii.gz"),
            f"listed twice: entry {count + 1} repeats entry 1 (the same case id); "
            "training would count it twice",
        ),
        (
            entries[1]["image"].split("/")[-1].removesuffix(".nii.gz"),
            f"listed twice: entry {count + 2} repeats entry 2 (the same case id); "
            "training would count it twice",
        ),
    ]
    assert not report.ok
    assert check_dataset(load_dataset(SAMPLE, strict=False)).ok


def test_a_dataset_without_a_foreground_voxel_is_one_problem_not_a_traceback(
    tmp_path,
):
    import shutil
    import subprocess
    import sys

    from tests.conftest import SAMPLE

    root = tmp_path / "blank"
    shutil.copytree(SAMPLE, root)
    for path in (root / "labelsTr").glob("*.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "medseg_cli",
         "data", "check", str(root)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert (
        f"BROKEN (every case): {root}: no label map has a foreground voxel (all 0): "
        "nothing to learn from"
    ) in result.stdout + result.stderr
    assert "channel 0 foreground intensity: no foreground voxel" in result.stdout
