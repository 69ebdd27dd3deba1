"""pspnet_tf.infer.predictor: window placement, sliding windows and multi-scale + flip, against
hand-worked examples and numpy."""

import numpy as np
import pytest
from conftest import BIAS, KERNEL, MEAN, numpy_softmax

from pspnet_tf.infer.modes import multiscale_probabilities, sliding_window_logits, window_starts
from pspnet_tf.infer.predictor import as_predictor


def test_window_starts_hand_worked():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # the last window ends at the edge
    assert window_starts(4, 4, 3) == [0]
    assert window_starts(3, 4, 3) == [0]


def test_sliding_window_averages_overlapping_windows():
    # Channel 0 holds the column index; each window answers its own mean column.
    # Crop 4, stride 3, width 10: windows [0, 4), [3, 7), [6, 10) with means 1.5, 4.5, 7.5.
    image = np.zeros((4, 10, 3), "float32")
    image[..., 0] = np.arange(10)

    def window_mean(batch):
        means = batch[..., 0].mean(axis=(1, 2))
        return np.broadcast_to(means[:, None, None, None], (*batch.shape[:3], 1))

    out = sliding_window_logits(window_mean, image, (4, 4), 1, stride=3)
    expected = [1.5, 1.5, 1.5, 3.0, 4.5, 4.5, 6.0, 7.5, 7.5, 7.5]
    np.testing.assert_allclose(out[0, :, 0], expected)
    np.testing.assert_allclose(out[:, :, 0], np.tile(expected, (4, 1)))


def test_sliding_window_pads_a_small_image_with_the_given_pixel(rng):
    image = rng.uniform(0, 255, (3, 5, 3)).astype("float32")
    pad = np.array([10.0, 20.0, 30.0], "float32")
    seen = []

    def record(batch):
        seen.append(batch.copy())
        return batch

    out = sliding_window_logits(record, image, (4, 8), 3, pad_value=pad)
    assert len(seen) == 1 and seen[0].shape == (1, 4, 8, 3)
    window = seen[0][0]
    np.testing.assert_array_equal(window[:3, 1:6], image)  # centred: top 0, left 1
    np.testing.assert_array_equal(window[:3, 0], np.tile(pad, (3, 1)))
    np.testing.assert_array_equal(window[:3, 6:], np.tile(pad, (3, 2, 1)))
    np.testing.assert_array_equal(window[3], np.tile(pad, (8, 1)))
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("size", [(20, 24), (32, 32), (45, 70)])
def test_sliding_window_returns_each_pixel_of_any_size(size, rng):
    # Smaller than, equal to and larger than the 32x32 crop: an identity "model"
    # must give the image back exactly, whatever the windows and padding.
    image = rng.uniform(0, 255, (*size, 3)).astype("float32")
    out = sliding_window_logits(lambda b: b * 1.0, image, 32, 3)
    np.testing.assert_array_equal(out, image)


def test_multiscale_flip_is_exact_for_a_flip_equivariant_model(pixelwise_model, rng):
    model = as_predictor(pixelwise_model(KERNEL, BIAS))
    image = rng.uniform(0, 255, (30, 44, 3)).astype("float32")
    kwargs = {"base_size": 40, "crop": 24, "scales": (0.5, 1.0, 1.5), "pad_value": MEAN}
    with_flip = multiscale_probabilities(model, image, 3, flip=True, **kwargs)
    without = multiscale_probabilities(model, image, 3, flip=False, **kwargs)
    np.testing.assert_allclose(with_flip, without, atol=1e-6)
    np.testing.assert_allclose(with_flip.sum(-1), 1.0, atol=1e-5)


def test_multiscale_flip_averages_the_flipped_prediction(rng):
    # A model that is not flip-equivariant: logits depend on the column.
    def column_model(batch):
        columns = np.arange(batch.shape[2], dtype="float32")[None, None, :, None]
        return np.concatenate([batch[..., :1] / 50, columns / 5 + 0 * batch[..., :1]], axis=-1)

    image = rng.uniform(0, 255, (6, 9, 3)).astype("float32")
    out = multiscale_probabilities(column_model, image, 2, base_size=9, scales=(1.0,), flip=True)
    direct = numpy_softmax(column_model(image[None])[0])
    flipped = numpy_softmax(column_model(image[None, :, ::-1])[0])[:, ::-1]
    np.testing.assert_allclose(out, (direct + flipped) / 2, atol=1e-6)
