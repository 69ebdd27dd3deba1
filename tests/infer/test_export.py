"""Export: SavedModel for any size, TFLite (float32, dynamic range), ONNX; reloaded and compared."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize_batch_norm, randomize_weights

from pspnet_tf import build_pspnet, rebuild
from pspnet_tf.cli import main as cli_main
from pspnet_tf.infer.export import export_onnx, export_saved_model, saved_model_agreement
from pspnet_tf.infer.litert import export_tflite, run_tflite
from pspnet_tf.infer.predictor import as_predictor

# Neither is the 64x64 training size; odd sizes exercise the adaptive pooling.
SIZES = [(50, 70), (97, 61)]


@pytest.fixture(scope="module")
def model():
    """A tiny PSPNet with an aux head, built for 64x64, with non-trivial weights."""
    pspnet = build_pspnet(
        4,
        "mobilenetv2",
        (64, 64, 3),
        alpha=0.35,
        aux_head=True,
        class_names=["a", "b", "c", "d"],
    )
    return randomize_weights(pspnet, seed=3)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (*size, 3)).astype("uint8") for size in SIZES]


@pytest.fixture(scope="module")
def saved_model(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "saved_model"
    export_saved_model(model, path)
    return tf.saved_model.load(str(path)), path


def _keras_logits(model, image):
    """The Keras model built for exactly this image's size (an independent graph)."""
    static = rebuild(model, input_shape=image.shape, aux_head=False)
    return static(image[None].astype("float32"), training=False).numpy()[0]


def test_saved_model_serves_any_size_like_keras(model, images, saved_model):
    loaded, path = saved_model
    for image in images:
        out = loaded.serving_default(tf.constant(image[None]))
        assert out["labels"].dtype == tf.int32 and out["labels"].shape == (1, *image.shape[:2])
        logits = _keras_logits(model, image)
        # Static pools (Keras at this size) vs adaptive ones (any size) round differently.
        np.testing.assert_allclose(out["probabilities"][0], tf.nn.softmax(logits), atol=1e-4)
        np.testing.assert_array_equal(out["labels"][0], logits.argmax(-1))
        # The same through the serving signature a server would call.
        by_signature = loaded.signatures["serving_default"](images=tf.constant(image[None]))
        np.testing.assert_array_equal(by_signature["labels"], out["labels"])
    assert saved_model_agreement(model, path, images) == 1.0


def test_saved_model_signature_and_metadata(saved_model):
    loaded, _ = saved_model
    spec = loaded.signatures["serving_default"].structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    metadata = json.loads(loaded.metadata()["json"].numpy())
    assert metadata["class_names"] == ["a", "b", "c", "d"]
    assert metadata["architecture"]["aux_head"] is False


def test_saved_model_in_bfloat16(images, tmp_path):
    model = build_pspnet(4, "mobilenetv2", (64, 64, 3), alpha=0.35, aux_head=True)
    model = randomize_batch_norm(model, seed=5)
    path = export_saved_model(model, tmp_path / "bf16", precision="bfloat16")
    loaded = tf.saved_model.load(path)
    assert json.loads(loaded.metadata()["json"].numpy())["precision"] == "bfloat16"
    reference = as_predictor(model, precision="float32")
    for image in images:
        out = loaded.serving_default(tf.constant(image[None]))
        assert out["probabilities"].dtype == tf.float32
        probabilities = tf.nn.softmax(reference(image[None].astype("float32"))[0]).numpy()
        difference = np.abs(out["probabilities"][0].numpy() - probabilities).max()
        assert 1e-4 < difference < 0.05  # computed in bfloat16: close to float32, not equal
        agreement = np.mean(out["labels"][0].numpy() == probabilities.argmax(-1))
        assert agreement > 0.97


def test_cli_precision_is_for_saved_models_only(pixelwise_model, tmp_path, capsys):
    pixelwise_model(np.eye(3), np.zeros(3)).save(tmp_path / "m.keras")
    args = ["export", "--model", str(tmp_path / "m.keras"), "--output", str(tmp_path / "m.tflite")]
    code = cli_main([*args, "--format", "tflite", "--input-size", "8", "--precision", "bfloat16"])
    assert code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("pspnet-tf export: error: --precision applies to --format saved_model only")
    )
    assert not (tmp_path / "m.tflite").exists()


BAD_INPUTS = {
    "float": (np.zeros((1, 8, 8, 3), "float32"), "uint8"),
    "rank 3": (np.zeros((8, 8, 3), "uint8"), r"\?,\?,\?,3|None, None, None, 3"),
    "2 channels": (np.zeros((1, 8, 8, 2), "uint8"), r"\?,\?,\?,3|None, None, None, 3"),
    "empty": (np.zeros((1, 0, 8, 3), "uint8"), "height and width >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("call", ["function", "signature"])
def test_bad_input_fails_with_a_clear_message(saved_model, case, call):
    loaded, _ = saved_model
    images, message = BAD_INPUTS[case]
    if call == "function":
        run = loaded.serving_default
    else:
        signature = loaded.signatures["serving_default"]

        def run(x):
            return signature(images=x)

    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match=message):
        run(tf.constant(images))


def test_saved_model_needs_an_any_size_model(pixelwise_model, tmp_path):
    fixed = pixelwise_model(np.eye(3), np.zeros(3), input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="takes only"):
        export_saved_model(fixed, tmp_path / "sm")
    assert not (tmp_path / "sm").exists()


@pytest.mark.slow
def test_tflite_float32_and_dynamic_range_match_keras(model, tmp_path):
    size = (72, 88)
    image = np.random.default_rng(1).integers(0, 256, (*size, 3)).astype("uint8")
    logits = _keras_logits(model, image)
    float_path = export_tflite(model, tmp_path / "m.tflite", size)
    out = run_tflite(float_path, image)
    assert out["labels"].shape == (1, *size) and out["labels"].dtype == np.int32
    assert (out["labels"][0] == logits.argmax(-1)).mean() >= 0.999
    np.testing.assert_allclose(out["probabilities"][0], tf.nn.softmax(logits), atol=1e-4)

    quantized_path = export_tflite(model, tmp_path / "q.tflite", size, quantization="dynamic")
    assert os.path.getsize(quantized_path) < 0.5 * os.path.getsize(float_path)
    quantized = run_tflite(quantized_path, image)
    # int8 weights move the logits of a random-weight model; most labels still agree.
    assert (quantized["labels"][0] == logits.argmax(-1)).mean() >= 0.75
    with pytest.raises(ValueError, match=r"uint8 images of shape \(1, 72, 88, 3\)"):
        run_tflite(float_path, image[:50])
    with pytest.raises(ValueError, match="quantization"):
        export_tflite(model, tmp_path / "x.tflite", size, quantization="int4")


@pytest.mark.slow
def test_onnx_serves_any_size_like_keras(model, images, tmp_path):
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for image in images:
        out = dict(zip(names, session.run(None, {"images": image[None]}), strict=True))
        logits = _keras_logits(model, image)
        np.testing.assert_array_equal(out["labels"][0], logits.argmax(-1))
        np.testing.assert_allclose(out["probabilities"][0], tf.nn.softmax(logits), atol=1e-4)


def test_cli_export_saved_model_and_tflite(pixelwise_model, tmp_path, capsys):
    kernel, bias = np.random.default_rng(0).normal(size=(3, 3)), np.zeros(3)
    model = pixelwise_model(kernel, bias)
    model.save(tmp_path / "m.keras")
    image = np.random.default_rng(2).integers(0, 256, (21, 34, 3)).astype("uint8")
    expected = np.argmax(as_predictor(model)(image[None].astype("float32"))[0], -1)

    out = tmp_path / "sm"
    args = ["export", "--model", str(tmp_path / "m.keras"), "--output", str(out)]
    assert cli_main(args) == 0
    loaded = tf.saved_model.load(str(out))  # keep it referenced: its variables die with it
    labels = loaded.serving_default(tf.constant(image[None]))["labels"]
    np.testing.assert_array_equal(labels[0], expected)

    tflite = tmp_path / "m.tflite"
    args = ["export", "--model", str(tmp_path / "m.keras"), "--output", str(tflite)]
    assert cli_main([*args, "--format", "tflite", "--input-size", "21", "34"]) == 0
    np.testing.assert_array_equal(run_tflite(tflite, image)["labels"][0], expected)
    assert "wrote" in capsys.readouterr().out
