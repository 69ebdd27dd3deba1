"""Segmentation losses on logits: cross-entropy, dice, focal and their sums.

Every loss takes labels ``(batch, height, width)`` (int; ``ignore_label``, 255 by
default, marks pixels that count nowhere) and logits ``(batch, height, width,
classes)``, computes in float32 whatever the mixed-precision policy, and returns
the scalar loss of the batch.

Why not ``keras.losses.SparseCategoricalCrossentropy(ignore_class=255)``: it
gives the same number without class weights (the tests check it), but it has no
per-class weights, and a weighted cross-entropy must divide by the summed weight
of the valid pixels (PyTorch's ``CrossEntropyLoss(weight=, ignore_index=)``), not
by their count. Dice is a batch-level ratio, so all losses here reduce the batch
themselves.

Under ``tf.distribute`` each replica computes the loss of its own part of the
batch, scaled by ``1 / num_replicas`` so that the gradients summed across
replicas are their mean (Keras does the same for its own losses, but skips the
scaling when ``call`` already returns a scalar). With ignored pixels spread
unevenly over replicas this is the mean of per-replica means, as in PyTorch DDP.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pspnet_tf.data.classes import IGNORE_LABEL


def _flatten(y_true, y_pred, ignore_label):
    """Returns ``(labels, logits, valid)``: ``(N,)`` int32 labels with ignored pixels set
    to 0, ``(N, C)`` float32 logits and an ``(N,)`` float32 mask of valid pixels."""
    num_classes = y_pred.shape[-1]
    logits = tf.reshape(tf.cast(y_pred, "float32"), [-1, num_classes])
    labels = tf.reshape(tf.cast(y_true, "int32"), [-1])
    valid = tf.not_equal(labels, ignore_label)
    return tf.where(valid, labels, 0), logits, tf.cast(valid, "float32")


def _class_vector(values, name):
    """Validates an optional per-class list (weights or alpha) and returns it as floats."""
    if values is None:
        return None
    values = [float(v) for v in values]
    if not values or min(values) < 0:
        raise ValueError(f"{name} must be a non-empty list of non-negative floats, got {values}")
    return values


def _pixel_weights(labels, valid, class_weights):
    """``(N,)`` weight of each pixel: its class weight, 0 where ignored."""
    if class_weights is None:
        return valid
    return tf.gather(tf.constant(class_weights, "float32"), labels) * valid


def _check_classes(values, num_classes, name):
    if values is not None and len(values) != num_classes:
        raise ValueError(f"{name} has {len(values)} values for {num_classes} classes")


def _per_replica(loss):
    """Scales a replica's loss so that gradients summed over replicas are the mean."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss / replicas if replicas > 1 else loss


def _weighted_mean(values, weights):
    return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))


class _SegmentationLoss(keras.losses.Loss):
    """Shared constructor and config of the per-pixel losses (labels + logits)."""

    def __init__(self, class_weights=None, ignore_label=IGNORE_LABEL, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = _class_vector(class_weights, "class_weights")
        self.ignore_label = int(ignore_label)

    def get_config(self):
        config = super().get_config()
        config.update(class_weights=self.class_weights, ignore_label=self.ignore_label)
        return config


@keras.saving.register_keras_serializable(package="pspnet_tf")
class CrossEntropy(_SegmentationLoss):
    """Softmax cross-entropy from logits, averaged over the valid pixels of the batch.

    With ``class_weights`` the mean is weighted: ``sum(w[y] * ce) / sum(w[y])``
    over valid pixels, as PyTorch's ``CrossEntropyLoss(weight=, ignore_index=)``.

    Args:
        class_weights: list of ``num_classes`` floats or None (all 1).
        ignore_label: int. Label value that contributes nothing. Defaults to 255.
        name: str. Defaults to ``"cross_entropy"``.
        **kwargs: base ``keras.losses.Loss`` arguments (``dtype``, ``reduction``;
            the reduction is done here and always gives the batch mean).

    Example:
    >>> import numpy as np
    >>> loss = CrossEntropy(class_weights=[1.0, 2.0, 1.0])
    >>> round(float(loss(np.array([[[1, 255]]]), np.zeros((1, 1, 2, 3)))), 4)  # log(3)
    1.0986
    """

    def __init__(self, class_weights=None, ignore_label=IGNORE_LABEL, name="cross_entropy", **kw):
        super().__init__(class_weights, ignore_label, name=name, **kw)

    def call(self, y_true, y_pred):
        _check_classes(self.class_weights, y_pred.shape[-1], "class_weights")
        labels, logits, valid = _flatten(y_true, y_pred, self.ignore_label)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return _per_replica(_weighted_mean(ce, _pixel_weights(labels, valid, self.class_weights)))


@keras.saving.register_keras_serializable(package="pspnet_tf")
class DiceLoss(_SegmentationLoss):
    """``1 - mean over classes of the soft dice`` between softmax probabilities and labels.

    Per class ``c``, over all valid pixels of the batch (ignored pixels are
    removed from both the probabilities and the one-hot labels):
    ``dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)``,
    the formula of bubbliiiing/pspnet-pytorch's dice loss with beta = 1. Every class
    counts in the mean, also one absent from the batch's labels (its dice is then ~0
    unless its probabilities are ~0 too); ``class_weights`` make it a weighted mean
    over classes.

    Args:
        class_weights: list of ``num_classes`` floats or None (plain mean).
        ignore_label: int. Defaults to 255.
        smooth: float. Added to numerator and denominator. Defaults to 1e-5 (as
            bubbliiiing/pspnet-pytorch).
        name: str. Defaults to ``"dice"``.
        **kwargs: base ``keras.losses.Loss`` arguments.
    """

    def __init__(
        self, class_weights=None, ignore_label=IGNORE_LABEL, smooth=1e-5, name="dice", **kwargs
    ):
        super().__init__(class_weights, ignore_label, name=name, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        _check_classes(self.class_weights, num_classes, "class_weights")
        labels, logits, valid = _flatten(y_true, y_pred, self.ignore_label)
        probs = tf.nn.softmax(logits) * valid[:, None]
        onehot = tf.one_hot(labels, num_classes) * valid[:, None]
        overlap = tf.reduce_sum(probs * onehot, axis=0)
        total = tf.reduce_sum(probs, axis=0) + tf.reduce_sum(onehot, axis=0)
        dice = (2.0 * overlap + self.smooth) / (total + self.smooth)
        weights = tf.ones_like(dice) if self.class_weights is None else self.class_weights
        return _per_replica(1.0 - _weighted_mean(dice, weights))

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="pspnet_tf")
class FocalLoss(_SegmentationLoss):
    """Focal loss ``-alpha_t * (1 - p_t) ** gamma * log(p_t)`` (Lin et al. 2017).

    ``p_t`` is the softmax probability of the true class. Averaged over valid
    pixels like :class:`CrossEntropy` (weighted by ``class_weights`` if given).
    Differs from bubbliiiing/pspnet-pytorch's focal loss in two places, both bugs there:
    ignored pixels are left out of the mean (it divides by all pixels), and ``p_t``
    is the plain probability (it raises it to the class weight).

    Args:
        gamma: float. Focusing parameter; 0 gives ``alpha`` times cross-entropy.
            Defaults to 2.0.
        alpha: float, list of ``num_classes`` floats (``alpha_t = alpha[y]``) or
            None (1). Defaults to 0.5, bubbliiiing/pspnet-pytorch's scalar.
        class_weights: list of ``num_classes`` floats or None.
        ignore_label: int. Defaults to 255.
        name: str. Defaults to ``"focal"``.
        **kwargs: base ``keras.losses.Loss`` arguments.
    """

    def __init__(
        self,
        gamma=2.0,
        alpha=0.5,
        class_weights=None,
        ignore_label=IGNORE_LABEL,
        name="focal",
        **kwargs,
    ):
        super().__init__(class_weights, ignore_label, name=name, **kwargs)
        self.gamma = float(gamma)
        if isinstance(alpha, (list, tuple)):
            alpha = _class_vector(alpha, "alpha")
        elif alpha is not None:
            alpha = float(alpha)
        self.alpha = alpha

    def call(self, y_true, y_pred):
        _check_classes(self.class_weights, y_pred.shape[-1], "class_weights")
        labels, logits, valid = _flatten(y_true, y_pred, self.ignore_label)
        log_p = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        focal = -((1.0 - tf.exp(log_p)) ** self.gamma) * log_p
        if isinstance(self.alpha, list):
            _check_classes(self.alpha, y_pred.shape[-1], "alpha")
            focal = focal * tf.gather(tf.constant(self.alpha, "float32"), labels)
        elif self.alpha is not None:
            focal = focal * self.alpha
        weights = _pixel_weights(labels, valid, self.class_weights)
        return _per_replica(_weighted_mean(focal, weights))

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="pspnet_tf")
class SumOfLosses(keras.losses.Loss):
    """The sum of several losses, e.g. cross-entropy + dice.

    Args:
        losses: list of ``keras.losses.Loss`` (or their serialized configs).
        name: str or None. Defaults to the losses' names joined by ``"_plus_"``
            (a TF name scope cannot contain ``+``).
        **kwargs: base ``keras.losses.Loss`` arguments.
    """

    def __init__(self, losses, name=None, **kwargs):
        losses = [
            keras.saving.deserialize_keras_object(x) if isinstance(x, dict) else x for x in losses
        ]
        if not losses:
            raise ValueError("SumOfLosses needs at least one loss")
        super().__init__(name=name or "_plus_".join(x.name for x in losses), **kwargs)
        self.losses = losses

    def call(self, y_true, y_pred):
        # Each term is already scaled for the replicas; the sum needs nothing more.
        return tf.add_n([loss(y_true, y_pred) for loss in self.losses])

    def get_config(self):
        config = super().get_config()
        config["losses"] = [keras.saving.serialize_keras_object(x) for x in self.losses]
        return config


LOSS_NAMES = ("ce", "dice", "focal", "ce+dice", "focal+dice")


def make_loss(name, class_weights=None, ignore_label=IGNORE_LABEL, gamma=2.0, alpha=0.5):
    """Builds the loss named by ``name``.

    Args:
        name: str. ``"ce"``, ``"dice"``, ``"focal"`` or a ``+``-joined sum of
            them, e.g. ``"ce+dice"``, ``"focal+dice"``.
        class_weights: list of floats or None. Given to every term.
        ignore_label: int. Defaults to 255.
        gamma: float. Focal loss focusing parameter. Defaults to 2.0.
        alpha: float, list of floats or None. Focal loss class balance. Defaults to 0.5.

    Returns:
        A ``keras.losses.Loss``.
    """
    common = {"class_weights": class_weights, "ignore_label": ignore_label}
    builders = {
        "ce": lambda: CrossEntropy(**common),
        "dice": lambda: DiceLoss(**common),
        "focal": lambda: FocalLoss(gamma=gamma, alpha=alpha, **common),
    }
    parts = [part.strip() for part in str(name).lower().split("+")]
    unknown = [part for part in parts if part not in builders]
    if unknown or not parts:
        raise ValueError(f"loss must be one of {LOSS_NAMES} (or another '+' sum), got {name!r}")
    losses = [builders[part]() for part in parts]
    return losses[0] if len(losses) == 1 else SumOfLosses(losses)
