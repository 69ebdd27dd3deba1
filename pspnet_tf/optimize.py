"""Faster inference graphs with the same outputs: BatchNorm folding, native dilated depthwise.

- :func:`fold_batch_norm`: every inference-mode BatchNormalization that directly follows a
  Conv2D or DepthwiseConv2D (and is that conv's only consumer) is folded into the conv's
  kernel and bias; the BatchNorm becomes a pass-through :class:`FoldedBatchNorm`. Keras
  computes BatchNorm as separate element-wise passes over each feature map and TF does not
  fuse them into the conv, so folding removes those passes.
- :class:`DilatedDepthwiseConv2D`: a dilated depthwise conv as one oneDNN
  ``DepthwiseConv2dNative`` call. TF lowers ``tf.nn.depthwise_conv2d`` with dilation to
  SpaceToBatch + conv + BatchToSpace, which copies every feature map twice; TF's own
  (Eigen) kernel and the gradients lack native dilation, so the layer uses it for
  inference with oneDNN only and falls back to Keras' path elsewhere.
- :class:`MatmulConv2D`: a 3x3 conv over very wide inputs (ResNet PSPNet's 4096-channel
  bottleneck) as nine shifted matmuls, which oneDNN runs at matmul speed (its direct conv
  took 1.5x as long).
- :func:`optimize_for_inference`: all three, where they apply; outputs equal the original's to
  float32 rounding (tests check 1e-4 relative). Prediction and evaluation
  (:class:`pspnet_tf.inference.Predictor`) use it by default, and SavedModel export folds
  BatchNorm (keeping TF's portable dilated depthwise form, which every TF build runs).
"""

from __future__ import annotations

import collections
import os
import platform

import keras
import numpy as np
import tensorflow as tf

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def onednn_enabled():
    """Whether TF runs its oneDNN kernels here (x86-64 CPU, not switched off, no GPU)."""
    switched_off = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and not switched_off and not tf.config.list_physical_devices("GPU")


def _pad_same(inputs, kernel_size, dilation_rate):
    """Zero-pads NHWC ``inputs`` so that a stride-1 VALID conv gives Keras' "same" output."""
    pads = [d * (k - 1) for k, d in zip(kernel_size, dilation_rate, strict=True)]
    return tf.pad(inputs, [[0, 0], *([p // 2, p - p // 2] for p in pads), [0, 0]])


@keras.saving.register_keras_serializable(package="pspnet_tf")
class DilatedDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``DepthwiseConv2D`` (stride 1, dilation > 1) run as one native dilated op at inference.

    Same arguments, weights and outputs as ``keras.layers.DepthwiseConv2D``; in training
    (or without oneDNN) it is exactly that layer.
    """

    def call(self, inputs, training=None):
        dilation = tuple(self.dilation_rate)
        if training or dilation == (1, 1) or tuple(self.strides) != (1, 1):
            return super().call(inputs)
        if not onednn_enabled():
            return super().call(inputs)
        if self.padding == "same":
            inputs = _pad_same(inputs, self.kernel_size, dilation)
        outputs = tf.raw_ops.DepthwiseConv2dNative(
            input=inputs,
            filter=tf.cast(self.kernel, inputs.dtype),
            strides=[1, 1, 1, 1],
            padding="VALID",
            dilations=[1, *dilation, 1],
        )
        if self.use_bias:
            outputs = outputs + tf.cast(self.bias, outputs.dtype)
        return self.activation(outputs) if self.activation is not None else outputs


@keras.saving.register_keras_serializable(package="pspnet_tf")
class FoldedBatchNorm(keras.layers.Layer):
    """Where a BatchNormalization was: its scale and shift now live in the conv before it."""

    def call(self, inputs, training=None, mask=None):  # BatchNormalization's call arguments
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


# Input channels from which a 3x3 conv runs faster as shifted matmuls than as oneDNN's conv:
# 4096 -> 512 at 60x60 (ResNet PSPNet's bottleneck) took 1110 ms as a conv, 727 ms as taps;
# at 1024 channels and below the conv was as fast or faster (benchmarks/NOTES.md).
MATMUL_CONV_MIN_CHANNELS = 2048


@keras.saving.register_keras_serializable(package="pspnet_tf")
class MatmulConv2D(keras.layers.Conv2D):
    """A stride-1 "same" ``Conv2D`` computed as one matmul per kernel tap, summed.

    Same arguments, weights and outputs as ``keras.layers.Conv2D``. For very wide inputs
    (the PSP bottleneck's 4096 channels) TF's oneDNN convolution runs far below the
    machine's matmul speed, while each tap is a plain ``(pixels, in) x (in, out)`` matmul.
    """

    def call(self, inputs):
        kh, kw = self.kernel_size
        dh, dw = self.dilation_rate
        height, width = tf.shape(inputs)[1], tf.shape(inputs)[2]
        padded = _pad_same(inputs, self.kernel_size, self.dilation_rate)
        kernel = tf.cast(self.kernel, inputs.dtype)
        outputs = None
        for i in range(kh):
            for j in range(kw):
                window = padded[:, i * dh : i * dh + height, j * dw : j * dw + width, :]
                tap = tf.einsum("nhwc,cf->nhwf", window, kernel[i, j])
                outputs = tap if outputs is None else outputs + tap
        if self.use_bias:
            outputs = outputs + tf.cast(self.bias, outputs.dtype)
        return self.activation(outputs) if self.activation is not None else outputs


def _as_matmul_conv(layer):
    """Whether ``layer`` is a Conv2D that :class:`MatmulConv2D` runs faster."""
    return (
        type(layer) is keras.layers.Conv2D
        and tuple(layer.strides) == (1, 1)
        and layer.padding == "same"
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.input.shape[-1] >= MATMUL_CONV_MIN_CHANNELS
        and max(layer.kernel_size) > 1
    )


def _parents(model):
    """``{layer name: [names of the layers feeding it]}``, from the model's config."""

    def names(value):
        if isinstance(value, dict):
            history = value.get("config", {}).get("keras_history") if "config" in value else None
            if value.get("class_name") == "__keras_tensor__" and history:
                return [history[0]]
            return [n for v in value.values() for n in names(v)]
        if isinstance(value, (list, tuple)):
            return [n for v in value for n in names(v)]
        return []

    return {entry["name"]: names(entry["inbound_nodes"]) for entry in model.get_config()["layers"]}


def _fold_pairs(model):
    """``{conv layer name: bn layer}`` for every BatchNorm fed only by a conv it alone reads."""
    parents = _parents(model)
    consumers = collections.Counter(name for feeding in parents.values() for name in feeding)
    pairs = {}
    for layer in model.layers:
        feeding = parents.get(layer.name, [])
        if not isinstance(layer, keras.layers.BatchNormalization) or len(feeding) != 1:
            continue
        conv = model.get_layer(feeding[0])
        linear = getattr(conv, "activation", None) in (None, keras.activations.linear)
        axis_last = layer.axis in (-1, len(layer.input.shape) - 1)
        if isinstance(conv, _CONVS) and linear and axis_last and consumers[conv.name] == 1:
            pairs[conv.name] = layer
    return pairs


def _folded_weights(conv, bn):
    """Kernel and bias of ``conv`` followed by ``bn`` (inference statistics), as one conv."""
    kernel = conv.kernel.numpy().astype(np.float64)
    bias = conv.bias.numpy().astype(np.float64) if conv.use_bias else 0.0
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    beta = bn.beta.numpy() if bn.center else 0.0
    mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    scale = np.asarray(gamma, np.float64) / np.sqrt(variance.astype(np.float64) + bn.epsilon)
    if isinstance(conv, keras.layers.DepthwiseConv2D):  # (kh, kw, in, multiplier)
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:  # (kh, kw, in, out)
        kernel = kernel * scale
    bias = (bias - mean) * scale + beta
    return kernel.astype(np.float32), bias.astype(np.float32)


def fold_batch_norm(model, native_dilation=True):
    """A copy of ``model`` for inference with BatchNorm folded into the convs before it.

    Args:
        model: a functional Keras model (e.g. a PSPNet inference model).
        native_dilation: bool. Also turn dilated depthwise convs into
            :class:`DilatedDepthwiseConv2D`. Defaults to True. Wide 3x3 convs become
            :class:`MatmulConv2D` either way.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs and layer names, for
        inference only (folded BatchNorms cannot train).
    """
    pairs = _fold_pairs(model)
    folded = {bn.name for bn in pairs.values()}

    def clone(layer):
        config = layer.get_config()
        if layer.name in folded:
            return FoldedBatchNorm(name=layer.name)
        if layer.name in pairs:
            config["use_bias"] = True
        if native_dilation and type(layer) is keras.layers.DepthwiseConv2D:
            return DilatedDepthwiseConv2D.from_config(config)
        if _as_matmul_conv(layer):
            return MatmulConv2D.from_config(config)
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        original = model.get_layer(layer.name)
        if layer.name in pairs:
            layer.set_weights(list(_folded_weights(original, pairs[layer.name])))
        elif layer.name not in folded:
            layer.set_weights(original.get_weights())
    return new


def optimize_for_inference(model, native_dilation=None):
    """:func:`fold_batch_norm` where it applies; other models come back unchanged.

    Args:
        model: a Keras model.
        native_dilation: bool or None. See :func:`fold_batch_norm`; None: where oneDNN
            runs them (:func:`onednn_enabled`).

    Returns:
        The optimised copy of a functional model, else ``model`` itself.
    """
    if native_dilation is None:
        native_dilation = onednn_enabled()
    try:
        return fold_batch_norm(model, native_dilation=native_dilation)
    except ValueError:  # clone_model takes only functional and Sequential models
        return model
