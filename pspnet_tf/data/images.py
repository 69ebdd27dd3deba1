"""Reading image files so that a bad one fails by name and a 16-bit one is not clipped.

:func:`read_rgb` is what ``pspnet-tf predict`` and ``check-data`` read images with. A
file that cannot be used raises :class:`UnreadableImage`, whose ``reason`` is one of
:data:`REASONS` (the word the command-line summaries print). Two things Pillow lets
through are caught here:

- JPEG data that libjpeg decodes anyway, printing "Corrupt JPEG data" and returning
  garbage pixels, and JPEGs cut short (Pillow raises for some, not all): see
  :func:`jpeg_damage`. Damage that happens to keep the marker structure is not caught.
- 16-bit grayscale (Pillow mode ``I;16``), which ``convert("RGB")`` clips at 255 (a
  16-bit photo comes out almost all white): it is scaled to 8 bits (``value >> 8``) with
  a warning naming the file. 16-bit RGB PNGs are already reduced by Pillow the same way.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger("pspnet_tf")

REASONS = ("no such file", "empty file", "truncated", "corrupt data", "not an image")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImage(ValueError):
    """An image file that cannot be used; the message names the file.

    Attributes:
        path: str. The file.
        reason: str. One of :data:`REASONS`.
    """

    def __init__(self, path, reason, detail=None):
        self.path, self.reason = os.fspath(path), reason
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"image {self.path!r}: {reason}{suffix}")


def jpeg_damage(data):
    """Why JPEG bytes are damaged, or None if their marker structure is sound.

    Walks the segments to the first scan of the main image (an EXIF thumbnail inside
    APP1 is skipped), then checks the compressed data up to the end-of-image marker;
    bytes after it (some cameras append data) are not looked at.

    Args:
        data: bytes of a file that starts with the JPEG magic ``FF D8 FF``.

    Returns:
        str or None: ``"truncated"`` (the file ends before the end-of-image marker) or
        ``"corrupt data"`` (a broken segment, or a reserved marker ``FF 01``-``FF BF``
        in the compressed data, where only stuffed ``FF 00``, restart markers and
        segment markers may be).
    """
    position = 2
    while True:
        if position + 4 > len(data):
            return "truncated"
        if data[position] != 0xFF:
            return "corrupt data"
        marker = data[position + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7:  # fill byte, restart marker
            position += 1 if marker == 0xFF else 2
            continue
        if marker in (0xD8, 0xD9) or marker < 0xC0:
            return "corrupt data"  # a second start, an end before any scan, reserved
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            return _scan_damage(data, position + 2 + length)
        position += 2 + length


def _scan_damage(data, start):
    body = np.frombuffer(data, np.uint8, offset=min(start, len(data)))
    following = body[1:][body[:-1] == 0xFF]
    ends = np.flatnonzero(following == 0xD9)
    if not ends.size:
        return "truncated"
    following = following[: ends[0]]
    return "corrupt data" if ((following >= 0x01) & (following <= 0xBF)).any() else None


def read_rgb(path, exif_transpose=True):
    """Reads an image file as ``(H, W, 3)`` uint8 RGB.

    Args:
        path: str or path-like.
        exif_transpose: bool. Apply the EXIF rotation (``tf.io.decode_jpeg``, which the
            training pipeline reads with, does not). Defaults to True.

    Returns:
        ``(H, W, 3)`` uint8 array. 16-bit grayscale is scaled to 8 bits (``>> 8``), with
        a warning naming the file.

    Raises:
        UnreadableImage: missing, empty, truncated, damaged or not an image (a
            ``FileNotFoundError`` is not raised, so callers handle one error type).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnreadableImage(path, "no such file")
    with open(path, "rb") as file:
        data = file.read()
    if not data:
        raise UnreadableImage(path, "empty file")
    damage = jpeg_damage(data) if data.startswith(b"\xff\xd8\xff") else None
    if damage:
        raise UnreadableImage(path, damage)
    try:
        with Image.open(path) as image:
            return _to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image, path)
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image") from None
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for bad data
        reason = "truncated" if "truncated" in str(error) else "corrupt data"
        raise UnreadableImage(path, reason, error) from None


def _to_rgb(image, path):
    if image.mode not in _SIXTEEN_BIT_MODES:
        return np.asarray(image.convert("RGB"))
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I" and values.max(initial=0) <= 255:  # 32-bit mode, 8-bit values
        gray = values
    else:
        log.warning("%s: 16-bit image scaled to 8 bits (value >> 8)", path)
        gray = values >> 8
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
