"""Faster computations of standard Keras layers, for :mod:`pspnet_tf.autotune` to install.

A model holds only standard Keras layers. Each kernel here is a replacement for one
layer's ``call`` that computes the same thing (same weights, outputs, gradients and
moving statistics) another way; :mod:`pspnet_tf.autotune` installs it on a layer
object in this process only, after probing that it runs on this device and timing it
against the layer's own call. Nothing of it is saved: ``model.save``, export and
``clone_model`` see the standard layer.

- ``fused_batch_norm`` (training): BatchNormalization's training pass as TF's one
  ``FusedBatchNormV3`` op (and its gradient another) instead of Keras' separate passes
  (cast, mean, squared difference, mean, scale, shift, and as many again backward).
- ``native_dilated_conv`` (training and inference): a dilated Conv2D as one native
  dilated convolution instead of TF's SpaceToBatch + conv + BatchToSpace form. oneDNN
  runs it forward and backward; TF's own CPU kernels reject dilated gradients.
- ``native_dilated_depthwise`` (inference): a dilated DepthwiseConv2D as one
  ``DepthwiseConv2dNative`` op; TF's own CPU kernel rejects dilation.
- ``tap_conv`` (training and inference): a 3x3 conv over very wide inputs (ResNet
  PSPNet's 4096-channel bottleneck) as one matmul per kernel tap (:func:`tap_conv2d`).

Each kernel falls back to the layer's own call where the layer's settings (strides,
groups, data format, masks, renorm, ...) are outside what it computes.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import keras
import tensorflow as tf


def _pad_same(inputs, kernel_size, dilation_rate):
    """Zero-pads NHWC ``inputs`` so that a stride-1 VALID conv gives Keras' "same" output."""
    pads = [d * (k - 1) for k, d in zip(kernel_size, dilation_rate, strict=True)]
    return tf.pad(inputs, [[0, 0], *([p // 2, p - p // 2] for p in pads), [0, 0]])


def _bias_and_activation(conv, outputs):
    """The rest of a Keras conv layer's call after the convolution itself."""
    if conv.use_bias:
        outputs = outputs + tf.cast(conv.bias, outputs.dtype)
    return conv.activation(outputs) if conv.activation is not None else outputs


def _own_call(layer):
    """The layer's class ``call`` (what runs where a kernel does not apply)."""
    return types.MethodType(type(layer).call, layer)


# ---------------------------------------------------------------- fused BatchNorm


def _fused_batch_norm_applies(layer):
    return (
        isinstance(layer, keras.layers.BatchNormalization)
        and not layer.renorm
        and not layer.synchronized
        and layer.axis in (-1, 3)
    )


def fused_batch_norm(layer, inputs, training=None, mask=None):
    """BatchNormalization's call, with the training pass as one fused op.

    The op returns the unbiased (n / (n - 1)) variance; Keras keeps the biased one in
    its moving variance, so it is rescaled. Inference, frozen layers, masks and inputs
    that are not 4-D run Keras' call.
    """
    fused = training and layer.trainable and mask is None and len(inputs.shape) == 4
    if not (fused and _fused_batch_norm_applies(layer)):
        return _own_call(layer)(inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, scale, offset, epsilon=layer.epsilon, is_training=True
    )
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
    variance = variance * (tf.maximum(count - 1.0, 1.0) / count)
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.cast(outputs, layer.compute_dtype)


# ---------------------------------------------------------------- native dilated convs


def _dilated_stride_1(layer):
    return max(layer.dilation_rate) > 1 and tuple(layer.strides) == (1, 1)


def _native_dilated_conv_applies(layer):
    return (
        isinstance(layer, keras.layers.Conv2D)  # not DepthwiseConv2D: no subclass in Keras 3
        and _dilated_stride_1(layer)
        and layer.groups == 1
        and layer.data_format == "channels_last"
    )


def native_dilated_conv(layer, inputs):
    """A dilated stride-1 Conv2D as one dilated convolution op (forward and gradients)."""
    outputs = tf.nn.conv2d(
        inputs,
        tf.cast(layer.kernel, inputs.dtype),
        strides=1,
        padding=layer.padding.upper(),
        dilations=tuple(layer.dilation_rate),
    )
    return _bias_and_activation(layer, outputs)


def _native_dilated_depthwise_applies(layer):
    return (
        isinstance(layer, keras.layers.DepthwiseConv2D)
        and _dilated_stride_1(layer)
        and layer.data_format == "channels_last"
    )


def native_dilated_depthwise(layer, inputs):
    """A dilated stride-1 DepthwiseConv2D as one ``DepthwiseConv2dNative`` op."""
    dilation = tuple(layer.dilation_rate)
    if layer.padding == "same":
        inputs = _pad_same(inputs, layer.kernel_size, dilation)
    outputs = tf.raw_ops.DepthwiseConv2dNative(
        input=inputs,
        filter=tf.cast(layer.kernel, inputs.dtype),
        strides=[1, 1, 1, 1],
        padding="VALID",
        dilations=[1, *dilation, 1],
    )
    return _bias_and_activation(layer, outputs)


# ---------------------------------------------------------------- per-tap matmul conv

# Input channels from which a 3x3 conv is a candidate for per-tap matmuls: on the
# AVX-512 development CPU 4096 -> 512 at 60x60 (the ResNet PSP bottleneck) took 1110 ms
# as oneDNN's conv and 727 ms as taps, while at 1024 channels and below the conv was as
# fast or faster (benchmarks/NOTES.md). The trial decides on each machine.
TAP_CONV_MIN_CHANNELS = 2048


def _tap_conv_applies(layer):
    if not isinstance(layer, keras.layers.Conv2D):
        return False
    kh, kw = layer.kernel_size
    return (
        tuple(layer.strides) == (1, 1)
        and layer.padding == "same"
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and kh % 2 == 1
        and kw % 2 == 1
        and max(kh, kw) > 1
        # Dilated, its input gradient is a dilated transposed conv, which TF's own CPU
        # kernels reject; the PSP bottleneck it is for is not dilated.
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.input.shape[-1] >= TAP_CONV_MIN_CHANNELS
    )


def tap_conv(layer, inputs):
    """A stride-1 "same" Conv2D as one matmul per kernel tap (:func:`tap_conv2d`)."""
    kernel = tf.cast(layer.kernel, inputs.dtype)
    return _bias_and_activation(layer, tap_conv2d(inputs, kernel, layer.dilation_rate[0]))


def tap_conv2d(inputs, kernel, dilation=1):
    """Stride-1 "same" 2-D convolution (odd kernel) as one matmul per kernel tap.

    The zero-padded input is flattened to ``(pixels, channels)``; the input of every tap
    is then a contiguous row range of it (no copy), and each output pixel of the padded
    grid is the sum of ``rows @ kernel[i, j]`` over the taps. Outputs on the padding ring
    (and the rows between images) are computed and cropped: 7% more work at 60x60.

    The gradient is written out: the kernel's from the same row ranges (one matmul per
    tap), the input's by the convolution input gradient, which runs near matmul speed
    here (its output has the wide side). Autodiff of the forward would instead build nine
    zero-padded copies of the wide input.

    Args:
        inputs: ``(N, H, W, C)`` tensor.
        kernel: ``(kh, kw, C, F)`` tensor of the same dtype, kh and kw odd.
        dilation: int.

    Returns:
        ``(N, H, W, F)`` tensor.
    """
    kh, kw, channels, filters = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"tap_conv2d needs an odd kernel size, got {(kh, kw)}")
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)

    @tf.custom_gradient
    def conv(inputs, kernel):
        n, h, w = tf.shape(inputs)[0], tf.shape(inputs)[1], tf.shape(inputs)[2]
        padded_width = w + 2 * pw
        rows = tf.reshape(_pad_same(inputs, (kh, kw), (dilation, dilation)), [-1, channels])
        centre = ph * padded_width + pw  # row of the first output pixel's centre tap
        length = tf.shape(rows)[0] - 2 * centre
        taps = [
            (i, j, i * dilation * padded_width + j * dilation) for i in range(kh) for j in range(kw)
        ]
        outputs = None
        for i, j, start in taps:
            tap = tf.matmul(rows[start : start + length], kernel[i, j])
            outputs = tap if outputs is None else outputs + tap
        grid = tf.pad(outputs, [[centre, centre], [0, 0]])
        grid = tf.reshape(grid, [n, h + 2 * ph, padded_width, filters])

        def gradient(upstream):
            grid = _pad_same(upstream, (kh, kw), (dilation, dilation))  # the output grid
            grid = tf.reshape(grid, [-1, filters])[centre : centre + length]
            kernel_grad = {
                (i, j): tf.matmul(rows[start : start + length], grid, transpose_a=True)
                for i, j, start in taps
            }
            kernel_grad = tf.stack(
                [tf.stack([kernel_grad[i, j] for j in range(kw)]) for i in range(kh)]
            )
            # After the kernel gradient, so the padded rows are freed before the input
            # gradient's wide output is allocated (120 MB less at the training peak).
            with tf.control_dependencies([kernel_grad]):
                input_grad = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(inputs),
                    filter=kernel,
                    out_backprop=upstream,
                    strides=[1, 1, 1, 1],
                    padding="SAME",
                    dilations=[1, dilation, dilation, 1],
                )
            return input_grad, kernel_grad

        return grid[:, ph : ph + h, pw : pw + w, :], gradient

    return conv(inputs, kernel)


# ---------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One candidate: where it applies, what it runs, and whether it trains.

    Attributes:
        name: str. What ``PSPNET_TF_KERNELS`` and the logs call it.
        applies: ``layer -> bool``. Whether it computes this layer's settings.
        call: ``(layer, inputs, ...) -> outputs``, with the layer's call arguments.
        training: bool. A candidate for training (its gradient is used).
        inference: bool. A candidate for inference copies.
    """

    name: str
    applies: Callable
    call: Callable
    training: bool
    inference: bool


KERNELS = (
    Kernel("fused_batch_norm", _fused_batch_norm_applies, fused_batch_norm, True, False),
    Kernel("native_dilated_conv", _native_dilated_conv_applies, native_dilated_conv, True, True),
    Kernel(
        "native_dilated_depthwise",
        _native_dilated_depthwise_applies,
        native_dilated_depthwise,
        False,
        True,
    ),
    Kernel("tap_conv", _tap_conv_applies, tap_conv, True, True),
)
KERNEL_NAMES = tuple(k.name for k in KERNELS)


def install(layer, kernel):
    """Runs ``kernel`` as ``layer``'s call in this process (never saved)."""
    object.__setattr__(layer, "call", types.MethodType(kernel.call, layer))
    object.__setattr__(layer, "_pspnet_kernel", kernel.name)


def uninstall(layer):
    """Gives ``layer`` its own call back."""
    if "call" in vars(layer):
        object.__delattr__(layer, "call")
        object.__delattr__(layer, "_pspnet_kernel")


def installed(layer):
    """The name of the kernel running as ``layer``'s call, or None."""
    return vars(layer).get("_pspnet_kernel")
