"""Inference graph optimisations keep the outputs: BatchNorm folding, native dilated depthwise."""

import keras
import numpy as np
import pytest
from conftest import randomize_weights

from pspnet_tf import build_pspnet, rebuild
from pspnet_tf.optimize import (
    DilatedDepthwiseConv2D,
    FoldedBatchNorm,
    MatmulConv2D,
    fold_batch_norm,
    onednn_enabled,
)


def _numpy_dilated_depthwise(x, kernel, dilation, padding):
    """A direct loop over taps: x (N, H, W, C), kernel (kh, kw, C, 1), stride 1."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        ph, pw = dilation * (kh - 1), dilation * (kw - 1)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    height = x.shape[1] - dilation * (kh - 1)
    width = x.shape[2] - dilation * (kw - 1)
    out = np.zeros((x.shape[0], height, width, x.shape[3]))
    for i in range(kh):
        for j in range(kw):
            window = x[:, i * dilation : i * dilation + height, j * dilation : j * dilation + width]
            out += window * kernel[i, j, :, 0]
    return out


@pytest.mark.parametrize("dilation, padding, size", [(2, "same", (9, 12)), (4, "valid", (13, 11))])
def test_native_dilated_depthwise_equals_a_direct_computation(rng, dilation, padding, size):
    layer = DilatedDepthwiseConv2D(3, dilation_rate=dilation, padding=padding, use_bias=True)
    x = rng.normal(size=(2, *size, 5)).astype("float32")
    layer.build(x.shape)
    kernel = rng.normal(size=(3, 3, 5, 1)).astype("float32")
    bias = rng.normal(size=(5,)).astype("float32")
    layer.set_weights([kernel, bias])
    expected = _numpy_dilated_depthwise(x.astype(np.float64), kernel, dilation, padding) + bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dilation, size", [(1, (7, 9)), (2, (8, 5))])
def test_matmul_conv_equals_a_direct_computation(rng, dilation, size):
    layer = MatmulConv2D(4, 3, padding="same", dilation_rate=dilation)
    x = rng.normal(size=(2, *size, 6)).astype("float32")
    layer.build(x.shape)
    kernel = rng.normal(size=(3, 3, 6, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    layer.set_weights([kernel, bias])
    # A direct conv: for each output channel, the sum over input channels of one-channel
    # dilated convolutions (the depthwise loop above).
    x64 = x.astype(np.float64)
    expected = np.stack(
        [
            sum(
                _numpy_dilated_depthwise(
                    x64[..., [c]], kernel[:, :, [c], f, None], dilation, "same"
                )
                for c in range(6)
            )[..., 0]
            for f in range(4)
        ],
        axis=-1,
    )
    expected += bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-4)


def _relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("backbone, size, alpha", [("mobilenetv2", 64, 0.35), ("resnet50", 48, 1)])
def test_folded_model_gives_the_same_logits(tmp_path, rng, backbone, size, alpha):
    model = build_pspnet(5, backbone, (size, size, 3), alpha=alpha, aux_head=False)
    randomize_weights(model, seed=3)
    model = rebuild(model, input_shape=(None, None, 3))  # how predict and export use it
    fast = fold_batch_norm(model)
    batch_norms = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    identities = [la for la in fast.layers if isinstance(la, FoldedBatchNorm)]
    assert batch_norms and len(identities) == len(batch_norms)  # every BN follows a conv
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in fast.layers)
    dilated = [
        la
        for la in model.layers
        if isinstance(la, keras.layers.DepthwiseConv2D) and max(la.dilation_rate) > 1
    ]
    assert len(dilated) == (11 if backbone == "mobilenetv2" else 0)  # blocks 6-16 at os 8
    depthwise = [la for la in fast.layers if isinstance(la, keras.layers.DepthwiseConv2D)]
    assert all(isinstance(la, DilatedDepthwiseConv2D) for la in depthwise)
    matmul = [la.name for la in fast.layers if isinstance(la, MatmulConv2D)]
    assert matmul == (["main_head_conv"] if backbone == "resnet50" else [])  # 4096 inputs
    for shape in ((1, size, size, 3), (2, 50, 70, 3)):
        images = rng.uniform(0, 255, shape).astype("float32")
        reference = model(images, training=False).numpy()
        assert _relative_error(fast(images, training=False).numpy(), reference) < 1e-4
    path = str(tmp_path / "fast.keras")
    fast.save(path)
    loaded = keras.models.load_model(path)
    images = rng.uniform(0, 255, (1, 40, 56, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images).numpy(), fast(images).numpy(), rtol=1e-5, atol=1e-5)


def test_onednn_switch_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert not onednn_enabled()
