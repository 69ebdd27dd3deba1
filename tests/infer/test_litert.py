"""LiteRT files: every quantisation against the Keras model, metadata inside the file,
and predict / evaluate running a ``.tflite`` through the command line."""

import json

import numpy as np
import pytest
from conftest import numpy_logits
from PIL import Image

from pspnet_tf.cli import main as cli_main
from pspnet_tf.infer.litert import (
    LiteRTPredictor,
    calibration_samples,
    export_litert,
    read_litert_metadata,
    run_tflite,
)
from pspnet_tf.infer.modes import predict_scores

# The conftest pixelwise model's weights (labels follow each pixel's colour).
KERNEL = np.array([[2.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.5, -2.0]])
BIAS = np.array([0.1, -0.2, 0.05])
SIZE = (24, 32)
NAMES, PALETTE = ["sky", "tree", "road"], [[0, 0, 255], [0, 255, 0], [128, 128, 128]]


@pytest.fixture
def model(pixelwise_model):
    return pixelwise_model(KERNEL, BIAS, metadata={"class_names": NAMES, "palette": PALETTE})


def _photos(n, seed=0):
    """Smooth colour fields (like photos, unlike noise): labels form regions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        corners = rng.uniform(0, 255, (2, 2, 3))
        y = np.linspace(0, 1, SIZE[0])[:, None, None]
        x = np.linspace(0, 1, SIZE[1])[None, :, None]
        top = corners[0, 0] * (1 - x) + corners[0, 1] * x
        bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
        image = top * (1 - y) + bottom * y + rng.normal(0, 8, (*SIZE, 3))
        out.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return out


def _agreement(path, images):
    equal = [
        (run_tflite(path, image)["labels"][0] == numpy_logits(image).argmax(-1)).mean()
        for image in images
    ]
    return float(np.mean(equal))


@pytest.mark.parametrize("quantization", ["none", "float16", "dynamic", "int8"])
def test_each_quantization_labels_as_the_keras_model(model, tmp_path, quantization):
    path = tmp_path / f"{quantization}.tflite"
    export_litert(model, path, SIZE, quantization, calibration=_photos(16, seed=1))
    images = _photos(8, seed=2)
    agreement = _agreement(path, images)
    # float32/float16: the same labels but for float rounding at class boundaries. int8:
    # 8-bit activations move the boundaries by about a step; calibrated, at most a few
    # percent of pixels change (a calibration on other images is the next test).
    assert agreement >= (0.999 if quantization in ("none", "float16") else 0.97), agreement
    out = run_tflite(path, images[0])
    np.testing.assert_allclose(
        out["logits"][0], numpy_logits(images[0]), atol=0.02 if quantization == "none" else 0.5
    )
    assert read_litert_metadata(path)["quantization"] == quantization


def test_int8_calibrated_on_other_images_is_told_apart(model, tmp_path):
    # A calibration that never saw the activation range clips it: what the bound above catches.
    good, bad = tmp_path / "good.tflite", tmp_path / "bad.tflite"
    export_litert(model, good, SIZE, "int8", calibration=_photos(16, seed=1))
    grey = [np.full((*SIZE, 3), 120, np.uint8)] * 4
    export_litert(model, bad, SIZE, "int8", calibration=grey)
    images = _photos(8, seed=2)
    assert _agreement(bad, images) < 0.9 < _agreement(good, images)


def test_metadata_travels_inside_the_file(model, tmp_path):
    path = export_litert(model, tmp_path / "m.tflite", SIZE)
    metadata = read_litert_metadata(path)
    assert metadata["class_names"] == NAMES and metadata["palette"] == PALETTE
    assert metadata["input_size"] == list(SIZE) and metadata["pad_value"] == [100.0, 120.0, 140.0]
    predictor = LiteRTPredictor(path)
    assert (predictor.input_size, predictor.num_classes) == (SIZE, 3)
    assert predictor.class_names == NAMES and predictor.palette == PALETTE


def test_a_litert_predictor_serves_any_image_size_in_every_mode(model, tmp_path):
    predictor = LiteRTPredictor(export_litert(model, tmp_path / "m.tflite", SIZE))
    image = _photos(1)[0]
    big = np.asarray(Image.fromarray(image).resize((70, 50)), np.float32)  # not the file's size
    expected = numpy_logits(big).argmax(-1)
    for mode in ("single", "sliding"):
        labels = predict_scores(predictor, big, mode).argmax(-1)
        assert labels.shape == (50, 70)
        # single resizes into the file's size and back: boundaries move by a pixel or so.
        assert (labels == expected).mean() > (0.9 if mode == "single" else 0.999), mode


def test_calibration_needs_images(tmp_path):
    with pytest.raises(ValueError, match="needs calibration images"):
        calibration_samples([], SIZE, np.zeros(3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        calibration_samples(tmp_path / "empty", SIZE, np.zeros(3))
    samples = calibration_samples(_photos(3), (10, 12), np.zeros(3), count=2)
    assert len(samples) == 2 and samples[0].shape == (10, 12, 3) and samples[0].dtype == np.uint8


def _voc(root, images):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i, image in enumerate(images):
        path = root / "JPEGImages" / f"p{i}.jpg"
        Image.fromarray(image).save(path, quality=95)
        label = numpy_logits(np.asarray(Image.open(path))).argmax(-1).astype(np.uint8)
        Image.fromarray(label, "L").save(root / "SegmentationClass" / f"p{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text(
        "".join(f"p{i}\n" for i in range(len(images)))
    )


def test_cli_exports_int8_then_predicts_and_evaluates_the_tflite(model, tmp_path, capsys):
    model.save(tmp_path / "m.keras")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(_photos(6, seed=3)):
        Image.fromarray(image).save(photos / f"c{i}.png")
    data = tmp_path / "voc"
    _voc(data, _photos(3, seed=4))
    tflite = tmp_path / "model.bin"  # found by its content, not its name
    code = cli_main([
        "export", "--model", str(tmp_path / "m.keras"), "--output", str(tflite),
        "--format", "litert", "--input-size", *map(str, SIZE), "--quantization", "int8",
        "--calibration", str(photos), "--calibration-images", "4",
        "--check", str(data), "--layout", "voc",
    ])  # fmt: skip
    assert code == 0 and read_litert_metadata(tflite)["calibration_images"] == 4
    table = capsys.readouterr().out.splitlines()
    assert table[-3].split()[:2] == ["model", "mIoU"]
    keras_row, lite_row = table[-2].split(), table[-1].split()
    assert keras_row[:2] == ["Keras", "float32"] and keras_row[4] == "100.00"  # its own labels
    assert lite_row[:2] == ["LiteRT", "int8"] and float(lite_row[4]) > 95, table
    report = tmp_path / "report.json"
    args = ["--model", str(tflite), "--threads", "1"]
    assert cli_main(["evaluate", *args, "--data", str(data), "--layout", "voc",
                     "--json", str(report)]) == 0  # fmt: skip
    scores = json.loads(report.read_text())
    assert scores["miou"] > 0.9 and scores["class_names"] == NAMES
    assert (
        cli_main(["predict", *args, "--input", str(photos), "--output", str(tmp_path / "o")]) == 0
    )
    labels = np.asarray(Image.open(tmp_path / "o" / "labels" / "c0.png"))
    expected = numpy_logits(np.asarray(Image.open(photos / "c0.png"))).argmax(-1)
    assert labels.shape == SIZE and (labels == expected).mean() > 0.95
    assert "wrote 18 files" in capsys.readouterr().out


def test_cli_calibrates_int8_on_a_dataset_split(model, tmp_path):
    model.save(tmp_path / "m.keras")
    data = tmp_path / "voc"
    _voc(data, _photos(5, seed=5))
    (data / "ImageSets/Segmentation/train.txt").write_text("p0\np1\np2\n")
    tflite = tmp_path / "m.tflite"
    code = cli_main([
        "export", "--model", str(tmp_path / "m.keras"), "--output", str(tflite),
        "--format", "litert", "--input-size", *map(str, SIZE), "--quantization", "int8",
        "--calibration", str(data), "--layout", "voc",
    ])  # fmt: skip
    assert code == 0 and read_litert_metadata(tflite)["calibration_images"] == 3  # train's
    assert _agreement(tflite, _photos(4, seed=6)) > 0.95


def test_cli_refuses_int8_without_calibration_and_quantization_elsewhere(tmp_path, capsys):
    model = str(tmp_path / "unread.keras")  # never read: the flags are refused first
    out = str(tmp_path / "m.tflite")
    assert cli_main(["export", "--model", model, "--output", out, "--format", "litert",
                     "--input-size", "8", "--quantization", "int8"]) == 2  # fmt: skip
    assert "--quantization int8 needs --calibration DIR" in capsys.readouterr().err
    assert cli_main(["export", "--model", model, "--output", str(tmp_path / "sm"),
                     "--quantization", "float16"]) == 2  # fmt: skip
    assert "apply to --format litert only" in capsys.readouterr().err
