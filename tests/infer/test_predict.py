"""Prediction: the one-call API, colours, palette PNGs, folders and videos."""

import os

import cv2
import numpy as np
import pytest
from conftest import BIAS, KERNEL, MEAN, STD
from PIL import Image

from pspnet_tf.cli import main as cli_main
from pspnet_tf.data import classes
from pspnet_tf.data.classes import CITYSCAPES_PALETTE
from pspnet_tf.infer.pictures import add_legend, colorize, overlay, read_image, save_label_png
from pspnet_tf.infer.predict import predict_image, predict_path

PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def numpy_labels(image, kernel=KERNEL, bias=BIAS):
    return (((np.asarray(image, np.float64) - MEAN) / STD) @ kernel + bias).argmax(-1)


@pytest.fixture
def model(pixelwise_model):
    return pixelwise_model(KERNEL, BIAS)


def test_predict_image_any_size_and_format(model, rng):
    image = rng.integers(0, 256, (37, 53, 3)).astype("uint8")
    labels = predict_image(model, image)
    assert labels.shape == (37, 53) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, numpy_labels(image))
    np.testing.assert_array_equal(predict_image(model, image.astype("float64")), labels)
    rgba = np.concatenate([image, np.zeros((37, 53, 1), "uint8")], axis=-1)
    np.testing.assert_array_equal(predict_image(model, rgba), labels)
    gray = image[..., 0]
    np.testing.assert_array_equal(
        predict_image(model, gray), numpy_labels(np.stack([gray] * 3, -1))
    )


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((1, 8, 8, 3)), "got shape"),
        (np.zeros((8, 8, 2)), "got shape"),
        (np.zeros((0, 8, 3)), "empty"),
        (np.full((4, 4, 3), "x"), "dtype"),
    ],
)
def test_predict_image_rejects_bad_images(model, bad, message):
    with pytest.raises(ValueError, match=message):
        predict_image(model, bad)


def test_colorize_and_overlay_hand_worked():
    labels = np.array([[0, 1], [2, 255]])
    colours = colorize(labels, PALETTE)
    np.testing.assert_array_equal(colours, [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]])
    image = np.full((2, 2, 3), 100, "uint8")
    blended = overlay(image, labels, PALETTE, alpha=0.25)
    # 0.75 * 100 + 0.25 * colour: 75 or 138.75 -> 139
    np.testing.assert_array_equal(blended[0, 0], [139, 75, 75])
    np.testing.assert_array_equal(blended[1, 1], [75, 75, 75])
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, labels, PALETTE, alpha=2)


def test_label_png_is_a_palette_png_of_indices(tmp_path):
    labels = np.array([[0, 1, 2], [2, 1, 0]])
    path = save_label_png(labels, tmp_path / "sub" / "l.png", PALETTE)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
        assert image.getpalette()[:9] == [255, 0, 0, 0, 255, 0, 0, 0, 255]
    wide = save_label_png(np.array([[0, 300]]), tmp_path / "wide.png")
    with Image.open(wide) as image:  # more classes than a palette holds: 16-bit
        np.testing.assert_array_equal(np.asarray(image), [[0, 300]])


def test_legend_lists_only_the_classes_shown():
    image = np.zeros((60, 30, 3), "uint8")
    labels = np.zeros((60, 30), int)
    labels[:, 15:] = 2
    out = add_legend(image, ["sky", "road", "tree"], np.array(PALETTE), labels)
    assert out.shape[0] == 60 and out.shape[1] > 30
    np.testing.assert_array_equal(out[:, :30], image)
    panel = out[:, 30:].reshape(-1, 3)
    has = {tuple(c) for c in PALETTE if (panel == c).all(-1).any()}
    assert has == {(255, 0, 0), (0, 0, 255)}  # swatches of classes 0 and 2, not 1
    # A legend taller than the image extends it downwards with white.
    tall = add_legend(image[:10], ["sky", "road", "tree"], np.array(PALETTE))
    assert tall.shape[0] > 10
    np.testing.assert_array_equal(tall[:10, :30], image[:10])
    assert (tall[10:, :30] == 255).all()


def test_predict_folder_writes_labels_masks_and_overlays(pixelwise_model, tmp_path, rng):
    metadata = {"class_names": ["sky", "road", "tree"], "palette": PALETTE}
    model = pixelwise_model(KERNEL, BIAS, metadata=metadata)
    source = tmp_path / "in"
    source.mkdir()
    images = {
        "a.png": rng.integers(0, 256, (24, 31, 3)).astype("uint8"),
        "b.png": rng.integers(0, 256, (17, 20, 3)).astype("uint8"),
    }
    for name, image in images.items():
        Image.fromarray(image).save(source / name)
    (source / "notes.txt").write_text("not an image")
    written = predict_path(model, source, tmp_path / "out", legend=True, verbose=0)
    assert len(written) == 6
    for name, image in images.items():
        stem = name[:-4]
        expected = numpy_labels(image)
        with Image.open(tmp_path / "out" / "labels" / f"{stem}.png") as saved:
            np.testing.assert_array_equal(np.asarray(saved), expected)
        mask = read_image(tmp_path / "out" / "masks" / f"{stem}.png")
        # The model's own palette colours the mask; the legend widens it.
        np.testing.assert_array_equal(
            mask[: image.shape[0], : image.shape[1]], colorize(expected, PALETTE)
        )
        assert mask.shape[1] > image.shape[1]
        assert (tmp_path / "out" / "overlays" / f"{stem}.jpg").is_file()


def test_predict_path_errors_name_the_input(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict_path(model, tmp_path / "nowhere.png", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        predict_path(model, tmp_path / "empty", tmp_path / "out")
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(ValueError, match="unknown extension"):
        predict_path(model, tmp_path / "x.docx", tmp_path / "out")
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(ValueError, match="broken.png"):
        predict_path(model, tmp_path / "broken.png", tmp_path / "out", verbose=0)


def _write_video(path, frames):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 32))
    for frame in frames:
        writer.write(frame[..., ::-1].copy())
    writer.release()


def test_predict_video_writes_videos_and_label_frames(model, tmp_path):
    # Flat-colour frames survive MJPG almost unchanged, so labels are predictable;
    # the first frame shows two classes, the others one.
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 200)]
    frames = [np.full((32, 48, 3), c, np.uint8) for c in colours]
    frames[0][:, 24:] = colours[1]
    _write_video(tmp_path / "clip.avi", frames)
    # A legend of every class keeps every frame the same (wider, taller) size.
    written = predict_path(
        model, tmp_path / "clip.avi", tmp_path / "out", outputs=("labels", "masks"), legend=True,
        verbose=0,
    )  # fmt: skip
    assert len(written) == 5
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip_masks.avi"))
    palette = np.asarray(classes.bit_palette(3))  # no palette in the model: VOC colours
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        expected = numpy_labels(frames[count])
        assert frame.shape[0] >= 32 and frame.shape[1] > 48
        assert np.abs(frame[:32, :48, ::-1].astype(int) - palette[expected]).mean() < 8
        with Image.open(tmp_path / "out" / "clip_labels" / f"{count:06d}.png") as labels:
            np.testing.assert_array_equal(np.asarray(labels)[:, 2:22], expected[:, 2:22])
        count += 1
    assert count == 4
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]


def test_cli_predict_with_a_dataset_palette(pixelwise_model, tmp_path, rng, capsys):
    kernel, bias = rng.normal(size=(3, 19)), rng.normal(size=19)
    pixelwise_model(kernel, bias).save(tmp_path / "m.keras")
    image = rng.integers(0, 256, (20, 26, 3)).astype("uint8")
    Image.fromarray(image).save(tmp_path / "photo.png")
    code = cli_main(
        ["predict", "--model", str(tmp_path / "m.keras"), "--input", str(tmp_path / "photo.png"),
         "--output", str(tmp_path / "out"), "--outputs", "masks", "--dataset", "cityscapes"]
    )  # fmt: skip
    assert code == 0 and "wrote 1 files" in capsys.readouterr().out
    mask = read_image(tmp_path / "out" / "masks" / "photo.png")
    np.testing.assert_array_equal(
        mask, colorize(numpy_labels(image, kernel, bias), CITYSCAPES_PALETTE)
    )
