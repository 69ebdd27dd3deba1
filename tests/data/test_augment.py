"""Augmentation geometry against numpy, alignment of image and label, determinism."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from pspnet_tf.data import augment

MEAN = np.array(augment.MEAN_PIXEL, np.float32)


def _pair(rng, height=24, width=32):
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    label = rng.integers(0, 6, (height, width)).astype(np.uint8)
    label[0, :5] = 255
    return image, label


def _fixed(image, label, **kwargs):
    params = dict(scale=1.0, angle=0.0, flip=False, blur=False, offset=(0, 0))
    params.update(kwargs)
    out_image, out_label = augment.augment_pair(image, label, **params)
    return out_image.numpy(), out_label.numpy()


def test_flip_equals_numpy(rng):
    image, label = _pair(rng)
    out_image, out_label = _fixed(image, label, flip=True, crop_size=(24, 32))
    np.testing.assert_array_equal(out_label, label[:, ::-1])
    np.testing.assert_allclose(out_image, image[:, ::-1], atol=1e-3)


def test_scale_two_then_crop_equals_repeated_pixels(rng):
    image, label = _pair(rng)
    _, out_label = _fixed(image, label, scale=2.0, offset=(3, 5), crop_size=(20, 30))
    upsampled = np.repeat(np.repeat(label, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(out_label, upsampled[3:23, 5:35])


def test_window_beyond_the_image_is_padded_with_mean_and_ignore(rng):
    image, label = _pair(rng)
    # scale 0.5 -> 12x16; a 20x24 window at (-4, -6) puts it at rows 4..15, columns 6..21.
    out_image, out_label = _fixed(image, label, scale=0.5, offset=(-4, -6), crop_size=(20, 24))
    inside = np.zeros((20, 24), bool)
    inside[4:16, 6:22] = True
    np.testing.assert_array_equal(out_label[inside].reshape(12, 16), label[1::2, 1::2])
    assert (out_label[~inside] == 255).all()
    np.testing.assert_allclose(out_image[~inside], np.broadcast_to(MEAN, (int((~inside).sum()), 3)))


def test_rotation_by_90_degrees_turns_the_grid():
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    _, out_label = _fixed(np.zeros((16, 16, 3), np.float32), label, angle=90.0, crop_size=16)
    np.testing.assert_array_equal(out_label, np.rot90(label, 1))


def test_small_rotation_fills_corners_with_ignore(rng):
    image, label = _pair(rng)
    out_image, out_label = _fixed(image, label, angle=10.0, crop_size=(24, 32))
    assert out_label[0, 0] == 255 and out_label[-1, -1] == 255
    np.testing.assert_allclose(out_image[0, 0], MEAN, atol=1e-3)
    assert set(np.unique(out_label)) <= set(range(6)) | {255}


def test_gaussian_blur_matches_opencv(rng):
    image = rng.uniform(0, 255, (20, 24, 3)).astype(np.float32)
    expected = cv2.GaussianBlur(image, (5, 5), 1.1)  # BORDER_REFLECT_101 = TF's REFLECT
    np.testing.assert_allclose(augment.gaussian_blur(image).numpy(), expected, atol=1e-3)


def _coded_pair():
    """8x8-pixel cells of random labels, each painted in its label's colour."""
    cells = np.random.default_rng(5).integers(0, 6, (8, 10)).astype(np.uint8)
    label = np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)
    codes = np.array(
        [
            [20, 200, 40],
            [220, 30, 60],
            [40, 60, 230],
            [200, 200, 20],
            [30, 30, 30],
            [230, 230, 230],
        ],
        np.float32,
    )
    return codes[label], label, codes


@pytest.mark.parametrize("seed", range(8))
def test_random_augment_keeps_image_and_label_aligned(seed):
    image, label, codes = _coded_pair()
    out_image, out_label = augment.random_augment(
        image, label, tf.constant([seed, 7], tf.int64), crop_size=(48, 56)
    )
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert out_image.shape == (48, 56, 3) and out_label.shape == (48, 56)
    assert set(np.unique(out_label)) <= set(range(6)) | {255}
    # Away from cell edges (3x3 of one label) each pixel must show its label's colour; a
    # one-pixel shift between image and label already breaks it for some seeds.
    kernel = np.ones((3, 3), np.uint8)
    uniform = cv2.dilate(out_label, kernel) == cv2.erode(out_label, kernel)
    interior = uniform & (out_label != 255)
    decoded = np.argmin(np.linalg.norm(out_image[..., None, :] - codes, axis=-1), axis=-1)
    assert interior.sum() > 300
    assert (decoded[interior] == out_label[interior]).mean() > 0.999


def test_random_augment_is_a_function_of_the_seed():
    image, label, _ = _coded_pair()
    runs = [
        augment.random_augment(image, label, tf.constant(seed, tf.int64), crop_size=40)
        for seed in ([1, 2], [1, 2], [3, 4])
    ]
    np.testing.assert_array_equal(runs[0][0].numpy(), runs[1][0].numpy())
    np.testing.assert_array_equal(runs[0][1].numpy(), runs[1][1].numpy())
    assert not np.array_equal(runs[0][0].numpy(), runs[2][0].numpy())


def test_random_augment_covers_the_scale_range():
    # A full-size crop of a uniform label: the share of padding tells the drawn scale.
    label = np.zeros((40, 40), np.uint8)
    image = np.zeros((40, 40, 3), np.float32)
    padded = []
    for seed in range(40):
        _, out = augment.random_augment(
            image, label, tf.constant([seed, 0], tf.int64), 40, max_rotation=0.0
        )
        padded.append(float((out.numpy() == 255).mean()))
    # Scale < 1 (about a third of the draws in 0.5-2.0) leaves padding, up to 1 - 0.5^2.
    assert 0.15 < np.mean(np.array(padded) > 0) < 0.6
    assert max(padded) <= 0.75 + 1e-6 and max(padded) > 0.4


def test_eval_stretch_and_pad(rng):
    image, label = _pair(rng)
    _, stretched = augment.resize_for_eval(image, label, (48, 64), fit="stretch")
    np.testing.assert_array_equal(stretched.numpy(), np.repeat(np.repeat(label, 2, 0), 2, 1))
    out_image, padded = augment.resize_for_eval(image, label, (30, 40), fit="pad")
    np.testing.assert_array_equal(padded.numpy()[:24, :32], label)
    assert (padded.numpy()[24:] == 255).all() and (padded.numpy()[:, 32:] == 255).all()
    np.testing.assert_allclose(out_image.numpy()[:24, :32], image, atol=1e-3)
    np.testing.assert_allclose(out_image.numpy()[25:, 33:], np.broadcast_to(MEAN, (5, 7, 3)))
    _, shrunk = augment.resize_for_eval(image, label, (16, 16), fit="pad")
    np.testing.assert_array_equal(shrunk.numpy()[:12], label[1::2, 1::2])
    assert (shrunk.numpy()[12:] == 255).all()
    with pytest.raises(ValueError, match="fit"):
        augment.resize_for_eval(image, label, 16, fit="squash")
