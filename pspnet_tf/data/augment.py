"""Training augmentation and evaluation resizing of (image, label) pairs, in TF ops.

The paper's recipe (and the official PyTorch code's order): random scale 0.5-2.0, random
rotation -10..10 degrees (half the time), Gaussian blur (half the time), horizontal flip
(half the time), random crop with padding (image by the mean pixel, label by 255).

All the geometry (scale, rotation, flip, crop, padding) is one affine map from output pixels
to source pixels, applied once by ``ImageProjectiveTransformV3``: bilinear for the image,
nearest neighbour for the label, the same map for both, so they cannot drift apart, and the
cost is proportional to the crop, not to the (up to 4x larger) scaled image. Scaling follows
``tf.image.resize``'s half-pixel convention.

Randomness is stateless: :func:`random_augment` draws every parameter from one ``seed``
tensor, so a pipeline that seeds each element reproducibly gives reproducible batches.
"""

from __future__ import annotations

import math
import numbers

import tensorflow as tf

from pspnet_tf.data.classes import IGNORE_LABEL
from pspnet_tf.model.layers import IMAGENET_MEAN

# RGB mean pixel (ImageNet, 0-255): what padding is filled with, so that it normalises to
# about zero whatever preprocessing the model applies.
MEAN_PIXEL = IMAGENET_MEAN
# Probabilities of the official PyTorch code (RandRotate p=0.5, RandomGaussianBlur 0.5,
# RandomHorizontalFlip 0.5); its blur is cv2.GaussianBlur with a 5x5 kernel, whose sigma
# for ksize 5 is 0.3 * ((5 - 1) * 0.5 - 1) + 0.8 = 1.1.
ROTATE_PROB = 0.5
BLUR_PROB = 0.5
FLIP_PROB = 0.5
BLUR_KSIZE = 5
BLUR_SIGMA = 1.1


def crop_hw(crop_size):
    """``crop_size`` (int or ``(height, width)``) as a ``(height, width)`` tuple of ints."""
    if isinstance(crop_size, numbers.Integral):
        crop_size = (crop_size, crop_size)
    height, width = (int(v) for v in crop_size)
    if height < 1 or width < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size!r}")
    return height, width


def _affine(a, b, c, d, e, f):
    """The 3x3 matrix ``[[a, b, c], [d, e, f], [0, 0, 1]]`` from scalar floats/tensors."""
    rows = [[a, b, c], [d, e, f], [0.0, 0.0, 1.0]]
    return tf.stack([tf.stack([tf.cast(v, tf.float32) for v in row]) for row in rows])


def warp(image, label, matrix, out_size, pad_value=MEAN_PIXEL):
    """Resamples an image and its label through one affine map.

    Args:
        image: float32 ``(H, W, 3)``.
        label: uint8 ``(H, W)``.
        matrix: float32 ``(3, 3)`` mapping output pixel ``(x, y, 1)`` (column, row) to the
            source pixel it is read from.
        out_size: ``(height, width)`` of the output, ints or int32 scalars.
        pad_value: RGB fill for image pixels that map outside the source.

    Returns:
        ``(image float32 (h, w, 3), label uint8 (h, w))``; label pixels outside the source
        are 255.
    """
    transform = tf.concat([tf.reshape(matrix[:2], [6]), tf.zeros([2])], 0)[None]
    out_size = tf.cast(tf.stack(out_size), tf.int32)
    mean = tf.constant(pad_value, tf.float32)
    # Filling with 0 around (image - mean) fills the image with the mean per channel.
    image = tf.raw_ops.ImageProjectiveTransformV3(
        images=(image - mean)[None],
        transforms=transform,
        output_shape=out_size,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    label = tf.raw_ops.ImageProjectiveTransformV3(
        images=label[None, :, :, None],
        transforms=transform,
        output_shape=out_size,
        fill_value=float(IGNORE_LABEL),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return image[0] + mean, label[0, :, :, 0]


def gaussian_blur(image, sigma=BLUR_SIGMA, ksize=BLUR_KSIZE):
    """Separable Gaussian blur of a float32 ``(H, W, C)`` image, borders reflected."""
    half = ksize // 2
    x = tf.range(-half, half + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel /= tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    kernel_y = tf.tile(tf.reshape(kernel, [ksize, 1, 1, 1]), [1, 1, channels, 1])
    kernel_x = tf.tile(tf.reshape(kernel, [1, ksize, 1, 1]), [1, 1, channels, 1])
    padded = tf.pad(image[None], [[0, 0], [half, half], [half, half], [0, 0]], mode="REFLECT")
    out = tf.nn.depthwise_conv2d(padded, kernel_y, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, kernel_x, [1, 1, 1, 1], "VALID")
    return out[0]


def augment_pair(
    image, label, *, scale, angle, flip, blur, offset, crop_size, pad_value=MEAN_PIXEL
):
    """Applies one fixed augmentation (the deterministic half of :func:`random_augment`).

    The source is scaled by ``scale`` to ``round(H * scale) x round(W * scale)``, rotated
    by ``angle`` degrees about its centre (keeping that size), flipped left-right if
    ``flip``, and the ``crop_size`` window at ``offset`` is cut out; parts of the window
    outside the scaled image are padding. Then the image is blurred if ``blur``.

    Args:
        image: float32 or uint8 ``(H, W, 3)``, RGB 0-255.
        label: uint8 ``(H, W)``.
        scale: float scalar.
        angle: float scalar, degrees.
        flip: bool scalar.
        blur: bool scalar.
        offset: ``(row, column)`` int scalars, top-left corner of the window in the
            scaled image (negative or past the end where the window pads).
        crop_size: int or ``(height, width)``.
        pad_value: RGB fill for padding and for corners uncovered by the rotation.

    Returns:
        ``(image float32 (crop_h, crop_w, 3), label uint8 (crop_h, crop_w))``.
    """
    crop_h, crop_w = crop_hw(crop_size)
    size = tf.cast(tf.shape(label), tf.float32)
    scaled = tf.maximum(tf.round(size * tf.cast(scale, tf.float32)), 1.0)
    sy, sx = scaled[0] / size[0], scaled[1] / size[1]
    cy, cx = (scaled[0] - 1.0) / 2.0, (scaled[1] - 1.0) / 2.0
    theta = tf.cast(angle, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    oy, ox = (tf.cast(v, tf.float32) for v in offset)
    # Right to left: window -> scaled frame, flip, rotate about the centre, unscale.
    to_scaled = _affine(1.0, 0.0, ox, 0.0, 1.0, oy)
    flipped = tf.cond(
        tf.cast(flip, tf.bool),
        lambda: _affine(-1.0, 0.0, scaled[1] - 1.0, 0.0, 1.0, 0.0),
        lambda: tf.eye(3),
    )
    rotate = _affine(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    unscale = _affine(1.0 / sx, 0.0, 0.5 / sx - 0.5, 0.0, 1.0 / sy, 0.5 / sy - 0.5)
    matrix = unscale @ rotate @ flipped @ to_scaled
    image, label = warp(tf.cast(image, tf.float32), label, matrix, (crop_h, crop_w), pad_value)
    image = tf.cond(tf.cast(blur, tf.bool), lambda: gaussian_blur(image), lambda: image)
    image.set_shape([crop_h, crop_w, 3])
    label.set_shape([crop_h, crop_w])
    return image, label


def _window_offset(u, scaled, crop):
    """Uniform integer offset of a ``crop``-long window over a ``scaled``-long side.

    A window longer than the side gets a random place around it, so the padding falls
    on either side.
    """
    low = tf.minimum(0.0, scaled - crop)
    high = tf.maximum(0.0, scaled - crop)
    return tf.minimum(low + tf.floor(u * (high - low + 1.0)), high)


def random_augment(
    image,
    label,
    seed,
    crop_size,
    *,
    scale_range=(0.5, 2.0),
    max_rotation=10.0,
    blur=True,
    flip=True,
    pad_value=MEAN_PIXEL,
):
    """The paper's training augmentation with parameters drawn from ``seed``.

    Args:
        image: float32 or uint8 ``(H, W, 3)``, RGB 0-255.
        label: uint8 ``(H, W)``, class ids and 255.
        seed: int32/int64 ``(2,)`` tensor for the stateless random ops.
        crop_size: int or ``(height, width)`` of the output.
        scale_range: ``(low, high)``; the scale is uniform in it. Defaults to (0.5, 2.0).
        max_rotation: degrees; the angle is uniform in +-max_rotation, applied with
            probability 0.5. 0 disables rotation.
        blur: whether to blur (5x5 Gaussian, sigma 1.1) with probability 0.5.
        flip: whether to flip left-right with probability 0.5.
        pad_value: RGB fill for padding.

    Returns:
        ``(image float32 (crop_h, crop_w, 3), label uint8 (crop_h, crop_w))``.
    """
    crop_h, crop_w = crop_hw(crop_size)
    u = tf.random.stateless_uniform([7], seed=seed)
    low, high = (float(v) for v in scale_range)
    scale = low + u[0] * (high - low)
    angle = tf.where(u[1] < ROTATE_PROB, (2.0 * u[2] - 1.0) * float(max_rotation), 0.0)
    size = tf.cast(tf.shape(label), tf.float32)
    scaled = tf.maximum(tf.round(size * scale), 1.0)
    offset = (_window_offset(u[5], scaled[0], crop_h), _window_offset(u[6], scaled[1], crop_w))
    return augment_pair(
        image,
        label,
        scale=scale,
        angle=angle,
        flip=tf.logical_and(flip, u[4] < FLIP_PROB),
        blur=tf.logical_and(blur, u[3] < BLUR_PROB),
        offset=offset,
        crop_size=(crop_h, crop_w),
        pad_value=pad_value,
    )


def resize_for_eval(image, label, crop_size, fit="pad", pad_value=MEAN_PIXEL):
    """Brings an evaluation pair to a fixed size without random changes.

    Args:
        image: float32 or uint8 ``(H, W, 3)``.
        label: uint8 ``(H, W)``.
        crop_size: int or ``(height, width)`` of the output.
        fit: ``"pad"`` keeps the aspect ratio: an image larger than the crop is scaled
            down until it fits, none is scaled up, and the rest of the crop (bottom and
            right) is padding (mean pixel, label 255), so the image sits at the top-left.
            ``"stretch"`` resizes to exactly the crop size (aspect ratio changes).

    Returns:
        ``(image float32 (crop_h, crop_w, 3), label uint8 (crop_h, crop_w))``; labels are
        resampled with nearest neighbour.
    """
    crop_h, crop_w = crop_hw(crop_size)
    size = tf.cast(tf.shape(label), tf.float32)
    if fit == "stretch":
        sy, sx = crop_h / size[0], crop_w / size[1]
    elif fit == "pad":
        sy = sx = tf.minimum(1.0, tf.minimum(crop_h / size[0], crop_w / size[1]))
    else:
        raise ValueError(f"fit must be 'pad' or 'stretch', got {fit!r}")
    # Scaled by exactly sy/sx (not by a rounded size) so "stretch" fills the crop exactly.
    matrix = _affine(1.0 / sx, 0.0, 0.5 / sx - 0.5, 0.0, 1.0 / sy, 0.5 / sy - 0.5)
    image, label = warp(tf.cast(image, tf.float32), label, matrix, (crop_h, crop_w), pad_value)
    image.set_shape([crop_h, crop_w, 3])
    label.set_shape([crop_h, crop_w])
    return image, label
