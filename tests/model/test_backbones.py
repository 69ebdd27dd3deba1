"""Backbones against keras.applications: names, weight shapes, features, loading."""

import h5py
import keras
import numpy as np
import pytest
from conftest import randomize_weights

from pspnet_tf import build_pspnet
from pspnet_tf.model.backbones import dilation_plan, keras_application

UNUSED_BY_PSPNET = {"Conv_1", "Conv_1_bn"}  # MobileNetV2's 1280-channel conv


def _weight_shapes(model):
    return {
        layer.name: [tuple(w.shape) for w in layer.weights]
        for layer in model.layers
        if layer.weights
    }


def _backbone_shapes(model):
    return {
        name: shapes
        for name, shapes in _weight_shapes(model).items()
        if not name.startswith(("ppm_", "main", "aux"))
    }


@pytest.mark.parametrize(
    "backbone,alpha",
    [("resnet50", 1.0), ("resnet101", 1.0), ("mobilenetv2", 1.0), ("mobilenetv2", 0.35)],
)
def test_layer_names_and_weight_shapes_match_keras_applications(backbone, alpha):
    ours = build_pspnet(3, backbone, (96, 96, 3), alpha=alpha, aux_head=True)
    reference = keras_application(backbone, alpha)
    expected = {k: v for k, v in _weight_shapes(reference).items() if k not in UNUSED_BY_PSPNET}
    assert _backbone_shapes(ours) == expected


def test_dilation_plan():
    assert dilation_plan([1, 2, 2, 2], 8, 4) == [(1, 1), (2, 1), (1, 2), (1, 4)]
    assert dilation_plan([1, 2, 2, 2], 16, 4) == [(1, 1), (2, 1), (2, 1), (1, 2)]
    assert dilation_plan([1, 2, 2, 2], 32, 4) == [(1, 1), (2, 1), (2, 1), (2, 1)]


def _write_legacy_h5(model, path):
    """Writes weights in the legacy Keras HDF5 layout keras.applications downloads."""
    with h5py.File(path, "w") as f:
        weighted = [layer for layer in model.layers if layer.weights]
        f.attrs["layer_names"] = [layer.name.encode() for layer in weighted]
        for layer in weighted:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.path.split('/')[-1]}:0".encode() for w in layer.weights]
            group.attrs["weight_names"] = names
            for name, value in zip(names, layer.get_weights(), strict=True):
                group.create_dataset(name.decode(), data=value)


@pytest.mark.parametrize(
    "backbone,alpha,feature_layer,size",
    [
        ("resnet50", 1.0, "conv5_block3_out", (97, 64)),
        ("mobilenetv2", 0.5, "block_16_project_BN", (97, 64)),
        ("mobilenetv2", 0.5, "block_16_project_BN", (96, 96)),
    ],
)
@pytest.mark.parametrize("file_format", ["legacy.h5", "model.keras", "app.weights.h5"])
def test_weights_from_keras_applications_give_identical_features(
    tmp_path, backbone, alpha, feature_layer, size, file_format
):
    # Output stride 32 is the undilated network, so features must equal the
    # keras.applications model's bit for bit (up to float rounding).
    reference = randomize_weights(keras_application(backbone, alpha, input_shape=(*size, 3)), 7)
    path = str(tmp_path / file_format)
    if file_format == "legacy.h5":
        _write_legacy_h5(reference, path)
    elif file_format == "model.keras":
        reference.save(path)
    else:
        reference.save_weights(path)
    ours = build_pspnet(
        3,
        backbone,
        (None, None, 3),
        output_stride=32,
        alpha=alpha,
        preprocessing=None,
        backbone_weights=path,
    )
    x = np.random.default_rng(0).normal(size=(1, *size, 3)).astype("float32")
    expected = keras.Model(reference.input, reference.get_layer(feature_layer).output)(x)
    got = keras.Model(ours.input, ours.get_layer(feature_layer).output)(x)
    expected = np.asarray(expected)
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(
        np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_mismatched_backbone_weights_list_the_layers(tmp_path):
    reference = keras_application("mobilenetv2", 0.35)
    path = str(tmp_path / "w.h5")
    _write_legacy_h5(reference, path)
    with pytest.raises(ValueError) as err:
        build_pspnet(3, "mobilenetv2", (64, 64, 3), alpha=0.5, backbone_weights=path)
    message = str(err.value)
    assert "shape mismatches" in message and "block_16_project" in message and "w.h5" in message
    with pytest.raises(ValueError, match="missing .*conv1_conv"):
        build_pspnet(3, "resnet50", (64, 64, 3), backbone_weights=path)
