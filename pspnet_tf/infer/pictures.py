"""Pictures of a prediction and the files they go to: colours, overlays, legends, label PNGs.

:func:`colorize` paints class indices with a palette, :func:`overlay` blends them on the
image, :func:`add_legend` lists the classes beside it; :func:`save_label_png` writes labels
as a palette PNG (the pixel value is the class), :func:`save_image` an RGB picture, and
:func:`read_image` reads one back. Every write follows the output-path rule of
:mod:`pspnet_tf.files`.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image

from pspnet_tf import files
from pspnet_tf.data import classes
from pspnet_tf.data.images import UnreadableImage, read_rgb
from pspnet_tf.files import JPEG, PNG, atomic_path

IMAGE_KINDS = {"PNG": PNG, "JPEG": JPEG, "BMP": files.file_kind("a BMP image", b"BM")}


def as_rgb(image, name="image"):
    """Checks an image and returns it as ``(H, W, 3)`` float32 RGB 0-255.

    Accepts ``(H, W)`` or ``(H, W, 1)`` grayscale, ``(H, W, 3)`` RGB and
    ``(H, W, 4)`` RGBA (alpha dropped), any real dtype with values 0-255.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name} must be (height, width), (height, width, 3) or (height, width, 4), "
            f"got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{name} must hold real numbers 0-255, got dtype {array.dtype}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array[..., :3].astype("float32")


def colorize(labels, palette):
    """Colours a label map: ``(H, W)`` int -> ``(H, W, 3)`` uint8 RGB.

    Labels beyond the palette (e.g. the ignore label 255) are black.
    """
    labels = np.asarray(labels)
    lut = np.zeros((max(256, int(labels.max(initial=0)) + 1), 3), np.uint8)
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    lut[: len(palette)] = palette
    return lut[labels]


def overlay(image, labels, palette, alpha=0.5):
    """Blends the coloured labels onto the image: ``(1 - alpha) * image + alpha * colour``.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    blended = (1.0 - alpha) * as_rgb(image) + alpha * colorize(labels, palette)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def add_legend(image, class_names, palette, labels=None):
    """Appends a legend (a colour swatch and name per class) to the right of an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        class_names: list of str.
        palette: ``(C, 3)`` colours.
        labels: label map or None. Only classes present in it are listed.

    Returns:
        ``(max(H, legend height), W + legend width, 3)`` uint8; white background.
    """
    shown = range(len(class_names)) if labels is None else np.unique(labels)
    shown = [int(k) for k in shown if 0 <= k < len(class_names)]
    row, font, scale = 18, cv2.FONT_HERSHEY_SIMPLEX, 0.45
    text_width = max([cv2.getTextSize(class_names[k], font, scale, 1)[0][0] for k in shown] or [0])
    height = max(image.shape[0], row * len(shown) + 8)
    panel = np.full((height, text_width + 36, 3), 255, np.uint8)
    for i, k in enumerate(shown):
        y = 4 + i * row
        colour = tuple(int(c) for c in palette[k])
        cv2.rectangle(panel, (4, y + 2), (20, y + row - 3), colour, thickness=-1)
        cv2.rectangle(panel, (4, y + 2), (20, y + row - 3), (0, 0, 0), thickness=1)
        cv2.putText(
            panel, class_names[k], (26, y + row - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    canvas = np.full((height, image.shape[1], 3), 255, np.uint8)
    canvas[: image.shape[0]] = image
    return np.concatenate([canvas, panel], axis=1)


def read_image(path):
    """Reads an image file as ``(H, W, 3)`` uint8 RGB (EXIF rotation applied).

    16-bit grayscale is scaled to 8 bits, with a warning; see
    :func:`pspnet_tf.data.images.read_rgb`.

    Raises:
        FileNotFoundError: no such file.
        pspnet_tf.data.images.UnreadableImage: (a ValueError) empty, truncated, damaged
            or not an image; the message names the file.
    """
    try:
        return read_rgb(path)
    except UnreadableImage as error:
        if error.reason == "no such file":
            raise FileNotFoundError(str(error)) from None
        raise


def save_image(image, path):
    """Writes a ``(H, W, 3)`` uint8 RGB image; the format follows the extension."""
    with atomic_path(path, IMAGE_KINDS[image_format(path)]) as temporary:
        Image.fromarray(np.asarray(image, np.uint8)).save(temporary, format=image_format(path))
    return os.fspath(path)


def save_label_png(labels, path, palette=None):
    """Writes labels as a palette PNG: pixel values are class indices, shown in colour.

    Args:
        labels: ``(H, W)`` int class indices.
        path: str. Output ``.png`` file.
        palette: ``(C, 3)`` colours or None (the VOC bit palette).
    """
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0:
        raise ValueError(f"{path}: labels must be >= 0")
    if labels.max(initial=0) > 255:  # too many classes for a palette PNG: 16-bit grayscale
        image = Image.fromarray(labels.astype(np.uint16))
    else:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        colours = np.zeros((256, 3), np.uint8)
        given = classes.bit_palette(256) if palette is None else palette
        given = np.asarray(given, np.uint8).reshape(-1, 3)[:256]
        colours[: len(given)] = given
        image.putpalette(colours.ravel().tolist())
    with atomic_path(path, PNG) as temporary:
        image.save(temporary, format="PNG")
    return os.fspath(path)


def image_format(path):
    extension = os.path.splitext(os.fspath(path))[1].lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}.get(extension, "PNG")


def render(image, labels, what, palette, names, alpha, legend, every_class=False):
    """The coloured mask or the overlay of one image, with an optional legend.

    The legend lists the classes present, or every class (``every_class``: video
    frames must all have the same size).
    """
    if what == "masks":
        picture = colorize(labels, palette)
    else:
        picture = overlay(image, labels, palette, alpha)
    if not legend:
        return picture
    return add_legend(picture, names, palette, None if every_class else labels)
