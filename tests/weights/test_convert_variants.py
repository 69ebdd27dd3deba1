"""Backbone variants for converted weights: validation, stride/dilation/padding placement."""

import keras
import numpy as np
import pytest
from conftest import randomize_weights

from pspnet_tf import build_pspnet, get_metadata, rebuild
from pspnet_tf.model.backbones import RESNET_VARIANT, resolve_variant

SEMSEG = {"stem": "deep", "stride_in": "3x3", "padding": "symmetric", "conv_bias": False}


def test_resolve_variant_fills_defaults_and_names_bad_options():
    assert resolve_variant("resnet50") == RESNET_VARIANT
    assert resolve_variant("resnet101", {"stem": "deep"})["stride_in"] == "1x1"
    assert resolve_variant("mobilenetv2", {"padding": "symmetric"})["bn_epsilon"] == 1e-3
    with pytest.raises(ValueError, match=r"\['stem'\] do not apply to mobilenetv2"):
        resolve_variant("mobilenetv2", {"stem": "deep"})
    with pytest.raises(ValueError, match="padding must be one of .*'valid'"):
        resolve_variant("resnet50", {"padding": "valid"})
    with pytest.raises(ValueError, match="padding must be one of"):
        resolve_variant("mobilenetv2", {"padding": "caffe"})  # no max pool to round up
    with pytest.raises(ValueError, match="bn_epsilon must be > 0"):
        resolve_variant("resnet50", {"bn_epsilon": 0})


def test_default_model_records_the_keras_variant():
    model = build_pspnet(3, "mobilenetv2", (64, 64, 3), alpha=0.35)
    assert get_metadata(model)["architecture"]["backbone_variant"] == {
        "first_dilation": "full",
        "padding": "same",
        "bn_epsilon": 1e-3,
    }


def _conv(model, name):
    layer = model.get_layer(name)
    return tuple(layer.strides), tuple(layer.dilation_rate), layer.use_bias


@pytest.mark.parametrize("first_dilation,dilations", [("full", (2, 4)), ("half", (1, 2))])
def test_deep_stem_stride_in_3x3_and_first_block_dilation(first_dilation, dilations):
    variant = {**SEMSEG, "first_dilation": first_dilation, "bn_epsilon": 1e-5}
    model = build_pspnet(3, "resnet50", (64, 64, 3), backbone_variant=variant)
    assert _conv(model, "conv1_1_conv") == ((2, 2), (1, 1), False)
    assert model.get_layer("conv1_3_conv").filters == 128
    assert _conv(model, "conv3_block1_1_conv")[0] == (1, 1)
    assert _conv(model, "conv3_block1_2_conv")[0] == (2, 2)
    assert _conv(model, "conv4_block1_2_conv")[1] == (dilations[0],) * 2
    assert _conv(model, "conv4_block2_2_conv")[1] == (2, 2)
    assert _conv(model, "conv5_block1_2_conv")[1] == (dilations[1],) * 2
    assert _conv(model, "conv5_block3_2_conv")[1] == (4, 4)
    assert model.get_layer("conv2_block1_1_bn").epsilon == 1e-5
    assert model.get_layer("main_head_bn").epsilon == 1e-5
    # rebuild reproduces the variant from the metadata alone.
    again = rebuild(model, (None, None, 3))
    assert _conv(again, "conv5_block1_2_conv")[1] == (dilations[1],) * 2


def test_caffe_padding_rounds_the_stem_pool_up():
    sizes = {}
    for padding in ("symmetric", "caffe"):
        variant = {**SEMSEG, "stride_in": "1x1", "padding": padding}
        model = build_pspnet(3, "resnet50", (64, 63, 3), backbone_variant=variant)
        sizes[padding] = model.get_layer("pool1_pool").output.shape[1:3]
    # 64 -> 32 -> PyTorch floor((32 - 1) / 2) + 1 = 16, Caffe floor(32 / 2) + 1 = 17;
    # 63 -> 32 as well (odd sizes agree only from an odd stem output).
    assert sizes == {"symmetric": (16, 16), "caffe": (17, 17)}


@pytest.mark.parametrize("size,differs", [((65, 65), False), ((64, 96), True)])
def test_symmetric_padding_differs_from_same_at_even_sizes_only(size, differs):
    same = randomize_weights(build_pspnet(3, "mobilenetv2", (None, None, 3), alpha=0.35), 4)
    symmetric = build_pspnet(
        3, "mobilenetv2", (None, None, 3), alpha=0.35, backbone_variant={"padding": "symmetric"}
    )
    symmetric.set_weights(same.get_weights())
    assert "block_1_depthwise_pad" in [layer.name for layer in symmetric.layers]
    image = np.random.default_rng(0).uniform(0, 255, (1, *size, 3)).astype("float32")
    a = keras.ops.convert_to_numpy(same(image, training=False))
    b = keras.ops.convert_to_numpy(symmetric(image, training=False))
    assert np.abs(a - b).max() / np.abs(a).max() > 1e-3 if differs else np.allclose(a, b, atol=1e-5)
