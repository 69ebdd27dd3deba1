"""A segmentation model ready for images of any size: :class:`Predictor`.

:func:`as_predictor` wraps a Keras model (a PSPNet built for a fixed size is rebuilt for any
size, its auxiliary head dropped) as a function from a batch of RGB 0-255 images to logits,
run as one frozen graph (:func:`frozen_function`). The evaluation modes
(:mod:`pspnet_tf.infer.modes`), evaluation and prediction run models through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from pspnet_tf.model.layers import PREPROCESSING_LAYER
from pspnet_tf.model.network import get_metadata, inference_model, rebuild
from pspnet_tf.precision import precision_copy, resolve_precision


@dataclasses.dataclass
class Predictor:
    """A segmentation model ready for images of any size (see :func:`as_predictor`).

    Calling it maps a ``(batch, h, w, 3)`` float32 RGB 0-255 batch to
    ``(batch, h, w, num_classes)`` float32 logits as a numpy array.

    Attributes:
        model: the inference model (main output only; any input size if possible).
        num_classes: int.
        pad_value: ``(3,)`` float32. The RGB 0-255 pixel the model normalises to
            0 (its mean): padding with it adds no signal.
        input_size: ``(h, w)`` if the model only takes that size, else None.
        crop_size: ``(h, w)`` the model was built or trained for (the default sliding
            window), or None.
        class_names: list of str or None, from the model's metadata.
        palette: list of ``[r, g, b]`` or None, from the model's metadata.
        frozen: bool. Run the model as one graph with its weights as constants
            (:func:`frozen_function`), which TensorFlow optimises further (BatchNorm
            folded into the convs); same outputs to float32 rounding. False runs a
            ``tf.function`` of the model as it is. Defaults to True.
        precision: None (the model's own dtype policies), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or ``"mixed"`` (bfloat16 on CPUs, float16 on
            GPUs): the compute dtype of the copy that runs
            (:func:`pspnet_tf.precision.precision_copy`). Weights, input normalisation
            and logits stay float32.
    """

    model: keras.Model
    num_classes: int
    pad_value: np.ndarray
    input_size: tuple | None = None
    crop_size: tuple | None = None
    class_names: list | None = None
    palette: list | None = None
    frozen: bool = True
    precision: str | None = None
    _fn: Callable | None = dataclasses.field(default=None, init=False, repr=False)

    def __call__(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        if self._fn is None:
            shape = (None, *(self.input_size or (None, None)), 3)
            model = precision_copy(self.model, self.precision)
            if self.frozen:
                self._fn = frozen_function(model, shape)
            else:
                spec = [tf.TensorSpec(shape, tf.float32)]
                self._fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
        return self._fn(images).numpy()


def frozen_function(model, input_shape):
    """``model``'s inference pass as one graph whose weights are constants.

    TensorFlow's graph optimiser then folds what follows from the weights alone
    (BatchNorm into the conv before it) and oneDNN keeps each conv's prepared kernel
    between calls. The weights are copied now: later changes to ``model`` do not reach it.

    Args:
        model: a Keras model with one float32 image input.
        input_shape: tuple. The input shape it accepts, None for any size of that axis.

    Returns:
        A function of a float32 tensor returning what ``model(x, training=False)``
        returns, with the same nesting.
    """
    spec = tf.TensorSpec(input_shape, tf.float32)
    traced = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(traced)

    def run(images):
        outputs = frozen(images)
        return tf.nest.pack_sequence_as(traced.structured_outputs, tf.nest.flatten(outputs))

    return run


def as_predictor(model, frozen=True, precision=None):
    """Wraps a Keras segmentation model as a :class:`Predictor` (idempotent).

    ``frozen``, ``precision``: see :class:`Predictor`. A :class:`Predictor` passed in
    comes back as it is, or as a copy with ``precision`` where one is given that differs
    from its own.

    A PSPNet built for a fixed size is rebuilt for any size with the same bins
    and weights (:func:`pspnet_tf.rebuild`), and its auxiliary head dropped;
    its build size becomes the default sliding-window crop. Any other model
    mapping ``(batch, h, w, 3)`` RGB 0-255 images to ``(batch, h, w, C)``
    logits (or a dict with ``"main"``) works as it is.
    """
    resolve_precision(precision)  # a bad value fails here, not at the first image
    if isinstance(model, Predictor):
        if precision is not None and precision != model.precision:
            if model.model is None:  # a LiteRT file: its precision was set when exported
                raise ValueError("precision applies to Keras models, not to a LiteRT file")
            return dataclasses.replace(model, precision=precision)
        return model
    static = tuple(model.input_shape[1:3])
    model, metadata = any_size_model(model)
    is_static = None not in static
    return Predictor(
        model=model,
        num_classes=int(model.output_shape[-1]),
        pad_value=mean_pixel(model),
        input_size=tuple(model.input_shape[1:3]) if None not in model.input_shape[1:3] else None,
        crop_size=static if is_static else _trained_crop(metadata),
        class_names=metadata.get("class_names"),
        palette=metadata.get("palette"),
        frozen=frozen,
        precision=precision,
    )


def any_size_model(model):
    """The inference model for images of any size, and its metadata.

    Args:
        model: a Keras segmentation model.

    Returns:
        ``(model, metadata)``: main output only; a PSPNet built for a fixed size rebuilt for
        any size with the same bins and weights (:func:`pspnet_tf.rebuild`); any other model
        as it is. ``metadata`` is empty for a model without pspnet_tf metadata.
    """
    if isinstance(model.output, dict):
        model = inference_model(model)
    try:
        metadata = get_metadata(model)
    except ValueError:  # not a pspnet_tf model: no preprocessing layer, no metadata
        metadata = {}
    if None not in tuple(model.input_shape[1:3]) and metadata.get("architecture"):
        model = rebuild(model, input_shape=(None, None, 3), aux_head=False)
    return model, metadata


def _trained_crop(metadata):
    """The crop a model saved by :func:`pspnet_tf.train` learned at, or None."""
    crop = metadata.get("crop_size")
    return tuple(int(c) for c in crop) if crop else None


def mean_pixel(model):
    """The RGB 0-255 pixel that the model's preprocessing layer maps to 0."""
    try:
        layer = model.get_layer(PREPROCESSING_LAYER)
    except ValueError:
        return np.zeros(3, "float32")
    mean = np.asarray(layer.mean, "float32")
    return mean[::-1].copy() if layer.channel_order == "bgr" else mean
