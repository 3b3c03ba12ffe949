from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
from click.testing import CliRunner
from PIL import Image

from medseg import figures
from medseg_cli.main import main


def test_best_median_worst_by_mean_dice_with_undefined_cases_left_out():
    rows = [
        {"case": "a", "label": 1, "dice": 0.9},
        {"case": "a", "label": 2, "dice": 0.5},  # mean 0.7
        {"case": "b", "label": 1, "dice": 0.8},
        {"case": "b", "label": 2, "dice": math.nan},  # mean 0.8 (NaN left out)
        {"case": "c", "label": 1, "dice": 0.1},
        {"case": "c", "label": 2, "dice": 0.3},  # mean 0.2
        {"case": "d", "label": 1, "dice": math.nan},
        {"case": "d", "label": 2, "dice": math.nan},  # nothing to score
        {"case": "e", "label": 1, "dice": 0.7},
        {"case": "e", "label": 2, "dice": 0.7},  # ties with a: a first
    ]
    scores = figures.case_scores(rows)
    assert scores["b"] == 0.8 and math.isnan(scores["d"])
    assert figures.pick_cases(scores) == {"best": "b", "median": "a", "worst": "c"}
    assert figures.pick_cases({"x": math.nan}) == {}


def test_slice_with_most_foreground(rng):
    mask = rng.random((6, 7, 9)) < 0.3
    for axis in range(3):
        counts = [
            int(np.take(mask, i, axis=axis).sum()) for i in range(mask.shape[axis])
        ]
        assert figures.pick_slice(mask, axis) == counts.index(max(counts))
    assert figures.pick_slice(np.zeros((4, 4, 8), bool), 2) == 4


def test_label_titles_name_the_labels_that_have_names():
    names = {1: "anterior"}
    assert figures.label_title(1, names) == "1 anterior"
    assert figures.label_title(2, names) == "2"
    assert figures.label_title(3, None) == "3"


def test_evaluate_report_writes_overlays_and_boxplot(tmp_path, rng):
    for folder in ("pred", "truth", "images"):
        (tmp_path / folder).mkdir()
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    truth = np.zeros((20, 20, 8), np.uint8)
    truth[5:15, 5:15, 2:6] = 1
    truth[8:12, 8:12, 3:5] = 2
    for i, shift in enumerate((0, 1, 3)):  # worse and worse predictions
        pred = np.roll(truth, shift, axis=0)
        for name, data in (("pred", pred), ("truth", truth)):
            nib.save(nib.Nifti1Image(data, affine), tmp_path / name / f"c{i}.nii.gz")
        image = rng.normal(size=truth.shape).astype(np.float32) + truth
        nib.save(
            nib.Nifti1Image(image, affine), tmp_path / "images" / f"c{i}_0000.nii.gz"
        )
    # an MSD manifest beside the truth folder names the labels
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "outer", "2": "inner"}})
    )
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--prediction",
            str(tmp_path / "pred"),
            "--truth",
            str(tmp_path / "truth"),
            "--summary",
            str(tmp_path / "s.json"),
            "--report",
            str(tmp_path / "report"),
            "--images",
            str(tmp_path / "images"),
        ],
    )
    assert result.exit_code == 0, result.output
    table = result.output.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:1] == ["label"])
    assert [line.split()[:2] for line in table[header + 1 : header + 3]] == [
        ["1", "outer"],
        ["2", "inner"],
    ]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["label_names"] == {"0": "background", "1": "outer", "2": "inner"}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "dice_boxplot.png",
        "overlay_best_c0.png",
        "overlay_median_c1.png",
        "overlay_worst_c2.png",
    ]
    best = np.asarray(Image.open(tmp_path / "report" / "overlay_best_c0.png"))
    assert best.shape[:2] == (500, 500)
    # contours drawn in both label colours over a grey image
    for colour in figures.COLOURS[:2]:
        rgb = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)])
        assert (np.abs(best[..., :3].astype(int) - rgb).sum(-1) < 30).sum() > 20


def test_preview_planes_are_drawn_as_radiologists_view_them(rng):
    """A blob on the patient's right, front and top, in a scan stored in another
    voxel order (LIP, oblique steps): each plane goes through the blob's most
    labelled slice, with it on the left (right or anterior) and at the top."""
    from medseg.io import Volume

    shape = (12, 10, 14)  # voxel axes along L, I, P
    affine = np.zeros((4, 4))
    affine[0, 0], affine[2, 1], affine[1, 2] = -1.5, -2.0, -1.0  # L, I, P
    affine[:3, 3] = [8.0, 6.0, 9.0]
    affine[3, 3] = 1.0
    world = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    world = world @ affine[:3, :3].T + affine[:3, 3]  # x right, y anterior, z up
    centre = world.reshape(-1, 3).mean(0)
    labels = np.zeros(shape, np.uint8)
    labels[np.all(world > centre + 1, axis=-1)] = 2  # right, anterior, superior
    labels[np.all(world > centre + 3, axis=-1)] = 5  # its innermost part
    image = rng.normal(size=shape).astype(np.float32)
    cuts = figures.preview_cuts(
        Volume(image[..., None], affine), Volume(labels[..., None], affine), (2, 5)
    )
    assert [title.split()[0] for title, _, _ in cuts] == [
        "axial",
        "coronal",
        "sagittal",
    ]
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, affine))
    ras = np.asarray(canonical.dataobj) > 0  # x right, y anterior, z up
    counts = [ras.sum((1, 2)), ras.sum((0, 2)), ras.sum((0, 1))]
    expected_index = {"sagittal": 0, "coronal": 1, "axial": 2}
    for title, picture, plane in cuts:
        name, index = title.split()
        assert int(index) == int(np.argmax(counts[expected_index[name]]))
        rows, columns = np.nonzero(np.isin(plane, (2, 5)))
        assert rows.min() >= plane.shape[0] / 2  # drawn from the first row up: top
        assert columns.max() < plane.shape[1] / 2  # right / anterior on the left
        assert picture.shape == plane.shape
    # the image's planes are the same cuts of the image
    canonical_image = np.asarray(
        nib.as_closest_canonical(nib.Nifti1Image(image, affine)).dataobj
    )
    axial = int(cuts[0][0].split()[1])
    np.testing.assert_array_equal(cuts[0][1], canonical_image[:, :, axial].T[:, ::-1])


def test_predict_preview_pictures_each_label_map(tmp_path):
    from tests.conftest import SAMPLE, run_medseg

    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    result = run_medseg(
        "predict", "--model", "hippocampus", "--input", scan, "--output", out,
        "--preview", "--seg-nrrd",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # and the label map as a 3D Slicer segmentation named as the model names them
    from medseg.io import read_volume
    from medseg.io.itk import Segment, slicer_segments

    labels = read_volume(out / scan.name)
    seg = read_volume(out / "slicer" / scan.name.replace(".nii.gz", ".seg.nrrd"))
    np.testing.assert_array_equal(seg.array, labels.array)
    np.testing.assert_allclose(seg.affine, labels.affine, atol=1e-6)
    assert slicer_segments(seg.header) == [
        Segment("Anterior", 1, 0),
        Segment("Posterior", 2, 0),
    ]
    picture = np.asarray(
        Image.open(out / "previews" / scan.name.replace(".nii.gz", ".png"))
    )
    assert picture.shape[:2] == (440, 1200)
    pixels = picture[..., :3].astype(float)
    for colour in figures.COLOURS[:2]:  # both labels filled: 45 % of it over grey
        rgb = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)])
        under = pixels - 0.45 * rgb  # the grey beneath, where this label is drawn
        blended = (np.ptp(under, axis=-1) < 6) & (np.ptp(pixels, axis=-1) > 20)
        assert blended.sum() > 500
    # the picture is part of a case's outputs: missing, the case is done again, and
    # the folder still evaluates (the pictures are not label maps)
    (out / "previews" / scan.name.replace(".nii.gz", ".png")).unlink()
    again = run_medseg(
        "predict", "--model", "hippocampus", "--input", scan, "--output", out,
        "--preview", "--seg-nrrd",
    )  # fmt: skip
    assert "1 segmented, 0 skipped" in again.stdout
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / scan.name).symlink_to(SAMPLE / "labelsTr" / scan.name)
    scored = run_medseg("evaluate", "--prediction", out, "--truth", tmp_path / "truth")
    assert scored.returncode == 0, scored.stderr[-2000:]
