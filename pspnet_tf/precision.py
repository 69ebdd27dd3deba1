"""Compute precision: one vocabulary for training, inference and export.

A precision is the dtype the layers compute in; weights, the input normalisation and
the logits stay float32 (Keras' mixed policies), so files are the same either way.

- ``"float32"``: everything in float32.
- ``"bfloat16"``: Keras' ``mixed_bfloat16``; about twice as fast on CPUs with bf16
  instructions (AVX512-BF16, AMX) and on recent GPUs.
- ``"float16"``: Keras' ``mixed_float16`` (GPUs; ``fit`` adds loss scaling).
- ``"mixed"``: bfloat16 on a CPU, float16 on a GPU.

Inference also takes None: every layer keeps the dtype policy it was built with.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("float32", "bfloat16", "float16", "mixed")
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def resolve_precision(precision, allow_none=True):
    """``"float32"``, ``"bfloat16"``, ``"float16"`` (or None) for a ``precision`` argument.

    Args:
        precision: one of :data:`PRECISIONS`, or None where ``allow_none``.
        allow_none: bool. Whether None (keep the model's own policies) is accepted.

    Returns:
        The concrete precision: ``"mixed"`` becomes float16 with a GPU, else bfloat16.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision is None and allow_none:
        return None
    if precision not in PRECISIONS:
        choices = (*PRECISIONS, None) if allow_none else PRECISIONS
        raise ValueError(f"precision must be one of {choices}, got {precision!r}")
    if precision == "mixed":
        import tensorflow as tf

        return "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
    return precision


def keras_policy(precision):
    """The Keras dtype policy name of a precision (``"bfloat16"`` -> ``"mixed_bfloat16"``)."""
    return _POLICIES[resolve_precision(precision, allow_none=False)]


@contextlib.contextmanager
def dtype_policy(precision):
    """Sets Keras' global dtype policy for ``precision`` inside the block."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(keras_policy(precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def precision_copy(model, precision):
    """A copy of a functional ``model`` that computes at ``precision`` (mixed precision).

    The input normalisation and the output layers stay float32 (raw pixels must not be
    rounded; logits keep their range), and so do all weights: only the compute dtype of
    the other layers changes, as Keras' mixed policies do.

    Args:
        model: a functional Keras model (e.g. a PSPNet inference model).
        precision: one of :data:`PRECISIONS`, or None for ``model`` itself.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs, layer names and weights;
        ``model`` itself when ``precision`` is None.
    """
    import keras

    precision = resolve_precision(precision)
    if precision is None:
        return model
    keep = _float32_layers(model)

    def clone(layer):
        config = layer.get_config()
        if layer.name not in keep:
            config["dtype"] = keras_policy(precision)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy


def _float32_layers(model):
    """Names of the layers that stay float32 at any precision: inputs, the input
    normalisation layer and the layers giving the outputs."""
    from pspnet_tf.model.layers import Preprocessing

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
