from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medseg import metrics
from medseg_cli.main import main
from tests import reference
from tests.conftest import save_slicer_segmentation, stored_in_another_order

SPACING = (0.7, 1.3, 2.5)


def test_dice_and_iou_by_hand():
    a = np.zeros((3, 3), bool)
    b = np.zeros((3, 3), bool)
    a[0, :2] = True  # two voxels
    b[0, 1:3] = True  # two voxels, one shared: IoU 1 / 3, Dice 2 * 1 / 4
    assert metrics.iou(a, b) == pytest.approx(1 / 3)
    assert metrics.dice(a, b) == pytest.approx(1 / 2)


def _blobs(rng, shape=(18, 14, 9)):
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.array(SPACING)
    centre = np.array(shape) * np.array(SPACING) / 2
    a = ((grid - centre) ** 2).sum(-1) < 6.0**2
    b = ((grid - centre - [1.5, -1.0, 2.0]) ** 2).sum(-1) < 5.0**2
    b[2:5, 2:4, 1:3] = True  # a detached island, far from a
    return a, b


def test_surface_metrics_match_brute_force_on_anisotropic_voxels(rng):
    a, b = _blobs(rng)
    d_ab = reference.directed_distances(a, b, SPACING)
    d_ba = reference.directed_distances(b, a, SPACING)
    fast_ab, fast_ba = metrics.surface_distances(a, b, SPACING)
    np.testing.assert_allclose(np.sort(fast_ab), np.sort(d_ab), rtol=1e-9)
    np.testing.assert_allclose(np.sort(fast_ba), np.sort(d_ba), rtol=1e-9)
    assert metrics.hausdorff_distance(a, b, SPACING) == pytest.approx(
        max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    )
    assert metrics.hausdorff_distance(a, b, SPACING, percentile=100) == pytest.approx(
        max(d_ab.max(), d_ba.max())
    )
    assert metrics.average_surface_distance(a, b, SPACING) == pytest.approx(
        (d_ab.mean() + d_ba.mean()) / 2
    )
    for tolerance in (0.5, 1.31, 3.01):  # away from exact voxel distances (ties)
        expected = ((d_ab <= tolerance).sum() + (d_ba <= tolerance).sum()) / (
            d_ab.size + d_ba.size
        )
        assert metrics.surface_dice(a, b, SPACING, tolerance) == pytest.approx(expected)
    assert metrics.volume_ml(a, SPACING) == pytest.approx(
        a.sum() * 0.7 * 1.3 * 2.5 / 1000
    )


def _expected_rows(prediction, truth, labels, spacing, tolerance):
    """label_metrics by brute force on the whole maps, label by label."""
    rows = []
    for label in labels:
        p, t = prediction == label, truth == label
        voxel = float(np.prod(spacing)) / 1000
        row = {
            "label": label,
            "volume_truth_ml": t.sum() * voxel,
            "volume_pred_ml": p.sum() * voxel,
        }
        if not p.any() and not t.any():
            row.update(dice=np.nan, iou=np.nan, hd95_mm=np.nan, assd_mm=np.nan)
            row["nsd"] = np.nan
        elif not p.any() or not t.any():
            row.update(dice=0.0, iou=0.0, hd95_mm=np.inf, assd_mm=np.inf, nsd=0.0)
        else:
            a = reference.directed_distances(p, t, spacing)
            b = reference.directed_distances(t, p, spacing)
            row.update(
                dice=2 * (p & t).sum() / (p.sum() + t.sum()),
                iou=(p & t).sum() / (p | t).sum(),
                hd95_mm=max(np.percentile(a, 95), np.percentile(b, 95)),
                assd_mm=(a.mean() + b.mean()) / 2,
                nsd=((a <= tolerance).sum() + (b <= tolerance).sum())
                / (a.size + b.size),
            )
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", ["uint8", "int64", "negative", "float"])
def test_label_metrics_on_boxes_equal_the_whole_maps_label_by_label(rng, kind):
    shape = (12, 10, 7)
    truth = np.zeros(shape, np.int64)
    truth[2:7, 3:8, 1:5] = 1
    truth[0:3, 0:4, 4:7] = 3  # against the border
    truth[8:11, 6:10, 2:4] = 4  # in the truth only
    prediction = np.roll(truth, (1, -1, 0), axis=(0, 1, 2))
    prediction[prediction == 4] = 0
    prediction[9:12, 0:3, 0:2] = 5  # in the prediction only
    prediction[rng.random(shape) < 0.05] = 1  # scattered voxels
    labels = [0, 1, 3, 4, 5, 9]  # 9 in neither
    if kind == "negative":  # values find_objects cannot box: label by label
        truth, prediction = truth - 1, prediction - 1
        labels = [v - 1 for v in labels]
    elif kind != "int64":
        truth, prediction = truth.astype(kind), prediction.astype(kind)
    rows = metrics.label_metrics(prediction, truth, labels, SPACING, 1.31)
    expected = _expected_rows(prediction, truth, labels, SPACING, 1.31)
    assert [r["label"] for r in rows] == labels
    for row, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            assert row[key] == pytest.approx(value, nan_ok=True), (row["label"], key)


def test_boundary_counts_the_image_border_as_outside():
    full = np.ones((4, 5), bool)
    assert set(zip(*np.nonzero(metrics.boundary(full)), strict=True)) == set(
        reference.boundary_voxels(full)
    )
    assert metrics.boundary(full).sum() == 4 * 5 - 2 * 3  # all but the inner 2 x 3


def test_empty_mask_policy():
    empty = np.zeros((5, 5, 5), bool)
    blob = np.zeros((5, 5, 5), bool)
    blob[1:3, 1:3, 1:3] = True
    for fn in (metrics.dice, metrics.iou):
        assert np.isnan(fn(empty, empty)) and fn(empty, blob) == 0 == fn(blob, empty)
    for fn in (metrics.hausdorff_distance, metrics.average_surface_distance):
        assert np.isnan(fn(empty, empty, SPACING))
        assert fn(empty, blob, SPACING) == np.inf == fn(blob, empty, SPACING)
    assert np.isnan(metrics.surface_dice(empty, empty, SPACING))
    assert metrics.surface_dice(blob, empty, SPACING) == 0
    assert metrics.dice(blob, blob) == 1 and metrics.hausdorff_distance(blob, blob) == 0
    with pytest.raises(ValueError, match="differs from truth shape"):
        metrics.dice(blob, blob[:4])


def _evaluate(folder, *options):
    """``medseg evaluate`` of ``folder/pred`` against ``folder/truth``."""
    return CliRunner().invoke(
        main,
        [
            "evaluate",
            "--prediction",
            str(folder / "pred"),
            "--truth",
            str(folder / "truth"),
            *options,
        ],
    )


def _failed(output: str) -> list[str]:
    return [line for line in output.splitlines() if "FAILED" in line]


def _save(path, data, spacing=SPACING):
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*spacing, 1.0])), path)


def test_lesion_wise_scores_by_hand_and_on_empty_sides():
    truth = np.zeros((8, 8, 6), bool)
    pred = np.zeros_like(truth)
    truth[1:3, 1:3, 1:3] = True  # lesion A, 8 voxels
    truth[6, 6, 4] = True  # lesion B, 1 voxel, missed
    pred[1:3, 1:3, 2:4] = True  # overlaps A by 4 of its 8 voxels: Dice 8 / 16
    pred[5:7, 0, 0] = True  # a false component, 2 voxels
    got = metrics.lesion_metrics(pred, truth, (1.0, 1.0, 2.0))
    assert got == {
        "lesions_truth": 2,
        "lesions_pred": 2,
        "lesions_detected": 1,
        "lesions_false": 1,
        "lesion_recall": 0.5,
        "lesion_precision": 0.5,
        "lesion_f1": 0.5,
        "lesion_dice": pytest.approx(0.5 / 3),  # A's 0.5, B's 0, the false one's 0
    }
    # components under 3 mm^3 (one voxel of 2 mm^3, B) are left out on both sides
    fewer = metrics.lesion_metrics(pred, truth, (1.0, 1.0, 2.0), min_size_mm3=3.0)
    assert (fewer["lesions_truth"], fewer["lesions_pred"]) == (1, 2)
    assert fewer["lesion_recall"] == 1.0 and fewer["lesion_dice"] == pytest.approx(
        0.5 / 2
    )
    nothing = np.zeros_like(truth)
    both = metrics.lesion_metrics(nothing, nothing)
    assert all(np.isnan(both[k]) for k in metrics.LESION_COLUMNS[4:])
    no_truth = metrics.lesion_metrics(pred, nothing)
    assert np.isnan(no_truth["lesion_recall"]) and no_truth["lesion_precision"] == 0
    assert no_truth["lesion_f1"] == 0 and no_truth["lesion_dice"] == 0
    no_pred = metrics.lesion_metrics(nothing, truth)
    assert no_pred["lesion_recall"] == 0 and np.isnan(no_pred["lesion_precision"])
    assert no_pred["lesion_f1"] == 0 and no_pred["lesion_dice"] == 0


def test_lesion_wise_scores_match_voxel_sets_on_random_lesions(rng):
    from scipy import ndimage

    seen = []
    for trial in range(25):
        shape = (11, 9, 7) if trial % 2 else (13, 12)
        seeds = [rng.random(shape) < 0.04 for _ in range(2)]
        truth, pred = (ndimage.binary_dilation(s, iterations=1) for s in seeds)
        pred ^= rng.random(shape) < 0.05  # holes and specks
        spacing = tuple(rng.uniform(0.5, 2.0, len(shape)))
        voxel = float(np.prod(spacing))
        min_size = float(rng.choice([0.0, 2.5 * voxel]))
        got = metrics.lesion_metrics(pred, truth, spacing, min_size)
        want = reference.lesion_scores(pred, truth, voxel, min_size)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(got[key]), (trial, key)
            else:
                assert got[key] == pytest.approx(value, rel=1e-12), (trial, key)
        seen.append(want)
    # the trials hold lesions found and missed, and false ones
    total = {k: sum(w[k] for w in seen) for k in metrics.LESION_COLUMNS[:4]}
    assert total["lesions_truth"] > total["lesions_detected"] > 30
    assert total["lesions_false"] > 10


def test_evaluate_lesion_wise_writes_counts_scores_and_pooled_rates(tmp_path):
    truth = np.zeros((8, 8, 6), np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    truth[6, 6, 4] = 1
    pred = np.zeros_like(truth)
    pred[1:3, 1:3, 2:4] = 1
    pred[5:7, 0, 0] = 1
    for folder, c1, c2 in (("truth", truth, truth), ("pred", pred, truth)):
        (tmp_path / folder).mkdir()
        _save(tmp_path / folder / "c1.nii.gz", c1)
        _save(tmp_path / folder / "c2.nii.gz", c2)  # c2 predicted exactly
    result = CliRunner().invoke(
        main,
        ["evaluate", "--prediction", str(tmp_path / "pred"), "--truth",
         str(tmp_path / "truth"), "--lesion-wise", "--output", str(tmp_path / "m.csv"),
         "--summary", str(tmp_path / "s.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(tmp_path / "m.csv", newline="") as handle:
        rows = list(__import__("csv").DictReader(handle))
    for row, (p, t) in zip(rows, [(pred, truth), (truth, truth)], strict=True):
        want = metrics.lesion_metrics(p == 1, t == 1, SPACING)
        for key in metrics.LESION_COLUMNS:
            assert float(row[key]) == pytest.approx(want[key], rel=1e-5), key
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["min_lesion_mm3"] == 0.0
    scores = summary["labels"]["1"]
    assert scores["lesions_truth"]["total"] == 4
    assert scores["lesions_detected"]["total"] == 3
    assert scores["lesions_false"]["total"] == 1
    assert scores["lesion_recall"]["pooled"] == 3 / 4  # per case: 0.5 and 1
    assert scores["lesion_precision"]["pooled"] == 3 / 4  # 1 of 4 predicted is false
    assert scores["lesion_dice"]["mean"] == pytest.approx((0.5 / 3 + 1) / 2)
    assert (
        "\nlesions   truth   found  recall    pred   false   prec.               F1"
        "      lesion Dice\n1           4       3   0.750       4       1   0.750    "
        "0.750 (0.750)    0.583 (0.583)\n"
    ) in result.output


def test_evaluate_command_writes_long_csv_and_summary(tmp_path, rng):
    a, b = _blobs(rng)
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    truth = a.astype(np.uint8) + 0  # label 1 = a
    pred = b.astype(np.uint8)
    _save(tmp_path / "truth" / "c1.nii.gz", truth)
    _save(tmp_path / "pred" / "c1.nii.gz", pred)
    _save(tmp_path / "truth" / "c2.nii.gz", truth)
    _save(tmp_path / "pred" / "c2.nii.gz", np.zeros_like(pred))  # missed entirely
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--prediction",
            str(tmp_path / "pred"),
            "--truth",
            str(tmp_path / "truth"),
            "--labels",
            "1",
            "--output",
            str(tmp_path / "m.csv"),
            "--summary",
            str(tmp_path / "s.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert (
        lines[0]
        == "case,label,dice,iou,hd95_mm,assd_mm,nsd,volume_truth_ml,volume_pred_ml"
    )
    assert lines[2].startswith("c2,1,0,0,inf,inf,0,")
    summary = json.loads((tmp_path / "s.json").read_text())["labels"]["1"]
    assert summary["dice"]["mean"] == pytest.approx(metrics.dice(b, a) / 2)
    assert summary["hd95_mm"]["n_inf"] == 1 and summary["hd95_mm"]["n"] == 1
    assert summary["hd95_mm"]["mean"] == pytest.approx(
        metrics.hausdorff_distance(b, a, SPACING)
    )
    assert "0 both, 1 one" in result.output


def test_evaluate_workers_give_the_rows_and_failures_of_one_in_the_cases_order(
    tmp_path, rng
):
    from medseg.errors import InputFileError
    from medseg.evaluation.scoring import evaluate_pairs, pair_files

    a, b = _blobs(rng)
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    for k in range(5):
        truth = (a * (1 + k % 2)).astype(np.uint8)
        _save(tmp_path / "truth" / f"c{k}.nii.gz", truth)
        pred = np.roll(b, k, axis=0).astype(np.uint8) * (1 + k % 2)
        _save(tmp_path / "pred" / f"c{k}.nii.gz", pred)
    (tmp_path / "pred" / "c2.nii.gz").write_bytes(b"not a scan")  # fails, mid-way
    pairs = pair_files(tmp_path / "pred", tmp_path / "truth")
    answers = []
    for workers in (1, 3):
        failures, done = [], []
        rows = evaluate_pairs(
            pairs, failures=failures, progress=done.append, workers=workers
        )
        answers.append((rows, failures, done))
    assert answers[0] == answers[1]
    rows, failures, done = answers[1]
    assert done == ["c0", "c1", "c2", "c3", "c4"]
    assert [c for c, _ in failures] == ["c2"]
    assert [(r["case"], r["label"]) for r in rows] == [
        ("c0", 1), ("c1", 2), ("c3", 2), ("c4", 1)
    ]  # fmt: skip
    assert rows[1]["dice"] == pytest.approx(metrics.dice(np.roll(b, 1, axis=0), a))
    with pytest.raises(InputFileError, match="c2.nii.gz"):  # no list: the first raises
        evaluate_pairs(pairs, workers=3)


def _dies_on(name, path):
    """A scorer for in_processes whose process dies on "dies", and on "once" the
    first time only."""
    import os

    seen = path.with_suffix(".seen")
    if name == "dies" or (name == "once" and not seen.exists()):
        seen.touch()
        os._exit(9)
    return [name], None


def test_a_case_whose_process_dies_is_scored_alone_and_fails_only_if_it_dies_again(
    tmp_path,
):
    from medseg.evaluation.scoring import in_processes

    names = ["a", "once", "b", "dies", "c", "d"]
    pairs = [(name, tmp_path / f"{name}.nii.gz") for name in names]
    scored = list(in_processes(_dies_on, pairs, workers=2))
    assert [rows for rows, _ in scored] == [["a"], ["once"], ["b"], [], ["c"], ["d"]]
    assert [str(error) for _, error in scored if error is not None] == [
        f"{tmp_path / 'dies.nii.gz'}: the process scoring it died (killed for lack of "
        "memory?), also when scored alone"
    ]


def test_evaluate_names_missing_pairs_and_scores_the_rest_past_a_grid_mismatch(
    tmp_path,
):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    data = np.zeros((4, 4, 4))
    data[1:3, 1:3, 1:3] = 1
    for name in ("a.nii.gz", "b.nii.gz"):
        _save(tmp_path / "truth" / name, data)
    _save(tmp_path / "pred" / "a.nii.gz", data)
    _save(tmp_path / "pred" / "z.nii.gz", data)
    result = _evaluate(tmp_path)
    assert result.exit_code == 2
    assert "no prediction for b.nii.gz; no truth for z.nii.gz" in result.output
    (tmp_path / "pred" / "z.nii.gz").unlink()
    _save(tmp_path / "pred" / "b.nii.gz", data, spacing=(1, 1, 1))
    result = _evaluate(
        tmp_path,
        "--output",
        str(tmp_path / "m.csv"),
        "--summary",
        str(tmp_path / "s.json"),
    )
    # the case on another grid is named and left out; the other is scored
    assert result.exit_code == 1
    failed = _failed(result.output)
    assert failed == [
        f"FAILED {tmp_path / 'pred' / 'b.nii.gz'}: affine differs from the truth's "
        "(not on the same grid)"
    ]
    assert "1 case(s) scored, 1 failed (not in the means)" in result.output
    rows = (tmp_path / "m.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:3] for row in rows] == [["a", "1", "1"]]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["cases"] == 1 and list(summary["failed"]) == ["b"]
    assert summary["labels"]["1"]["dice"]["n"] == 1


def test_evaluate_reads_a_prediction_stored_in_another_voxel_order_in_the_truths(
    tmp_path, rng
):
    a, b = _blobs(rng)
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    affine = np.diag([*SPACING, 1.0])
    nib.save(
        nib.Nifti1Image(a.astype(np.uint8), affine), tmp_path / "truth" / "c.nii.gz"
    )
    # the prediction as another tool might save it: LPS, slices first
    stored, stored_affine = stored_in_another_order(
        b.astype(np.uint8), affine, (2, 0, 1), [1, 2]
    )
    assert nib.aff2axcodes(stored_affine) == ("S", "L", "P")
    nib.save(nib.Nifti1Image(stored, stored_affine), tmp_path / "pred" / "c.nii.gz")
    result = _evaluate(tmp_path, "--output", str(tmp_path / "m.csv"))
    assert result.exit_code == 0, result.output
    row = (tmp_path / "m.csv").read_text().splitlines()[1].split(",")
    assert float(row[2]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    d_ab = reference.directed_distances(a, b, SPACING)
    d_ba = reference.directed_distances(b, a, SPACING)
    assert float(row[4]) == pytest.approx(
        max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-3
    )


def test_evaluate_places_a_slicer_segmentation_saved_on_a_box_of_the_others_grid(
    tmp_path, rng
):
    sitk = pytest.importorskip("SimpleITK")
    from medseg.io import Volume, write_volume

    a, b = _blobs(rng)
    affine = np.diag([*SPACING, 1.0])
    lo = np.argwhere(b).min(0)
    hi = np.argwhere(b).max(0) + 1

    def slicer(mask, path):  # the box around the labels, as 3D Slicer may save it
        moved = affine.copy()
        moved[:3, 3] = affine[:3, :3] @ lo
        box = mask[tuple(map(slice, lo, hi))].astype(np.uint8)[..., None]
        write_volume(Volume(box, moved), path, is_label=True)
        image = sitk.ReadImage(str(path))
        image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
        sitk.WriteImage(image, str(path), True)

    for folder in ("truth", "pred"):
        (tmp_path / folder).mkdir()
    _save(tmp_path / "truth" / "boxed_pred.nii.gz", a)
    slicer(b, tmp_path / "pred" / "boxed_pred.seg.nrrd")
    slicer(b, tmp_path / "truth" / "boxed_truth.seg.nrrd")
    _save(tmp_path / "pred" / "boxed_truth.nii.gz", a)
    result = _evaluate(tmp_path, "--output", str(tmp_path / "m.csv"))
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in (tmp_path / "m.csv").read_text().splitlines()]
    # scored on the full grid: a against b, either way round
    assert [r[0] for r in rows[1:]] == ["boxed_pred", "boxed_truth"]
    assert float(rows[1][2]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    # the same scores with the roles swapped (the two volumes change places)
    assert rows[2][2:7] == rows[1][2:7] and rows[2][7:9] == rows[1][8:6:-1]


def test_evaluate_refuses_a_slicer_truth_whose_segments_contradict_the_label_names(
    tmp_path, rng
):
    pytest.importorskip("SimpleITK")
    a, b = _blobs(rng)
    two = a.astype(np.uint8) + 2 * (b & ~a)  # labels 1 and 2
    affine = np.diag([*SPACING, 1.0])
    for folder in ("truth", "pred"):
        (tmp_path / folder).mkdir()
    (tmp_path / "truth" / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "anterior", "2": "posterior"}})
    )
    swapped = np.choose(two, [0, 2, 1]).astype(np.uint8)
    for case, voxels, segments in [
        ("named", two, [("Anterior", 1, 0), ("Posterior", 2, 0)]),
        ("swapped", swapped, [("posterior", 1, 0), ("anterior", 2, 0)]),
    ]:
        save_slicer_segmentation(
            tmp_path / "truth" / f"{case}.seg.nrrd", voxels, segments, affine
        )
        _save(tmp_path / "pred" / f"{case}.nii.gz", two)
    # overlapping segments in two layers: no label map
    layers = np.stack([np.where(two == 1, 1, 0), np.where(b, 2, 0)], -1)
    save_slicer_segmentation(
        tmp_path / "truth" / "layers.seg.nrrd",
        layers,
        [("anterior", 1, 0), ("posterior", 2, 1)],
        affine,
    )
    _save(tmp_path / "pred" / "layers.nii.gz", two)
    result = _evaluate(tmp_path, "--output", str(tmp_path / "m.csv"))
    assert result.exit_code == 1, result.output
    truth = tmp_path / "truth"
    assert sorted(set(_failed(result.output))) == [
        f"FAILED {truth / 'layers.seg.nrrd'}: segments 'anterior' and "
        f"'posterior' overlap in {int((a & b).sum()):,} voxels (saved in 2 layers); a "
        "label map holds one label a voxel",
        f"FAILED {truth / 'swapped.seg.nrrd'}: segment 'posterior' holds "
        "label value 1, but the dataset's labels give 'posterior' the value 2; "
        "segment 'anterior' holds label value 2, but the dataset's labels give "
        "'anterior' the value 1",
    ]
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in rows[1:]] == [
        ["named", "1", "1"],
        ["named", "2", "1"],
    ]
    # without a dataset.json, the truth's segments name the labels: each name at
    # the value most files hold it at, and the file numbered otherwise is refused
    (truth / "dataset.json").unlink()
    result = _evaluate(tmp_path, "--output", str(tmp_path / "m.csv"))
    assert result.exit_code == 1, result.output
    assert (
        "label names from the truth's 3D Slicer segments: 1 anterior, 2 posterior\n"
        in result.output
    )
    assert sorted(set(_failed(result.output)))[1] == (
        f"FAILED {truth / 'swapped.seg.nrrd'}: segment 'posterior' holds "
        "label value 1, but the other truth files give 'posterior' the value 2; "
        "segment 'anterior' holds label value 2, but the other truth files give "
        "'anterior' the value 1"
    )
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in rows[1:]] == [
        ["named", "1", "1"],
        ["named", "2", "1"],
    ]
    table = result.output.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[1:2] == ["dice"])
    assert [line.split()[:2] for line in table[header + 1 : header + 3]] == [
        ["1", "anterior"],
        ["2", "posterior"],
    ]


def test_label_names_from_slicer_segments_follow_most_files(tmp_path):
    pytest.importorskip("SimpleITK")
    from medseg.io.itk import segment_names

    voxels = np.zeros((3, 3, 3), np.uint8)
    files = [
        save_slicer_segmentation(tmp_path / f"{case}.seg.nrrd", voxels, segments)
        for case, segments in [
            ("a", [("Left lung", 1, 0), ("right_lung", 2, 0)]),
            ("b", [("right lung", 1, 0), ("left lung", 2, 0)]),  # numbered otherwise
            ("c", [("left-lung", 1, 0), ("Right Lung", 2, 0), ("Tumour", 3, 0)]),
        ]
    ]
    _save(tmp_path / "d.nii.gz", voxels)  # no segments: passed over
    (tmp_path / "e.seg.nrrd").write_bytes(b"NRRD0004\ncut")  # named when read
    assert segment_names([*files, tmp_path / "d.nii.gz", tmp_path / "e.seg.nrrd"]) == {
        1: "Left lung",  # as the first file that holds it there spells it
        2: "right_lung",
        3: "Tumour",
    }
    assert segment_names([files[1], files[0]]) == {1: "right lung", 2: "left lung"}
    assert segment_names([tmp_path / "d.nii.gz"]) == {}


def test_label_files_pair_by_name_else_by_case_when_that_names_one_on_each_side(
    tmp_path,
):
    from medseg.errors import InputFileError
    from medseg.evaluation.scoring import pair_files

    for folder, names in (
        ("truth", ["a.nii.gz", "b.seg.nrrd", "c.nii.gz"]),
        ("pred", ["a.nii.gz", "b.nii.gz", "c.seg.nrrd", "c.mha"]),
    ):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).touch()
    with pytest.raises(InputFileError) as info:  # c: two predictions of one case
        pair_files(tmp_path / "pred", tmp_path / "truth")
    assert str(info.value).endswith(
        "no prediction for c.nii.gz; no truth for c.mha, c.seg.nrrd"
    )
    (tmp_path / "pred" / "c.mha").unlink()
    pairs = pair_files(tmp_path / "pred", tmp_path / "truth")
    assert [(c, p.name, t.name) for c, p, t in pairs] == [
        ("a", "a.nii.gz", "a.nii.gz"),
        ("b", "b.nii.gz", "b.seg.nrrd"),
        ("c", "c.seg.nrrd", "c.nii.gz"),
    ]


def test_evaluate_refuses_files_that_are_not_label_maps_and_reads_whole_floats(
    tmp_path, rng
):
    a, b = _blobs(rng)
    affine = np.diag([*SPACING, 1.0])
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    for name in ("whole.nii.gz", "soft.nii.gz", "onehot.nii.gz", "nan.nii.gz"):
        _save(tmp_path / "truth" / name, a * 2)  # label 2
    pred = (b * 2).astype(np.float32)

    def save(name, data):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / "pred" / name)

    save("whole.nii.gz", pred)  # 0.0 and 2.0 as float32: a label map
    save("soft.nii.gz", pred * 0.75)  # 0 and 1.5: a probability-like map
    save("onehot.nii.gz", np.stack([1 - b, b], -1).astype(np.uint8))
    nan = pred.copy()
    nan[0, 0, 0] = np.nan
    save("nan.nii.gz", nan)
    result = _evaluate(tmp_path, "--output", str(tmp_path / "m.csv"))
    assert result.exit_code == 1
    failed = sorted(_failed(result.output))
    pred_dir = tmp_path / "pred"
    assert failed == [
        f"FAILED {pred_dir / 'nan.nii.gz'}: NaN or Inf values: not a label map",
        f"FAILED {pred_dir / 'onehot.nii.gz'}: 2 channels: a label map has one value "
        "per voxel",
        f"FAILED {pred_dir / 'soft.nii.gz'}: {int(b.sum()):,} voxels hold values that "
        "are not whole numbers (such as 1.5): not a label map",
    ]
    rows = (tmp_path / "m.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in rows] == [["whole", "2"]]
    expected = reference.hard_dice(a.astype(int), b.astype(int), 1)
    assert float(rows[0].split(",")[2]) == pytest.approx(expected, abs=1e-5)


def test_evaluate_reads_a_grey_mask_saved_in_colour_and_refuses_a_colour_one(tmp_path):
    from PIL import Image

    truth = np.zeros((12, 10), np.uint8)
    truth[2:8, 3:7] = 255
    pred = np.zeros_like(truth)
    pred[3:9, 3:7] = 255
    for name in ("grey.png", "colour.png"):
        (tmp_path / "truth").mkdir(exist_ok=True)
        Image.fromarray(truth).save(tmp_path / "truth" / name)
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.stack([pred] * 3, -1)).save(tmp_path / "pred" / "grey.png")
    colour = np.stack([pred, pred, 255 - pred], -1)
    Image.fromarray(colour).save(tmp_path / "pred" / "colour.png")
    result = _evaluate(tmp_path, "--output", str(tmp_path / "m.csv"))
    assert result.exit_code == 1
    failed = _failed(result.output)
    assert failed == [
        f"FAILED {tmp_path / 'pred' / 'colour.png'}: a colour picture (its channels "
        "differ): not a label map"
    ]
    rows = (tmp_path / "m.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in rows] == [["grey", "255"]]
    expected = reference.hard_dice(truth, pred, 255)  # 5 of 6 rows overlap: 5/6
    assert expected == pytest.approx(5 / 6)
    assert float(rows[0].split(",")[2]) == pytest.approx(expected, abs=1e-5)


def test_evaluate_makes_its_output_folders_before_the_work_or_names_a_file_there(
    tmp_path,
):
    # a summary into a folder not there yet: made (the scores would be lost at the
    # end); a file where a folder should be: one line before any case is read
    labels = np.zeros((6, 6, 4), np.uint8)
    labels[1:4, 1:4, 1:3] = 1
    for folder in ("pred", "truth"):
        (tmp_path / folder).mkdir()
        _save(tmp_path / folder / "a.nii.gz", labels)
    summary = tmp_path / "new" / "sub" / "s.json"
    result = _evaluate(tmp_path, "--summary", str(summary), "--output",
                       str(tmp_path / "other" / "m.csv"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(summary.read_text())["labels"]["1"]["dice"]["mean"] == 1.0
    assert (tmp_path / "other" / "m.csv").read_text().startswith("case,label,")
    (tmp_path / "taken").write_text("kept")
    result = _evaluate(tmp_path, "--summary", str(tmp_path / "taken" / "s.json"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'taken'}: a file is there, where the output folder should "
        "be"
    ]
    assert (tmp_path / "taken").read_text() == "kept"
