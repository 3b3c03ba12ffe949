from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.models import (
    build_autoencoder,
    build_classifier,
    build_model,
    build_unet,
    load_model,
    transfer_encoder_weights,
    unet_output_size,
    valid_unet_input_sizes,
    weights_dtype,
    with_precision,
    with_weights_dtype,
)
from medseg.models.classifier import ARCHITECTURES
from medseg.models.info import describe_model, receptive_field
from medseg.models.unet import UPSAMPLING_MODES
from tests.conftest import bundle_record

TINY = dict(filters=(4, 8, 16), norm="batch")


def _same_after_save(model, tmp_path, x):
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    loaded = load_model(path)
    for a, b in zip(
        keras.tree.flatten(model(x)), keras.tree.flatten(loaded(x)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return loaded


# U-Net


@pytest.mark.parametrize("upsampling", UPSAMPLING_MODES)
@pytest.mark.parametrize(("dims", "size"), [(2, 64), (3, 32)])
def test_unet_every_upsampling_keeps_the_input_size(upsampling, dims, size, rng):
    model = build_unet(
        spatial_dims=dims, in_channels=2, num_classes=3, upsampling=upsampling, **TINY
    )
    x = rng.random((1, *(size,) * dims, 2)).astype(np.float32)
    assert model(x).shape == (1, *(size,) * dims, 3)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    assert names[-1] == "logits" and names[0] == "image"
    assert {n.split("_")[0] for n in names} <= {
        "image",
        "enc0",
        "enc1",
        "bottleneck",
        "dec0",
        "dec1",
        "logits",
    }


def test_unet_tiny_parameter_count_by_hand():
    model = build_unet(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        filters=(4, 8),
        convs_per_level=1,
        norm="none",
    )
    # enc0_conv1 3*3*1*4+4 = 40; bottleneck_conv1 3*3*4*8+8 = 296;
    # dec0_up 2*2*8*4+4 = 132; dec0_conv1 3*3*8*4+4 = 292; logits 4*2+2 = 10
    assert model.count_params() == 40 + 296 + 132 + 292 + 10 == 770


def test_unet_3d_pinned_parameter_count():
    model = build_unet(
        spatial_dims=3, in_channels=1, num_classes=3, filters=(8, 16, 32)
    )
    assert model.count_params() == 85_195


def test_unet_options_all_together_survive_save_and_load(rng, tmp_path):
    model = build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=2,
        filters=(4, 8, 8),
        upsampling="max_unpool",
        residual=True,
        padding_mode="reflect",
        norm="group",
        dropout=0.1,
        dilation=2,
        deep_supervision=1,
        activation="leaky_relu",
    )
    x = rng.random((1, 16, 16, 16, 1)).astype(np.float32)
    outputs = model(x)
    assert [o.shape for o in outputs] == [(1, 16, 16, 16, 2), (1, 8, 8, 8, 2)]
    assert model.output_names == ["logits", "logits_ds1"]
    _same_after_save(model, tmp_path, x)


@pytest.mark.parametrize("upsampling", UPSAMPLING_MODES)
def test_every_upsampling_mode_survives_save_and_load(upsampling, rng, tmp_path):
    model = build_unet(
        spatial_dims=2, in_channels=1, num_classes=2, upsampling=upsampling, **TINY
    )
    _same_after_save(model, tmp_path, rng.random((2, 16, 16, 1)).astype(np.float32))


def test_original_valid_unet_572_to_388():
    assert unet_output_size(572, depth=4) == 388
    assert unet_output_size(570, depth=4) is None
    sizes = valid_unet_input_sizes(depth=4, max_size=600)
    assert 572 in sizes and all(s % 16 == 12 for s in sizes)  # 572 = 16 * 35 + 12
    model = build_unet(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        filters=(2, 2, 2, 2, 2),
        padding="valid",
        patch_size=(572, 572),
        norm="none",
    )
    assert model.output.shape == (None, 388, 388, 2)
    assert "dec0_crop" in [layer.name for layer in model.layers]


def test_valid_unet_3d_runs(rng):
    size = valid_unet_input_sizes(depth=2, max_size=60)[-1]
    out = unet_output_size(size, depth=2)
    model = build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=2,
        filters=(2, 4, 4),
        padding="valid",
        patch_size=(size,) * 3,
        residual=True,
    )
    x = rng.random((1, size, size, size, 1)).astype(np.float32)
    assert model(x).shape == (1, out, out, out, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(spatial_dims=4), "spatial_dims must be one of"),
        (dict(filters=(8,)), "filters must list at least 2"),
        (dict(upsampling="bilinear"), "upsampling must be one of"),
        (dict(downsampling="avg"), "downsampling must be one of"),
        (dict(norm="layer"), "norm must be one of"),
        (dict(padding="full"), "padding must be one of"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
        (dict(activation="wiggle"), "activation 'wiggle'"),
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(num_classes=0), "num_classes must be a positive int"),
        (dict(deep_supervision=5), "deep_supervision must be an int in"),
        (
            dict(upsampling="max_unpool", downsampling="strided_conv"),
            "needs downsampling",
        ),
        (dict(padding="valid"), "needs patch_size"),
        (dict(padding="valid", patch_size=(66, 66)), "not a valid input size"),
        (dict(patch_size=(62, 64)), "divisible by 2\\*\\*depth = 4"),
    ],
)
def test_unet_bad_arguments_raise_value_error(kwargs, message):
    base = dict(spatial_dims=2, in_channels=1, num_classes=2, filters=(4, 8, 16))
    with pytest.raises(ValueError, match=message):
        build_unet(**{**base, **kwargs})


# autoencoder


@pytest.mark.parametrize("upsampling", UPSAMPLING_MODES)
@pytest.mark.parametrize(("dims", "size"), [(2, 64), (3, 32)])
def test_autoencoder_returns_the_input_shape(upsampling, dims, size, rng):
    model = build_autoencoder(
        spatial_dims=dims, in_channels=2, upsampling=upsampling, denoising=True, **TINY
    )
    x = rng.random((2, *(size,) * dims, 2)).astype(np.float32)
    assert model(x).shape == x.shape
    assert model.layers[-1].name == "reconstruction"


def test_autoencoder_pinned_parameter_count_and_save(rng, tmp_path):
    model = build_autoencoder(
        spatial_dims=2, in_channels=1, filters=(4, 8), convs_per_level=1, norm="none"
    )
    # enc0 40 + bottleneck 296 + dec0_up 132 + dec0_conv1 3*3*4*4+4 = 148
    # + reconstruction 4*1+1 = 5
    assert model.count_params() == 40 + 296 + 132 + 148 + 5 == 621
    _same_after_save(model, tmp_path, rng.random((1, 8, 8, 1)).astype(np.float32))


def test_autoencoder_encoder_transfers_into_a_unet(rng):
    options = dict(spatial_dims=3, in_channels=1, filters=(4, 8, 16), norm="batch")
    autoencoder = build_autoencoder(**options)
    unet = build_unet(num_classes=3, **options)
    report = transfer_encoder_weights(autoencoder, unet)
    encoder_layers = [
        layer.name
        for layer in unet.layers
        if layer.weights and layer.name.startswith(("enc", "bottleneck"))
    ]
    assert report["matched"] == encoder_layers and report["skipped"] == {}
    for name in encoder_layers:
        for a, b in zip(
            autoencoder.get_layer(name).get_weights(),
            unet.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    wider = build_unet(num_classes=3, **{**options, "filters": (4, 8, 32)})
    report = transfer_encoder_weights(autoencoder, wider)
    assert "bottleneck_conv1" in report["skipped"]
    assert report["skipped"]["bottleneck_conv1"].startswith("shape mismatch")


# classifier


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_classifier_returns_batch_by_classes(architecture, dims, rng):
    model = build_classifier(
        spatial_dims=dims,
        in_channels=1,
        num_classes=3,
        architecture=architecture,
        base_filters=8,
        stem="small" if dims == 3 else "standard",
    )
    x = rng.random((2, *(28,) * dims, 1)).astype(np.float32)
    assert model(x).shape == (2, 3)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names)) and names[-1] == "logits"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_classifier_survives_save_and_load(architecture, rng, tmp_path):
    model = build_classifier(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        architecture=architecture,
        base_filters=4,
        stem="small",
    )
    _same_after_save(model, tmp_path, rng.random((2, 16, 16, 1)).astype(np.float32))


@pytest.mark.parametrize(
    ("architecture", "trainable"),
    [
        # the published ImageNet models (2D, 3 channels, 1000 classes)
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("densenet121", 7_978_856),
    ],
)
def test_classifier_matches_published_parameter_counts(architecture, trainable):
    model = build_classifier(
        spatial_dims=2, in_channels=3, num_classes=1000, architecture=architecture
    )
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable


def test_simple_classifier_pinned_count_and_heads(rng, tmp_path):
    model = build_classifier(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        architecture="simple",
        head="flatten",
        patch_size=(28, 28),
        hidden_units=10,
    )
    # conv1 5*5*1*6+6 = 156; conv2 5*5*6*16+16 = 2416; 28 -> 14 -> 7, flatten 7*7*16
    # = 784; head_dense1 784*10+10 = 7850; logits 10*2+2 = 22
    assert model.count_params() == 156 + 2416 + 7850 + 22
    x = rng.random((3, 28, 28, 1)).astype(np.float32)
    _same_after_save(model, tmp_path, x)
    pooled = build_classifier(
        spatial_dims=3,
        in_channels=1,
        num_classes=2,
        architecture="vgg",
        head="global_max",
        base_filters=4,
        dropout=0.2,
    )
    _same_after_save(
        pooled, tmp_path, rng.random((1, 16, 16, 16, 1)).astype(np.float32)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(architecture="resnet101"), "architecture must be one of"),
        (dict(head="attention"), "head must be one of"),
        (dict(head="flatten"), "needs patch_size"),
        (dict(stem="tiny"), "stem must be one of"),
        (dict(base_filters=0), "base_filters must be a positive int"),
    ],
)
def test_classifier_bad_arguments(kwargs, message):
    base = dict(spatial_dims=2, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=message):
        build_classifier(**{**base, **kwargs})


# registry and loading


def test_registry_builds_by_name_and_names_unknown_options():
    model = build_model(
        "unet", spatial_dims=2, in_channels=1, num_classes=2, filters=(4, 8)
    )
    assert model.name == "unet"
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        build_model("vnet")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\]"):
        build_model("unet", spatial_dims=2, in_channels=1, num_classes=2, depth=3)


def test_load_model_refuses_lambda_layers_and_bad_files(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError) as refused:
        load_model(tmp_path / "lambda.keras")
    assert str(refused.value) == (
        f"{tmp_path / 'lambda.keras'}: refused: the model holds Python code (a Lambda "
        "layer or a function of its own), and medseg never runs code from a model file"
    )
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.keras: cannot load model"):
        load_model(tmp_path / "junk.keras")
    # a copy cut short: Keras itself says "File not found"
    whole = (tmp_path / "lambda.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "cut.keras")
    assert str(info.value) == (
        f"{tmp_path / 'cut.keras'}: cannot load model (damaged or truncated: not a "
        "whole .keras archive)"
    )
    with pytest.raises(ValueError, match="model file not found"):
        load_model(tmp_path / "missing")


# receptive field, FLOPs, memory


def _empirical_receptive_field(model, size: int, dims: int) -> tuple[int, ...]:
    """Extent of the input voxels with a non-zero gradient for the centre output voxel.

    All kernels are made positive and the input is positive, so no path cancels."""
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([np.abs(w) + 0.01 for w in layer.get_weights()])
    x = tf.Variable(np.ones((1, *(size,) * dims, 1), np.float32))
    with tf.GradientTape() as tape:
        out = model(x)
        centre = (0, *(out.shape[1 + i] // 2 for i in range(dims)), 0)
        value = out[centre]
    grad = np.asarray(tape.gradient(value, x))[0, ..., 0]
    hits = np.nonzero(grad)
    return tuple(int(h.max() - h.min() + 1) for h in hits)


@pytest.mark.parametrize("dims", [2, 3])
def test_receptive_field_matches_gradient_extent(dims):
    options = dict(
        spatial_dims=dims,
        in_channels=1,
        num_classes=1,
        filters=(1, 1, 1),
        norm="none",
        activation="linear",
        downsampling="strided_conv",
    )
    model = build_unet(**options)
    expected = receptive_field(model)
    # enc0 1+2+2 = 5; down (2x2 stride 2) +1 -> 6, jump 2; enc1 +2*2*2 = 14; down
    # +2 -> 16, jump 4; bottleneck +2*2*4 = 32; up jump 2: +2*2*2 = 40; up jump 1: +4
    assert expected == (44,) * dims
    size = 64 if dims == 2 else 48
    assert _empirical_receptive_field(model, size, dims) == expected


def test_receptive_field_of_known_networks():
    resnet = build_classifier(
        spatial_dims=2, in_channels=3, num_classes=10, architecture="resnet18"
    )
    assert receptive_field(resnet) == (435, 435)  # the published ResNet-18 value
    dilated = build_unet(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        filters=(2, 2),
        dilation=2,
        convs_per_level=1,
    )
    # enc0 1+2*2 = 5; pool +1 = 6 (jump 2); bottleneck +2*2*2 = 14; dec0 (jump 1) +4
    assert receptive_field(dilated) == (18, 18)


def test_flops_and_memory_estimate_by_hand():
    model = build_unet(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        filters=(4, 8),
        convs_per_level=1,
        norm="none",
        patch_size=(8, 8),
    )
    info = describe_model(model, batch_size=3, optimizer="adam")
    # enc0 3*3*1*4 MACs at 64 px = 2304; bottleneck 3*3*4*8 at 16 px = 4608;
    # dec0_up 2*2*8*4 per input px at 16 px = 2048; dec0 3*3*8*4 at 64 = 18432;
    # logits 4*2 at 64 = 512; FLOPs = 2 x MACs
    assert info.flops_per_sample == 2 * (2304 + 4608 + 2048 + 18432 + 512)
    # outputs per sample: image 64, enc0_conv1 256, enc0_act1 256, pool 64,
    # bottleneck conv+act 2*128, dec0_up 256, dec0 conv+act 2*256 (its convolution
    # takes the skip and dec0_up without concatenating them), logits 128
    activations = 64 + 256 + 256 + 64 + 256 + 256 + 512 + 128
    assert info.memory_bytes == {
        "parameters": 4 * 770,
        "gradients": 4 * 770,
        "optimizer": 8 * 770,
        "activations": 4 * 3 * activations,
        "total": 16 * 770 + 12 * activations,
    }
    assert info.rows[1].name == "enc0_conv1" and info.rows[1].params == 40


@pytest.mark.parametrize("upsampling", ["transpose", "max_unpool"])
def test_bfloat16_copy_keeps_weights_and_returns_close_float32_logits(upsampling, rng):
    keras.utils.set_random_seed(0)
    model = build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=3,
        filters=(4, 8),
        norm="batch",  # instance norm of a random network magnifies any rounding
        upsampling=upsampling,
    )
    x = rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    copy = with_precision(model, "mixed_bfloat16")
    assert copy is not model
    for a, b in zip(model.get_weights(), copy.get_weights(), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    final = copy.layers[-1]
    assert final.dtype_policy.name == "float32"
    convs = [layer for layer in copy.layers if isinstance(layer, keras.layers.Conv3D)]
    assert all(c.compute_dtype == "bfloat16" for c in convs if c is not final)
    expected = np.asarray(model(x, training=False))
    got = copy(x, training=False)
    assert got.dtype == "float32"
    # bfloat16 keeps 8 significant bits: the logits agree to a few percent overall
    # (other weights would be off by their whole size; argmax unpooling can move a
    # near-tied maximum, so single voxels may differ more), and differ (the copy
    # really computes in bfloat16)
    error = np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected)
    assert 0 < error < 0.05
    assert with_precision(model, "float32") is model


def test_float16_weights_halve_the_bundle_and_load_rounded_as_float32(tmp_path, rng):
    from medseg.bundle import read_metadata, verify, write_bundle

    keras.utils.set_random_seed(0)
    model = build_unet(
        spatial_dims=3, in_channels=1, num_classes=3, filters=(16, 32), norm="instance"
    )
    record = bundle_record(spatial_dims=3, num_classes=3)
    write_bundle(tmp_path / "full", model, record)
    write_bundle(tmp_path / "half", model, record, weights_dtype="float16")
    verify(tmp_path / "half")
    assert read_metadata(tmp_path / "half")["weights_dtype"] == "float16"
    assert read_metadata(tmp_path / "full")["weights_dtype"] == "float32"
    sizes = {k: (tmp_path / k / "model.keras").stat().st_size for k in ("full", "half")}
    weight_bytes = 4 * model.count_params()
    assert sizes["full"] - sizes["half"] == pytest.approx(weight_bytes / 2, rel=0.05)

    loaded = load_model(tmp_path / "half")
    assert weights_dtype(loaded) == "float32"
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
    rounded = [w.astype(np.float16).astype(np.float32) for w in model.get_weights()]
    changed = 0
    for got, want, original in zip(
        loaded.get_weights(), rounded, model.get_weights(), strict=True
    ):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        changed += int(np.any(want != original))
    assert changed > 0  # the weights really were rounded
    # it computes in float32 with the rounded weights: the same as the float32
    # model given them, and close to the unrounded one
    reference = build_unet(
        spatial_dims=3, in_channels=1, num_classes=3, filters=(16, 32), norm="instance"
    )
    reference.set_weights(rounded)
    x = rng.normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    got = np.asarray(loaded(x, training=False))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(reference(x, training=False)), atol=1e-5)
    full = np.asarray(model(x, training=False))
    error = np.linalg.norm(got - full) / np.linalg.norm(full)
    assert 0 < error < 1e-2


def test_float16_weights_refuse_values_float16_cannot_hold():
    model = build_unet(spatial_dims=2, in_channels=1, num_classes=2, **TINY)
    weights = model.get_weights()
    weights[0] = np.full_like(weights[0], 7e4)
    model.set_weights(weights)
    with pytest.raises(ValueError, match="65504"):
        with_weights_dtype(model, "float16")
    with pytest.raises(ValueError, match="float8"):
        with_weights_dtype(model, "float8")
    assert with_weights_dtype(model, "float32") is model


def test_instance_norm_and_leaky_relu_are_one_layer_with_the_same_function(rng):
    keras.utils.set_random_seed(0)
    model = build_unet(
        spatial_dims=3,
        in_channels=1,
        num_classes=2,
        filters=(4, 8),
        norm="instance",
        activation="leaky_relu",
    )
    from medseg import layers as medseg_layers

    fused = [
        layer
        for layer in model.layers
        if isinstance(layer, medseg_layers.InstanceNormLeakyReLU)
    ]
    assert [layer.name for layer in fused][:2] == ["enc0_norm1", "enc0_norm2"]
    assert len(fused) == 6  # two per encoder, bottleneck and decoder level
    assert not any(isinstance(layer, medseg_layers.LeakyReLU) for layer in model.layers)

    def split(layer):  # the same network with norm and activation as two layers
        if isinstance(layer, medseg_layers.InstanceNormLeakyReLU):
            norm = medseg_layers.InstanceNormalization(epsilon=layer.epsilon)
            return keras.Sequential(
                [norm, medseg_layers.LeakyReLU(layer.negative_slope)], name=layer.name
            )
        return layer.__class__.from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=split)
    for ours, theirs in zip(model.layers, twin.layers, strict=True):
        if isinstance(theirs, keras.Sequential):
            theirs.layers[0].set_weights(ours.get_weights())
        else:
            theirs.set_weights(ours.get_weights())
    x = rng.random((1, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(model(x), twin(x), atol=1e-5)
