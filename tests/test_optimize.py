"""Inference graph optimisations keep the outputs: BatchNorm folding, native dilated depthwise."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize_batch_norm, randomize_weights

from pspnet_tf import build_pspnet, rebuild
from pspnet_tf.inference import as_predictor
from pspnet_tf.optimize import (
    DilatedConv2D,
    DilatedDepthwiseConv2D,
    FoldedBatchNorm,
    FusedBatchNorm,
    MatmulConv2D,
    fold_batch_norm,
    onednn_enabled,
    optimize_for_inference,
)
from pspnet_tf.predict import predict_image
from pspnet_tf.training import dtype_policy


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
    layer = DilatedDepthwiseConv2D(3, dilation_rate=dilation, padding=padding, use_bias=True)
    x = rng.normal(size=(2, *size, 5)).astype("float32")
    layer.build(x.shape)
    kernel = rng.normal(size=(3, 3, 5, 1)).astype("float32")
    bias = rng.normal(size=(5,)).astype("float32")
    layer.set_weights([kernel, bias])
    expected = _numpy_dilated_depthwise(x.astype(np.float64), kernel, dilation, padding) + bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dilation, size", [(1, (7, 9)), (2, (8, 5))])
def test_matmul_conv_equals_a_direct_computation(rng, dilation, size):
    layer = MatmulConv2D(4, 3, padding="same", dilation_rate=dilation)
    x = rng.normal(size=(2, *size, 6)).astype("float32")
    layer.build(x.shape)
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
    a graph (as in ``fit``, where the gradient's ops are ordered by control dependencies)."""
    x = tf.constant(rng.normal(size=(2, *size, 6)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, *size, 4)).astype("float32"))
    kernel = rng.normal(size=(kernel_size, kernel_size, 6, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    results = []
    for cls in (keras.layers.Conv2D, MatmulConv2D):
        layer = cls(4, kernel_size, padding="same", dilation_rate=dilation)
        layer.build(x.shape)
        layer.set_weights([kernel, bias])
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
    layers = [
        cls(4, 3, padding=padding, dilation_rate=dilation)
        for cls in (keras.layers.Conv2D, DilatedConv2D)
    ]
    for layer in layers:
        layer.build(x.shape)
        layer.set_weights(weights)
    upstream = tf.constant(rng.normal(size=layers[0].compute_output_shape(x.shape)), tf.float32)
    keras_results, our_results = (
        _outputs_and_gradients(layer, x, upstream, graph) for layer in layers
    )
    for ours, reference in zip(our_results, keras_results, strict=True):
        np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)


def test_matmul_conv_without_onednn_is_keras_conv(rng, monkeypatch):
    layer = MatmulConv2D(3, 3, padding="same")
    x = rng.normal(size=(1, 5, 6, 4)).astype("float32")
    expected = layer(x).numpy()  # taps where oneDNN runs (x86 CI), Keras' conv elsewhere
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    reference = keras.layers.Conv2D.call(layer, tf.constant(x)).numpy()
    np.testing.assert_allclose(layer(x).numpy(), reference, rtol=1e-6)
    np.testing.assert_allclose(expected, reference, rtol=1e-5, atol=1e-5)


def test_dilated_conv_without_onednn_is_keras_conv(rng, monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    layer = DilatedConv2D(3, 3, padding="same", dilation_rate=2)
    x = tf.constant(rng.normal(size=(1, 7, 6, 4)).astype("float32"))
    np.testing.assert_array_equal(layer(x).numpy(), keras.layers.Conv2D.call(layer, x).numpy())


def test_resnet_dilated_convs_are_native_except_in_export_copies():
    model = build_pspnet(3, "resnet50", (64, 64, 3))
    dilated = [
        layer.name for layer in model.layers if max(getattr(layer, "dilation_rate", (1,))) > 1
    ]
    assert dilated and all(isinstance(model.get_layer(n), DilatedConv2D) for n in dilated)
    portable = fold_batch_norm(model, native_dilation=False)
    assert not any(isinstance(layer, DilatedConv2D) for layer in portable.layers)
    assert all(type(portable.get_layer(n)) is keras.layers.Conv2D for n in dilated)


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
    pair = [
        cls(momentum=0.9, epsilon=1e-3, **options)
        for cls in (keras.layers.BatchNormalization, FusedBatchNorm)
    ]
    for layer in pair:
        layer.build(shape)
        layer.set_weights(weights + layer.get_weights()[4:])  # renorm has 3 more
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


@pytest.mark.parametrize("backbone, alpha", [("resnet50", 1.0), ("mobilenetv2", 0.35)])
def test_models_are_built_with_fused_batch_norm(backbone, alpha):
    model = build_pspnet(3, backbone, (64, 64, 3), aux_head=True, alpha=alpha)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(isinstance(layer, FusedBatchNorm) for layer in norms)


def _relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("backbone, size, alpha", [("mobilenetv2", 64, 0.35), ("resnet50", 48, 1)])
def test_folded_model_gives_the_same_logits(tmp_path, rng, backbone, size, alpha):
    model = build_pspnet(5, backbone, (size, size, 3), alpha=alpha, aux_head=False)
    randomize_weights(model, seed=3)
    model = rebuild(model, input_shape=(None, None, 3))  # how predict and export use it
    fast = fold_batch_norm(model)
    batch_norms = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    identities = [la for la in fast.layers if isinstance(la, FoldedBatchNorm)]
    assert batch_norms and len(identities) == len(batch_norms)  # every BN follows a conv
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in fast.layers)
    dilated = [
        la
        for la in model.layers
        if isinstance(la, keras.layers.DepthwiseConv2D) and max(la.dilation_rate) > 1
    ]
    assert len(dilated) == (11 if backbone == "mobilenetv2" else 0)  # blocks 6-16 at os 8
    depthwise = [la for la in fast.layers if isinstance(la, keras.layers.DepthwiseConv2D)]
    assert all(isinstance(la, DilatedDepthwiseConv2D) for la in depthwise)
    matmul = [la.name for la in fast.layers if isinstance(la, MatmulConv2D)]
    assert matmul == (["main_head_conv"] if backbone == "resnet50" else [])  # 4096 inputs
    for shape in ((1, size, size, 3), (2, 50, 70, 3)):
        images = rng.uniform(0, 255, shape).astype("float32")
        reference = model(images, training=False).numpy()
        assert _relative_error(fast(images, training=False).numpy(), reference) < 1e-4
    path = str(tmp_path / "fast.keras")
    fast.save(path)
    loaded = keras.models.load_model(path)
    images = rng.uniform(0, 255, (1, 40, 56, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images).numpy(), fast(images).numpy(), rtol=1e-5, atol=1e-5)


def test_onednn_switch_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert not onednn_enabled()


@pytest.fixture(scope="module")
def small_model():
    model = build_pspnet(5, "mobilenetv2", (None, None, 3), alpha=0.35, aux_head=False)
    return randomize_batch_norm(model, seed=4)


def test_reduced_precision_copy_computes_as_a_model_built_under_keras_mixed_policy(
    small_model, rng
):
    with dtype_policy("mixed_bfloat16"):  # how training builds a bf16 model
        mixed = build_pspnet(5, "mobilenetv2", (None, None, 3), alpha=0.35, aux_head=False)
    mixed.set_weights(small_model.get_weights())
    copy = optimize_for_inference(small_model, precision="bfloat16", fold=False)

    def policies(model):  # input layers only pass float32 pixels on
        return {
            layer.name: layer.dtype_policy.name
            for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)
        }

    assert policies(copy) == policies(mixed)
    # Raw pixels are normalised and logits returned in float32; the network in between
    # computes in bfloat16 with float32 weights.
    policies = policies(copy)
    assert copy.inputs[0].dtype == "float32"
    assert policies["preprocessing"] == policies["main"] == "float32"
    assert policies["Conv1"] == policies["main_head_conv"] == "mixed_bfloat16"
    assert all(w.dtype == "float32" for w in copy.weights)
    images = rng.uniform(0, 255, (2, 45, 61, 3)).astype("float32")
    out = copy(images, training=False)
    assert out.dtype == "float32"
    np.testing.assert_array_equal(out.numpy(), mixed(images, training=False).numpy())
    reference = small_model(images, training=False).numpy()
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per op): close, not equal.
    assert 1e-4 < _relative_error(out.numpy(), reference) < 0.05


def test_folded_bfloat16_model_stays_close_to_float32(small_model, rng):
    fast = optimize_for_inference(small_model, precision="bfloat16")
    assert any(isinstance(layer, FoldedBatchNorm) for layer in fast.layers)
    convs = [la for la in fast.layers if isinstance(la, keras.layers.Conv2D | FoldedBatchNorm)]
    assert {la.dtype_policy.compute_dtype for la in convs} == {"bfloat16"}
    images = rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    reference = small_model(images, training=False).numpy()
    assert _relative_error(fast(images, training=False).numpy(), reference) < 0.05
    # float32 asked of a model built under the mixed policy: computes in float32 again.
    back = optimize_for_inference(fast, precision="float32", fold=False)
    assert {la.dtype_policy.name for la in back.layers} == {"float32"}


def test_predictor_precision(small_model, rng):
    predictor = as_predictor(small_model, precision="bfloat16")
    assert predictor.precision == "bfloat16"
    assert as_predictor(predictor) is predictor
    assert as_predictor(predictor, precision="bfloat16") is predictor
    again = as_predictor(predictor, precision="float32")
    assert again.precision == "float32" and again.model is predictor.model
    images = rng.uniform(0, 255, (1, 40, 52, 3)).astype("float32")
    reference = as_predictor(small_model, fast=False)(images)
    np.testing.assert_allclose(
        again(images), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max()
    )
    assert _relative_error(predictor(images), reference) < 0.05
    slow = as_predictor(small_model, fast=False, precision="bfloat16")
    assert _relative_error(slow(images), reference) < 0.05
    with pytest.raises(ValueError, match="precision must be one of .*'bf16'"):
        as_predictor(small_model, precision="bf16")
    # The one-image API takes it too, and runs the same bfloat16 graph.
    image = images[0].astype("uint8")
    labels = predict_image(small_model, image, precision="bfloat16")
    np.testing.assert_array_equal(labels, predictor(image[None].astype("float32"))[0].argmax(-1))
    assert np.mean(labels == reference[0].argmax(-1)) > 0.9
