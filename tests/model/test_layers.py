"""The custom layers against independent numpy computations."""

import numpy as np
import pytest
import tensorflow as tf

from pspnet_tf.model.layers import (
    PREPROCESSING_MODES,
    AdaptiveAveragePooling,
    Preprocessing,
    ResizeLike,
)


def numpy_adaptive_avg_pool(x, bins):
    """PyTorch AdaptiveAvgPool2d, written from its definition with loops."""
    batch, height, width, channels = x.shape
    out = np.zeros((batch, bins, bins, channels))
    for i in range(bins):
        h0, h1 = (i * height) // bins, -(-((i + 1) * height) // bins)
        for j in range(bins):
            w0, w1 = (j * width) // bins, -(-((j + 1) * width) // bins)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


def numpy_resize_align_corners(x, out_h, out_w):
    """Bilinear resize with align_corners=True, from its definition."""
    batch, in_h, in_w, channels = x.shape
    out = np.zeros((batch, out_h, out_w, channels))
    for i in range(out_h):
        y = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            xx = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(np.floor(xx))
            x1, dx = min(x0 + 1, in_w - 1), xx - x0
            top = x[:, y0, x0] * (1 - dx) + x[:, y0, x1] * dx
            bottom = x[:, y1, x0] * (1 - dx) + x[:, y1, x1] * dx
            out[:, i, j] = top * (1 - dy) + bottom * dy
    return out


@pytest.mark.parametrize("bins", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("size", [(7, 11), (13, 5), (60, 60), (32, 48)])
def test_adaptive_pooling_matches_numpy(rng, bins, size):
    x = rng.normal(size=(2, *size, 3)).astype("float32")
    expected = numpy_adaptive_avg_pool(x.astype("float64"), bins)
    layer = AdaptiveAveragePooling(bins)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bins", [1, 3, 6])
def test_adaptive_pooling_dynamic_shapes_in_graph_and_xla(rng, bins):
    layer = AdaptiveAveragePooling(bins)
    spec = tf.TensorSpec((None, None, None, 2), tf.float32)
    graph_fn = tf.function(layer.call, input_signature=[spec])
    xla_fn = tf.function(layer.call, input_signature=[spec], jit_compile=True)
    for size in [(9, 14), (25, 4)]:
        x = rng.normal(size=(1, *size, 2)).astype("float32")
        expected = numpy_adaptive_avg_pool(x.astype("float64"), bins)
        np.testing.assert_allclose(graph_fn(x).numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(xla_fn(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_size", [(13, 17), (1, 5), (40, 40)])
def test_resize_align_corners_matches_numpy(rng, out_size):
    x = rng.normal(size=(1, 5, 7, 2)).astype("float32")
    reference = np.zeros((1, *out_size, 1), "float32")
    out = ResizeLike(align_corners=True)([x, reference]).numpy()
    expected = numpy_resize_align_corners(x.astype("float64"), *out_size)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_resize_half_pixel_is_tf_image_resize(rng):
    x = rng.normal(size=(1, 5, 7, 2)).astype("float32")
    out = ResizeLike(align_corners=False)([x, np.zeros((1, 11, 3, 1), "float32")]).numpy()
    # Half-pixel centres: output pixel i samples input (i + 0.5) * in / out - 0.5.
    ys = np.clip((np.arange(11) + 0.5) * 5 / 11 - 0.5, 0, 4)
    xs = np.clip((np.arange(3) + 0.5) * 7 / 3 - 0.5, 0, 6)
    rows = np.stack([np.interp(ys, np.arange(5), x[0, :, c, 0]) for c in range(7)], axis=1)
    expected = np.stack([np.interp(xs, np.arange(7), r) for r in rows])
    np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_resize_keeps_bfloat16_dtype(rng):
    x = tf.cast(rng.normal(size=(1, 4, 4, 2)), tf.bfloat16)
    out = ResizeLike(dtype="mixed_bfloat16")([x, np.zeros((1, 8, 8, 1))])
    assert out.dtype == tf.bfloat16
    expected = numpy_resize_align_corners(tf.cast(x, tf.float64).numpy(), 8, 8)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, rtol=1e-2, atol=1e-2)


def test_preprocessing_caffe_reverses_channels_and_subtracts_bgr_mean():
    pixel = np.array([[[[10.0, 20.0, 30.0]]]], "float32")  # R, G, B
    out = Preprocessing(**PREPROCESSING_MODES["caffe"])(pixel).numpy()
    np.testing.assert_allclose(out[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def test_preprocessing_torch_mean_std_and_uint8_input():
    pixel = np.array([[[[255, 0, 128]]]], "uint8")
    out = Preprocessing(**PREPROCESSING_MODES["torch"])(pixel).numpy()
    expected = (np.array([255, 0, 128]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5)


def test_preprocessing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channel_order"):
        Preprocessing(mean=[0, 0, 0], std=[1, 1, 1], channel_order="gbr")
    with pytest.raises(ValueError, match="std"):
        Preprocessing(mean=[0, 0, 0], std=[1, 0, 1])
