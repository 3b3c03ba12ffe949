from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg import layers
from medseg.models import load_model
from tests import reference


def _round_trip(model, tmp_path, *inputs):
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_model(path)
    args = inputs[0] if len(inputs) == 1 else list(inputs)
    before, after = model(args), loaded(args)
    for a, b in zip(keras.tree.flatten(before), keras.tree.flatten(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return loaded


def _training_step_graph(model, input_shape):
    """The graph of one gradient computation of ``sum(model(x) ** 2)``."""

    @tf.function
    def step(data):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(data) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    return step.get_concrete_function(tf.TensorSpec(input_shape)).graph


# max pooling with argmax / max unpooling


def test_textbook_2x2_max_pool_of_a_4x4_map():
    # the classic example: max of each 2x2 block, and where it was (row * 4 + col)
    x = np.array([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]], np.float32)
    values, indices = layers.MaxPoolingWithArgmax2D(2)(x[None, :, :, None])
    np.testing.assert_array_equal(np.asarray(values)[0, :, :, 0], [[6, 8], [3, 4]])
    np.testing.assert_array_equal(np.asarray(indices)[0, :, :, 0], [[5, 7], [8, 15]])
    assert indices.dtype == tf.int64


@pytest.mark.parametrize(
    ("layer", "shape", "pool"),
    [
        (layers.MaxPoolingWithArgmax2D, (2, 6, 8, 3), (2, 2)),
        (layers.MaxPoolingWithArgmax2D, (1, 7, 5, 2), (3, 2)),
        (layers.MaxPoolingWithArgmax3D, (2, 4, 6, 4, 2), (2, 2, 2)),
        (layers.MaxPoolingWithArgmax3D, (1, 5, 7, 3, 3), (2, 3, 1)),
    ],
)
def test_argmax_pooling_and_unpooling_match_loop_reference(rng, layer, shape, pool):
    x = rng.random(shape).astype(np.float32)
    values, indices = layer(pool)(x)
    ref_values, ref_indices = reference.max_pool_with_argmax(x, pool)
    np.testing.assert_array_equal(np.asarray(values), ref_values)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)
    unpool = layers.MaxUnpooling2D if len(pool) == 2 else layers.MaxUnpooling3D
    out = unpool(pool)([values, indices, x])  # reference tensor: odd sizes come back
    assert out.shape == x.shape
    np.testing.assert_array_equal(
        np.asarray(out), reference.max_unpool(ref_values, ref_indices, shape[1:-1])
    )


def test_argmax_indices_agree_with_tensorflow_2d(rng):
    x = rng.random((2, 8, 6, 5)).astype(np.float32)
    _, indices = layers.MaxPoolingWithArgmax2D(2)(x)
    _, tf_indices = tf.nn.max_pool_with_argmax(x, 2, 2, "VALID")
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(tf_indices))


def test_unpooling_gradient_flows_to_values_at_argmax(rng):
    x = tf.Variable(rng.random((1, 4, 4, 4, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        values, indices = layers.MaxPoolingWithArgmax3D()(x)
        out = layers.MaxUnpooling3D()([values * 3.0, indices])
        total = tf.reduce_sum(out)
    grad = np.asarray(tape.gradient(total, x))
    _, ref_indices = reference.max_pool_with_argmax(np.asarray(x), (2, 2, 2))
    expected = np.zeros(x.shape[1:]).reshape(-1)
    expected[ref_indices[0].ravel()] = 3.0
    np.testing.assert_array_equal(grad[0], expected.reshape(x.shape[1:]))


def test_argmax_pooling_symbolic_shapes_and_dtypes():
    inputs = keras.Input((None, None, None, 4))
    values, indices = layers.MaxPoolingWithArgmax3D()(inputs)
    assert indices.dtype == "int64" and values.dtype == "float32"
    out = layers.MaxUnpooling3D()([values, indices, inputs])
    assert out.shape == (None, None, None, None, 4)
    fixed = keras.Input((10, 7, 4))
    values, indices = layers.MaxPoolingWithArgmax2D()(fixed)
    assert values.shape == (None, 5, 3, 4)
    assert layers.MaxUnpooling2D()([values, indices]).shape == (None, 10, 6, 4)
    assert layers.MaxUnpooling2D()([values, indices, fixed]).shape == (None, 10, 7, 4)


def test_argmax_layers_survive_save_and_load(rng, tmp_path):
    inputs = keras.Input((6, 6, 4, 2))
    values, indices = layers.MaxPoolingWithArgmax3D(name="pool")(inputs)
    out = layers.MaxUnpooling3D(name="unpool")([values, indices, inputs])
    model = keras.Model(inputs, [out, indices])
    x = rng.random((2, 6, 6, 4, 2)).astype(np.float32)
    loaded = _round_trip(model, tmp_path, x)
    assert loaded.get_layer("pool").get_config()["pool_size"] == (2, 2, 2)
    assert loaded(x)[1].dtype == tf.int64


# bed of nails, N-max pooling, padding


@pytest.mark.parametrize(
    ("layer", "shape", "size"),
    [
        (layers.BedOfNailsUnpooling2D, (2, 3, 4, 2), (2, 2)),
        (layers.BedOfNailsUnpooling2D, (1, 2, 3, 1), (3, 1)),
        (layers.BedOfNailsUnpooling3D, (1, 2, 3, 2, 2), (2, 2, 2)),
    ],
)
def test_bed_of_nails_matches_reference(rng, layer, shape, size):
    x = rng.random(shape).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(layer(size)(x)), reference.bed_of_nails(x, size)
    )


def test_bed_of_nails_textbook_case():
    x = np.array([[1, 2], [3, 4]], np.float32)[None, :, :, None]
    out = np.asarray(layers.BedOfNailsUnpooling2D(2)(x))[0, :, :, 0]
    np.testing.assert_array_equal(
        out, [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]
    )


@pytest.mark.parametrize(
    ("layer", "shape", "pool", "n"),
    [
        (layers.NMaxPooling2D, (2, 4, 6, 3), (2, 2), 2),
        (layers.NMaxPooling2D, (1, 6, 6, 1), (3, 3), 4),
        (layers.NMaxPooling3D, (1, 4, 4, 4, 2), (2, 2, 2), 3),
    ],
)
def test_n_max_pooling_matches_reference(rng, layer, shape, pool, n):
    x = rng.random(shape).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(layer(pool, n=n)(x)), reference.n_max_pool(x, pool, n), rtol=1e-6
    )


def test_n_max_pooling_limits_are_max_and_average_pooling(rng):
    x = rng.random((1, 4, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(
        layers.NMaxPooling2D(2, n=1)(x), keras.layers.MaxPooling2D(2)(x)
    )
    np.testing.assert_allclose(
        layers.NMaxPooling2D(2, n=4)(x), keras.layers.AveragePooling2D(2)(x), rtol=1e-6
    )


@pytest.mark.parametrize("mode", layers.PADDING_MODES)
@pytest.mark.parametrize(
    ("layer", "shape", "padding"),
    [
        (layers.Padding2D, (1, 3, 4, 2), (1, 2)),
        (layers.Padding3D, (2, 3, 3, 4, 1), (1, 0, 2)),
    ],
)
def test_padding_modes_match_reference(rng, mode, layer, shape, padding):
    x = rng.random(shape).astype(np.float32)
    out = layer(padding, mode=mode)(x)
    np.testing.assert_array_equal(np.asarray(out), reference.pad(x, padding, mode))


def test_padding_modes_on_a_row():
    row = np.array([1, 2, 3], np.float32)[None, None, :, None]

    def padded(mode):
        return np.asarray(layers.Padding2D((0, 2), mode=mode)(row))[0, 0, :, 0].tolist()

    assert padded("zero") == [0, 0, 1, 2, 3, 0, 0]
    assert padded("reflect") == [3, 2, 1, 2, 3, 2, 1]
    assert padded("replicate") == [1, 1, 1, 2, 3, 3, 3]
    assert padded("circular") == [2, 3, 1, 2, 3, 1, 2]


def test_other_layers_survive_save_and_load(rng, tmp_path):
    inputs = keras.Input((8, 8, 8, 2))
    x = layers.Padding3D(1, mode="reflect")(inputs)
    x = layers.NMaxPooling3D(2, n=3)(x)
    x = layers.BedOfNailsUnpooling3D((1, 2, 2))(x)
    y = layers.ConcatConv3D(3, 3, padding="same")([inputs, inputs])
    model = keras.Model(inputs, [x, y])
    data = rng.random((1, 8, 8, 8, 2)).astype(np.float32)
    loaded = _round_trip(model, tmp_path, data)
    assert [type(layer).__name__ for layer in loaded.layers[1:]] == [
        "Padding3D",
        "NMaxPooling3D",
        "BedOfNailsUnpooling3D",
        "ConcatConv3D",
    ]


# instance normalisation


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 2), (3, 5, 4, 3)])
def test_instance_norm_values_and_gradients_match_reference(rng, shape):
    x = rng.normal(2.0, 3.0, size=shape)
    gamma, beta = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    weights = rng.normal(size=shape)  # loss = sum(weights * y): every output matters
    layer = layers.InstanceNormalization()
    layer.build(shape)
    layer.set_weights([gamma.astype(np.float32), beta.astype(np.float32)])
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(tf.constant(weights, tf.float32) * y)
    dx, d_gamma, d_beta = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    def loss_of(x_=x, gamma_=gamma, beta_=beta):
        return (weights * reference.instance_norm(x_, gamma_, beta_, 1e-5)).sum()

    np.testing.assert_allclose(y, reference.instance_norm(x, gamma, beta, 1e-5),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(dx, reference.numeric_gradient(loss_of, x), atol=2e-4)
    np.testing.assert_allclose(
        d_gamma, reference.numeric_gradient(lambda g: loss_of(gamma_=g), gamma),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    np.testing.assert_allclose(
        d_beta, reference.numeric_gradient(lambda b: loss_of(beta_=b), beta),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip


def test_instance_norm_gradient_with_shapes_known_only_at_run_time(rng):
    x = rng.normal(1.0, 2.0, size=(2, 5, 3, 4, 2))
    weights = tf.constant(rng.normal(size=x.shape), tf.float32)
    layer = layers.InstanceNormalization()
    layer.build((None, None, None, None, 2))

    def gradient(x_):
        with tf.GradientTape() as tape:
            tape.watch(x_)
            loss = tf.reduce_sum(weights * layer(x_))
        return tape.gradient(loss, x_)

    traced = tf.function(
        gradient, input_signature=[tf.TensorSpec([None, None, None, None, 2])]
    )
    expected = reference.numeric_gradient(
        lambda x_: (
            np.asarray(weights)
            * reference.instance_norm(x_, np.ones(2), np.zeros(2), 1e-5)
        ).sum(),
        x,
    )
    np.testing.assert_allclose(traced(tf.constant(x, tf.float32)), expected, atol=2e-4)


def test_instance_norm_on_bfloat16_input_matches_reference(rng):
    # bfloat16 input (a convolution's output under mixed precision) with an offset
    # large against its spread: sums kept in bfloat16 would lose the variance
    x = (100 + 10 * rng.normal(size=(2, 16, 16, 16, 2))).astype(np.float32)
    layer = layers.InstanceNormalization(dtype="mixed_bfloat16")
    xt = tf.cast(tf.constant(x), tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
    gradient = tape.gradient(loss, xt)
    assert y.dtype == tf.bfloat16
    rounded = np.asarray(tf.cast(xt, tf.float32))
    expected = reference.instance_norm(rounded, np.ones(2), np.zeros(2), 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.05)
    # sum of squares of a normalised channel is its size: no gradient left to give
    assert np.all(np.isfinite(gradient)) and np.abs(gradient).max() < 0.05


def test_instance_norm_matches_keras_group_norm_and_loads_its_weights(rng, tmp_path):
    x = rng.normal(size=(2, 6, 6, 6, 4)).astype(np.float32)
    keras_norm = keras.layers.GroupNormalization(groups=-1, epsilon=1e-5)
    keras_norm.build(x.shape)
    keras_norm.set_weights([rng.normal(size=4).astype(np.float32) for _ in range(2)])
    ours = layers.InstanceNormalization()
    ours.build(x.shape)
    ours.set_weights(keras_norm.get_weights())
    np.testing.assert_allclose(ours(x), keras_norm(x), atol=1e-5)
    inputs = keras.Input((6, 6, 6, 4))
    _round_trip(keras.Model(inputs, ours(inputs)), tmp_path, x)


# instance normalisation fused with leaky ReLU


def test_fused_norm_leaky_relu_values_and_gradients_match_reference(rng):
    shape = (2, 3, 4, 5, 3)
    x = rng.normal(1.0, 2.0, size=shape)
    gamma = np.array([1.3, -0.7, 0.02])  # negative and small scales recovered too
    beta = np.array([0.4, -0.2, 0.1])
    weights = rng.normal(size=shape)
    layer = layers.InstanceNormLeakyReLU(negative_slope=0.1)
    layer.build(shape)
    layer.set_weights([gamma.astype(np.float32), beta.astype(np.float32)])
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(tf.constant(weights, tf.float32) * y)
    dx, d_gamma, d_beta = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    def forward(x_=x, gamma_=gamma, beta_=beta):
        normalised = reference.instance_norm(x_, gamma_, beta_, 1e-5)
        return reference.leaky_relu(normalised, 0.1)

    z = reference.instance_norm(x, gamma, beta, 1e-5)
    assert np.abs(z).min() > 1e-3  # central differences do not cross the kink

    def loss_of(**kwargs):
        return (weights * forward(**kwargs)).sum()

    np.testing.assert_allclose(y, forward(), atol=1e-5)
    np.testing.assert_allclose(
        dx, reference.numeric_gradient(lambda v: loss_of(x_=v), x, step=1e-5),
        atol=2e-4,
    )  # fmt: skip
    np.testing.assert_allclose(
        d_gamma, reference.numeric_gradient(lambda g: loss_of(gamma_=g), gamma),
        rtol=1e-4, atol=2e-4,
    )  # fmt: skip
    np.testing.assert_allclose(
        d_beta, reference.numeric_gradient(lambda b: loss_of(beta_=b), beta),
        rtol=1e-4, atol=2e-4,
    )  # fmt: skip


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_norm_leaky_relu_equals_the_two_layers(rng, policy):
    x = tf.constant(rng.normal(3.0, 2.0, size=(2, 6, 6, 6, 4)).astype(np.float32))
    weights = [rng.normal(size=4).astype(np.float32) for _ in range(2)]
    fused = layers.InstanceNormLeakyReLU(dtype=policy)
    norm = layers.InstanceNormalization(dtype=policy)
    act = layers.LeakyReLU(dtype=policy)
    for layer in (fused, norm):
        layer.build(x.shape)
        layer.set_weights(weights)
    dtype = "float32" if policy == "float32" else "bfloat16"
    xt = tf.cast(x, dtype)
    results = []
    for run in (fused, lambda t: act(norm(t))):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = run(xt)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * x)
        results.append(
            [np.asarray(tf.cast(t, tf.float32)) for t in [y, tape.gradient(loss, xt)]]
        )
    (y1, g1), (y2, g2) = results
    if policy == "float32":
        np.testing.assert_allclose(y1, y2, atol=1e-6)
        np.testing.assert_allclose(g1, g2, atol=1e-5)
    else:  # the fused layer recovers its input from a bfloat16 output
        np.testing.assert_allclose(y1, y2, atol=0.02 * np.abs(y2).max())
        np.testing.assert_allclose(g1, g2, atol=0.03 * np.abs(g2).max())


def test_backward_ops_wait_for_the_upstream_gradient():
    # ops of a hand-written backward pass that read only forward tensors would
    # otherwise run during the forward pass and keep full-size results until backward
    inputs = keras.Input((6, 6, 6, 2))
    conv = keras.layers.Conv3D(2, 3, padding="same", use_bias=False)
    layers_used = [
        layers.InstanceNormLeakyReLU(),
        layers.InstanceNormalization(),
        layers.LeakyReLU(),
    ]
    x = conv(inputs)
    for layer in layers_used:
        x = layer(x)
    model = keras.Model(inputs, x)
    graph = _training_step_graph(model, (2, 6, 6, 6, 2))

    def waits_for_gradient(op, seen):
        # some op it depends on (through inputs or control inputs) is of TensorFlow's
        # own backward pass, which starts from the loss's gradient
        for parent in [t.op for t in op.inputs] + list(op.control_inputs):
            if parent.name in seen:
                continue
            seen.add(parent.name)
            if parent.name.startswith("gradient_tape") or waits_for_gradient(
                parent, seen
            ):
                return True
        return False

    readers = 0
    for op in graph.get_operations():
        if op.name.startswith(("functional", "gradient_tape", "pow")):
            continue  # the model, TensorFlow's own gradients, the loss
        if any(
            t.name.startswith("functional") and t.shape.rank == 5 for t in op.inputs
        ):  # a hand-written backward op reading a full-size forward tensor
            readers += 1
            assert waits_for_gradient(op, set()), f"{op.name} ({op.type}) runs early"
    assert readers >= 3  # each layer's backward reads a forward tensor


# convolution of concatenated inputs


@pytest.mark.parametrize("dilation", [1, 2])
def test_concat_conv_matches_reference_convolution_of_the_concatenation(rng, dilation):
    a = rng.normal(size=(7, 6, 2))
    b = rng.normal(size=(7, 6, 3))
    kernel = rng.normal(size=(3, 3, 5, 4))
    bias = rng.normal(size=4)
    layer = layers.ConcatConv2D(4, 3, padding="same", dilation_rate=dilation)
    layer.build([(1, 7, 6, 2), (1, 7, 6, 3)])
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    out = np.asarray(layer([a[None].astype(np.float32), b[None].astype(np.float32)]))
    expected = reference.conv_same_2d(np.concatenate([a, b], -1), kernel, dilation)
    np.testing.assert_allclose(out[0], expected + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_concat_conv_equals_concatenate_and_conv_in_value_and_gradient(rng, policy):
    shapes = [(2, 6, 5, 4, 3), (2, 6, 5, 4, 2)]
    parts = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    split = layers.ConcatConv3D(4, 3, padding="same", dtype=policy)
    joined = keras.layers.Conv3D(4, 3, padding="same", dtype=policy)
    split.build([p.shape for p in parts])
    joined.build((2, 6, 5, 4, 5))
    assert [w.shape for w in split.weights] == [w.shape for w in joined.weights]
    split.set_weights([rng.normal(0, 0.1, w.shape) for w in split.get_weights()])
    joined.set_weights(split.get_weights())
    exact = keras.layers.Conv3D(4, 3, padding="same", dtype="float32")
    exact.build((2, 6, 5, 4, 5))
    exact.set_weights(split.get_weights())
    weight = rng.normal(size=(2, 6, 5, 4, 4)).astype(np.float32)
    results = []
    for layer, run in [
        (split, split),
        (joined, lambda ps: joined(keras.ops.concatenate(ps, axis=-1))),
        (exact, lambda ps: exact(keras.ops.concatenate(ps, axis=-1))),
    ]:
        with tf.GradientTape() as tape:
            tape.watch(parts)
            y = tf.cast(run(parts), tf.float32)
            loss = tf.reduce_sum(y * weight)
        grads = tape.gradient(loss, [*parts, *layer.trainable_weights])
        results.append([np.asarray(y), *(np.asarray(g) for g in grads)])
    for mine, theirs, float32 in zip(*results, strict=True):
        scale = max(1.0, np.abs(float32).max())
        if policy == "float32":
            np.testing.assert_allclose(mine, theirs, atol=1e-5 * scale)
        else:
            # in bfloat16, about as close to float32 arithmetic as concatenate + conv
            # is: within twice its error and two bfloat16 steps at the largest value
            # (the sum of the two convolutions rounds once more). Where TensorFlow
            # runs bfloat16 without oneDNN (no AVX-512) both miss float32 by up to
            # ~4 % of the largest value, and differ from each other by up to ~3 %.
            error = np.abs(mine - float32).max()
            assert error <= 2 * np.abs(theirs - float32).max() + 2**-6 * scale


def test_unet_training_step_never_forms_the_skip_concatenation():
    from medseg.models import build_unet

    model = build_unet(spatial_dims=3, in_channels=1, num_classes=2, filters=(4, 8))
    assert not any(isinstance(x, keras.layers.Concatenate) for x in model.layers)
    assert isinstance(model.get_layer("dec0_conv1"), layers.ConcatConv3D)
    graph = _training_step_graph(model, (2, 8, 8, 8, 1))
    full_size = [
        op
        for op in graph.get_operations()
        if op.type in ("ConcatV2", "Concat", "Pack")
        and any(t.shape.rank == 5 for t in op.outputs)
    ]
    assert full_size == []
    # the same U-Net with a residual block needs the concatenated tensor
    residual = build_unet(
        spatial_dims=3, in_channels=1, num_classes=2, filters=(4, 8), residual=True
    )
    assert isinstance(residual.get_layer("dec0_concat"), keras.layers.Concatenate)


def test_concat_conv_needs_a_list_of_matching_inputs():
    with pytest.raises(ValueError, match="list of inputs"):
        layers.ConcatConv2D(2, 3)(np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="differ but in channels"):
        layers.ConcatConv2D(2, 3)(
            [np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 4, 5, 1), np.float32)]
        )


# leaky ReLU


def test_leaky_relu_values_and_gradient_match_reference(rng):
    x = rng.normal(size=(2, 4, 3, 5, 3))
    x[0, 0, 0, 0] = 0.0  # at zero the slope side is taken, as TensorFlow does
    weights = rng.normal(size=x.shape)
    layer = layers.LeakyReLU(negative_slope=0.1)
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(tf.constant(weights, tf.float32) * y)
    np.testing.assert_allclose(y, reference.leaky_relu(x, 0.1), rtol=1e-6, atol=1e-7)
    # away from the kink the loss is linear in x: central differences are exact
    away = np.abs(x) > 1e-3
    numeric = reference.numeric_gradient(
        lambda x_: (weights * reference.leaky_relu(x_, 0.1)).sum(), x, step=1e-4
    )
    gradient = np.asarray(tape.gradient(loss, xt))
    np.testing.assert_allclose(gradient[away], numeric[away], rtol=1e-4, atol=1e-6)
    assert gradient[0, 0, 0, 0, 0] == pytest.approx(0.1 * weights[0, 0, 0, 0, 0])


def test_leaky_relu_equals_keras_activation_in_value_and_gradient(rng):
    x = tf.constant(rng.normal(size=(2, 6, 6, 6, 4)).astype(np.float32))
    for dtype, policy in (("float32", "float32"), ("bfloat16", "mixed_bfloat16")):
        xt = tf.cast(x, dtype)
        results = []
        for layer in (
            layers.LeakyReLU(dtype=policy),
            keras.layers.Activation("leaky_relu", dtype=policy),
        ):
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = layer(xt)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(x, tf.float32))
            results.append((y, tape.gradient(loss, xt)))
        (ours, our_grad), (theirs, their_grad) = results
        assert ours.dtype == theirs.dtype == tf.dtypes.as_dtype(dtype)
        np.testing.assert_array_equal(np.asarray(ours, np.float32),
                                      np.asarray(theirs, np.float32))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(our_grad, np.float32),
                                      np.asarray(their_grad, np.float32))  # fmt: skip


def test_leaky_relu_needs_a_positive_slope():
    with pytest.raises(ValueError, match="negative_slope must be > 0"):
        layers.LeakyReLU(negative_slope=0.0)


# transposed convolution seeds


def test_transposed_convolution_output_size_textbook():
    # input 2x2, kernel 3x3, stride 1, no padding -> (2 - 1) * 1 + 3 = 4
    layer = keras.layers.Conv2DTranspose(1, 3, strides=1, padding="valid")
    assert layer(np.zeros((1, 2, 2, 1), np.float32)).shape == (1, 4, 4, 1)
    # input 3x3, kernel 2x2, stride 2 -> (3 - 1) * 2 + 2 = 6
    layer = keras.layers.Conv2DTranspose(1, 2, strides=2, padding="valid")
    assert layer(np.zeros((1, 3, 3, 1), np.float32)).shape == (1, 6, 6, 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_transposed_convolution_values_match_reference(stride):
    x = np.array([[0, 1], [2, 3]], np.float32)
    kernel = np.array([[0, 1], [2, 3]], np.float32)
    layer = keras.layers.Conv2DTranspose(1, 2, strides=stride, use_bias=False)
    layer.build((1, 2, 2, 1))
    layer.set_weights([kernel[:, :, None, None]])
    out = np.asarray(layer(x[None, :, :, None]))[0, :, :, 0]
    np.testing.assert_allclose(out, reference.conv_transpose_2d(x, kernel, stride))
    if stride == 1:  # the worked example: [[0, 0, 1], [0, 4, 6], [4, 12, 9]]
        np.testing.assert_allclose(out, [[0, 0, 1], [0, 4, 6], [4, 12, 9]])


# bad arguments


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: layers.MaxPoolingWithArgmax3D(pool_size=(2, 2)), "pool_size"),
        (lambda: layers.MaxUnpooling2D(pool_size=0), "pool_size"),
        (lambda: layers.BedOfNailsUnpooling3D(size="2"), "size"),
        (lambda: layers.NMaxPooling2D(2, n=5), r"n must be an int in \[1, 4\]"),
        (lambda: layers.Padding2D(-1), "padding"),
        (lambda: layers.Padding3D(1, mode="mirror"), "mode must be one of"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unpooling_needs_values_and_indices():
    with pytest.raises(ValueError, match=r"takes \[values, indices\]"):
        layers.MaxUnpooling2D()(np.zeros((1, 2, 2, 1), np.float32))


@pytest.mark.parametrize(
    "layer",
    [
        layers.MaxPoolingWithArgmax2D((2, 3)),
        layers.MaxPoolingWithArgmax3D(2),
        layers.MaxUnpooling2D(2),
        layers.MaxUnpooling3D((1, 2, 2)),
        layers.BedOfNailsUnpooling2D(3),
        layers.BedOfNailsUnpooling3D((2, 1, 2)),
        layers.NMaxPooling2D(2, n=3),
        layers.NMaxPooling3D((2, 2, 1), n=2),
        layers.Padding2D((1, 2), mode="circular"),
        layers.Padding3D(2, mode="replicate"),
        layers.InstanceNormalization(epsilon=1e-3),
        layers.InstanceNormLeakyReLU(negative_slope=0.1, epsilon=1e-3),
        layers.LeakyReLU(negative_slope=0.05),
        layers.ConcatConv2D(4, 3, padding="same", use_bias=False),
        layers.ConcatConv3D(2, 3, dilation_rate=2),
    ],
)
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"medseg>{type(layer).__name__}"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
