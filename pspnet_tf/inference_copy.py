"""Inference copies of a model's graph: BatchNorm folded into the convs, another precision.

- :func:`fold_batch_norm`: every inference-mode BatchNormalization that directly follows a
  Conv2D or DepthwiseConv2D (and is that conv's only consumer) is folded into the conv's
  kernel and bias; the BatchNorm becomes a pass-through :class:`FoldedBatchNorm`. Keras
  computes BatchNorm as separate element-wise passes over each feature map and TF does not
  fuse them into the conv, so folding removes those passes. The copy holds standard layers
  only (and the pass-throughs), so it runs and exports anywhere.
- ``precision`` (:mod:`pspnet_tf.precision`): optionally the copy computes in bfloat16
  (CPUs) or float16 (GPUs) with float32 weights, input normalisation and logits: about
  twice as fast on CPUs with bf16 instructions, labels nearly always the same (see the
  README).
- :class:`FrozenGraph`: a model's forward pass as one graph whose weights are constants.
  TensorFlow can then prepare each weight once (oneDNN, for example, keeps a conv's
  reordered kernel between calls only when the kernel is a constant) and fold what follows
  from the weights alone. It holds no layers and cannot be saved or trained: it only runs.

Where faster kernels are then installed on such a copy (by probe and timed trial) is
:mod:`pspnet_tf.autotune`'s job.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from pspnet_tf.precision import keras_policy, resolve_precision

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


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


@keras.saving.register_keras_serializable(package="pspnet_tf")
class FoldedBatchNorm(keras.layers.Layer):
    """Where a BatchNormalization was: its scale and shift now live in the conv before it."""

    def call(self, inputs, training=None, mask=None):  # BatchNormalization's call arguments
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


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


def fold_batch_norm(model, precision=None):
    """A copy of ``model`` for inference with BatchNorm folded into the convs before it.

    Args:
        model: a functional Keras model (e.g. a PSPNet inference model).
        precision: one of :data:`pspnet_tf.precision.PRECISIONS` or None. The copy's
            compute dtype (weights stay float32; so do the input normalisation and the
            output layers). None keeps every layer's own policy.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs and layer names, for
        inference only (folded BatchNorms cannot train).
    """
    return inference_copy(model, fold=True, precision=precision)


def inference_copy(model, fold=True, precision=None):
    """A copy of ``model``'s graph, BatchNorm folded (``fold``) and at ``precision``.

    Args:
        model: a functional or Sequential Keras model.
        fold: bool. Fold BatchNorm into the convs (see :func:`fold_batch_norm`).
        precision: one of :data:`pspnet_tf.precision.PRECISIONS` or None; None keeps
            every layer's own policy.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs, layer names and results
        (to float32 rounding; reduced precisions round more).

    Raises:
        ValueError: an unknown ``precision``, or a model that ``clone_model`` cannot
            copy (subclassed models).
    """
    precision = resolve_precision(precision)
    pairs = _fold_pairs(model) if fold else {}
    folded = {bn.name for bn in pairs.values()}
    keep_float32 = _float32_layers(model) if precision else set()

    def clone(layer):
        config = layer.get_config()
        if precision and layer.name not in keep_float32:
            config["dtype"] = keras_policy(precision)
        if layer.name in folded:
            policy = config["dtype"] if precision else layer.dtype_policy.name
            return FoldedBatchNorm(name=layer.name, dtype=policy)
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        original = model.get_layer(layer.name)
        if layer.name in pairs:
            layer.set_weights(list(_folded_weights(original, pairs[layer.name])))
        elif layer.name not in folded:
            layer.set_weights(original.get_weights())
    return new


class FrozenGraph:
    """``model``'s inference pass with its weights as constants of one TensorFlow graph.

    Calling it as ``frozen(images, training=False)`` gives what
    ``model(images, training=False)`` gives (the same structure; values to float32
    rounding). The weights are copied when it is made: later changes to ``model``'s
    weights do not reach it.

    Args:
        model: a Keras model (any model ``tf.function`` can trace).
        input_shape: the input shape it accepts, None for any size of that axis; defaults
            to the model's input shape (any batch).
    """

    def __init__(self, model, input_shape=None):
        shape = tuple(input_shape or (None, *model.inputs[0].shape[1:]))
        spec = tf.TensorSpec(shape, model.inputs[0].dtype)
        traced = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        self._function = convert_variables_to_constants_v2(traced)
        self._structure = traced.structured_outputs
        self.name = model.name
        self.input_shape = shape

    def __call__(self, inputs, training=False):
        if training:
            raise ValueError(f"FrozenGraph of {self.name!r} runs inference only (training=True)")
        inputs = tf.convert_to_tensor(inputs, self._function.inputs[0].dtype)
        if not inputs.shape.is_compatible_with(self.input_shape):
            raise ValueError(
                f"FrozenGraph of {self.name!r} takes inputs of shape {self.input_shape}, "
                f"got {tuple(inputs.shape)}"
            )
        outputs = self._function(inputs)
        return tf.nest.pack_sequence_as(self._structure, tf.nest.flatten(outputs))
