"""Layouts read from tiny folders, the load_dataset pipeline, bad data and check_dataset."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pspnet_tf import build_pspnet, cli
from pspnet_tf.data.checks import check_dataset
from pspnet_tf.data.classes import VOC_PALETTE, default_palette
from pspnet_tf.data.demo import DEMO_CLASSES
from pspnet_tf.data.layouts import list_pairs
from pspnet_tf.data.pipeline import load_dataset

FLAT_VOC_PALETTE = [v for colour in default_palette(256) for v in colour]


def _write_image(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)  # no chroma resampling
    return np.asarray(Image.open(path).convert("RGB"))  # what a decoder gives back


def _write_label(path, label, palette=None, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(label, "L")
    if palette is not None:
        image.putpalette(palette)
    elif mode == "RGB":
        image = image.convert("RGB")
    image.save(path)


def _label_with(values, height, width, rng):
    label = rng.choice(np.array(values, np.uint8), (height, width))
    label.flat[: len(values)] = values  # every value occurs
    return label


def _batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def _write_voc(root, rng, names=("a", "b", "c"), size=(20, 24)):
    """VOC folder with palette labels: 'a' VOC colours, the others an all-black palette."""
    images, labels = {}, {}
    for i, name in enumerate(names):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        images[name] = _write_image(os.path.join(root, "JPEGImages", f"{name}.jpg"), pixels)
        labels[name] = _label_with([0, 5, 20, 255], *size, rng)
        # All-black palette: only the indices, not the colours, carry the classes.
        palette = FLAT_VOC_PALETTE if i == 0 else [0] * 768
        _write_label(os.path.join(root, "SegmentationClass", f"{name}.png"), labels[name], palette)
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"))
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as file:
        file.write("".join(f"{name}\n" for name in names))
    return images, labels


@pytest.fixture
def voc(tmp_path, rng):
    root = str(tmp_path / "voc")
    images, labels = _write_voc(root, rng)
    return root, images, labels


def test_voc_palette_labels_read_as_indices(voc):
    root, images, labels = voc
    assert Image.open(os.path.join(root, "SegmentationClass", "a.png")).mode == "P"
    assert VOC_PALETTE[5] != (5, 5, 5)  # reading colours instead would fail below
    batches = _batches(load_dataset(root, "voc", "train", 21))
    assert len(batches) == 3
    for (image, label), name in zip(batches, "abc", strict=True):
        assert image.dtype == np.float32 and image.shape == (1, 20, 24, 3)
        assert label.dtype == np.int32 and label.shape == (1, 20, 24)
        np.testing.assert_array_equal(label[0], labels[name])
        np.testing.assert_array_equal(image[0], images[name])  # same (accurate) JPEG DCT


def test_voc_aug_split_with_path_pairs_and_grayscale_labels(tmp_path, rng):
    base = tmp_path / "data"
    voc_root = str(base / "VOCdevkit" / "VOC2012")
    label = _label_with([0, 1, 15, 255], 16, 16, rng)
    _write_image(os.path.join(voc_root, "JPEGImages", "x.jpg"), np.zeros((16, 16, 3), np.uint8))
    _write_label(os.path.join(voc_root, "SegmentationClassAug", "x.png"), label)
    os.makedirs(os.path.join(voc_root, "ImageSets", "Segmentation"))
    with open(os.path.join(voc_root, "ImageSets", "Segmentation", "train_aug.txt"), "w") as file:
        file.write("/JPEGImages/x.jpg /SegmentationClassAug/x.png\n")
    [(_, out)] = _batches(load_dataset(str(base), "voc", "train_aug", 21))
    np.testing.assert_array_equal(out[0], label)


def test_cityscapes_label_ids_map_to_train_ids(tmp_path, rng):
    root = str(tmp_path / "cs")
    ids = np.array([[0, 7, 8, 11, 26, 33, 34, 255, 6, 24]], np.uint8).repeat(3, axis=0)
    expected = np.array([[255, 0, 1, 2, 13, 18, 255, 255, 255, 11]]).repeat(3, axis=0)
    for city in ("aachen", "bonn"):
        stem = f"{city}_000000_000019"
        pixels = rng.integers(0, 256, (3, 10, 3), dtype=np.uint8)
        _write_image(
            os.path.join(root, "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png"), pixels
        )
        _write_label(os.path.join(root, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png"), ids)
    pairs = list_pairs(root, "cityscapes", "val")
    assert [os.path.basename(os.path.dirname(p[1])) for p in pairs] == ["aachen", "bonn"]
    batches = _batches(load_dataset(root, "cityscapes", "val", 19))
    assert len(batches) == 2
    for _, label in batches:
        np.testing.assert_array_equal(label[0], expected)


def test_ade20k_zero_is_ignored_and_classes_shift_down(tmp_path):
    base = os.path.join(str(tmp_path), "ADEChallengeData2016")
    raw = np.array([[0, 1, 2, 75, 150, 255]], np.uint8).repeat(2, axis=0)
    pixels = np.full((2, 6, 3), 99, np.uint8)
    _write_image(os.path.join(base, "images", "validation", "ADE_val_1.jpg"), pixels)
    _write_label(os.path.join(base, "annotations", "validation", "ADE_val_1.png"), raw)
    [(_, label)] = _batches(load_dataset(str(tmp_path), "ade20k", "val", 150))
    np.testing.assert_array_equal(label[0], [[255, 0, 1, 74, 149, 255]] * 2)


def test_list_layout_reads_png_images_exactly_and_gray_rgb_and_2bit_labels(tmp_path, rng):
    root = str(tmp_path)
    pixels = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    label = _label_with([0, 3, 255], 12, 14, rng)
    small = _label_with([0, 1, 2, 3], 12, 14, rng)
    _write_image(os.path.join(root, "imgs", "p.png"), pixels)
    _write_label(os.path.join(root, "labs", "p.png"), label, mode="RGB")  # r = g = b: allowed
    image = Image.fromarray(small, "L")
    image.putpalette(FLAT_VOC_PALETTE[:12])
    image.save(os.path.join(root, "labs", "q.png"), bits=2)  # 2-bit palette indices
    os.makedirs(os.path.join(root, "list"))
    with open(os.path.join(root, "list", "val.txt"), "w") as file:  # found as <root>/list/
        file.write("# image label\nimgs/p.png labs/p.png\n\nimgs/p.png labs/q.png\n")
    [(image, out), (_, out_small)] = _batches(load_dataset(root, "list", "val", 4))
    np.testing.assert_array_equal(image[0], pixels)
    np.testing.assert_array_equal(out[0], label)
    np.testing.assert_array_equal(out_small[0], small)


def test_eval_crop_pads_and_batches(voc):
    root, _, labels = voc
    batches = _batches(load_dataset(root, "voc", "train", 21, crop_size=(24, 30), batch_size=2))
    assert [b[1].shape for b in batches] == [(2, 24, 30), (1, 24, 30)]
    np.testing.assert_array_equal(batches[0][1][1, :20, :24], labels["b"])
    assert (batches[0][1][:, 20:] == 255).all() and (batches[0][1][:, :, 24:] == 255).all()


def test_training_batches_depend_only_on_the_seed(voc):
    root = voc[0]

    def make(seed, **kwargs):
        return load_dataset(root, "voc", "train", 21, 16, 2, True, seed=seed, **kwargs)

    first, again, other = make(1), make(1), make(2)
    epoch = _batches(first)
    assert [b[0].shape for b in epoch] == [(2, 16, 16, 3), (1, 16, 16, 3)]
    for (x1, y1), (x2, y2) in zip(epoch, _batches(again), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(epoch[0][0], _batches(other)[0][0])
    assert not np.array_equal(epoch[0][0], _batches(first)[0][0])  # next epoch: new draws
    for x1, x2 in zip(epoch, _batches(make(1, cache=True)), strict=True):
        np.testing.assert_array_equal(x1[0], x2[0])  # caching changes nothing
    for _, label in epoch:
        assert set(np.unique(label)) <= {0, 5, 20, 255}


def test_aux_targets(voc):
    _, targets = next(iter(load_dataset(voc[0], "voc", "train", 21, aux_targets=True)))
    assert set(targets) == {"main", "aux"}
    np.testing.assert_array_equal(targets["main"], targets["aux"])


def test_model_fit_runs_on_the_pipeline(demo_dataset):
    n = len(DEMO_CLASSES)
    model = build_pspnet(n, "mobilenetv2", (64, 64, 3), alpha=0.35, aux_head=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    model.compile("sgd", loss={"main": loss, "aux": loss}, loss_weights={"main": 1, "aux": 0.4})
    train = load_dataset(demo_dataset, "voc", "train", n, 64, 4, True, seed=0, aux_targets=True)
    val = load_dataset(demo_dataset, "voc", "val", n, 64, 2, aux_targets=True)
    history = model.fit(train, epochs=1, steps_per_epoch=1, validation_data=val, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["val_loss"][0])


# Bad data: each case breaks file "b" of the VOC fixture; (breaker, words in the error).
def _rewrite(path, data):
    with open(path, "wb") as file:
        file.write(data)


def _truncate(path):
    with open(path, "rb") as file:
        data = file.read()
    _rewrite(path, data[: len(data) // 2])


BAD_CASES = {
    "missing image": (lambda img, lab, rng: os.remove(img), "jpg", "missing"),
    "unreadable image": (lambda img, lab, rng: _rewrite(img, b"not an image"), "jpg", "unreadable"),
    "truncated image": (lambda img, lab, rng: _truncate(img), "jpg", "truncated"),
    "truncated label": (lambda img, lab, rng: _truncate(lab), "png", "truncated"),
    "label size": (
        lambda img, lab, rng: _write_label(lab, np.zeros((19, 24), np.uint8)),
        "png",
        "size 19x24 differs from image size 20x24",
    ),
    "label value": (
        lambda img, lab, rng: _write_label(lab, _label_with([0, 255, 30], 20, 24, rng)),
        "png",
        ">= num_classes (21)",
    ),
    "16-bit label": (
        lambda img, lab, rng: Image.fromarray(np.zeros((20, 24), np.uint16)).save(lab),
        "png",
        "8-bit",
    ),
    "rgb label": (
        lambda img, lab, rng: Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
            lab
        ),
        "png",
        "RGB colour label",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_errors_name_the_file(case, voc, rng):
    root = voc[0]
    breaker, extension, words = BAD_CASES[case]
    image_path = os.path.join(root, "JPEGImages", "b.jpg")
    label_path = os.path.join(root, "SegmentationClass", "b.png")
    breaker(image_path, label_path, rng)
    bad_path = image_path if extension == "jpg" else label_path
    with pytest.raises((tf.errors.OpError, FileNotFoundError)) as info:
        _batches(load_dataset(root, "voc", "train", 21))
    assert bad_path in str(info.value) and words in str(info.value)
    problems = check_dataset(root, "voc", "train", 21)
    assert len(problems) == 1 and bad_path in problems[0], problems
    assert words.split()[0] in problems[0]


def test_check_data_cli_reports_every_problem(voc, rng, capsys):
    root = voc[0]
    argv = ["check-data", "--data", root, "--layout", "voc", "--num-classes", "21"]
    assert cli.main([*argv, "--split", "train"]) == 0
    assert "checked 3 image/label pairs (train): 0 problems" in capsys.readouterr().out
    _truncate(os.path.join(root, "JPEGImages", "a.jpg"))
    _write_label(os.path.join(root, "SegmentationClass", "c.png"), np.full((20, 24), 40, np.uint8))
    assert cli.main(argv) == 1  # default splits train and val; val.txt is missing
    out = capsys.readouterr().out
    assert "a.jpg: unreadable or truncated image" in out and "c.png: 480 pixels" in out
    assert "val.txt: VOC split file for 'val' not found" in out
    assert "3 problems" in out


def test_missing_split_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/val.txt"):
        load_dataset(str(tmp_path), "voc", "val", 21)
    with pytest.raises(ValueError, match="crop_size"):
        load_dataset(str(tmp_path), "voc", "val", 21, training=True)
