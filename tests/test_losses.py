"""Losses against numpy computations on small random inputs with ignored pixels."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pspnet_tf import losses

NUM_CLASSES = 4


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def batch(rng):
    """Labels (2, 5, 6) with ~20% ignored pixels and class 3 absent; logits (2, 5, 6, 4)."""
    labels = rng.integers(0, NUM_CLASSES - 1, (2, 5, 6)).astype("int32")
    labels[rng.random(labels.shape) < 0.2] = 255
    logits = rng.normal(0, 2, (2, 5, 6, NUM_CLASSES)).astype("float32")
    return labels, logits


def _numpy_pixels(labels, logits):
    valid = labels.reshape(-1) != 255
    return labels.reshape(-1)[valid], _softmax(logits.astype("float64")).reshape(-1, 4)[valid]


def numpy_ce(labels, logits, weights=None):
    y, p = _numpy_pixels(labels, logits)
    w = np.ones(len(y)) if weights is None else np.asarray(weights)[y]
    return np.sum(-w * np.log(p[np.arange(len(y)), y])) / w.sum()


def numpy_dice(labels, logits, weights=None, smooth=1e-5):
    y, p = _numpy_pixels(labels, logits)
    t = np.eye(NUM_CLASSES)[y]
    dice = (2 * (p * t).sum(0) + smooth) / (p.sum(0) + t.sum(0) + smooth)
    w = np.ones(NUM_CLASSES) if weights is None else np.asarray(weights)
    return 1 - np.sum(w * dice) / w.sum()


def numpy_focal(labels, logits, gamma, alpha, weights=None):
    y, p = _numpy_pixels(labels, logits)
    pt = p[np.arange(len(y)), y]
    a = np.asarray(alpha)[y] if isinstance(alpha, list) else alpha
    w = np.ones(len(y)) if weights is None else np.asarray(weights)[y]
    return np.sum(-w * a * (1 - pt) ** gamma * np.log(pt)) / w.sum()


WEIGHTS = [0.5, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_cross_entropy_matches_numpy(batch, weights):
    labels, logits = batch
    got = losses.CrossEntropy(class_weights=weights)(labels, logits)
    np.testing.assert_allclose(float(got), numpy_ce(labels, logits, weights), rtol=1e-5)


def test_unweighted_cross_entropy_equals_keras_ignore_class(batch):
    labels, logits = batch
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    got = losses.CrossEntropy()(labels, logits)
    np.testing.assert_allclose(float(got), float(keras_loss(labels, logits)), rtol=1e-5)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_dice_matches_numpy(batch, weights):
    labels, logits = batch
    got = losses.DiceLoss(class_weights=weights)(labels, logits)
    np.testing.assert_allclose(float(got), numpy_dice(labels, logits, weights), rtol=1e-5)


def test_dice_ignores_logits_of_ignored_pixels(batch):
    labels, logits = batch
    changed = logits.copy()
    changed[labels == 255] = 50.0 * np.arange(NUM_CLASSES)
    loss = losses.DiceLoss()
    np.testing.assert_allclose(float(loss(labels, changed)), float(loss(labels, logits)))


@pytest.mark.parametrize(
    "gamma, alpha, weights",
    [(2.0, 0.5, None), (1.5, [0.2, 0.3, 0.4, 0.9], WEIGHTS), (0.0, None, None)],
)
def test_focal_matches_numpy(batch, gamma, alpha, weights):
    labels, logits = batch
    got = losses.FocalLoss(gamma=gamma, alpha=alpha, class_weights=weights)(labels, logits)
    expected = numpy_focal(labels, logits, gamma, 1.0 if alpha is None else alpha, weights)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["ce+dice", "focal+dice"])
def test_sums_add_their_terms(batch, name):
    labels, logits = batch
    expected = numpy_dice(labels, logits, WEIGHTS) + (
        numpy_ce(labels, logits, WEIGHTS)
        if name == "ce+dice"
        else numpy_focal(labels, logits, 2.0, 0.5, WEIGHTS)
    )
    got = losses.make_loss(name, class_weights=WEIGHTS)(labels, logits)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_all_ignored_gives_zero_cross_entropy(batch):
    labels, logits = batch
    got = losses.CrossEntropy()(np.full_like(labels, 255), logits)
    assert float(got) == 0.0


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "ce+dice", "focal+dice"])
def test_losses_serialize_and_keep_their_value(batch, name):
    labels, logits = batch
    loss = losses.make_loss(name, class_weights=WEIGHTS, gamma=1.0, alpha=[1, 2, 3, 4])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    np.testing.assert_allclose(float(restored(labels, logits)), float(loss(labels, logits)))


@pytest.mark.parametrize("name", ["ce", "dice", "focal"])
def test_low_precision_logits_are_computed_in_float32(batch, name):
    labels, logits = batch
    loss = losses.make_loss(name)
    low = tf.cast(logits, "bfloat16")
    got = loss(labels, low)
    assert got.dtype == tf.float32
    expected = float(loss(labels, tf.cast(low, "float32")))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_bad_arguments_are_rejected(batch):
    labels, logits = batch
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.make_loss("ce+lovasz")
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        losses.CrossEntropy(class_weights=[1, 1, 1])(labels, logits)
    with pytest.raises(ValueError, match="non-negative"):
        losses.DiceLoss(class_weights=[1, -1, 1, 1])
