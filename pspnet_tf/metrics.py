"""Confusion-matrix segmentation scores.

:func:`confusion_matrix` counts ``(label, prediction)`` pairs in TF ops (usable
inside ``tf.function``); :func:`scores_from_confusion` turns a confusion matrix
into mIoU, pixel accuracy, mean class accuracy and per-class IoU in numpy.
Classes absent from both the labels and the predictions have no IoU (NaN in
``per_class_iou``) and are left out of the means.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pspnet_tf.classes import IGNORE_LABEL


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
        pixels of true class ``t`` predicted as ``p``.
    """
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int64), [-1])
    valid = tf.not_equal(labels, ignore_label)
    index = tf.boolean_mask(labels * num_classes + predictions, valid)
    counts = tf.math.bincount(
        index,
        minlength=num_classes * num_classes,
        maxlength=num_classes * num_classes,
        dtype=tf.int64,
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
