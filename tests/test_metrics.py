"""Confusion-matrix scores and streaming metrics against a numpy computation."""

import keras
import numpy as np
import pytest

from pspnet_tf import metrics
from pspnet_tf.losses import CrossEntropy

NUM_CLASSES = 5  # class 4 never appears in labels or predictions; class 3 only in predictions


def numpy_scores(labels, predictions):
    """Per-class IoU / accuracy by counting pixels class by class."""
    valid = labels != 255
    y, p = labels[valid], predictions[valid]
    iou, acc = [], []
    for c in range(NUM_CLASSES):
        inter = np.sum((y == c) & (p == c))
        union = np.sum((y == c) | (p == c))
        iou.append(inter / union if union else np.nan)
        acc.append(inter / np.sum(y == c) if np.sum(y == c) else np.nan)
    return {
        "miou": np.nanmean(iou),
        "pixel_accuracy": np.mean(y == p),
        "mean_class_accuracy": np.nanmean(acc),
        "per_class_iou": iou,
        "per_class_accuracy": acc,
    }


@pytest.fixture
def batches(rng):
    """Three batches of labels (2, 6, 7) with ignored pixels, and logits (2, 6, 7, 5)."""
    out = []
    for _ in range(3):
        labels = rng.integers(0, 3, (2, 6, 7)).astype("int32")
        labels[rng.random(labels.shape) < 0.15] = 255
        logits = rng.normal(0, 1, (2, 6, 7, NUM_CLASSES)).astype("float32")
        logits[..., 4] = -10.0  # never predicted
        logits[..., 3] -= 1.0  # predicted sometimes, never a label
        out.append((labels, logits))
    return out


def _all(batches):
    labels = np.concatenate([b[0] for b in batches])
    predictions = np.concatenate([b[1] for b in batches]).argmax(-1)
    return labels, predictions


def test_scores_from_confusion_match_numpy(batches):
    labels, predictions = _all(batches)
    confusion = metrics.confusion_matrix(labels, predictions, NUM_CLASSES)
    assert int(np.sum(confusion)) == np.sum(labels != 255)
    got = metrics.scores_from_confusion(confusion)
    expected = numpy_scores(labels, predictions)
    assert np.isnan(got["per_class_iou"][4]) and np.isnan(got["per_class_accuracy"][3])
    assert got["per_class_iou"][3] == 0.0
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12)


@pytest.mark.parametrize(
    "metric_class, key",
    [
        (metrics.MeanIoU, "miou"),
        (metrics.PixelAccuracy, "pixel_accuracy"),
        (metrics.MeanClassAccuracy, "mean_class_accuracy"),
    ],
)
def test_streaming_metrics_accumulate_over_batches(batches, metric_class, key):
    metric = metric_class(NUM_CLASSES)
    assert metric.name == key
    for labels, logits in batches:
        metric.update_state(labels, logits)
    expected = numpy_scores(*_all(batches))
    np.testing.assert_allclose(float(metric.result()), expected[key], rtol=1e-6)
    np.testing.assert_allclose(metric.scores()["per_class_iou"], expected["per_class_iou"])
    metric.reset_state()
    metric.update_state(*batches[0][:1], batches[0][1])
    np.testing.assert_allclose(float(metric.result()), numpy_scores(*_all(batches[:1]))[key], 1e-6)


def test_miou_takes_class_indices_and_leaves_absent_classes_out():
    metric = metrics.MeanIoU(num_classes=3)
    metric.update_state([[0, 1, 255]], [[0, 0, 2]])
    # class 0: 1 / 2, class 1: 0 / 1, class 2 predicted only where ignored: absent.
    assert float(metric.result()) == pytest.approx(0.25)


def test_miou_equals_keras_meaniou_when_every_class_is_present(batches):
    ours = metrics.MeanIoU(NUM_CLASSES - 2)
    theirs = keras.metrics.MeanIoU(NUM_CLASSES - 2, ignore_class=255, sparse_y_pred=False)
    for labels, logits in batches:
        ours.update_state(labels, logits[..., :3])
        theirs.update_state(labels, logits[..., :3])
    np.testing.assert_allclose(float(ours.result()), float(theirs.result()), rtol=1e-6)


def test_metrics_in_a_compiled_model_and_config_round_trip(batches):
    labels, logits = batches[0]
    model = keras.Sequential([keras.Input(logits.shape[1:]), keras.layers.Identity()])
    model.compile(
        loss=CrossEntropy(),
        metrics=[metrics.MeanIoU(NUM_CLASSES), metrics.PixelAccuracy(NUM_CLASSES)],
    )
    got = model.evaluate(logits, labels, batch_size=1, verbose=0, return_dict=True)
    expected = numpy_scores(*_all(batches[:1]))
    np.testing.assert_allclose(got["miou"], expected["miou"], rtol=1e-6)
    np.testing.assert_allclose(got["pixel_accuracy"], expected["pixel_accuracy"], rtol=1e-6)
    metric = metrics.MeanIoU(NUM_CLASSES, ignore_label=0, name="m")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert isinstance(restored, metrics.MeanIoU) and restored.get_config() == metric.get_config()


def test_sample_weight_is_refused():
    with pytest.raises(ValueError, match="sample_weight"):
        metrics.MeanIoU(2).update_state([[0]], [[0]], sample_weight=[[1.0]])


def test_confusion_matrix_compiles_under_xla_and_counts_as_numpy(batches):
    import tensorflow as tf

    labels, predictions = _all(batches)
    labels[0, 0, :3] = [7, -1, 5]  # out of range: not counted, as ignored pixels
    compiled = tf.function(
        lambda y, p: metrics.confusion_matrix(y, p, NUM_CLASSES), jit_compile=True
    )
    got = compiled(labels, predictions).numpy()
    expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    valid = (labels >= 0) & (labels < NUM_CLASSES)
    np.add.at(expected, (labels[valid], predictions[valid]), 1)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(metrics.confusion_matrix(labels, predictions, NUM_CLASSES), got)
