"""ONNX files: metadata inside, ONNX Runtime as a Predictor, predict and evaluate on one."""

import json

import numpy as np
import pytest
from conftest import numpy_logits
from PIL import Image

from pspnet_tf.cli import main as cli_main
from pspnet_tf.infer.export import export_onnx
from pspnet_tf.infer.modes import predict_scores
from pspnet_tf.infer.onnx_model import OnnxPredictor

KERNEL = np.array([[2.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.5, -2.0]])
BIAS = np.array([0.1, -0.2, 0.05])
NAMES = ["sky", "tree", "road"]

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    import keras

    from pspnet_tf.model.layers import Preprocessing

    image = keras.Input((None, None, 3))
    x = Preprocessing((100.0, 120.0, 140.0), (50.0, 60.0, 70.0), "rgb",
                      metadata={"class_names": NAMES}, name="preprocessing")(image)  # fmt: skip
    conv = keras.layers.Conv2D(3, 1, name="classifier")
    model = keras.Model(image, conv(x))
    conv.set_weights([KERNEL[None, None].astype("float32"), BIAS.astype("float32")])
    folder = tmp_path_factory.mktemp("onnx")
    model.save(folder / "m.keras")
    return export_onnx(model, folder / "m.onnx"), folder / "m.keras"


def test_an_onnx_predictor_gives_the_keras_logits_at_any_size(onnx_file):
    predictor = OnnxPredictor(onnx_file[0], threads=1)
    assert predictor.num_classes == 3 and predictor.class_names == NAMES
    np.testing.assert_allclose(predictor.pad_value, [100.0, 120.0, 140.0])
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype("float32")
    scores = predict_scores(predictor, image, "single")
    np.testing.assert_allclose(scores, numpy_logits(image), atol=1e-4)


def test_cli_predicts_and_evaluates_an_onnx_file(onnx_file, tmp_path):
    path, _ = onnx_file
    rng = np.random.default_rng(1)
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        jpeg = root / "JPEGImages" / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype("uint8")).save(jpeg)
        label = numpy_logits(np.asarray(Image.open(jpeg))).argmax(-1).astype("uint8")
        Image.fromarray(label, "L").save(root / "SegmentationClass" / f"p{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("p0\np1\n")
    report = tmp_path / "report.json"
    assert cli_main(["evaluate", "--model", str(path), "--data", str(root), "--layout", "voc",
                     "--json", str(report)]) == 0  # fmt: skip
    assert json.loads(report.read_text())["miou"] == 1.0  # float32 all the way: the same labels
    out = tmp_path / "out"
    assert cli_main(["predict", "--model", str(path), "--input", str(root / "JPEGImages"),
                     "--output", str(out), "--outputs", "labels"]) == 0  # fmt: skip
    labels = np.asarray(Image.open(out / "labels" / "p0.png"))
    expected = numpy_logits(np.asarray(Image.open(root / "JPEGImages" / "p0.jpg"))).argmax(-1)
    np.testing.assert_array_equal(labels, expected)
