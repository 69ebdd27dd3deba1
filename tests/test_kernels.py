"""Each run-time kernel computes what the Keras layer it replaces computes.

Outputs against numpy (a direct loop over taps, batch statistics), gradients and moving
statistics against the layer's own call. A kernel that does not run on this machine
(TF's CPU kernels without oneDNN reject dilation) is skipped here; test_autotune checks
that such a kernel is never chosen.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pspnet_tf import autotune, kernels


def _with_kernel(layer, name, training=False):
    """``layer`` running kernel ``name`` (skips the test where it does not run here)."""
    ok, why = autotune.probe(name, training)
    if not ok:
        pytest.skip(f"{name} does not run on this machine: {why}")
    kernels.install(layer, next(k for k in kernels.KERNELS if k.name == name))
    assert kernels.installed(layer) == name  # else the comparisons check Keras against itself
    return layer


def _numpy_dilated_depthwise(x, kernel, dilation, padding):
    """A direct loop over taps: x (N, H, W, C), kernel (kh, kw, C, 1), stride 1."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        ph, pw = dilation * (kh - 1), dilation * (kw - 1)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    height = x.shape[1] - dilation * (kh - 1)
    width = x.shape[2] - dilation * (kw - 1)
    out = np.zeros((x.shape[0], height, width, x.shape[3]))
    for i in range(kh):
        for j in range(kw):
            window = x[:, i * dilation : i * dilation + height, j * dilation : j * dilation + width]
            out += window * kernel[i, j, :, 0]
    return out


@pytest.mark.parametrize("dilation, padding, size", [(2, "same", (9, 12)), (4, "valid", (13, 11))])
def test_native_dilated_depthwise_equals_a_direct_computation(rng, dilation, padding, size):
    layer = keras.layers.DepthwiseConv2D(3, dilation_rate=dilation, padding=padding)
    x = rng.normal(size=(2, *size, 5)).astype("float32")
    layer.build(x.shape)
    _with_kernel(layer, "native_dilated_depthwise")
    kernel = rng.normal(size=(3, 3, 5, 1)).astype("float32")
    bias = rng.normal(size=(5,)).astype("float32")
    layer.set_weights([kernel, bias])
    expected = _numpy_dilated_depthwise(x.astype(np.float64), kernel, dilation, padding) + bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert kernels.installed(layer) == "native_dilated_depthwise"


@pytest.mark.parametrize("dilation, size", [(1, (7, 9)), (2, (8, 5))])
def test_matmul_conv_equals_a_direct_computation(rng, dilation, size):
    layer = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=dilation)
    x = rng.normal(size=(2, *size, 6)).astype("float32")
    layer.build(x.shape)
    _with_kernel(layer, "tap_conv", training=True)
    kernel = rng.normal(size=(3, 3, 6, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    layer.set_weights([kernel, bias])
    # A direct conv: for each output channel, the sum over input channels of one-channel
    # dilated convolutions (the depthwise loop above).
    x64 = x.astype(np.float64)
    expected = np.stack(
        [
            sum(
                _numpy_dilated_depthwise(
                    x64[..., [c]], kernel[:, :, [c], f, None], dilation, "same"
                )
                for c in range(6)
            )[..., 0]
            for f in range(4)
        ],
        axis=-1,
    )
    expected += bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-4)


def _outputs_and_gradients(layer, x, upstream, graph, weights=("kernel", "bias"), **call):
    """``layer(x, **call)`` (as float32) and the gradients of ``sum(y * upstream)`` for x
    and the layer's ``weights``, eagerly or in a ``tf.function``."""

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x, **call), tf.float32)
            loss = tf.reduce_sum(y * upstream)
        return [y, *tape.gradient(loss, [x, *(getattr(layer, w) for w in weights)])]

    return tf.function(run)() if graph else run()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize(
    "dilation, kernel_size, size", [(1, 3, (7, 9)), (2, 3, (8, 5)), (1, 5, (6, 6))]
)
def test_matmul_conv_gradients_equal_keras_conv(rng, dilation, kernel_size, size, graph):
    """Its written-out gradient (kernel from the tap rows, input as the transposed conv)
    against TF's own convolution gradients, for inputs, kernel and bias, eagerly and in
    a graph (as in ``fit``, where the gradient's ops are ordered by control dependencies).

    Dilated, the input gradient is TF's dilated transposed conv, which only some kernels
    have (the same as native_dilated_conv's); autotune installs tap_conv undilated only."""
    if dilation > 1 and not autotune.probe("native_dilated_conv", True)[0]:
        pytest.skip("no dilated conv gradient on this machine")
    x = tf.constant(rng.normal(size=(2, *size, 6)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, *size, 4)).astype("float32"))
    kernel = rng.normal(size=(kernel_size, kernel_size, 6, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    results = []
    for kernel_name in (None, "tap_conv"):
        layer = keras.layers.Conv2D(4, kernel_size, padding="same", dilation_rate=dilation)
        layer.build(x.shape)
        layer.set_weights([kernel, bias])
        if kernel_name:
            _with_kernel(layer, kernel_name, training=True)
        results.append(_outputs_and_gradients(layer, x, upstream, graph)[1:])  # gradients only
    for ours, keras_grad in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(ours.numpy(), keras_grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize(
    "dilation, padding, size",
    [(2, "same", (9, 7)), ((2, 3), "same", (8, 10)), (2, "valid", (9, 9))],
)
def test_dilated_conv_equals_keras_conv_with_gradients(rng, dilation, padding, size, graph):
    """The native dilated conv against Keras' (SpaceToBatch) one: outputs and the
    gradients for input, kernel and bias."""
    x = tf.constant(rng.normal(size=(2, *size, 5)).astype("float32"))
    weights = [
        rng.normal(size=(3, 3, 5, 4)).astype("float32"),
        rng.normal(size=4).astype("float32"),
    ]
    layers = [keras.layers.Conv2D(4, 3, padding=padding, dilation_rate=dilation) for _ in "ab"]
    for layer in layers:
        layer.build(x.shape)
        layer.set_weights(weights)
    _with_kernel(layers[1], "native_dilated_conv", training=True)
    upstream = tf.constant(rng.normal(size=layers[0].compute_output_shape(x.shape)), tf.float32)
    keras_results, our_results = (
        _outputs_and_gradients(layer, x, upstream, graph) for layer in layers
    )
    for ours, reference in zip(our_results, keras_results, strict=True):
        np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)


def test_installed_kernels_are_not_saved(tmp_path, rng):
    """A model running kernels saves (and clones) as the standard layers it is made of."""
    inputs = keras.Input((None, None, 4))
    x = keras.layers.Conv2D(3, 3, padding="same", dilation_rate=2, name="conv")(inputs)
    outputs = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, outputs)
    _with_kernel(model.get_layer("conv"), "native_dilated_conv")
    _with_kernel(model.get_layer("bn"), "fused_batch_norm", training=True)
    x = rng.normal(size=(1, 9, 7, 4)).astype("float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    for copy in (keras.models.load_model(path), keras.models.clone_model(model)):
        copy.set_weights(model.get_weights())
        assert [type(la) for la in copy.layers[1:]] == [
            keras.layers.Conv2D,
            keras.layers.BatchNormalization,
        ]
        assert not any(kernels.installed(la) for la in copy.layers)
        np.testing.assert_allclose(copy(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    kernels.uninstall(model.get_layer("conv"))
    assert kernels.installed(model.get_layer("conv")) is None
    assert "call" not in vars(model.get_layer("conv"))


def _batch_norm_run(layer, x, upstream, graph, **call):
    """Outputs and gradients for x, gamma and beta, and the layer's weights afterwards
    (moving statistics updated or not), as numpy arrays."""
    results = _outputs_and_gradients(layer, x, upstream, graph, ("gamma", "beta"), **call)
    return [r.numpy() for r in results], [w.numpy() for w in layer.weights]


def _fused_op_count(layer, x, **call):
    graph = tf.function(lambda x: layer(x, **call)).get_concrete_function(x).graph
    return sum(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


def _batch_norm_pair(rng, shape, **options):
    gamma, beta = rng.uniform(0.5, 1.5, shape[-1]), rng.normal(size=shape[-1])
    mean, variance = rng.normal(size=shape[-1]), rng.uniform(0.5, 2, shape[-1])
    weights = [w.astype("float32") for w in (gamma, beta, mean, variance)]
    pair = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, **options) for _ in "ab"]
    for layer in pair:
        layer.build(shape)
        layer.set_weights(weights + layer.get_weights()[4:])  # renorm has 3 more
    _with_kernel(pair[1], "fused_batch_norm", training=True)
    return pair, weights


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
def test_fused_batch_norm_training_equals_numpy_and_keras(rng, graph):
    """Training mode: outputs and moving statistics against numpy's batch statistics
    (biased variance, as Keras keeps), gradients against Keras' BatchNormalization."""
    shape = (2, 7, 5, 6)
    x = tf.constant((rng.normal(size=shape) * 3 + 1).astype("float32"))
    upstream = tf.constant(rng.normal(size=shape).astype("float32"))
    (keras_bn, fused), (gamma, beta, moving_mean, moving_variance) = _batch_norm_pair(rng, shape)
    keras_out, _ = _batch_norm_run(keras_bn, x, upstream, graph, training=True)
    out, weights = _batch_norm_run(fused, x, upstream, graph, training=True)
    xs = x.numpy().astype("float64")
    mean, variance = xs.mean(axis=(0, 1, 2)), xs.var(axis=(0, 1, 2))
    expected = (xs - mean) / np.sqrt(variance + 1e-3) * gamma + beta
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    expected_weights = [gamma, beta, 0.9 * moving_mean + 0.1 * mean]
    expected_weights.append(0.9 * moving_variance + 0.1 * variance)
    for ours, reference in zip(weights, expected_weights, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    for ours, reference in zip(out[1:], keras_out[1:], strict=True):  # d x, d gamma, d beta
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
    assert _fused_op_count(fused, x, training=True) == 1


def test_fused_batch_norm_in_bfloat16_equals_keras_mixed_policy(rng):
    shape = (2, 6, 6, 8)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    upstream = tf.constant(rng.normal(size=shape).astype("float32"))
    pair, _ = _batch_norm_pair(rng, shape, dtype="mixed_bfloat16")
    (keras_out, keras_weights), (out, weights) = (
        _batch_norm_run(layer, x, upstream, False, training=True) for layer in pair
    )
    assert pair[1](x, training=True).dtype == tf.bfloat16
    for ours, reference in zip(out + weights, keras_out + keras_weights, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=2e-2, atol=2e-2)  # bf16 rounding
    np.testing.assert_allclose(weights[2:], keras_weights[2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["inference", "frozen", "mask", "renorm"], ids=lambda case: case)
def test_fused_batch_norm_runs_keras_call_where_it_does_not_apply(rng, case):
    """Inference, frozen layers, masks and renorm: Keras' own computation (and no fused
    op), so outputs, gradients and moving statistics are Keras' exactly."""
    shape = (2, 5, 4, 3)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    upstream = tf.constant(rng.normal(size=shape).astype("float32"))
    pair, _ = _batch_norm_pair(rng, shape, renorm=case == "renorm")
    call = {"training": case != "inference"}
    if case == "frozen":
        for layer in pair:
            layer.trainable = False
    if case == "mask":
        call["mask"] = tf.constant(rng.uniform(size=shape[:3]) > 0.3)
    (keras_out, keras_weights), (out, weights) = (
        _batch_norm_run(layer, x, upstream, False, **call) for layer in pair
    )
    for ours, reference in zip(out + weights, keras_out + keras_weights, strict=True):
        np.testing.assert_array_equal(ours, reference)
    assert _fused_op_count(pair[1], x, **call) == 0
