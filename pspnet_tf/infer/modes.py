"""The evaluation modes of the PSPNet paper (Zhao et al. 2017, Sec. 5) on one image.

- ``single``: the whole image in one pass; a model that needs a fixed input size gets the
  image resized to fit and padded with the model's mean pixel.
- ``sliding``: crop-size windows with a stride of 2/3 of the crop; overlapping logits are
  averaged; an image smaller than the crop is padded with the mean.
- ``multiscale``: the image resized so its long side is ``scale * base_size`` for scales
  0.5-1.75 (base 512 for VOC and ADE20K, 2048 for Cityscapes), each scale predicted with
  sliding windows (one padded window when it fits the crop) and with its horizontal flip;
  the softmax scores of all passes are averaged.

The functions take any ``predict_fn`` (a batch of RGB 0-255 images -> per-pixel scores),
so they are testable without a model; :func:`predict_scores` runs a
:class:`pspnet_tf.infer.predictor.Predictor` on one image in a given mode.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pspnet_tf.infer.predictor import as_predictor
from pspnet_tf.options import MODES

# Multi-scale testing of the paper and its reference code.
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# Sliding windows overlap by a third of the crop, as in the authors' code.
STRIDE_RATE = 2 / 3


def resize(array, size):
    """Bilinear (half-pixel) resize of an ``(H, W, C)`` array to ``size = (h, w)``, float32."""
    array = np.asarray(array, "float32")
    if tuple(array.shape[:2]) == tuple(size):
        return array
    return tf.image.resize(array, size, method="bilinear").numpy()


def _pair(value, name):
    if value is None:
        return None
    pair = (int(value), int(value)) if np.ndim(value) == 0 else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair


def pad_image(image, height, width, value=0.0):
    """Pads an image on all sides (centred) to at least ``height x width``.

    Args:
        image: ``(H, W, C)`` array.
        height, width: int. Minimum output size.
        value: float or per-channel sequence. Fill value.

    Returns:
        ``(padded, (top, left))``: the padded array and the offset of the
        original image inside it.
    """
    h, w = image.shape[:2]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    top, left = pad_h // 2, pad_w // 2
    if not pad_h and not pad_w:
        return image, (0, 0)
    padded = np.empty((h + pad_h, w + pad_w, image.shape[2]), image.dtype)
    padded[...] = np.asarray(value, image.dtype)
    padded[top : top + h, left : left + w] = image
    return padded, (top, left)


def window_starts(size, crop, stride):
    """Start offsets of sliding windows along one axis (the last one ends at the edge).

    Example: ``window_starts(10, 4, 3) == [0, 3, 6]``; ``window_starts(11, 4, 3) == [0, 3, 6, 7]``.
    """
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def sliding_window_logits(
    predict_fn, image, crop, num_classes, stride=None, pad_value=0.0, batch_size=4
):
    """Averages a model's outputs over overlapping crop-size windows.

    Args:
        predict_fn: callable mapping ``(batch, crop_h, crop_w, 3)`` float32
            images to ``(batch, crop_h, crop_w, num_classes)`` scores.
        image: ``(H, W, 3)`` RGB 0-255 image, any size.
        crop: int or ``(crop_h, crop_w)``. Window size.
        num_classes: int. Channels of the scores.
        stride: int, ``(h, w)`` or None. None: ceil(2/3 of the crop).
        pad_value: per-channel fill for images smaller than the crop (the
            model's mean pixel, so padding is 0 after normalisation).
        batch_size: int. Windows per ``predict_fn`` call.

    Returns:
        ``(H, W, num_classes)`` float32: each pixel's scores averaged over
        the windows that cover it.
    """
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride") or (
        math.ceil(crop_h * STRIDE_RATE),
        math.ceil(crop_w * STRIDE_RATE),
    )
    height, width = image.shape[:2]
    padded, (top, left) = pad_image(np.asarray(image, "float32"), crop_h, crop_w, pad_value)
    total = np.zeros((*padded.shape[:2], num_classes), "float32")
    count = np.zeros((*padded.shape[:2], 1), "float32")
    windows = [
        (y, x)
        for y in window_starts(padded.shape[0], crop_h, stride_h)
        for x in window_starts(padded.shape[1], crop_w, stride_w)
    ]
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        batch = np.stack([padded[y : y + crop_h, x : x + crop_w] for y, x in chunk])
        for (y, x), scores in zip(chunk, np.asarray(predict_fn(batch)), strict=True):
            total[y : y + crop_h, x : x + crop_w] += scores
            count[y : y + crop_h, x : x + crop_w] += 1
    return (total / count)[top : top + height, left : left + width]


def single_logits(predict_fn, image, input_size=None, pad_value=0.0):
    """Scores of the whole image in one pass, at the image's size.

    Args:
        predict_fn: callable, as for :func:`sliding_window_logits`.
        image: ``(H, W, 3)`` RGB 0-255 image.
        input_size: ``(h, w)`` or None. The fixed input size of a model that
            cannot take any size: the image is resized to fit inside it (aspect
            ratio kept), padded with ``pad_value``, and the scores of the image
            part resized back to ``(H, W)``. None: the image goes in as it is.
        pad_value: per-channel fill, RGB 0-255.

    Returns:
        ``(H, W, C)`` float32 scores.
    """
    image = np.asarray(image, "float32")
    if input_size is None:
        return np.asarray(predict_fn(image[None]))[0]
    height, width = image.shape[:2]
    scale = min(input_size[0] / height, input_size[1] / width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    padded, (top, left) = pad_image(resize(image, size), *input_size, pad_value)
    scores = np.asarray(predict_fn(padded[None]))[0]
    return resize(scores[top : top + size[0], left : left + size[1]], (height, width))


def softmax(logits, axis=-1):
    """Numerically stable softmax of a numpy array."""
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def flip_softmax_fn(predict_fn, flip=True):
    """Wraps ``predict_fn`` to return softmax scores, averaged with the flipped image's.

    The flipped batch goes through ``predict_fn`` in the same call; its scores
    are flipped back before averaging.
    """

    def scores(batch):
        if not flip:
            return softmax(np.asarray(predict_fn(batch)))
        both = softmax(np.asarray(predict_fn(np.concatenate([batch, batch[:, :, ::-1]]))))
        return (both[: len(batch)] + both[len(batch) :][:, :, ::-1]) / 2

    return scores


def scaled_size(height, width, long_side):
    """``(h, w)`` with the long side ``long_side`` and the aspect ratio kept."""
    long_side = max(1, round(long_side))
    if height >= width:
        return long_side, max(1, round(width * long_side / height))
    return max(1, round(height * long_side / width)), long_side


def multiscale_probabilities(
    predict_fn,
    image,
    num_classes,
    base_size,
    crop=None,
    scales=SCALES,
    flip=True,
    pad_value=0.0,
    stride=None,
):
    """Multi-scale (and flipped) softmax scores, averaged at the image's size.

    Args:
        predict_fn: callable returning logits, as for :func:`sliding_window_logits`.
        image: ``(H, W, 3)`` RGB 0-255 image.
        num_classes: int.
        base_size: int. Long side of the image at scale 1.0 (the paper: 512 for
            VOC and ADE20K, 2048 for Cityscapes).
        crop: int, ``(h, w)`` or None. Sliding-window size inside each scale (a
            scaled image smaller than the crop is padded to one window). None:
            each scaled image goes through in one pass.
        scales: sequence of float. Defaults to 0.5, 0.75, ..., 1.75.
        flip: bool. Also predict each scale flipped horizontally.
        pad_value: per-channel fill, RGB 0-255.
        stride: sliding stride; None for 2/3 of the crop.

    Returns:
        ``(H, W, num_classes)`` float32 probabilities: the sum of the softmax
        scores of every scale and flip divided by their number.
    """
    height, width = image.shape[:2]
    scores_fn = flip_softmax_fn(predict_fn, flip)
    total = np.zeros((height, width, num_classes), "float32")
    for scale in scales:
        scaled = resize(np.asarray(image, "float32"), scaled_size(height, width, scale * base_size))
        if crop is None:
            scores = scores_fn(scaled[None])[0]
        else:
            scores = sliding_window_logits(
                scores_fn, scaled, crop, num_classes, stride, pad_value=pad_value
            )
        total += resize(scores, (height, width))
    return total / len(scales)


def predict_scores(
    model,
    image,
    mode="single",
    crop_size=None,
    stride=None,
    base_size=None,
    scales=SCALES,
    flip=True,
    precision=None,
):
    """Per-pixel scores of one image in one of the evaluation modes.

    Args:
        model: a Keras segmentation model or a :class:`Predictor`.
        image: ``(H, W, 3)`` RGB 0-255 array (any numeric dtype).
        mode: ``"single"``, ``"sliding"`` or ``"multiscale"``.
        crop_size: int, ``(h, w)`` or None. Window size for ``sliding`` and
            ``multiscale``; None takes the size the model was built for.
        stride: sliding stride; None for 2/3 of the crop.
        base_size: int. Long side at scale 1.0; required for ``multiscale``.
        scales: sequence of float, for ``multiscale``.
        flip: bool, for ``multiscale``.
        precision: the compute dtype, see :class:`Predictor` (None: the model's own).

    Returns:
        ``(H, W, num_classes)`` float32: logits (``single``, ``sliding``) or
        averaged probabilities (``multiscale``).
    """
    predictor = as_predictor(model, precision=precision)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    crop = _pair(crop_size, "crop_size") or predictor.crop_size
    if predictor.input_size and mode != "single" and crop != predictor.input_size:
        raise ValueError(
            f"model {predictor.model.name!r} takes only {predictor.input_size} inputs; "
            f"crop_size {crop} must equal it"
        )
    pad, classes_ = predictor.pad_value, predictor.num_classes
    if mode == "single":
        return single_logits(predictor, image, predictor.input_size, pad)
    if mode == "sliding":
        if crop is None:
            raise ValueError("sliding evaluation needs crop_size (the model has no fixed size)")
        return sliding_window_logits(predictor, image, crop, classes_, stride, pad)
    if not base_size:
        raise ValueError("multiscale evaluation needs base_size (512 VOC/ADE20K, 2048 Cityscapes)")
    return multiscale_probabilities(
        predictor, image, classes_, base_size, crop, scales, flip, pad, stride
    )
