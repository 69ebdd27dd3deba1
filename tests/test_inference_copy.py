"""Inference copies keep the outputs: BatchNorm folded, reduced compute precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import BIAS, KERNEL, MEAN, STD, randomize_batch_norm, randomize_weights

from pspnet_tf import build_pspnet, rebuild
from pspnet_tf.inference import as_predictor
from pspnet_tf.inference_copy import (
    FoldedBatchNorm,
    FrozenGraph,
    fold_batch_norm,
    inference_copy,
)
from pspnet_tf.precision import dtype_policy
from pspnet_tf.predict import predict_image


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
    # Standard layers only, besides the pass-throughs: the copy runs anywhere.
    custom = {type(la).__module__.split(".")[0] for la in fast.layers} - {"keras"}
    assert custom == {"pspnet_tf"}
    assert {
        type(la).__name__ for la in fast.layers if type(la).__module__.startswith("pspnet")
    } <= {"FoldedBatchNorm", "Preprocessing", "AdaptiveAveragePooling", "ResizeLike"}
    for shape in ((1, size, size, 3), (2, 50, 70, 3)):
        images = rng.uniform(0, 255, shape).astype("float32")
        reference = model(images, training=False).numpy()
        assert _relative_error(fast(images, training=False).numpy(), reference) < 1e-4
    path = str(tmp_path / "fast.keras")
    fast.save(path)
    loaded = keras.models.load_model(path)
    images = rng.uniform(0, 255, (1, 40, 56, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images).numpy(), fast(images).numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small_model():
    model = build_pspnet(5, "mobilenetv2", (None, None, 3), alpha=0.35, aux_head=False)
    return randomize_batch_norm(model, seed=4)


def test_reduced_precision_copy_computes_as_a_model_built_under_keras_mixed_policy(
    small_model, rng
):
    with dtype_policy("bfloat16"):  # how training builds a bf16 model
        mixed = build_pspnet(5, "mobilenetv2", (None, None, 3), alpha=0.35, aux_head=False)
    mixed.set_weights(small_model.get_weights())
    copy = inference_copy(small_model, fold=False, precision="bfloat16")

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
    fast = fold_batch_norm(small_model, precision="bfloat16")
    assert any(isinstance(layer, FoldedBatchNorm) for layer in fast.layers)
    convs = [la for la in fast.layers if isinstance(la, keras.layers.Conv2D | FoldedBatchNorm)]
    assert {la.dtype_policy.compute_dtype for la in convs} == {"bfloat16"}
    images = rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    reference = small_model(images, training=False).numpy()
    assert _relative_error(fast(images, training=False).numpy(), reference) < 0.05
    # float32 asked of a model built under the mixed policy: computes in float32 again.
    back = inference_copy(fast, fold=False, precision="float32")
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


def test_frozen_graph_computes_the_numpy_logits_of_the_weights_it_was_made_with(
    pixelwise_model, rng
):
    model = pixelwise_model(KERNEL, BIAS)
    frozen = FrozenGraph(model)
    assert frozen.input_shape == (None, None, None, 3)
    for shape in ((1, 5, 7, 3), (3, 9, 4, 3)):  # any batch and size
        images = rng.uniform(0, 255, shape).astype("float32")
        expected = ((images - MEAN) / STD) @ KERNEL + BIAS
        logits = frozen(images, training=False)
        assert isinstance(logits, tf.Tensor)
        np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    # The weights are constants of its graph: changing the model's does not reach it.
    zeros = [np.zeros((1, 1, *KERNEL.shape), "float32"), np.zeros(len(BIAS), "float32")]
    model.get_layer("classifier").set_weights(zeros)
    np.testing.assert_allclose(frozen(images).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not model(images).numpy().any()
    with pytest.raises(ValueError, match="inference only"):
        frozen(images, training=True)


def test_frozen_graph_keeps_a_pspnets_outputs_and_their_structure(rng):
    model = build_pspnet(5, "mobilenetv2", (48, 48, 3), alpha=0.35, aux_head=True)
    randomize_batch_norm(model, seed=5)
    frozen = FrozenGraph(model)
    assert frozen.input_shape == (None, 48, 48, 3)
    images = rng.uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    reference = model(images, training=False)
    outputs = frozen(images)
    assert sorted(outputs) == sorted(reference) == ["aux", "main"]
    for name, value in reference.items():
        assert _relative_error(outputs[name].numpy(), value.numpy()) < 1e-4, name
    with pytest.raises(ValueError, match="takes inputs of shape"):  # the size it was made for
        frozen(rng.uniform(0, 255, (1, 40, 48, 3)).astype("float32"))
