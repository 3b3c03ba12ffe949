from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.bundle import shipped_models
from medseg.models import build_autoencoder, build_unet
from medseg.models.transfer import adapt_weights, freeze_layers
from tests.conftest import SAMPLE
from tests.conftest import run_medseg as medseg


def _unet(in_channels, num_classes, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    return build_unet(
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=num_classes,
        filters=(4, 8),
        norm="batch",
    )


def test_weights_are_copied_adapted_or_initialised_by_fit():
    source = _unet(1, 3, seed=1)
    target = _unet(2, 2, seed=2)
    fresh_logits = [w.copy() for w in target.get_layer("logits").get_weights()]
    report = adapt_weights(source, target)
    assert set(report["initialised"]) == {"logits"}
    assert list(report["adapted"]) == ["enc0_conv1"]
    for name in report["copied"]:
        for a, b in zip(
            source.get_layer(name).get_weights(),
            target.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(
        fresh_logits, target.get_layer("logits").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # left as initialised
    old_kernel, *old_rest = source.get_layer("enc0_conv1").get_weights()
    new_kernel, *new_rest = target.get_layer("enc0_conv1").get_weights()
    assert new_kernel.shape == (3, 3, 2, 4)
    for c in range(2):  # the mean over 1 channel, halved for each of 2 channels
        np.testing.assert_allclose(new_kernel[:, :, c], old_kernel[:, :, 0] / 2)
    assert len(new_rest) == len(old_rest)
    for a, b in zip(old_rest, new_rest, strict=True):  # a bias, where there is one
        np.testing.assert_array_equal(a, b)
    # so a constant image gives the first convolution the same response as before
    import keras

    ones1, ones2 = np.ones((1, 8, 8, 1), "float32"), np.ones((1, 8, 8, 2), "float32")
    first = keras.Model(source.input, source.get_layer("enc0_conv1").output)
    second = keras.Model(target.input, target.get_layer("enc0_conv1").output)
    np.testing.assert_allclose(first(ones1), second(ones2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("new", "sources", "section"),
    [
        # the same labels in another order: each keeps what it learnt
        (["background", "Posterior", "Anterior"], [0, 2, 1], "adapted"),
        # one label of the pretrained set, one new: the new one starts afresh
        (["Background", "tumour", "anterior"], [0, None, 1], "adapted"),
        (["background", "posterior"], [0, 2], "adapted"),  # fewer classes
        (["liver", "spleen", "kidney"], [None, None, None], "initialised"),
    ],
)
def test_output_classes_take_the_pretrained_output_of_their_name(new, sources, section):
    old = ["background", "Anterior", "Posterior"]

    def unet(classes):
        return build_unet(
            spatial_dims=2,
            in_channels=1,
            num_classes=classes,
            filters=(4, 8, 16),
            deep_supervision=1,
        )

    source, target = unet(3), unet(len(new))
    heads = ("logits", "logits_ds1")
    fresh = {n: [w.copy() for w in target.get_layer(n).get_weights()] for n in heads}
    report = adapt_weights(source, target, classes=(old, new))
    for name in heads:
        assert name in report[section] and name not in report["copied"]
        pretrained = source.get_layer(name).get_weights()  # kernel, bias
        for k, j in enumerate(sources):
            for got, was, start in zip(
                target.get_layer(name).get_weights(), pretrained, fresh[name],
                strict=True,
            ):  # fmt: skip
                np.testing.assert_array_equal(
                    got[..., k], start[..., k] if j is None else was[..., j]
                )
    if section == "adapted":
        kept = [n for n, j in zip(new, sources, strict=True) if j is not None]
        assert report["adapted"]["logits"].startswith(
            f"classes by name from the pretrained ones: {', '.join(kept)}"
        )
    # one label set in one order: copied as any layer (names compared loosely)
    same = _unet(1, 3, seed=3)
    report = adapt_weights(source, same, classes=(old, ["Background", "anterior",
                                                          "posterior"]))  # fmt: skip
    assert "logits" in report["copied"]
    np.testing.assert_array_equal(
        same.get_layer("logits").get_weights()[0],
        source.get_layer("logits").get_weights()[0],
    )


def test_encoder_only_from_an_autoencoder_and_glob_freezing():
    autoencoder = build_autoencoder(spatial_dims=2, in_channels=1, filters=(4, 8))
    unet = _unet(1, 2)
    report = adapt_weights(autoencoder, unet, prefixes=("enc", "bottleneck"))
    assert report["copied"] and all(
        n.startswith(("enc", "bottleneck")) for n in report["copied"]
    )
    assert not any(n.startswith("dec") for n in report["copied"])
    frozen = freeze_layers(unet, ["enc*"])
    assert frozen == [layer.name for layer in unet.layers if layer.name[:3] == "enc"]
    assert all(not unet.get_layer(n).trainable for n in frozen)
    assert unet.get_layer("logits").trainable


@pytest.fixture(scope="module")
def pretrained(bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained")
    whole = folder / "whole"  # the sample with one label: the whole hippocampus
    shutil.copytree(SAMPLE, whole)
    manifest = json.loads((whole / "dataset.json").read_text())
    manifest["labels"] = {"0": "background", "1": "hippocampus"}
    (whole / "dataset.json").write_text(json.dumps(manifest))
    for path in (whole / "labelsTr").glob("*.nii.gz"):
        img = nib.load(path)
        merged = (np.asanyarray(img.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(merged, img.affine, img.header), path)
    return bundle, whole


def _weights(folder):
    from medseg.models import load_model

    return {layer.name: layer.get_weights() for layer in load_model(folder).layers}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tiny", "hippocampus"])
def test_finetune_to_one_label_keeps_frozen_encoder_bit_identical(
    pretrained, tmp_path, source
):
    from medseg.bundle import resolve

    bundle, whole = pretrained
    name = bundle if source == "tiny" else source  # the shipped model, by name
    bundle = resolve(name)
    out = tmp_path / "ft"
    result = medseg(
        "finetune",
        "--model",
        name,
        "--data",
        whole,
        "--output",
        out,
        "--freeze",
        "enc*",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the shipped model trained to a time budget; this run is --epochs long
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 2
    before, after = _weights(bundle), _weights(out)
    encoder = [n for n in before if n.startswith("enc") and before[n]]
    assert encoder
    for name in encoder:
        for a, b in zip(before[name], after[name], strict=True):
            np.testing.assert_array_equal(a, b)
    assert after["logits"][0].shape[-1] == 2  # background + hippocampus
    changed = [
        n
        for n in after
        if n.startswith("dec")
        and after[n]
        and any(
            not np.array_equal(a, b) for a, b in zip(before[n], after[n], strict=True)
        )
    ]
    assert changed  # the rest did train
    metadata = json.loads((out / "medseg.json").read_text())
    pretrained_meta = json.loads((bundle / "medseg.json").read_text())
    assert metadata["labels"] == {
        "0": {"value": 0, "name": "background"},
        "1": {"value": 1, "name": "hippocampus"},
    }
    assert metadata["preprocessing"] == pretrained_meta["preprocessing"]
    assert metadata["patch_size"] == pretrained_meta["patch_size"]
    origin = metadata["finetuned_from"]
    assert origin["model_sha256"] == pretrained_meta["model_sha256"]
    # the output layer rebuilt for the new labels: background kept, as named
    assert origin["weights"]["initialised"] == {}
    assert origin["weights"]["adapted"] == {
        "logits": "classes by name from the pretrained ones: background; initialised "
        "afresh: hippocampus"
    }
    assert metadata["config"]["train"]["freeze"] == ["enc*"]
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(out / "model.keras") as archive:  # weights only
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        assert "optimizer" not in weights
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = medseg(
        "predict", "--model", out, "--input", scan, "--output", tmp_path / "p"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    labels = np.asanyarray(nib.load(tmp_path / "p" / scan.name).dataobj)
    assert labels.shape == nib.load(scan).shape and set(np.unique(labels)) <= {0, 1}


@pytest.mark.slow
def test_unfreeze_after_trains_the_encoder_from_that_epoch(pretrained, tmp_path):
    from medseg.models import load_model

    bundle, whole = pretrained
    out = tmp_path / "ft"
    result = medseg(
        "finetune",
        "--model",
        bundle,
        "--data",
        whole,
        "--output",
        out,
        "--freeze",
        "enc*",
        "--unfreeze-after",
        "1",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1: every layer trainable from here on" in result.stderr
    model = load_model(out)
    model.load_weights(out / "checkpoint" / "model.weights.h5")  # after epoch 2
    before = _weights(bundle)
    moved = [
        layer.name
        for layer in model.layers
        if layer.name.startswith("enc")
        and layer.get_weights()
        and any(
            not np.array_equal(a, b)
            for a, b in zip(before[layer.name], layer.get_weights(), strict=True)
        )
    ]
    assert moved


def test_finetune_refuses_a_classification_bundle_and_needs_data(tmp_path):
    from medseg.bundle import read_metadata, resolve

    (tmp_path / "cls").mkdir()
    record = read_metadata(resolve("hippocampus")).to_dict()
    record["task"] = "classification"
    (tmp_path / "cls" / "medseg.json").write_text(json.dumps(record))
    result = medseg("finetune", "--model", tmp_path / "cls", "--output", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fine-tuning takes a segmentation or reconstruction bundle" in result.stderr


@pytest.mark.slow
def test_export_savedmodel_round_trip(pretrained, tmp_path):
    import tensorflow as tf

    from medseg.models import load_model

    bundle, _ = pretrained
    out = tmp_path / "served"
    result = medseg("export", "--model", bundle, "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class probabilities match the bundle's within" in result.stdout
    metadata = json.loads((out / "medseg.json").read_text())
    original = json.loads((bundle / "medseg.json").read_text())
    assert metadata["preprocessing"] == original["preprocessing"]
    assert metadata["labels"] == original["labels"]
    assert metadata["export"]["format"] == "savedmodel"
    served = tf.saved_model.load(str(out))
    x = np.random.default_rng(5).normal(size=(2, 24, 32, 16, 1)).astype(np.float32)
    expected = np.asarray(load_model(bundle)(x, training=False))
    np.testing.assert_allclose(
        np.asarray(served.serve(tf.constant(x))), expected, atol=1e-4
    )
    again = medseg("export", "--model", bundle, "--output", out)
    assert again.returncode == 2 and "exists already" in again.stderr
    assert not list(tmp_path.glob(".served.*"))


def test_export_onnx_round_trip_carries_the_metadata(pretrained, tmp_path):
    import onnx
    import onnxruntime

    from medseg.models import load_model

    bundle, _ = pretrained
    out = tmp_path / "onnx"
    result = medseg("export", "--model", bundle, "--format", "onnx", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    original = json.loads((bundle / "medseg.json").read_text())
    beside = json.loads((out / "medseg.json").read_text())
    embedded = {
        p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props
    }
    assert json.loads(embedded["medseg.json"]) == beside
    assert beside["preprocessing"] == original["preprocessing"]
    assert beside["export"]["format"] == "onnx"
    session = onnxruntime.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert session.get_inputs()[0].name == "image"
    x = np.random.default_rng(6).normal(size=(2, 24, 32, 16, 1)).astype(np.float32)
    expected = np.asarray(load_model(bundle)(x, training=False))
    np.testing.assert_allclose(session.run(None, {"image": x})[0], expected, atol=1e-4)
    assert not list(tmp_path.glob(".onnx.*"))


def test_exports_are_held_to_the_class_probabilities_of_the_bundle():
    # logits of a hundred (a trained network's) differ between runtimes by 1e-4 from
    # float32 rounding alone; the probabilities predict uses by less (at most half)
    from medseg.export import output_difference

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=60.0, size=(2, 5, 4, 3))
    rounded = logits + rng.uniform(-2e-4, 2e-4, size=logits.shape)
    segmentation = {"task": "segmentation"}
    gap, compared = output_difference(segmentation, rounded, logits)
    assert compared == "class probabilities" and gap < 1e-4
    assert np.max(np.abs(rounded - logits)) > 1e-4  # logits alone would be refused
    soft = logits / 60.0  # near ties: a real disagreement shows
    swapped = soft.copy()
    swapped[0, 0, 0] = soft[0, 0, 0, ::-1]
    probabilities = np.exp(soft) / np.exp(soft).sum(-1, keepdims=True)
    gap, _ = output_difference(segmentation, swapped, soft)
    assert gap == pytest.approx(
        np.max(np.abs(probabilities[0, 0, 0] - probabilities[0, 0, 0, ::-1]))
    )
    # an autoencoder's outputs: to their scale
    image = rng.normal(scale=500.0, size=(1, 4, 4, 1))
    gap, compared = output_difference({"task": "reconstruction"}, image + 0.01, image)
    assert compared == "outputs (to scale)"
    assert gap == pytest.approx(0.01 / np.max(np.abs(image)))


@pytest.mark.slow
def test_the_shipped_model_exports_to_onnx_within_the_tolerance(tmp_path):
    # its logits reach about 140: they differed from onnxruntime's by 1.1e-4 on this
    # CPU, which the export refused when it compared logits
    from medseg.bundle import resolve
    from medseg.export import TOLERANCE

    out = tmp_path / "onnx"
    result = medseg(
        "export", "--model", "hippocampus", "--format", "onnx", "--output", out
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "medseg.json").read_text())["export"]
    assert record["checked"] == "class probabilities"
    assert record["checked_max_abs_difference"] <= TOLERANCE
    assert (
        json.loads((resolve("hippocampus") / "medseg.json").read_text())["labels"]
        == json.loads((out / "medseg.json").read_text())["labels"]
    )


def test_onnx_export_without_the_extra_names_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from medseg.errors import InputFileError
    from medseg.export import export_bundle

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tf2onnx" else real(name, *a),
    )
    with pytest.raises(
        InputFileError, match=r"needs tf2onnx: pip install 'medseg\[onnx\]'"
    ):
        export_bundle(tmp_path / "bundle", tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists()


def test_finetune_names_scans_of_other_dimensions_than_the_pretrained_model(tmp_path):
    result = medseg(
        "finetune", "--model", "membrane", "--data", SAMPLE, "--output", tmp_path / "o"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(
        f"Error: {SAMPLE}: 3D scans (median 36 x 49 x 36), but the pretrained model "
        f"{shipped_models()['membrane']} was trained on 2D scans"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_finetune_trains_to_its_time_budget_through_the_unfreezing(
    pretrained, tmp_path, monkeypatch
):
    import csv

    import yaml

    # the run's own CPU time: on a busy machine its wall-clock budget could end
    # before the second epoch, where the unfreezing happens
    monkeypatch.setenv("MEDSEG_BUDGET_CLOCK", "cpu")
    bundle, whole = pretrained
    out = tmp_path / "ft"
    result = medseg(
        "finetune",
        "--model",
        bundle,
        "--data",
        whole,
        "--output",
        out,
        "--freeze",
        "enc*",
        "--unfreeze-after",
        "1",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--time-budget",
        "10s",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1: every layer trainable from here on" in result.stderr
    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the budget ended the run, in the first epoch that reached it
    assert len(rows) > 2 and float(rows[-2]["elapsed"]) <= 10.0
    assert float(rows[-1]["elapsed"]) >= 10.0
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["time_budget"] == 10.0 and saved["init_from"] == str(bundle)


@pytest.mark.slow
def test_finetune_from_an_autoencoder_starts_a_unet_from_its_encoder(tmp_path):
    """An autoencoder bundle gives a U-Net of its encoder: with the encoder frozen,
    the fine-tuned bundle's encoder is the autoencoder's, bit for bit, and it
    segments the sample's scans on their own grids."""
    config = tmp_path / "ae.yaml"
    config.write_text(
        "model: {name: autoencoder, spatial_dims: 3, filters: [4, 8], "
        "patch_size: [16, 16, 16]}\n"
        "data: {task: reconstruction}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 2, optimizer: adam, "
        "learning_rate: 0.001, folds: 4}\n"
    )
    autoencoder = tmp_path / "ae"
    result = medseg(
        "train", "--config", config, "--data", SAMPLE, "--output", autoencoder
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ft"
    result = medseg(
        "finetune", "--model", autoencoder, "--data", SAMPLE, "--output", out,
        "--freeze", "enc*", "--freeze", "bottleneck*",
        "--epochs", "1", "--steps-per-epoch", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((out / "medseg.json").read_text())
    assert metadata["task"] == "segmentation"
    assert metadata["config"]["model"]["name"] == "unet"
    assert metadata["config"]["model"]["filters"] == [4, 8]
    assert metadata["finetuned_from"]["task"] == "reconstruction"
    before, after = _weights(autoencoder), _weights(out)
    encoder = [n for n in after if n.startswith(("enc", "bottleneck")) and after[n]]
    assert encoder
    for name in encoder:
        for a, b in zip(before[name], after[name], strict=True):
            np.testing.assert_array_equal(a, b)
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = medseg(
        "predict", "--model", out, "--input", scan, "--output", tmp_path / "p"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    labels = np.asanyarray(nib.load(tmp_path / "p" / scan.name).dataobj)
    assert labels.shape == nib.load(scan).shape
