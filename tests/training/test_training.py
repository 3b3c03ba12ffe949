from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from medseg.config import Config
from medseg.errors import InputFileError
from medseg.preprocessing import Preprocessor, ZScoreNormalization
from medseg.training import data as training_data
from tests import reference
from tests.conftest import REPO, SAMPLE, tiny_classification

TINY_TRAIN = """\
model:
  name: unet
  spatial_dims: 3
  filters: [4, 8]
  patch_size: [16, 16, 16]
train:
  epochs: {epochs}
  steps_per_epoch: {steps}
  batch_size: 2
  optimizer: adam
  learning_rate: 0.001
  folds: 4
  augment:
    mirror_axes: [0, 2]
"""


def test_kfold_split_is_deterministic_disjoint_and_complete():
    ids = [f"case_{i:03d}" for i in range(23)]
    folds = [training_data.kfold_split(ids, 5, k) for k in range(5)]
    validation = [set(val) for _, val in folds]
    assert sorted(len(v) for v in validation) == [4, 4, 5, 5, 5]
    assert set().union(*validation) == set(ids)
    assert all(
        not (a & b) for i, a in enumerate(validation) for b in validation[i + 1 :]
    )
    for train, val in folds:
        assert set(train) | set(val) == set(ids) and not set(train) & set(val)
    # order of the input does not matter
    assert training_data.kfold_split(ids[::-1], 5, 2) == folds[2]
    assert training_data.kfold_split(ids, 5, "all") == (sorted(ids), [])
    with pytest.raises(ValueError, match="3 cases cannot be split into 5 folds"):
        training_data.kfold_split(ids[:3], 5, 0)


def test_label_values_map_to_class_indices(tmp_path):
    labels = np.array([[0, 255], [255, 0]])
    np.testing.assert_array_equal(
        training_data._to_classes(labels, [0, 255], tmp_path), [[0, 1], [1, 0]]
    )
    with pytest.raises(InputFileError, match=r"label values \[7\] not among"):
        training_data._to_classes(np.array([0, 7]), [0, 255], tmp_path)


def _prepared(rng, shape=(12, 10, 8)):
    label = np.zeros((*shape, 1), np.uint8)
    label[2:4, 3:5, 1:3] = 1
    label[9, 8, 7] = 2
    image = rng.random((*shape, 1)).astype(np.float32)
    return training_data._indexed("c", image, label)


def test_patch_extraction_pads_outside_the_case(rng):
    case = _prepared(rng)
    sampler = training_data.PatchSampler(
        [case], (6, 6, 6), foreground_oversample=0, seed=0, samples_per_epoch=4
    )
    image, label = sampler.patch(case, (0, 0, 0))
    # centre 0 with patch 6 starts at -3: the first 3 voxels of each axis are padding
    np.testing.assert_array_equal(image[3:, 3:, 3:], case.image[:3, :3, :3])
    assert np.all(image[:3] == 0) and np.all(label[:, :3] == 0)


def test_foreground_oversampling_and_per_epoch_determinism(rng):
    case = _prepared(rng)
    sampler = training_data.PatchSampler(
        [case], (4, 4, 4), foreground_oversample=1.0, seed=3, samples_per_epoch=20
    )
    stream = sampler.samples()
    for _ in range(20):
        _, label, _ = next(stream)
        assert label[2, 2, 2, 0] != 0  # every patch centred on a foreground voxel
    first = sampler.samples(0)
    for _ in range(20):
        next(first)
    second_epoch = [next(first) for _ in range(5)]
    resumed = sampler.samples(1)
    for a, b in zip(second_epoch, [next(resumed) for _ in range(5)], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_a_2d_network_on_volumes_is_fed_whole_slices_of_them(slice_axis, rng):
    shape = (12, 10, 8)
    # each voxel holds its own position, so a sample shows where it was cut from
    where = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    image = (where @ np.array([10000, 100, 1])).astype(np.float32)[..., None] + 1
    label = np.zeros((*shape, 1), np.uint8)
    label[4:6, 3:5, 2:4] = 1
    case = training_data._indexed("c", image, label)
    sampler = training_data.PatchSampler(
        [case], (6, 4), foreground_oversample=0.5, seed=1, samples_per_epoch=30,
        slice_axis=slice_axis,
    )  # fmt: skip
    in_plane = [n for a, n in enumerate(shape) if a != slice_axis]
    stream = sampler.samples()
    for _ in range(30):
        patch, patch_label, _ = next(stream)
        assert patch.shape == (6, 4, 1) and patch_label.shape == (6, 4, 1)
        inside = patch[..., 0] > 0  # the rest is padding beyond the case
        voxels = (patch[..., 0][inside] - 1).astype(int)
        position = np.stack([voxels // 10000, voxels // 100 % 100, voxels % 100], -1)
        assert len(np.unique(position[:, slice_axis])) == 1  # one slice
        k = position[0, slice_axis]
        cut = np.take(image[..., 0], k, axis=slice_axis)
        cut_label = np.take(label[..., 0], k, axis=slice_axis)
        rows, cols = np.nonzero(inside)
        first = [position[0, a] for a in range(3) if a != slice_axis]
        # the patch is that slice's window, pixel for pixel, labels with it
        for r, c in zip(rows, cols, strict=True):
            i, j = first[0] + r - rows[0], first[1] + c - cols[0]
            assert 0 <= i < in_plane[0] and 0 <= j < in_plane[1]
            assert patch[r, c, 0] == cut[i, j]
            assert patch_label[r, c, 0] == cut_label[i, j]


def test_poly_schedule_values():
    from medseg.training.runtime import PolyDecay

    schedule = PolyDecay(0.01, 100, 0.9)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(50)) == pytest.approx(0.01 * 0.5**0.9, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    assert PolyDecay(**schedule.get_config()).get_config() == schedule.get_config()


def test_resume_keeps_the_saved_config_and_warns_of_new_epochs(tmp_path, caplog):
    import dataclasses

    import yaml

    from medseg.training.run_files import prepare_run

    config = Config.from_dict({"model": {"name": "unet"}, "train": {"epochs": 10}})
    with caplog.at_level("WARNING"):  # nothing to resume yet: a new run
        assert prepare_run(tmp_path, config, resume=True) is config
    assert caplog.records[-1].getMessage() == (
        f"{tmp_path}: no checkpoint to resume from; starting the run from its first "
        "epoch"
    )
    caplog.clear()
    assert prepare_run(tmp_path, config, resume=False) is config
    (tmp_path / "medseg.json").write_text("{}")  # a bundle, no checkpoint: kept
    with pytest.raises(InputFileError, match="holds a bundle but no checkpoint"):
        prepare_run(tmp_path, config, resume=True)
    (tmp_path / "medseg.json").unlink()
    saved = config.to_dict()
    saved["train"]["learning_rate"] = 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text('{"epoch": 3}')
    with pytest.raises(InputFileError, match="pass --resume"):
        prepare_run(tmp_path, config, resume=False)
    with caplog.at_level("WARNING"):
        same = prepare_run(tmp_path, config, resume=True)
    assert same.train.learning_rate == 0.5 and same.train.epochs == 10
    assert not caplog.records
    longer = config.replace(train=dataclasses.replace(config.train, epochs=15))
    with caplog.at_level("WARNING"):
        resumed = prepare_run(tmp_path, longer, resume=True)
    assert resumed.train.epochs == 15 and resumed.train.learning_rate == 0.5
    assert "resuming with 15 epochs instead of 10" in caplog.text


def _fingerprint(shape, spacing=(1.0, 1.0, 1.0), cases=100):
    return {
        "spacing_mm": {"median": list(spacing)},
        "shape": {"median": list(shape)},
        "num_readable_cases": cases,
    }


def test_planning_rounds_patch_and_respects_the_memory_budget():
    from medseg.training.planning import plan_training

    config = Config.from_dict(
        {"model": {"name": "unet", "num_classes": 3, "filters": [8, 16, 32, 64]}}
    )
    plan = plan_training(config, _fingerprint((36, 50, 35)), memory_gb=4.0)
    # the median case rounded up to multiples of 2**3: 40 x 56 x 40 (nnU-Net's choice)
    assert plan.patch_size == (40, 56, 40)
    assert plan.batch_size >= 2 and plan.estimated_memory_gb <= 4.0
    small = plan_training(config, _fingerprint((128, 128, 128)), memory_gb=0.2)
    assert all(p % 8 == 0 for p in small.patch_size)
    assert max(small.patch_size) < 128 and small.estimated_memory_gb <= 0.2
    resampled = plan_training(
        Config.from_dict(
            {
                "model": {"name": "unet", "num_classes": 2, "filters": [4, 8]},
                "data": {"target_spacing_mm": [2.0, 2.0, 2.0]},
            }
        ),
        _fingerprint((40, 40, 20), spacing=(1.0, 1.0, 2.0)),
        memory_gb=1.0,
    )
    assert resampled.median_shape == (20, 20, 20)
    assert resampled.target_spacing_mm == (2.0, 2.0, 2.0)


def test_a_2d_network_on_volumes_is_planned_on_slices_across_the_thick_axis():
    from medseg.training.planning import plan_training, slice_axis_for

    assert slice_axis_for((1.0, 1.0, 1.0)) == 2  # axial slices of a RAS volume
    assert slice_axis_for((0.8, 0.8, 5.0)) == 2
    assert slice_axis_for((5.0, 0.7, 0.7)) == 0
    assert slice_axis_for((1.0, 3.0, 1.0)) == 1
    config = Config.from_dict(
        {
            "model": {
                "name": "unet", "spatial_dims": 2, "num_classes": 2,
                "filters": [4, 8, 16],
            },
        }
    )  # fmt: skip
    plan = plan_training(config, _fingerprint((30, 50, 35), spacing=(1.0, 4.0, 1.0)))
    # the slices are the 30 x 35 planes, rounded up to multiples of 2**2
    assert plan.slice_axis == 1 and plan.patch_size == (32, 36)
    assert plan.window == (32, 1, 36) and plan.target_spacing_mm == (1.0, 4.0, 1.0)
    assert "patch 32 x 36 (2D slices across axis 1)" in plan.describe()
    assert plan_training(config, _fingerprint((30, 50))).slice_axis is None


def test_preprocessor_keeps_image_and_label_on_one_grid(rng):
    from medseg.io import Volume
    from tests.conftest import OBLIQUE_LPS

    image = np.zeros((12, 10, 6, 1), np.float32)
    image[2:9, 3:8, 1:5] = rng.random((7, 5, 4, 1)) + 1
    label = (image > 1.5).astype(np.uint8)
    pre = Preprocessor((ZScoreNormalization(),), target_spacing_mm=(1.0, 1.0, 1.0))
    out, records = pre.image(Volume(image, OBLIQUE_LPS))
    out_label = pre.label(Volume(label, OBLIQUE_LPS), records)
    assert out.shape[:-1] == out_label.shape[:-1]
    assert out.dtype == np.float32 and abs(float(out.mean())) < 1e-4
    assert Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def _history(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _train_command(config_path, output, *extra):
    return [
        sys.executable,
        "-m",
        "medseg_cli",
        "train",
        "--config",
        str(config_path),
        "--data",
        str(SAMPLE),
        "--output",
        str(output),
        *extra,
    ]


@pytest.mark.slow
def test_train_on_the_sample_writes_a_bundle_that_predicts(tmp_path):
    from medseg import bundle
    from medseg.models import load_model

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TRAIN.format(epochs=2, steps=2))
    run = tmp_path / "run"
    result = subprocess.run(_train_command(config, run), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plan: spacing 1 x 1 x 1 mm" in result.stderr
    rows = _history(run / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "dice_1", "dice_2", "val_dice_1", "val_dice_mean", "lr"} <= set(
        rows[0]
    )
    assert (run / "progress.png").stat().st_size > 0
    assert not (run / ".medseg_train.lock").exists()  # the run's lock went with it
    metadata = bundle.verify(run)
    assert metadata["labels"] == {
        "0": {"value": 0, "name": "background"},
        "1": {"value": 1, "name": "Anterior"},
        "2": {"value": 2, "name": "Posterior"},
    }
    assert metadata["patch_size"] == [16, 16, 16] and metadata["in_channels"] == 1
    assert metadata["preprocessing"]["normalizers"] == [
        {"scheme": "zscore", "nonzero_mask": False}
    ]
    assert len(metadata["split"]["validation"]) == 3  # 12 cases, 4 folds
    assert metadata["fingerprint"]["num_cases"] == 12
    assert set(metadata["versions"]) == {"medseg", "keras", "tensorflow", "python"}
    # the 9 training scans profiled for predict's out-of-distribution check
    ood = metadata["ood"]
    assert ood["scans"] == 9 and ood["features"]["layer"] == "bottleneck_act2"
    assert len(ood["features"]["mean"]) == 8  # the bottleneck's channels
    assert len(ood["intensity"]["mean"]) == 7 and ood["intensity"]["threshold"] > 0
    model = load_model(run)
    x = np.zeros((1, 32, 32, 32, 1), np.float32)
    assert model(x).shape == (1, 32, 32, 32, 3)
    again = subprocess.run(_train_command(config, run), capture_output=True, text=True)
    assert again.returncode == 2
    assert "holds a training run already; pass --resume" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_exactly_the_requested_epochs(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TRAIN.format(epochs=3, steps=6))
    run = tmp_path / "run"
    process = subprocess.Popen(  # --resume from the start, as a requeued job has it
        _train_command(config, run, "--resume"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert killed_at in (1, 2)
    resumed = subprocess.run(
        _train_command(config, run, "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {killed_at}" in resumed.stderr
    assert [r["epoch"] for r in _history(run / "history.csv")] == ["1", "2", "3"]
    assert json.loads(state.read_text())["epoch"] == 3
    assert not (run / ".checkpoint.partial").exists()


@pytest.mark.slow
def test_a_run_is_not_resumed_on_a_dataset_changed_since_it_started(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TRAIN.format(epochs=1, steps=1))
    run = tmp_path / "run"

    def train(*extra):
        return subprocess.run(
            [sys.executable, "-m", "medseg_cli", "train", "--config", str(config),
             "--data", str(data), "--output", str(run), *extra],
            capture_output=True, text=True,
        )  # fmt: skip

    assert train().returncode == 0
    resumed = train("--resume", "--epochs", "2")  # the same dataset: resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1" in resumed.stderr
    manifest = json.loads((data / "dataset.json").read_text())
    gone = manifest["training"].pop(0)  # a case taken out, another put in
    for key in ("image", "label"):
        shutil.copy(data / gone[key], data / gone[key].replace("_003", "_903"))
    manifest["training"].append({k: v.replace("_003", "_903") for k, v in gone.items()})
    (data / "dataset.json").write_text(json.dumps(manifest))
    refused = train("--resume", "--epochs", "3")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Error: {run}: cannot resume: the dataset has changed since this run started "
        "(cases added since: hippocampus_903; gone since: hippocampus_003), so fold 0 "
        "would train and validate on other cases; restore the dataset as it was, or "
        "start a new run in another folder"
    )
    assert [r["epoch"] for r in _history(run / "history.csv")] == ["1", "2"]


def test_resuming_refuses_scans_planned_otherwise_since_and_old_checkpoints_pass(
    tmp_path,
):
    from medseg.training.run_files import PLANNED_FILE, check_resumable

    metadata = {
        "split": {"fold": 1, "folds": 5, "train": ["a", "b"], "validation": ["c"]},
        "plan": {"patch_size": [16, 16, 16], "target_spacing_mm": [1.0, 1.0, 1.0]},
        "preprocessing": {"normalizers": [{"kind": "ct", "clip": [-100.0, 300.5]}]},
        "labels": {"0": "background"},  # not a planned key: free to differ
    }
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text('{"epoch": 3, "best": null}')
    check_resumable(tmp_path, metadata)  # a checkpoint of an older medseg: passes
    planned = {k: metadata[k] for k in ("split", "plan", "preprocessing")}
    (checkpoint / PLANNED_FILE).write_text(json.dumps(planned))
    check_resumable(tmp_path, {**metadata, "labels": {}})
    clipped = {"normalizers": [{"kind": "ct", "clip": [-100.0, 300.25]}]}
    with pytest.raises(InputFileError) as caught:
        check_resumable(tmp_path, {**metadata, "preprocessing": clipped})
    assert str(caught.value) == (
        f"{tmp_path}: cannot resume: the dataset's scans have changed since this run "
        "started (its preprocessing would now differ); restore the dataset as it "
        "was, or start a new run in another folder"
    )
    moved = {**metadata["split"], "train": ["a", "c"], "validation": ["b"]}
    with pytest.raises(InputFileError, match=r"started, so fold 1 would train and "):
        check_resumable(tmp_path, {**metadata, "split": moved})
    every = {"fold": "all", "folds": 5, "train": ["a", "b", "c"], "validation": []}
    (checkpoint / PLANNED_FILE).write_text(json.dumps({**planned, "split": every}))
    more = {**every, "train": ["a", "b", "c", "d"]}
    with pytest.raises(InputFileError) as caught:
        check_resumable(tmp_path, {**metadata, "split": more})
    assert "(cases added since: d), so it would train on other cases;" in str(
        caught.value
    )
    # a classification run's dataset: its splits' sizes, wherever it is now
    planned["dataset"] = {"path": "/old/x.npz", "splits": {"train": 9, "val": 3}}
    (checkpoint / PLANNED_FILE).write_text(json.dumps(planned))
    moved = {
        **metadata,
        "dataset": {"path": "/new/x.npz", "splits": {"train": 9, "val": 3}},
    }
    check_resumable(tmp_path, moved)
    moved["dataset"]["splits"]["val"] = 4
    with pytest.raises(InputFileError, match=r"\(its dataset would now differ\)"):
        check_resumable(tmp_path, moved)


@pytest.mark.slow
def test_reconstruction_training_writes_an_autoencoder_bundle(tmp_path):
    from medseg import bundle
    from medseg.models import build_unet, load_model, transfer_encoder_weights

    config = tmp_path / "ae.yaml"
    config.write_text(
        "model: {name: autoencoder, spatial_dims: 3, filters: [4, 8], "
        "patch_size: [16, 16, 16], denoising: true}\n"
        "data: {task: reconstruction}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 2, optimizer: adam, "
        "learning_rate: 0.001, folds: 4, augment: {mirror_axes: [0, 2]}}\n"
    )
    run = tmp_path / "ae"
    result = subprocess.run(_train_command(config, run), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _history(run / "history.csv")
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["val_mse"]) > 0
    metadata = bundle.verify(run)
    assert metadata["task"] == "reconstruction" and metadata["labels"] is None
    autoencoder = load_model(run)
    unet = build_unet(spatial_dims=3, in_channels=1, num_classes=2, filters=(4, 8))
    report = transfer_encoder_weights(autoencoder, unet)
    assert report["skipped"] == {} and "enc0_conv1" in report["matched"]


def test_auc_matches_pairwise_reference(rng):
    from medseg.evaluation.classification import binary_auc
    from tests import reference

    scores = np.round(rng.random(60), 1)  # rounding makes ties
    positive = rng.random(60) < 0.4
    assert binary_auc(scores, positive) == pytest.approx(
        reference.pairwise_auc(scores, positive)
    )
    assert np.isnan(binary_auc(scores, np.zeros(60, bool)))


def test_classification_scores_by_hand():
    from medseg.evaluation.classification import classification_scores

    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    scores = classification_scores(probabilities, labels)
    # predictions 0, 0, 1, 1: 3 of 4 right; recalls 1/1 and 2/3; every positive scores
    # above the one negative (0.4, 0.7, 0.8 > 0.1): AUC 1
    assert scores == {
        "accuracy": 0.75,
        "balanced_accuracy": pytest.approx(5 / 6),
        "auc": 1.0,
    }


@pytest.mark.slow
def test_classification_training_on_a_medmnist_style_npz(tmp_path, rng):
    from medseg import bundle

    npz, config = tiny_classification(tmp_path, rng)
    command = _train_command(config, tmp_path / "run")
    command[command.index("--data") + 1] = str(npz)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _history(tmp_path / "run" / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"accuracy", "val_accuracy", "val_auc", "val_balanced_accuracy"} <= set(
        rows[0]
    )
    metadata = bundle.verify(tmp_path / "run")
    assert metadata["task"] == "classification" and metadata["patch_size"] == [
        12,
        12,
        12,
    ]
    assert metadata["dataset"]["splits"] == {"train": 40, "val": 10}


def test_a_setting_that_cannot_work_is_reported_against_the_config(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model: {name: unet, spatial_dims: 3, filters: [4, 8, 16], "
        "patch_size: [18, 16, 16]}\n"
        "train: {epochs: 1, steps_per_epoch: 1, batch_size: 2, folds: 4, "
        "augment: {mirror_axes: [0, 2]}}\n"
    )
    result = subprocess.run(
        _train_command(config, tmp_path / "run"), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        f"Error: {config}: patch_size (18, 16, 16): each size must be divisible by "
        "2**depth = 4"
    ) in result.stderr


def test_checkpoint_restores_dropout_randomness(tmp_path):
    import keras

    from medseg.models import build_unet
    from medseg.training.run_files import restore_checkpoint, save_checkpoint

    def model():
        net = build_unet(
            spatial_dims=2, in_channels=1, num_classes=2, filters=(4, 8), dropout=0.3
        )
        net.compile(optimizer="adam", loss="mse")
        net.optimizer.build(net.trainable_variables)
        return net

    x = np.random.default_rng(0).random((2, 16, 16, 1)).astype("float32")
    first = model()
    for _ in range(3):
        first(x, training=True)  # move the dropout state on
    save_checkpoint(tmp_path, first, 3, None)
    second = model()
    assert restore_checkpoint(tmp_path, second) == (3, None)
    a = keras.ops.convert_to_numpy(first(x, training=True))
    b = keras.ops.convert_to_numpy(second(x, training=True))
    np.testing.assert_array_equal(a, b)  # the same dropout masks from here on
    again = keras.ops.convert_to_numpy(first(x, training=True))
    assert not np.array_equal(a, again)  # dropout is on: masks differ call to call


def test_a_checkpoint_of_another_network_is_one_error_naming_it(tmp_path):
    from medseg.models import build_unet
    from medseg.training.run_files import restore_checkpoint, save_checkpoint

    def model(filters):
        net = build_unet(spatial_dims=2, in_channels=1, num_classes=2, filters=filters)
        net.compile(optimizer="adam", loss="mse")
        return net

    save_checkpoint(tmp_path, model((4, 8)), 3, None)
    with pytest.raises(InputFileError) as caught:
        restore_checkpoint(tmp_path, model((4, 8, 16)))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'checkpoint'}: its weights do not fit")
    assert "\n" not in message


@pytest.mark.parametrize("shape", [(8, 12, 16), (12, 8)])
def test_deep_supervision_targets_take_each_blocks_centre_label(shape, rng):
    label = rng.integers(0, 3, size=(*shape, 1)).astype(np.int32)
    targets = training_data.deep_supervision_targets(tf.constant(label), 2)
    assert len(targets) == 3
    np.testing.assert_array_equal(targets[0], label)
    for level, target in enumerate(targets[1:], start=1):
        expected = reference.block_centre_labels(label, 2**level)
        np.testing.assert_array_equal(np.asarray(target), expected)


def test_deep_supervision_trains_on_weighted_outputs_and_bundles_full_resolution(
    tmp_path,
):
    from medseg.config import load_config
    from medseg.models import build_model, load_model

    config = tmp_path / "ds.yaml"
    config.write_text(
        TINY_TRAIN.format(epochs=1, steps=2).replace(
            "filters: [4, 8]", "filters: [4, 8, 16, 32]\n  deep_supervision: 2"
        )
    )
    run = tmp_path / "run"
    result = subprocess.run(_train_command(config, run), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = _history(run / "history.csv")
    # the Dice columns are the full-resolution output's; the loss weighs the outputs'
    # losses 4/7, 2/7, 1/7 (halving per level, summing to 1)
    assert {"dice_1", "dice_2", "val_dice_mean"} <= set(row)
    parts = [
        float(row[k]) for k in ("logits_loss", "logits_ds1_loss", "logits_ds2_loss")
    ]
    expected = sum(w * p for w, p in zip((4 / 7, 2 / 7, 1 / 7), parts, strict=True))
    assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)
    assert len(set(parts)) == 3
    model = load_model(run)
    assert [t.shape for t in model.outputs] == [(None, None, None, None, 3)]
    names = {layer.name for layer in model.layers}
    assert "logits" in names and not any(n.startswith("logits_ds") for n in names)
    # the bundle's layers hold the weights of the same layers of the trained
    # deep-supervised network (its checkpoint)
    trained_config = load_config(run / "config.yaml").model
    trained = build_model(
        "unet", **{**trained_config.builder_kwargs(), "patch_size": None}
    )
    assert len(trained.outputs) == 3
    trained.load_weights(run / "checkpoint" / "model.weights.h5")
    for layer in model.layers:
        for got, want in zip(
            layer.get_weights(),
            trained.get_layer(layer.name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    x = np.zeros((1, 16, 16, 16, 1), np.float32)
    assert model(x).shape == (1, 16, 16, 16, 3)


def test_deep_supervision_with_valid_padding_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "ds.yaml"
    config.write_text(
        TINY_TRAIN.format(epochs=1, steps=1).replace(
            "filters: [4, 8]",
            "filters: [4, 8, 16]\n  deep_supervision: 1\n  padding: valid",
        )
    )
    result = subprocess.run(
        _train_command(config, tmp_path / "run"), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "model.deep_supervision needs padding: same" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("keep", "epoch"), [("best", 2), ("last", 4)])
def test_the_bundle_is_the_best_or_the_last_validated_epoch(
    tmp_path, monkeypatch, caplog, keep, epoch
):
    from medseg import bundle
    from medseg.config import load_config
    from medseg.models import load_model
    from medseg.training import fitting, trainer

    scores = iter([0.5, 0.7, 0.6, 0.4])  # validation Dice of epochs 1 to 4

    def scripted(model, run):
        score = next(scores)
        return {"val_dice_1": score, "val_dice_2": score, "val_dice_mean": score}

    monkeypatch.setattr(fitting, "validate", scripted)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        TINY_TRAIN.format(epochs=4, steps=1)
        + f"  val_interval: 1\n  keep: {keep}\ndata:\n  dataset: {SAMPLE}\n"
    )
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="medseg.training.trainer"):
        trainer.train(load_config(path), run, verbose=0)
    # a run that picks its epoch on its held-out cases says so
    said = "best validation score on the 3 held-out cases of fold 0" in caplog.text
    assert said == (keep == "best")
    metadata = bundle.verify(run)
    assert metadata["epoch"] == epoch
    assert metadata["validation"]["val_dice_mean"] == [0.5, 0.7, 0.6, 0.4][epoch - 1]
    assert metadata["config"]["train"]["keep"] == keep
    final = load_model(run)  # the checkpoint holds the weights after epoch 4
    final.load_weights(run / "checkpoint" / "model.weights.h5")
    same = [
        np.array_equal(a, b)
        for a, b in zip(load_model(run).get_weights(), final.get_weights(), strict=True)
    ]
    assert all(same) if keep == "last" else not all(same)
    # resuming the finished run reads no data and leaves the bundle as it is
    stamp = (run / "model.keras").stat().st_mtime_ns

    def unread(config):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(trainer, "_checked_dataset", unread)
    assert trainer.train(load_config(path), run, resume=True, verbose=0) == run
    assert (run / "model.keras").stat().st_mtime_ns == stamp


def test_precision_on_a_cpu_trains_float16_as_float32_and_warns_of_slow_bfloat16(
    monkeypatch, caplog
):
    from medseg.training.runtime import precision_policy

    def config(precision):
        return Config.from_dict(
            {"model": {"name": "unet"}, "train": {"precision": precision}}
        )

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(
        "medseg.inference.precision.cpu_lacks_onednn_bfloat16", lambda: True
    )
    assert precision_policy(config("auto")) == "float32"
    assert precision_policy(config("float32")) == "float32"
    with caplog.at_level("WARNING", logger="medseg"):
        assert precision_policy(config("mixed_float16")) == "float32"
    assert "mixed_float16 is for GPUs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg"):
        assert precision_policy(config("mixed_bfloat16")) == "mixed_bfloat16"
    assert "no AVX-512" in caplog.text
    caplog.clear()
    monkeypatch.setattr(
        "medseg.inference.precision.cpu_lacks_onednn_bfloat16", lambda: False
    )
    with caplog.at_level("WARNING", logger="medseg"):
        assert precision_policy(config("mixed_bfloat16")) == "mixed_bfloat16"
    assert caplog.text == ""
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu"])
    assert precision_policy(config("auto")) == "mixed_float16"
    assert precision_policy(config("mixed_float16")) == "mixed_float16"


def test_a_run_refused_before_it_writes_anything_leaves_no_folder(tmp_path):
    from medseg.errors import ConfigError
    from medseg.training import trainer

    config = Config.from_dict(
        {
            "model": {
                "name": "unet",
                "filters": [4, 8],
                "deep_supervision": 1,
                "padding": "valid",
            },
            "data": {"dataset": str(SAMPLE)},
            "train": {"epochs": 1},
        }
    )
    run = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="deep_supervision needs padding: same"):
        trainer.train(config, run, verbose=0)
    assert not run.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ConfigError, match="deep_supervision needs padding: same"):
        trainer.train(config, existing, verbose=0)
    assert existing.is_dir() and not any(existing.iterdir())
    # refused after the run wrote its config.yaml: that goes too
    frozen = Config.from_dict(
        {
            "model": {"name": "unet", "filters": [4, 8]},
            "data": {"dataset": str(SAMPLE)},
            "train": {"epochs": 1, "freeze": ["nothing_called_this*"]},
        }
    )
    for folder in (run, existing):
        with pytest.raises(ConfigError, match="matches no layer"):
            trainer.train(frozen, folder, verbose=0)
    assert not run.exists()
    assert existing.is_dir() and not any(existing.iterdir())
    # a config.yaml that was there before the run is not the run's to remove
    (existing / "config.yaml").write_text("kept: true\n")
    with pytest.raises(ConfigError, match="matches no layer"):
        trainer.train(frozen, existing, verbose=0)
    assert [p.name for p in existing.iterdir()] == ["config.yaml"]


def test_a_second_training_run_in_a_run_folder_is_refused_while_the_first_lives(
    tmp_path,
):
    import socket

    from medseg.errors import InputFileError
    from medseg.io import hold_folder
    from medseg.training import trainer

    config = Config.from_dict(
        {
            "model": {"name": "unet", "filters": [4, 8]},
            "data": {"dataset": str(SAMPLE)},
            "train": {"epochs": 1, "steps_per_epoch": 1},
        }
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text("epoch\n")  # the first run's files, untouched
    lock = run / trainer.TRAIN_LOCK
    # the first run, in its own process (as a job its scheduler started twice)
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from medseg.io import hold_folder; "
            f"held = hold_folder(Path({str(run)!r}), {trainer.TRAIN_LOCK!r}, "
            "what='run', advice='wait'); print('held', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "held"
        started = lock.read_text().split("started ")[1].strip()
        for resume in (True, False):
            with pytest.raises(InputFileError) as info:
                trainer.train(config, run, resume=resume, verbose=0)
            assert str(info.value) == (
                f"{run}: another medseg train run is writing this folder (pid "
                f"{first.pid} on {socket.gethostname()}, started {started}); wait "
                "for it to end, or train into another --output"
            )
        assert sorted(p.name for p in run.iterdir()) == [lock.name, "history.csv"]
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # killed, it holds nothing; a lock released goes with its file
    held = hold_folder(run, trainer.TRAIN_LOCK, what="run", advice="wait")
    assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    held.release()
    assert [p.name for p in run.iterdir()] == ["history.csv"]


def test_pictures_for_a_3d_network_are_refused_by_name(tmp_path):
    from skimage import io as skio

    from medseg.training import trainer

    pictures = tmp_path / "pictures"
    for name in ("a", "b", "c", "d"):
        for kind, value in (("image", 90), ("label", 1)):
            array = np.zeros((24, 20), np.uint8)
            array[5:15, 4:12] = value
            (pictures / kind).mkdir(parents=True, exist_ok=True)
            skio.imsave(pictures / kind / f"{name}.png", array, check_contrast=False)
    config = Config.from_dict(
        {
            "model": {"name": "unet", "spatial_dims": 3, "filters": [4, 8]},
            "data": {"dataset": str(pictures), "labels": {0: "bg", 1: "fg"}},
            "train": {"epochs": 1},
        }
    )
    run = tmp_path / "run"
    with pytest.raises(InputFileError) as caught:
        trainer.train(config, run, verbose=0)
    assert str(caught.value) == (
        f"{pictures}: 2D scans (median 24 x 20), but the config's model is 3D "
        "(model.spatial_dims: 3)"
    )
    assert not run.exists()
