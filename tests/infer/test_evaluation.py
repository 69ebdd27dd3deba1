"""Evaluation modes and reports, checked against numpy on models whose outputs are known."""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    BIAS,
    KERNEL,
    numpy_logits,
    numpy_resize,
    numpy_softmax,
    randomize_weights,
)
from PIL import Image

from pspnet_tf import build_pspnet, rebuild
from pspnet_tf.cli import main as cli_main
from pspnet_tf.infer.evaluation import (
    evaluate,
    format_report,
    plot_confusion_matrix,
    write_json_report,
)
from pspnet_tf.infer.modes import predict_scores, single_logits
from pspnet_tf.infer.predictor import as_predictor


def numpy_miou(labels, predictions, num_classes):
    """mIoU and pixel accuracy from label/prediction lists, ignoring 255."""
    labels = np.concatenate([x.ravel() for x in labels])
    predictions = np.concatenate([x.ravel() for x in predictions])
    keep = labels != 255
    labels, predictions = labels[keep], predictions[keep]
    ious = []
    for c in range(num_classes):
        union = np.sum((labels == c) | (predictions == c))
        if union:
            ious.append(np.sum((labels == c) & (predictions == c)) / union)
    return np.mean(ious), np.mean(labels == predictions)


def _dataset(rng, sizes, num_classes=3):
    images, labels = [], []
    for height, width in sizes:
        # Smooth images (a few coloured blobs) keep classes in regions, as in real data.
        small = rng.uniform(0, 255, (4, 5, 3))
        images.append(np.clip(numpy_resize(small, (height, width)), 0, 255).astype("float32"))
        label = rng.integers(0, num_classes, (height, width)).astype("int32")
        label[rng.uniform(size=(height, width)) < 0.1] = 255
        labels.append(label)
    return images, labels


def _numpy_predictions(mode, image):
    if mode in ("single", "sliding"):  # a pixelwise model: windows change nothing
        return numpy_logits(image).argmax(-1)
    height, width = image.shape[:2]
    total = 0
    for scale in (0.5, 1.0, 1.75):
        long_side = round(scale * 48)
        size = (long_side, round(width * long_side / height))
        if width > height:
            size = (round(height * long_side / width), long_side)
        total = total + numpy_resize(
            numpy_softmax(numpy_logits(numpy_resize(image, size))), image.shape[:2]
        )
    return total.argmax(-1)


@pytest.mark.parametrize("mode", ["single", "sliding", "multiscale"])
def test_every_mode_gives_the_numpy_miou(mode, pixelwise_model, rng):
    model = pixelwise_model(KERNEL, BIAS)
    sizes = [(20, 28), (32, 32), (41, 57)]  # smaller than, equal to, larger than the crop
    images, labels = _dataset(rng, sizes)
    dataset = tf.data.Dataset.from_generator(
        lambda: ((x[None], y[None]) for x, y in zip(images, labels, strict=True)),
        output_signature=(
            tf.TensorSpec((1, None, None, 3), tf.float32),
            tf.TensorSpec((1, None, None), tf.int32),
        ),
    )
    report = evaluate(
        model, dataset, mode=mode, crop_size=32, base_size=48, scales=(0.5, 1.0, 1.75), verbose=0
    )
    predictions = [_numpy_predictions(mode, image) for image in images]
    miou, accuracy = numpy_miou(labels, predictions, 3)
    assert report["num_images"] == 3
    np.testing.assert_allclose(report["miou"], miou, rtol=1e-12)
    np.testing.assert_allclose(report["pixel_accuracy"], accuracy, rtol=1e-12)
    # Different modes really differ here, or the test would not tell them apart.
    if mode == "multiscale":
        single = [_numpy_predictions("single", image) for image in images]
        assert not all(np.array_equal(a, b) for a, b in zip(single, predictions, strict=True))


def test_single_mode_resizes_and_pads_for_a_fixed_size_model(pixelwise_model, rng):
    # A 32x32-only model that cannot be rebuilt: a 20x40 image is resized to
    # 16x32, padded to 32x32, and its scores resized back to 20x40.
    model = pixelwise_model(KERNEL, BIAS, input_shape=(32, 32, 3))
    image = rng.uniform(0, 255, (20, 40, 3)).astype("float32")
    scores = predict_scores(model, image, "single")
    expected = numpy_resize(numpy_logits(numpy_resize(image, (16, 32))), (20, 40))
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    with pytest.raises(ValueError, match="crop_size"):
        predict_scores(model, image, "sliding", crop_size=24)


def test_pad_value_is_the_mean_pixel_in_rgb(pixelwise_model):
    bgr = pixelwise_model(KERNEL, BIAS, mean=(10.0, 20.0, 30.0), channel_order="bgr")
    predictor = as_predictor(bgr)
    np.testing.assert_array_equal(predictor.pad_value, [30.0, 20.0, 10.0])
    normalised = bgr.get_layer("preprocessing")(predictor.pad_value[None, None, None])
    np.testing.assert_array_equal(np.asarray(normalised), 0.0)


def test_pspnet_is_rebuilt_for_any_size_and_modes_agree():
    model = randomize_weights(
        build_pspnet(3, "mobilenetv2", (64, 64, 3), alpha=0.35, aux_head=True)
    )
    predictor = as_predictor(model, frozen=False)
    assert predictor.crop_size == (64, 64) and predictor.input_size is None
    np.testing.assert_array_equal(predictor.pad_value, [127.5, 127.5, 127.5])
    image = np.random.default_rng(0).uniform(0, 255, (50, 70, 3)).astype("float32")
    single = predict_scores(predictor, image, "single")
    # The same network built statically for this exact size (an independent graph).
    static = rebuild(model, input_shape=(50, 70, 3), aux_head=False)
    reference = static(image[None], training=False)[0].numpy()
    np.testing.assert_allclose(single, reference, atol=1e-4 * np.abs(reference).max())
    # The default (a frozen graph: BatchNorm folded by TF) equals it to float32 rounding.
    fast = predict_scores(as_predictor(model), image, "single")
    assert np.abs(fast - single).max() < 1e-4 * np.abs(single).max()
    # One window covering the whole image is the single-scale pass.
    sliding = predict_scores(predictor, image, "sliding", crop_size=(50, 70))
    np.testing.assert_allclose(sliding, single, atol=1e-5)
    np.testing.assert_allclose(single_logits(predictor, image), single, atol=1e-6)


def test_evaluate_names_the_image_with_out_of_range_labels(pixelwise_model):
    labels = np.zeros((1, 8, 8), "int32")
    labels[0, 2, 3] = 7
    image = np.zeros((1, 8, 8, 3), "float32")
    data = [(image, np.zeros((1, 8, 8), "int32")), (image, labels)]
    with pytest.raises(ValueError, match=r"image 1: label values \[7\]"):
        evaluate(pixelwise_model(KERNEL, BIAS), data, verbose=0)


def test_reports_table_json_and_confusion_png(pixelwise_model, tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("# my classes\nsky\n\n road \ntree\n")
    image = np.zeros((1, 4, 4, 3), "float32")  # every pixel predicted as the same class
    predicted = int(numpy_logits(image[0, 0, 0]).argmax())
    labels = np.full((1, 4, 4), predicted, "int32")
    labels[0, 0] = (predicted + 1) % 3
    report = evaluate(
        pixelwise_model(KERNEL, BIAS), [(image, labels)], class_names=names_file, verbose=0
    )
    assert report["class_names"] == ["sky", "road", "tree"]
    assert report["pixel_accuracy"] == pytest.approx(12 / 16)
    assert report["per_class_iou"][predicted] == pytest.approx(12 / 16)
    text = format_report(report)
    assert "road" in text and "75.00" in text
    write_json_report(report, tmp_path / "out" / "report.json")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["miou"] == pytest.approx(report["miou"])
    missing = 3 - len({predicted, (predicted + 1) % 3})
    assert saved["per_class_iou"].count(None) == missing  # NaN -> null
    assert saved["confusion_matrix"][(predicted + 1) % 3][predicted] == 4
    png = plot_confusion_matrix(report, tmp_path / "confusion.png")
    with Image.open(png) as picture:
        assert picture.format == "PNG" and min(picture.size) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "names.txt", "out"]
    with pytest.raises(ValueError, match="2 class names given for 3"):
        evaluate(pixelwise_model(KERNEL, BIAS), [(image, labels)], class_names=["a", "b"])


@pytest.mark.parametrize("precision", [None, "bfloat16"])
def test_cli_evaluate_writes_the_same_report(pixelwise_model, tmp_path, rng, capsys, precision):
    images, labels = _dataset(rng, [(24, 30), (40, 36)])
    lines = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image.round().astype("uint8")).save(tmp_path / f"i{i}.png")
        Image.fromarray(label.astype("uint8")).save(tmp_path / f"l{i}.png")
        lines.append(f"i{i}.png l{i}.png")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    model = pixelwise_model(KERNEL, BIAS, metadata={"class_names": ["a", "b", "c"]})
    model.save(tmp_path / "model.keras")
    code = cli_main(
        ["evaluate", "--model", str(tmp_path / "model.keras"), "--data", str(tmp_path),
         "--layout", "list", "--mode", "sliding", "--crop-size", "32",
         "--json", str(tmp_path / "r.json"), "--confusion-png", str(tmp_path / "c.png"),
         *(["--precision", precision] if precision else [])]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    # The classifier gives the model's output, which stays float32 at any precision.
    assert saved["settings"]["precision"] == precision
    rounded = [image.round() for image in images]
    miou, _ = numpy_miou(labels, [numpy_logits(x).argmax(-1) for x in rounded], 3)
    assert saved["miou"] == pytest.approx(miou, rel=1e-12)
    assert saved["class_names"] == ["a", "b", "c"] and (tmp_path / "c.png").is_file()
    assert "mIoU" in capsys.readouterr().out
