"""Confusion-matrix segmentation scores.

:func:`confusion_matrix` counts ``(label, prediction)`` pairs in TF ops (usable
inside ``tf.function``); :func:`scores_from_confusion` turns a confusion matrix
into mIoU, pixel accuracy, mean class accuracy and per-class IoU in numpy.
Classes absent from both the labels and the predictions have no IoU (NaN in
``per_class_iou``) and are left out of the means.

:class:`MeanIoU`, :class:`PixelAccuracy` and :class:`MeanClassAccuracy` are the
streaming Keras metrics built on them (for ``model.compile`` and evaluation
loops); their ``scores()`` method returns every score, per-class IoU included.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pspnet_tf.data.classes import IGNORE_LABEL


def confusion_matrix(labels, predictions, num_classes, ignore_label=IGNORE_LABEL):
    """Counts label/prediction pairs, skipping ignored pixels.

    Args:
        labels: int tensor of any shape; values in ``[0, num_classes)`` or
            ``ignore_label``.
        predictions: int tensor of the same shape (class indices).
        num_classes: int.
        ignore_label: int. Label value left out of the counts. Defaults to 255.

    Returns:
        ``(num_classes, num_classes)`` int64 tensor; entry ``[t, p]`` counts
        pixels of true class ``t`` predicted as ``p``. Pixels whose label or
        prediction lies outside ``[0, num_classes)`` are not counted.
    """
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int64), [-1])
    in_range = (labels >= 0) & (labels < num_classes) & (predictions >= 0)
    valid = in_range & (predictions < num_classes) & tf.not_equal(labels, ignore_label)
    # A sum over segments, not tf.math.bincount or a boolean mask: XLA compiles it (no
    # data-dependent shapes), so compile(jit_compile=True) works with these metrics.
    index = tf.where(valid, labels * num_classes + predictions, 0)
    counts = tf.math.unsorted_segment_sum(
        tf.cast(valid, tf.int64), index, num_segments=num_classes * num_classes
    )
    return tf.reshape(counts, (num_classes, num_classes))


def scores_from_confusion(confusion):
    """Segmentation scores from a confusion matrix (rows: truth, columns: prediction).

    Args:
        confusion: ``(C, C)`` array of counts.

    Returns:
        dict with ``miou``, ``pixel_accuracy``, ``mean_class_accuracy`` (floats)
        and ``per_class_iou``, ``per_class_accuracy`` (lists of C floats, NaN
        for classes without pixels in the labels and predictions, or in the
        labels respectively). Means skip NaN.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    label_count = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    union = label_count + predicted_count - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        accuracy = np.where(label_count > 0, true_positive / label_count, np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_accuracy": float(true_positive.sum() / total) if total else 0.0,
        "mean_class_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else 0.0,
        "per_class_iou": iou.tolist(),
        "per_class_accuracy": accuracy.tolist(),
    }


def _scores_tf(confusion):
    """``(miou, pixel_accuracy, mean_class_accuracy)`` of a float confusion matrix, in TF
    ops for ``Metric.result()`` (:func:`scores_from_confusion` is the numpy twin)."""
    true_positive = tf.linalg.diag_part(confusion)
    label_count = tf.reduce_sum(confusion, axis=1)
    union = label_count + tf.reduce_sum(confusion, axis=0) - true_positive

    def mean_where_present(numerator, denominator):
        present = denominator > 0
        values = tf.where(present, tf.math.divide_no_nan(numerator, denominator), 0.0)
        return tf.math.divide_no_nan(
            tf.reduce_sum(values), tf.reduce_sum(tf.cast(present, confusion.dtype))
        )

    pixel_accuracy = tf.math.divide_no_nan(tf.reduce_sum(true_positive), tf.reduce_sum(label_count))
    return (
        mean_where_present(true_positive, union),
        pixel_accuracy,
        mean_where_present(true_positive, label_count),
    )


class _ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates a confusion matrix over batches; subclasses pick the score.

    Args:
        num_classes: int.
        ignore_label: int. Label value left out of the counts. Defaults to 255.
        name: str or None.
        dtype: dtype of the result. Defaults to float32.

    ``update_state(y_true, y_pred)`` takes labels ``(batch, height, width)`` and
    logits or probabilities ``(batch, height, width, num_classes)`` (argmax is
    taken) or class indices of the labels' shape. The counts are float64, exact
    up to 2**53 pixels per cell.
    """

    _score_index = None

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float64",
            name="confusion",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{self.name} does not take sample_weight; use label 255 to ignore")
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.shape.rank == y_true.shape.rank + 1:
            y_pred = tf.argmax(y_pred, axis=-1)
        counts = confusion_matrix(y_true, y_pred, self.num_classes, self.ignore_label)
        self.confusion.assign_add(tf.cast(counts, "float64"))

    def result(self):
        score = _scores_tf(tf.convert_to_tensor(self.confusion))[self._score_index]
        return tf.cast(score, self.dtype)

    def reset_state(self):
        self.confusion.assign(tf.zeros_like(self.confusion))

    def scores(self):
        """All scores of what was accumulated, read after evaluation.

        Returns:
            :func:`scores_from_confusion`'s dict: ``miou``, ``pixel_accuracy``,
            ``mean_class_accuracy``, ``per_class_iou`` and ``per_class_accuracy``
            (lists of ``num_classes`` floats, NaN for absent classes).
        """
        return scores_from_confusion(keras.ops.convert_to_numpy(self.confusion))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, ignore_label=self.ignore_label)
        return config


@keras.saving.register_keras_serializable(package="pspnet_tf")
class MeanIoU(_ConfusionMatrixMetric):
    """Streaming mean intersection over union, the paper's mIoU.

    Classes absent from both the labels and the predictions seen so far have no
    IoU and are left out of the mean (so a validation set without some class is
    not penalised for it). ``scores()["per_class_iou"]`` gives every class's IoU
    (NaN where absent). Args as :class:`_ConfusionMatrixMetric`; name ``"miou"``.

    Example:
    >>> metric = MeanIoU(num_classes=3)
    >>> metric.update_state([[0, 1, 255]], [[0, 0, 2]])
    >>> float(metric.result())  # class 0: 1/2, class 1: 0/1, class 2 absent
    0.25
    """

    _score_index = 0

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name="miou", dtype=None):
        super().__init__(num_classes, ignore_label, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="pspnet_tf")
class PixelAccuracy(_ConfusionMatrixMetric):
    """Streaming fraction of valid (not ignored) pixels labelled correctly.

    Args as :class:`_ConfusionMatrixMetric`; name ``"pixel_accuracy"``.
    """

    _score_index = 1

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name="pixel_accuracy", dtype=None):
        super().__init__(num_classes, ignore_label, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="pspnet_tf")
class MeanClassAccuracy(_ConfusionMatrixMetric):
    """Streaming mean over classes of the per-class pixel accuracy (recall).

    Classes without pixels in the labels seen so far are left out of the mean.
    Args as :class:`_ConfusionMatrixMetric`; name ``"mean_class_accuracy"``.
    """

    _score_index = 2

    def __init__(
        self, num_classes, ignore_label=IGNORE_LABEL, name="mean_class_accuracy", dtype=None
    ):
        super().__init__(num_classes, ignore_label, name=name, dtype=dtype)
