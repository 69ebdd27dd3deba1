"""Faster graphs with the same outputs: BatchNorm folding and fusing, native dilated convs.

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
- :class:`DilatedConv2D`: a dilated (non-depthwise) conv as oneDNN's native dilated
  convolution, forward and both gradients, instead of TF's SpaceToBatch form; ResNet
  backbones are built with it, so training uses it too. Export turns it back into Conv2D.
- :class:`FusedBatchNorm`: BatchNormalization whose training pass is TF's one fused op
  (and its gradient another) instead of Keras' separate passes; every model's BatchNorms are
  built with it, so training uses it. Same outputs, gradients and moving statistics.
- :class:`MatmulConv2D`: a 3x3 conv over very wide inputs (ResNet PSPNet's 4096-channel
  bottleneck) as nine shifted matmuls, which oneDNN runs at matmul speed (its direct conv
  took 1.5x as long).
- :func:`optimize_for_inference`: all three, where they apply; outputs equal the original's to
  float32 rounding (tests check 1e-4 relative). Prediction and evaluation
  (:class:`pspnet_tf.inference.Predictor`) use it by default, and SavedModel export folds
  BatchNorm (keeping TF's portable dilated depthwise form, which every TF build runs).
- ``precision``: optionally the copy computes in bfloat16 (CPUs) or float16 (GPUs) with
  float32 weights, input normalisation and logits (Keras' mixed policies): about twice as
  fast on CPUs with bf16 instructions, labels nearly always the same (see the README).
"""

from __future__ import annotations

import collections
import os
import platform

import keras
import numpy as np
import tensorflow as tf

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
# Inference precisions: None keeps each layer's own dtype policy; "mixed" is bfloat16 on
# CPUs and float16 on GPUs, as the training option of the same name.
PRECISIONS = (None, "float32", "bfloat16", "float16", "mixed")
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def onednn_enabled():
    """Whether TF runs its oneDNN kernels here (x86-64 CPU, not switched off, no GPU)."""
    switched_off = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and not switched_off and not tf.config.list_physical_devices("GPU")


def resolve_precision(precision):
    """``"float32"``, ``"bfloat16"``, ``"float16"`` or None for a ``precision`` argument.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "mixed":
        return "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
    return precision


def _float32_layers(model):
    """Names of the layers that stay float32 at any precision: inputs, the input
    normalisation (raw pixels must not be rounded) and the layers giving the outputs."""
    from pspnet_tf.layers import Preprocessing

    config = model.get_config()
    ends = [config["input_layers"], config["output_layers"]]

    def names(value):  # a (nested) list or dict of [layer name, node index, tensor index]
        if isinstance(value, dict):
            return [n for v in value.values() for n in names(v)]
        if value and isinstance(value[0], str):
            return [value[0]]
        return [n for v in value for n in names(v)]

    keep = {layer.name for layer in model.layers if isinstance(layer, Preprocessing)}
    return keep | set(names(ends))


def _pad_same(inputs, kernel_size, dilation_rate):
    """Zero-pads NHWC ``inputs`` so that a stride-1 VALID conv gives Keras' "same" output."""
    pads = [d * (k - 1) for k, d in zip(kernel_size, dilation_rate, strict=True)]
    return tf.pad(inputs, [[0, 0], *([p // 2, p - p // 2] for p in pads), [0, 0]])


def _bias_and_activation(conv, outputs):
    """The rest of a Keras conv layer's call after the convolution itself."""
    if conv.use_bias:
        outputs = outputs + tf.cast(conv.bias, outputs.dtype)
    return conv.activation(outputs) if conv.activation is not None else outputs


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
        return _bias_and_activation(self, outputs)


@keras.saving.register_keras_serializable(package="pspnet_tf")
class DilatedConv2D(keras.layers.Conv2D):
    """``Conv2D`` with dilation > 1 run as one native dilated oneDNN convolution.

    Same arguments, weights and outputs (and gradients) as ``keras.layers.Conv2D``, which
    on TF computes a dilated conv as SpaceToBatch + conv + BatchToSpace: at output stride 8
    that turns ResNet's 4x-dilated 3x3 convs on 40x40 maps into 64 images of 12x12 each,
    where oneDNN's weight gradient runs slowly. oneDNN's own dilated convolution runs the
    forward pass and both gradients on the whole map. Used in training and inference; TF
    without oneDNN (whose CPU conv rejects dilation) and strided, grouped or channels-first
    settings run Keras' form, and exported models get plain ``Conv2D`` layers (portable).
    """

    def call(self, inputs):
        dilation = tuple(self.dilation_rate)
        native = (
            dilation != (1, 1)
            and tuple(self.strides) == (1, 1)
            and self.groups == 1
            and self.data_format == "channels_last"
            and onednn_enabled()
        )
        if not native:
            return super().call(inputs)
        outputs = tf.nn.conv2d(
            inputs,
            tf.cast(self.kernel, inputs.dtype),
            strides=1,
            padding=self.padding.upper(),
            dilations=dilation,
        )
        return _bias_and_activation(self, outputs)


@keras.saving.register_keras_serializable(package="pspnet_tf")
class FusedBatchNorm(keras.layers.BatchNormalization):
    """``BatchNormalization`` whose training pass is one fused op and its gradient another.

    Same arguments, weights, outputs, gradients and moving-statistics updates as
    ``keras.layers.BatchNormalization``. Keras computes a training-mode BatchNorm from
    separate passes (cast to float32, mean, squared difference, mean, scale, shift), and
    its gradient from as many again; TF's ``FusedBatchNormV3`` (oneDNN, Eigen or cuDNN)
    does the statistics and the normalisation in one op, reading bfloat16 or float16
    inputs directly and accumulating in float32. Inference, masks, renorm, synchronized
    statistics, frozen layers and inputs that are not 4-D channels-last run Keras' call.
    """

    def call(self, inputs, training=None, mask=None):
        fused = (
            training
            and self.trainable
            and mask is None
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis % 4 == 3
        )
        if not fused:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset, epsilon=self.epsilon, is_training=True
        )
        # The op returns the unbiased (n / (n - 1)) variance; Keras keeps the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
        variance = variance * (tf.maximum(count - 1.0, 1.0) / count)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="pspnet_tf")
class FoldedBatchNorm(keras.layers.Layer):
    """Where a BatchNormalization was: its scale and shift now live in the conv before it."""

    def call(self, inputs, training=None, mask=None):  # BatchNormalization's call arguments
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


# Input channels from which a 3x3 conv runs faster as shifted matmuls than as oneDNN's conv:
# 4096 -> 512 at 60x60 (ResNet PSPNet's bottleneck) took 1110 ms as a conv, 727 ms as taps,
# and forward + backward at batch 2 6.4 s against 4.5 s; at 1024 channels and below the conv
# was as fast or faster (benchmarks/NOTES.md).
MATMUL_CONV_MIN_CHANNELS = 2048


def tap_conv2d(inputs, kernel, dilation=1):
    """Stride-1 "same" 2-D convolution (odd kernel) as one matmul per kernel tap.

    The zero-padded input is flattened to ``(pixels, channels)``; the input of every tap
    is then a contiguous row range of it (no copy), and each output pixel of the padded
    grid is the sum of ``rows @ kernel[i, j]`` over the taps. Outputs on the padding ring
    (and the rows between images) are computed and cropped: 7% more work at 60x60.

    The gradient is written out: the kernel's from the same row ranges (one matmul per
    tap), the input's by oneDNN's convolution input gradient, which runs near matmul speed
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


@keras.saving.register_keras_serializable(package="pspnet_tf")
class MatmulConv2D(keras.layers.Conv2D):
    """A ``Conv2D`` that runs as one matmul per kernel tap on CPUs with oneDNN.

    Same arguments, weights and outputs as ``keras.layers.Conv2D`` (and the same
    gradients). For very wide inputs (the PSP bottleneck's 4096 channels) TF's oneDNN
    convolution runs far below the machine's matmul speed, forward and backward, while
    each tap is a plain ``(pixels, in) x (in, out)`` matmul (:func:`tap_conv2d`). Other
    settings (stride, even kernels, "valid" padding, groups, channels first) and machines
    without oneDNN (GPUs, ``TF_ENABLE_ONEDNN_OPTS=0``) run Keras' convolution.
    """

    def call(self, inputs):
        if not (_tap_conv_applies(self) and onednn_enabled()):
            return super().call(inputs)
        outputs = tap_conv2d(inputs, tf.cast(self.kernel, inputs.dtype), self.dilation_rate[0])
        return _bias_and_activation(self, outputs)


def _tap_conv_applies(layer):
    """Whether :func:`tap_conv2d` computes this Conv2D's settings."""
    kh, kw = layer.kernel_size
    return (
        tuple(layer.strides) == (1, 1)
        and layer.padding == "same"
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and kh % 2 == 1
        and kw % 2 == 1
        and len(set(layer.dilation_rate)) == 1
    )


def _as_matmul_conv(layer):
    """Whether ``layer`` is a Conv2D that :class:`MatmulConv2D` runs faster."""
    return (
        type(layer) is keras.layers.Conv2D
        and _tap_conv_applies(layer)
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


def fold_batch_norm(model, native_dilation=True, precision=None):
    """A copy of ``model`` for inference with BatchNorm folded into the convs before it.

    Args:
        model: a functional Keras model (e.g. a PSPNet inference model).
        native_dilation: bool. Also turn dilated depthwise convs into
            :class:`DilatedDepthwiseConv2D`. Defaults to True. Wide 3x3 convs become
            :class:`MatmulConv2D` either way.
        precision: one of :data:`PRECISIONS`. The copy's compute dtype (weights stay
            float32; so do the input normalisation and the output layers). None keeps
            every layer's own policy.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs and layer names, for
        inference only (folded BatchNorms cannot train).
    """
    return _inference_copy(model, True, native_dilation, resolve_precision(precision))


def _inference_copy(model, fold, native_dilation, precision):
    """:func:`fold_batch_norm`'s copy; ``fold=False`` copies the graph as it is and only
    applies ``precision`` (already resolved by :func:`resolve_precision`)."""
    pairs = _fold_pairs(model) if fold else {}
    folded = {bn.name for bn in pairs.values()}
    keep_float32 = _float32_layers(model) if precision else set()

    def clone(layer):
        config = layer.get_config()
        if precision and layer.name not in keep_float32:
            config["dtype"] = _POLICIES[precision]
        cls = layer.__class__
        if not native_dilation and cls is DilatedConv2D:
            cls = keras.layers.Conv2D  # portable: TF's own dilated form
        if not fold:
            return cls.from_config(config)
        if layer.name in folded:
            policy = config["dtype"] if precision else layer.dtype_policy.name
            return FoldedBatchNorm(name=layer.name, dtype=policy)
        if layer.name in pairs:
            config["use_bias"] = True
        if native_dilation and type(layer) is keras.layers.DepthwiseConv2D:
            return DilatedDepthwiseConv2D.from_config(config)
        if _as_matmul_conv(layer):
            return MatmulConv2D.from_config(config)
        return cls.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        original = model.get_layer(layer.name)
        if layer.name in pairs:
            layer.set_weights(list(_folded_weights(original, pairs[layer.name])))
        elif layer.name not in folded:
            layer.set_weights(original.get_weights())
    return new


def optimize_for_inference(model, native_dilation=None, precision=None, fold=True):
    """:func:`fold_batch_norm` where it applies; other models come back unchanged.

    Args:
        model: a Keras model.
        native_dilation: bool or None. See :func:`fold_batch_norm`; None: where oneDNN
            runs them (:func:`onednn_enabled`).
        precision: one of :data:`PRECISIONS`; see :func:`fold_batch_norm`.
        fold: bool. False: no graph changes, only ``precision``.

    Returns:
        The optimised copy of a functional model, else ``model`` itself.

    Raises:
        ValueError: an unknown ``precision``, or a reduced one for a model that is
            not functional (its layers cannot be copied with another policy).
    """
    resolved = resolve_precision(precision)
    if native_dilation is None:
        native_dilation = onednn_enabled()
    if not fold and resolved is None:
        return model
    try:
        return _inference_copy(model, fold, native_dilation, resolved)
    except ValueError:  # clone_model takes only functional and Sequential models
        if resolved not in (None, "float32"):
            raise ValueError(
                f"precision={precision!r} needs a functional Keras model; "
                f"{type(model).__name__} {model.name!r} is not one"
            ) from None
        return model
