"""The models shipped in the package: listed, intact, small, recording their
cross-validation, and segmenting real inputs."""

from __future__ import annotations

import math
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.bundle import MODEL_FILE, resolve, verify
from medseg.config import parse_duration
from tests.conftest import REPO, SAMPLE, assert_failures_named
from tests.conftest import run_medseg as medseg
from tests.reference import hard_dice


def test_hippocampus_is_listed_intact_small_and_records_its_cross_validation():
    folder = resolve("hippocampus")
    metadata = verify(folder)  # sha256 of model.keras matches its record
    assert (folder / MODEL_FILE).stat().st_size <= 15_000_000
    assert metadata["task"] == "segmentation" and metadata["spatial_dims"] == 3
    assert [v["name"] for _, v in sorted(metadata["labels"].items())] == [
        "background",
        "Anterior",
        "Posterior",
    ]
    # trained on every case; its record is the 5-fold cross-validation of its config
    assert metadata["split"]["fold"] == "all"
    evaluation = metadata["evaluation"]
    folds = evaluation["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2, 3, 4]
    cases = len(metadata["split"]["train"])
    assert sum(f["cases"] for f in folds) == evaluation["cases"] == cases
    for name in ("Anterior", "Posterior"):  # all cases' mean = fold means by case count
        pooled = sum(f["dice"][name] * f["cases"] for f in folds) / cases
        assert evaluation["dice"][name] == pytest.approx(pooled, abs=2e-4)
    # the record is of the config it names, each fold scored as shipped: last epoch
    config = yaml.safe_load((REPO / metadata["trained_with"]).read_text())
    assert metadata["config"]["model"]["filters"] == config["model"]["filters"]
    assert all(f["scored_epoch"] == f["epochs"] for f in folds)
    budget = config["train"].get("time_budget")
    if budget is None:
        assert metadata["epoch"] == config["train"]["epochs"] == folds[0]["epochs"]
    else:  # trained to its time budget, as each fold was
        assert metadata["trained_seconds"] >= parse_duration(budget)
    listing = medseg("models")
    assert listing.returncode == 0
    assert listing.stdout.startswith("hippocampus: segmentation, 3D, labels ")
    assert f"Dice Anterior {evaluation['dice']['Anterior']:.3f}" in listing.stdout


@pytest.mark.slow
def test_hippocampus_segments_sample_cases_on_their_own_grids(tmp_path):
    # its held-out accuracy is the cross-validation's: these cases were in its training
    # data, so this checks the shipped model end to end (reading, geometry, writing)
    cases = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[::4]
    (tmp_path / "in").mkdir()
    for path in cases:
        shutil.copy(path, tmp_path / "in")
    result = medseg(
        "predict", "--model", "hippocampus", "--input", tmp_path / "in",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for path in cases:
        truth = nib.load(SAMPLE / "labelsTr" / path.name)
        predicted = nib.load(tmp_path / "out" / path.name)
        assert np.allclose(predicted.affine, truth.affine)
        for k in (1, 2):
            dice = hard_dice(
                np.asarray(truth.dataobj), np.asarray(predicted.dataobj), k
            )
            assert not math.isnan(dice) and dice >= 0.8, (path.name, k, dice)


def test_membrane_is_listed_intact_small_and_records_its_cross_validation():
    folder = resolve("membrane")
    metadata = verify(folder)
    assert (folder / MODEL_FILE).stat().st_size <= 10_000_000
    assert metadata["task"] == "segmentation" and metadata["spatial_dims"] == 2
    labels = sorted(metadata["labels"].items(), key=lambda kv: int(kv[0]))
    assert [(v["value"], v["name"]) for _, v in labels] == [
        (0, "membrane"),
        (255, "cell"),
    ]
    assert metadata["split"]["fold"] == "all"
    evaluation = metadata["evaluation"]
    folds = evaluation["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2, 3, 4]
    assert sum(f["cases"] for f in folds) == evaluation["cases"] == 24
    for name in ("membrane", "cell"):  # all cases' mean = fold means by case count
        pooled = sum(f["dice"][name] * f["cases"] for f in folds) / 24
        assert evaluation["dice"][name] == pytest.approx(pooled, abs=2e-4)
    listing = medseg("models")
    assert "membrane: segmentation, 2D, labels 0=membrane, 255=cell" in listing.stdout


@pytest.mark.slow
def test_membrane_segments_a_png_into_its_label_values_flip_for_flip(tmp_path):
    from skimage import io

    rng = np.random.default_rng(3)
    image = (rng.random((200, 232)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    io.imsave(tmp_path / "in" / "a.png", image, check_contrast=False)
    io.imsave(tmp_path / "in" / "b.png", image[::-1, ::-1], check_contrast=False)
    result = medseg(
        "predict", "--model", "membrane", "--input", tmp_path / "in",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    a = io.imread(tmp_path / "out" / "a.png")
    b = io.imread(tmp_path / "out" / "b.png")
    assert a.shape == image.shape and set(np.unique(a)) == {0, 255}  # both, not one
    # mirroring over both axes at prediction makes the result flip-equivariant
    assert np.mean(a != b[::-1, ::-1]) < 1e-3


@pytest.mark.slow
def test_greyscale_pictures_stored_as_colour_are_segmented_as_their_grey(tmp_path):
    from skimage import io

    rng = np.random.default_rng(4)
    grey = (rng.random((96, 112)) * 255).astype(np.uint8)
    opaque = np.full_like(grey, 255)
    colour = np.stack([grey, grey, grey], -1)
    colour[40, 50, 2] ^= 1  # one pixel's blue differs: a colour picture
    (tmp_path / "in").mkdir()
    pictures = {
        "grey": grey,
        "grey_alpha": np.stack([grey, opaque], -1),
        "rgb": np.stack([grey, grey, grey], -1),
        "rgba": np.stack([grey, grey, grey, opaque], -1),
        "colour": colour,
    }
    for name, picture in pictures.items():
        io.imsave(tmp_path / "in" / f"{name}.png", picture, check_contrast=False)
    result = medseg(
        "predict", "--model", "membrane", "--input", tmp_path / "in",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 1
    assert "4 segmented, 0 skipped (output existed), 1 failed" in result.stdout
    assert_failures_named(
        result.stderr,
        tmp_path / "in",
        [("colour.png", "2D scan with 3 channel(s) (a colour picture: its channels")],
    )
    # stderr not a terminal (a batch job's log): a line a scan as each finishes
    logged = re.findall(r"^\[(\d)/5\] (.*)$", result.stderr, re.MULTILINE)
    assert [int(count) for count, _ in logged] == [1, 2, 3, 4, 5]
    segmented = sorted(
        re.fullmatch(r"(.*): segmented in \d+\.\d s", line).group(1)
        for _, line in logged
        if "FAILED" not in line
    )
    assert segmented == [
        str(tmp_path / "in" / f"{name}.png")
        for name in ("grey", "grey_alpha", "rgb", "rgba")
    ]
    assert [line for _, line in logged if "FAILED" in line] == [
        f"FAILED {tmp_path / 'in' / 'colour.png'}: 2D scan with 3 channel(s) (a colour "
        "picture: its channels differ), but the model segments 2D scans with 1 "
        "channel(s)"
    ]
    expected = io.imread(tmp_path / "out" / "grey.png")
    assert expected.shape == grey.shape and set(np.unique(expected)) == {0, 255}
    for name in ("grey_alpha", "rgb", "rgba"):
        np.testing.assert_array_equal(
            io.imread(tmp_path / "out" / f"{name}.png"), expected
        )
    assert not (tmp_path / "out" / "colour.png").exists()
