"""The few custom layers PSPNet needs.

All are registered Keras layers (package ``pspnet_tf``) that return every
constructor argument from ``get_config``, so a saved ``.keras`` model loads with
``keras.models.load_model`` in safe mode once ``pspnet_tf`` is imported.

- :class:`Preprocessing`: the model's first layer. It turns RGB pixel values
  0-255 into what the weights expect, and carries the model's metadata (class
  names, palette, weights source, build arguments) in its config.
- :class:`AdaptiveAveragePooling`: exact PyTorch ``AdaptiveAvgPool2d`` semantics
  for static and dynamic sizes, as two averaging matrices applied with einsum.
- :class:`ResizeLike`: bilinear resize of one tensor to the spatial size of
  another (``align_corners=True`` as the original Caffe Interp layer, or
  half-pixel as ``tf.image.resize``).
"""

from __future__ import annotations

import copy

import keras
import tensorflow as tf

# Per-channel statistics in RGB order, in 0-255 units.
# The name of every model's Preprocessing layer (its config carries the metadata).
PREPROCESSING_LAYER = "preprocessing"
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 255 * (0.485, 0.456, 0.406)
_IMAGENET_STD = (58.395, 57.12, 57.375)  # 255 * (0.229, 0.224, 0.225)
# keras.applications ResNet ("caffe" mode) subtracts these BGR means.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

PREPROCESSING_MODES = {
    # RGB, mean/std normalised: torchvision-style ImageNet weights.
    "torch": {"mean": IMAGENET_MEAN, "std": _IMAGENET_STD, "channel_order": "rgb"},
    # BGR, mean subtracted, no scaling: Caffe and keras.applications ResNet.
    "caffe": {"mean": _CAFFE_MEAN_BGR, "std": (1.0, 1.0, 1.0), "channel_order": "bgr"},
    # RGB scaled to [-1, 1]: keras.applications MobileNetV2.
    "tf": {"mean": (127.5, 127.5, 127.5), "std": (127.5, 127.5, 127.5), "channel_order": "rgb"},
    # Identity: the caller feeds already-normalised input.
    "none": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "channel_order": "rgb"},
}


@keras.saving.register_keras_serializable(package="pspnet_tf")
class Preprocessing(keras.layers.Layer):
    """Normalises RGB 0-255 input and carries the model's metadata.

    The layer computes in float32 whatever the global dtype policy, so that
    mixed precision never rounds raw pixel values.

    Args:
        mean: sequence of 3 floats. Per-channel mean subtracted, in the channel
            order given by ``channel_order``, in 0-255 units.
        std: sequence of 3 floats. Per-channel divisor, same order and units.
        channel_order: str. ``"rgb"`` keeps the input order; ``"bgr"`` reverses
            the channels before normalising (Caffe weights).
        metadata: dict or None. JSON-serialisable facts about the model (class
            names, palette, weights source, build arguments). Stored in the
            config so it travels inside the saved ``.keras`` file.
        **kwargs: base ``keras.layers.Layer`` arguments.

    Example:
    >>> import numpy as np
    >>> layer = Preprocessing(**PREPROCESSING_MODES["torch"])
    >>> layer(np.full((1, 2, 2, 3), 255.0)).shape
    TensorShape([1, 2, 2, 3])
    """

    def __init__(self, mean, std, channel_order="rgb", metadata=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
        if any(s == 0 for s in std):
            raise ValueError(f"std must not contain 0, got {std!r}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.channel_order = channel_order
        self.metadata = copy.deepcopy(metadata) if metadata else {}

    def call(self, inputs):
        x = tf.cast(inputs, "float32")
        if self.channel_order == "bgr":
            x = x[..., ::-1]
        return (x - tf.constant(self.mean)) / tf.constant(self.std)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            mean=list(self.mean),
            std=list(self.std),
            channel_order=self.channel_order,
            metadata=copy.deepcopy(self.metadata),
        )
        return config


def adaptive_pool_matrix(size, bins, dtype="float32"):
    """Averaging matrix of shape ``(bins, size)`` for adaptive average pooling.

    Row ``i`` averages positions ``floor(i * size / bins)`` up to (not including)
    ``ceil((i + 1) * size / bins)``: PyTorch ``AdaptiveAvgPool2d`` regions.

    Args:
        size: int or scalar int tensor. Input length along one axis.
        bins: int. Number of output regions.
        dtype: tf dtype of the result.

    Returns:
        A ``(bins, size)`` tensor whose rows sum to 1.
    """
    size = tf.cast(size, "int32")
    i = tf.range(bins, dtype="int32")[:, None]
    start = (i * size) // bins
    # ceil(a / b) written as (a + b - 1) // b: ONNX runtimes truncate integer
    # division, so the -((-a) // b) form gives wrong results there.
    end = ((i + 1) * size + bins - 1) // bins
    pos = tf.range(size, dtype="int32")[None, :]
    inside = tf.cast((pos >= start) & (pos < end), "float32")
    return tf.cast(inside / tf.cast(end - start, "float32"), dtype)


@keras.saving.register_keras_serializable(package="pspnet_tf")
class AdaptiveAveragePooling(keras.layers.Layer):
    """Exact adaptive average pooling to ``bins x bins`` for any input size.

    Unlike ``keras.layers.AdaptiveAveragePooling2D`` it accepts dynamic height
    and width and works inside ``tf.function``/XLA for every ``bins``, including 1.
    Where the size divides by ``bins`` it equals ``AveragePooling2D`` with
    kernel = stride = size / bins.

    Args:
        bins: int. Output height and width.
        **kwargs: base ``keras.layers.Layer`` arguments.

    Input: ``(batch, height, width, channels)``. Output: ``(batch, bins, bins, channels)``.
    """

    def __init__(self, bins, **kwargs):
        super().__init__(**kwargs)
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins!r}")
        self.bins = int(bins)

    def call(self, inputs):
        shape = tf.shape(inputs)
        rows = adaptive_pool_matrix(shape[1], self.bins, inputs.dtype)
        cols = adaptive_pool_matrix(shape[2], self.bins, inputs.dtype)
        return tf.einsum("ih,bhwc,jw->bijc", rows, inputs, cols)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.bins, self.bins, input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(bins=self.bins)
        return config


@keras.saving.register_keras_serializable(package="pspnet_tf")
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of ``inputs[0]`` to the height and width of ``inputs[1]``.

    Args:
        align_corners: bool. ``True`` maps corner pixels onto corner pixels, as
            Caffe's Interp layer and PyTorch ``align_corners=True`` (what the
            published PSPNet weights were trained with). ``False`` uses
            half-pixel centres, as ``tf.image.resize``.
        **kwargs: base ``keras.layers.Layer`` arguments.

    Input: a list ``[x, reference]`` of 4-D tensors. Output: ``x`` resized to
    ``reference``'s spatial size, in ``x``'s dtype.
    """

    def __init__(self, align_corners=True, **kwargs):
        super().__init__(**kwargs)
        self.align_corners = bool(align_corners)

    def call(self, inputs):
        x, reference = inputs
        size = tf.shape(reference)[1:3]
        # Resize in float32: bilinear resize of bfloat16 fails to compile under
        # XLA (tensorflow#81273) and both resize ops return float32 anyway.
        x32 = tf.cast(x, "float32")
        if self.align_corners:
            out = tf.raw_ops.ResizeBilinear(
                images=x32, size=size, align_corners=True, half_pixel_centers=False
            )
        else:
            out = tf.image.resize(x32, size, method="bilinear")
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shapes):
        x_shape, ref_shape = input_shapes
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(align_corners=self.align_corners)
        return config
