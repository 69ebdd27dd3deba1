"""``tf.data`` pipelines for segmentation datasets.

:func:`load_dataset` turns a dataset folder into batches of ``(images float32 (B, H, W, 3),
RGB 0-255; labels int32 (B, H, W), 255 = ignore)`` that ``model.fit`` takes as they are (the
model normalises its own input). :func:`pspnet_tf.data.checks.check_dataset` scans a
dataset and lists every bad file.

Layouts (``"voc"``, ``"cityscapes"``, ``"ade20k"``, ``"list"``): see :mod:`pspnet_tf.data.layouts`.

Label PNGs may be palette PNGs (indices are read, not colours: ``tf.io.decode_png`` would
return colours, so they are decoded with Pillow) or 8-bit grayscale (decoded in TF); an
RGB PNG whose three channels are equal counts as grayscale, any other RGB label is an error.
Errors raised while iterating (unreadable or truncated file, label size differing from the
image, label value >= num_classes other than 255, colour label) name the file.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from pspnet_tf.data import augment
from pspnet_tf.data.classes import IGNORE_LABEL
from pspnet_tf.data.layouts import LAYOUTS, label_lut, list_pairs, raise_if_missing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Magic bytes of the image formats tf.io.decode_image reads.
IMAGE_MAGIC = (b"\xff\xd8\xff", PNG_MAGIC, b"BM", b"GIF8")
# A complete JPEG ends with the EOI marker and a complete PNG with the IEND chunk; some
# writers append a little padding, so look for them in the last few kilobytes.
TAIL_WINDOW = 4096


def read_label(data, path="label"):
    """Decodes label PNG bytes to class indices with Pillow.

    Args:
        data: bytes of a PNG file.
        path: str, named in error messages.

    Returns:
        uint8 ``(H, W)`` array: the palette indices of a palette PNG, the values of a
        grayscale PNG, or the common value of an RGB PNG whose channels are all equal.

    Raises:
        ValueError: naming ``path``, if the file is not a readable 8-bit PNG or is an RGB
            colour label.
    """
    if not bytes(data[:8]) == PNG_MAGIC:
        raise ValueError(f"{path}: label is not a PNG file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image.convert("RGB") if mode == "RGBA" else image)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"{path}: unreadable or truncated label PNG ({error})") from None
    if mode in ("P", "L"):
        return array.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        if (array == array[..., :1]).all():
            return np.ascontiguousarray(array[..., 0], dtype=np.uint8)
        raise ValueError(
            f"{path}: RGB colour label where class indices are expected; save labels as "
            "palette or 8-bit grayscale PNGs of class indices"
        )
    raise ValueError(f"{path}: unsupported label PNG mode {mode!r} (need palette or 8-bit gray)")


def _assert(condition, path, *message):
    """An assertion whose error message starts with ``path``; message parts may be tensors."""
    parts = [p if isinstance(p, str) else tf.strings.as_string(p) for p in message]
    return tf.debugging.Assert(condition, [tf.strings.join([path, ": ", *parts])])


def _starts_with(raw, magic):
    return tf.equal(tf.strings.substr(raw, 0, len(magic)), magic)


def _tail_contains(raw, marker):
    """Whether ``marker`` occurs in the last TAIL_WINDOW bytes of ``raw``."""
    start = tf.maximum(tf.strings.length(raw) - TAIL_WINDOW, 0)
    tail = tf.io.decode_raw(tf.strings.substr(raw, start, TAIL_WINDOW), tf.uint8)
    count = tf.maximum(tf.shape(tail)[0] - len(marker) + 1, 0)
    hits = tf.ones([count], tf.bool)
    for i, byte in enumerate(marker):
        hits = tf.logical_and(hits, tf.equal(tail[i : i + count], byte))
    return tf.reduce_any(hits)


def _complete(raw):
    """False for a JPEG or PNG that stops before its end marker (a truncated file)."""
    return tf.logical_and(
        tf.logical_or(
            tf.logical_not(_starts_with(raw, IMAGE_MAGIC[0])), _tail_contains(raw, b"\xff\xd9")
        ),
        tf.logical_or(tf.logical_not(_starts_with(raw, PNG_MAGIC)), _tail_contains(raw, b"IEND")),
    )


def _decode_image(path):
    raw = tf.io.read_file(path)
    known = tf.reduce_any([_starts_with(raw, magic) for magic in IMAGE_MAGIC])
    checks = [
        _assert(known, path, "unreadable image (not a JPEG, PNG, BMP or GIF file)"),
        _assert(_complete(raw), path, "truncated image (no end marker)"),
    ]
    with tf.control_dependencies(checks):
        # TF's default JPEG DCT is the fast, inexact one; OpenCV and Pillow (which the
        # published models were evaluated with) use the accurate one.
        image = tf.cond(
            _starts_with(raw, IMAGE_MAGIC[0]),
            lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(raw, channels=3, expand_animations=False),
        )
    image.set_shape([None, None, 3])
    return image


def _palette_label(raw, path):
    # numpy_function passes bytes inside tf.data and 0-d arrays when run eagerly.
    return read_label(np.asarray(raw).item(), np.asarray(path).item().decode())


def _decode_label(path):
    """Label PNG -> uint8 (H, W) class indices; palette PNGs via Pillow, the rest in TF."""
    raw = tf.io.read_file(path)
    checks = [
        _assert(_starts_with(raw, PNG_MAGIC), path, "label is not a PNG file"),
        _assert(_tail_contains(raw, b"IEND"), path, "truncated label PNG (no IEND chunk)"),
    ]
    with tf.control_dependencies(checks):
        # IHDR: bit depth at byte 24, colour type at byte 25 (0 gray, 2 RGB, 3 palette, ...).
        depth = tf.strings.substr(raw, 24, 1)
        colour = tf.strings.substr(raw, 25, 1)

    def gray():
        return tf.io.decode_png(raw, channels=1)[..., 0]

    def rgb():
        pixels = tf.io.decode_png(raw, channels=3)
        equal = tf.reduce_all(tf.equal(pixels, pixels[..., :1]))
        check = _assert(equal, path, "RGB colour label where class indices are expected")
        with tf.control_dependencies([check]):
            return tf.identity(pixels[..., 0])

    def palette():  # any bit depth: Pillow returns the indices
        return tf.numpy_function(_palette_label, [raw, path], tf.uint8, stateful=False)

    def other_depth():  # decode_png would rescale the values of 1-16 bit gray or RGB
        with tf.control_dependencies([_assert(False, path, "label PNG is not 8-bit")]):
            return tf.zeros([0, 0], tf.uint8)

    is_8bit = tf.equal(depth, b"\x08")
    index = tf.where(tf.equal(colour, b"\x00"), 0, 1)
    index = tf.where(is_8bit, index, 3)
    index = tf.where(tf.equal(colour, b"\x03"), 2, index)
    label = tf.switch_case(index, [gray, rgb, palette, other_depth])
    label.set_shape([None, None])
    return label


def _load_pair(image_path, label_path, lut, num_classes):
    """Reads, maps and validates one pair: ``(image uint8 (H, W, 3), label uint8 (H, W))``."""
    image = _decode_image(image_path)
    label = _decode_label(label_path)
    if lut is not None:
        label = tf.gather(tf.constant(lut), tf.cast(label, tf.int32))
    image_hw, label_hw = tf.shape(image)[:2], tf.shape(label)
    largest = tf.reduce_max(tf.where(tf.equal(label, IGNORE_LABEL), tf.zeros_like(label), label))
    checks = [
        _assert(
            tf.reduce_all(tf.equal(image_hw, label_hw)),
            label_path, "label size ", label_hw[0], "x", label_hw[1], " differs from image size ",
            image_hw[0], "x", image_hw[1], " of ", image_path,
        ),
        _assert(
            tf.cast(largest, tf.int32) < num_classes,
            label_path, "label value ", tf.cast(largest, tf.int32), " >= num_classes (",
            num_classes, "); only 255 (ignore) may exceed it",
        ),
    ]  # fmt: skip
    with tf.control_dependencies(checks):
        return tf.identity(image), tf.identity(label)


def _check_args(layout, num_classes, crop_size, batch_size, training):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 1 <= int(num_classes) <= IGNORE_LABEL:
        raise ValueError(f"num_classes must be in 1..255, got {num_classes!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if training and crop_size is None:
        raise ValueError("training=True needs a crop_size (int or (height, width))")


def load_dataset(
    root,
    layout,
    split,
    num_classes,
    crop_size=None,
    batch_size=1,
    training=False,
    *,
    seed=None,
    aux_targets=False,
    list_file=None,
    cache=False,
    shuffle=None,
    fit="pad",
    label_map=None,
    scale_range=(0.5, 2.0),
    max_rotation=10.0,
    blur=True,
    flip=True,
    pad_value=augment.MEAN_PIXEL,
    drop_remainder=False,
    skip=(),
    pairs=None,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of one split of a segmentation dataset.

    Not repeated: call ``.repeat()`` on it when training with ``steps_per_epoch``. Every
    iteration (epoch) reshuffles and draws new augmentations; with a ``seed`` the sequence
    of batches is the same on every run.

    Args:
        root: str or path, the dataset folder (see the module docstring for each layout).
        layout: ``"voc"``, ``"cityscapes"``, ``"ade20k"`` or ``"list"``.
        split: str, e.g. ``"train"``, ``"val"``, ``"train_aug"``.
        num_classes: int; label values must be below it or 255 (checked, naming the file).
        crop_size: int or ``(height, width)``. Training: the random crop. Evaluation: None
            for full images (use ``batch_size=1`` unless all images have one size), or a
            fixed size reached as ``fit`` says.
        batch_size: int.
        training: bool. True applies the paper's augmentation and random crop and
            shuffles; False applies no random change and keeps the file order of
            :func:`list_pairs`.
        seed: int or None. Seeds the shuffle and the augmentation.
        aux_targets: bool. Yield ``{"main": labels, "aux": labels}`` targets, for a model
            built with ``aux_head=True``.
        list_file: str. The split file: VOC ids/pairs or a ``list`` layout pair file,
            absolute or relative to ``root``.
        cache: False, True (decoded pairs kept in memory) or a file path prefix for
            ``Dataset.cache``. Caching happens before augmentation.
        shuffle: bool; defaults to ``training``.
        fit: evaluation with a ``crop_size``: ``"pad"`` (shrink images larger than the crop
            to fit, keep the aspect ratio, pad bottom/right with the mean pixel and label 255)
            or ``"stretch"`` (resize to the crop size). See
            :func:`pspnet_tf.data.augment.resize_for_eval`.
        label_map: dict of raw label value -> train id (unlisted values become 255),
            replacing the layout's own mapping.
        scale_range, max_rotation, blur, flip, pad_value: training augmentation, see
            :func:`pspnet_tf.data.augment.random_augment`.
        drop_remainder: bool, drop a last partial batch.
        skip: ``(image, label)`` path pairs to leave out, e.g. the keys of
            :func:`find_bad_pairs` (``pspnet-tf evaluate`` skips those).
        pairs: list of ``(image_path, label_path)`` or None. Read these instead of the
            split's list (e.g. the pairs :func:`check_pairs` found good).

    Returns:
        ``tf.data.Dataset`` of ``(images float32 (B, H, W, 3), labels int32 (B, H, W))``
        (targets a dict with ``aux_targets``), images RGB 0-255, labels 255 = ignore.

    Raises:
        FileNotFoundError: naming the missing split file, image or label files.
        ValueError: bad arguments or split file lines.
    """
    _check_args(layout, num_classes, crop_size, batch_size, training)
    if pairs is None:
        pairs = list_pairs(root, layout, split, list_file=list_file)
    skip = {tuple(pair) for pair in skip}
    pairs = [pair for pair in pairs if tuple(pair) not in skip]
    if not pairs:
        raise ValueError(f"{root}: no usable image/label pairs in split {split!r}")
    raise_if_missing(pairs)
    lut = label_lut(layout, label_map)
    lut = None if (lut == np.arange(256)).all() else lut  # skip an identity lookup
    load = functools.partial(_load_pair, lut=lut, num_classes=int(num_classes))
    images, labels = ([pair[i] for pair in pairs] for i in (0, 1))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if cache:
        dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.cache("" if cache is True else os.fspath(cache))
    if training if shuffle is None else shuffle:
        dataset = dataset.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)
    if training:
        # A seed pair per element for the stateless augmentation, new on each iteration.
        aug_seed = None if seed is None else seed + 7919
        seeds = tf.data.Dataset.random(seed=aug_seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds))

    def prepare(*element):
        paths, pair_seed = (element[0], element[1]) if training else (element, None)
        image, label = paths if cache else load(*paths)
        if training:
            options = dict(scale_range=scale_range, max_rotation=max_rotation, blur=blur)
            image, label = augment.random_augment(
                image, label, pair_seed, crop_size, flip=flip, pad_value=pad_value, **options
            )
        elif crop_size is not None:
            image, label = augment.resize_for_eval(image, label, crop_size, fit, pad_value)
        label = tf.cast(label, tf.int32)
        return tf.cast(image, tf.float32), ({"main": label, "aux": label} if aux_targets else label)

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(int(batch_size), drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)
