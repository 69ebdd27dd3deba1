"""build_pspnet: shapes, the pyramid pooling table, static/dynamic parity, saving."""

import keras
import numpy as np
import pytest
from conftest import randomize_weights

from pspnet_tf import build_pspnet, get_metadata, inference_model, rebuild, set_metadata
from pspnet_tf.model.layers import AdaptiveAveragePooling


def _ppm_input(model):
    return model.get_layer("ppm_concat").input[0]


def _logits(model, x):
    out = model(x, training=False)
    return (out["main"] if isinstance(out, dict) else out).numpy()


# Odd and even sizes: the feature is ceil(size / stride) ("same" padding) at any size.
# The table sizes' pools are checked in test_ppm_pools_follow_the_table.
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (65, 97), (50, 38)])
def test_mobilenetv2_output_and_feature_shapes(size, output_stride):
    model = build_pspnet(3, "mobilenetv2", (*size, 3), output_stride=output_stride, alpha=0.35)
    feature = _ppm_input(model).shape
    assert feature[1:3] == tuple(-(-s // output_stride) for s in size)
    x = np.zeros((1, *size, 3), "float32")
    assert _logits(model, x).shape == (1, *size, 3)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (65, 97), (50, 38)])
def test_resnet50_static_shapes(size, output_stride):
    # Shape inference only: a forward pass at 473 is test_resnet50_feature_is_60x60x2048_at_473.
    model = build_pspnet(3, "resnet50", (*size, 3), output_stride=output_stride)
    assert _ppm_input(model).shape[1:] == (
        *(-(-s // output_stride) for s in size),
        2048,
    )
    assert model.output_shape == (None, *size, 3)


@pytest.mark.slow
def test_resnet101_at_473():
    model = build_pspnet(21, "resnet101", (473, 473, 3), aux_head=True)
    assert _ppm_input(model).shape[1:] == (60, 60, 2048)
    assert model.get_layer("conv4_block23_out").output.shape[1:] == (60, 60, 1024)
    assert {k: tuple(v.shape) for k, v in model.output.items()} == {
        "main": (None, 473, 473, 21),
        "aux": (None, 473, 473, 21),
    }


@pytest.mark.parametrize("backbone,kwargs", [("resnet50", {}), ("mobilenetv2", {"alpha": 0.35})])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dynamic_model_runs_on_two_sizes(backbone, kwargs, output_stride):
    model = build_pspnet(4, backbone, (None, None, 3), output_stride, aux_head=True, **kwargs)
    for size in [(65, 97), (120, 80)]:
        out = model(np.zeros((1, *size, 3), "float32"), training=False)
        assert out["main"].shape == (1, *size, 4)
        assert out["aux"].shape == (1, *size, 4)


@pytest.mark.slow
def test_resnet50_feature_is_60x60x2048_at_473():
    # Seed 000: 473 input -> (60, 60, 2048) at output stride 8, in a real forward pass.
    model = build_pspnet(21, "resnet50", (473, 473, 3))
    features = keras.Model(model.input, _ppm_input(model))
    assert features(np.zeros((1, 473, 473, 3), "float32")).shape == (1, 60, 60, 2048)


# kernel = stride of each pyramid pool, by input size: seed 000's table.
PPM_TABLE = {
    473: {1: 60, 2: 30, 3: 20, 6: 10},
    713: {1: 90, 2: 45, 3: 30, 6: 15},
    320: {1: 40, 2: 20, 4: 10, 8: 5},
    512: {1: 64, 2: 32, 4: 16, 8: 8},
}


@pytest.mark.parametrize("size", sorted(PPM_TABLE))
def test_ppm_pools_follow_the_table(size):
    model = build_pspnet(3, "mobilenetv2", (size, size, 3), alpha=0.35)
    assert get_metadata(model)["architecture"]["bins"] == sorted(PPM_TABLE[size])
    for bins, kernel in PPM_TABLE[size].items():
        pool = model.get_layer(f"ppm_pool{bins}")
        assert isinstance(pool, keras.layers.AveragePooling2D)
        assert tuple(pool.pool_size) == (kernel, kernel)
        assert tuple(pool.strides) == (kernel, kernel)


def test_other_sizes_use_adaptive_pools_with_default_bins():
    model = build_pspnet(3, "mobilenetv2", (250, 380, 3), alpha=0.35)
    assert get_metadata(model)["architecture"]["bins"] == [1, 2, 3, 6]
    # 250x380 -> 32x48 features: 3 and 6 do not divide 32.
    assert isinstance(model.get_layer("ppm_pool3"), AdaptiveAveragePooling)
    assert isinstance(model.get_layer("ppm_pool2"), keras.layers.AveragePooling2D)


def test_bins_survive_rebuild_for_dynamic_size():
    model = build_pspnet(3, "mobilenetv2", (320, 320, 3), alpha=0.35)
    dynamic = rebuild(model, (None, None, 3))
    assert get_metadata(dynamic)["architecture"]["bins"] == [1, 2, 4, 8]
    assert isinstance(dynamic.get_layer("ppm_pool8"), AdaptiveAveragePooling)


# At the table sizes the static model pools with fixed kernels and the any-size one
# adaptively: both must give the same logits (full-width ResNet-50 only in slow runs).
@pytest.mark.parametrize(
    "backbone,kwargs",
    [pytest.param("resnet50", {}, marks=pytest.mark.slow), ("mobilenetv2", {"alpha": 0.35})],
)
@pytest.mark.parametrize("size", [473, 512])
def test_static_and_dynamic_models_agree(backbone, kwargs, size):
    static = randomize_weights(build_pspnet(5, backbone, (size, size, 3), **kwargs), seed=size)
    dynamic = rebuild(static, (None, None, 3))
    x = np.random.default_rng(size).uniform(0, 255, (1, size, size, 3)).astype("float32")
    a, b = _logits(static, x), _logits(dynamic, x)
    assert np.abs(a).max() > 1e-2  # a vanishing output would make this test vacuous
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def _expected_resnet50_pspnet_params(num_classes, aux):
    """Parameter count from the layer recipe (BatchNorm: gamma, beta, mean, variance)."""

    def conv(k, cin, cout, bias=True):
        return k * k * cin * cout + (cout if bias else 0)

    def bn(c):
        return 4 * c

    total = conv(7, 3, 64) + bn(64)
    cin = 64
    for blocks, f in zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True):
        for block in range(blocks):
            total += conv(1, cin, f) + bn(f) + conv(3, f, f) + bn(f) + conv(1, f, 4 * f) + bn(4 * f)
            if block == 0:
                total += conv(1, cin, 4 * f) + bn(4 * f)
            cin = 4 * f
    total += 4 * (conv(1, 2048, 512, bias=False) + bn(512))  # pyramid branches
    total += conv(3, 4096, 512, bias=False) + bn(512) + conv(1, 512, num_classes)
    if aux:
        total += conv(3, 1024, 256, bias=False) + bn(256) + conv(1, 256, num_classes)
    return total


@pytest.mark.parametrize("aux", [False, True])
def test_resnet50_parameter_count(aux):
    model = build_pspnet(21, "resnet50", (64, 64, 3), aux_head=aux)  # no size dependence
    assert model.count_params() == _expected_resnet50_pspnet_params(21, aux)


def test_save_and_load_in_safe_mode(tmp_path):
    names = ["sky", "road", "car"]
    model = build_pspnet(
        3,
        "mobilenetv2",
        (64, 96, 3),
        alpha=0.35,
        aux_head=True,
        class_names=names,
        palette=[[0, 0, 255], [128, 128, 128], [255, 0, 0]],
        preprocessing="torch",
    )
    randomize_weights(model, seed=3)
    set_metadata(model, weights="unit-test")
    for m in (model, rebuild(model, (None, None, 3))):
        path = tmp_path / f"{m.input_shape[1]}.keras"
        m.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
        x = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
        np.testing.assert_allclose(_logits(loaded, x), _logits(m, x), rtol=1e-6, atol=1e-6)
        meta = get_metadata(loaded)
        assert meta["class_names"] == names
        assert meta["weights"] == "unit-test"
        assert meta["architecture"]["preprocessing"]["channel_order"] == "rgb"
        assert loaded.get_layer("preprocessing").std == pytest.approx([58.395, 57.12, 57.375])


def test_inference_model_shares_weights_and_drops_aux():
    model = build_pspnet(3, "mobilenetv2", (64, 64, 3), alpha=0.35, aux_head=True)
    randomize_weights(model, seed=5)
    infer = inference_model(model)
    assert not any(layer.name.startswith("aux") for layer in infer.layers)
    x = np.random.default_rng(1).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(infer(x, training=False).numpy(), _logits(model, x))
    layer = model.get_layer("main_classifier")
    layer.kernel.assign(layer.kernel * 2.0)  # shared: a change shows through
    np.testing.assert_array_equal(infer(x, training=False).numpy(), _logits(model, x))


def test_dynamic_model_trains():
    # Any-size models train: a few steps on one batch halve its loss.
    model = build_pspnet(3, "mobilenetv2", (None, None, 3), alpha=0.35, dropout=0.0)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
    )
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 48, 3)).astype("float32")
    y = np.zeros((2, 32, 48), "int32")
    y[:, :, 24:] = 1
    losses = model.fit(x, y, epochs=5, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_explicit_arguments_never_yield_to_the_weights(tmp_path):
    # The weights' architecture fills in what the caller left out; anything given (even
    # a value equal to build_pspnet's default) must match it, or it is an error.
    trained = build_pspnet(3, "mobilenetv2", (64, 64, 3), alpha=0.35, output_stride=16)
    trained.save(tmp_path / "m.keras")
    weights = str(tmp_path / "m.keras")
    followed = get_metadata(build_pspnet(3, weights=weights, input_shape=(64, 64, 3)))
    assert followed["architecture"]["backbone"] == "mobilenetv2"
    assert followed["architecture"]["output_stride"] == 16
    assert followed["architecture"]["alpha"] == 0.35
    same = build_pspnet(3, "mobilenetv2", (64, 64, 3), output_stride=16, alpha=0.35,
                        weights=weights)  # fmt: skip
    assert same.count_params() == trained.count_params()
    conflicts = {
        "backbone": ("resnet50", "mobilenetv2"),  # resnet50 is the default
        "output_stride": (8, 16),  # 8 is the default
        "alpha": (1.0, 0.35),  # 1.0 is the default
        "align_corners": (False, True),
    }
    for key, (given, stored) in conflicts.items():
        with pytest.raises(ValueError, match=f"{key}={given!r} does not match") as error:
            build_pspnet(3, weights=weights, input_shape=(64, 64, 3), **{key: given})
        assert f"{key}={stored!r}" in str(error.value)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backbone"):
        build_pspnet(3, "vgg16")
    with pytest.raises(ValueError, match="output_stride"):
        build_pspnet(3, "mobilenetv2", (64, 64, 3), output_stride=4)
    with pytest.raises(ValueError, match="class_names"):
        build_pspnet(3, "mobilenetv2", (64, 64, 3), class_names=["a"])
    with pytest.raises(ValueError, match="preprocessing"):
        build_pspnet(3, "mobilenetv2", (64, 64, 3), preprocessing="bgr")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        build_pspnet(3, "mobilenetv2", (64, 64, 3), alpha=0.0)
    with pytest.raises(FileNotFoundError, match="nope.keras"):
        build_pspnet(3, "mobilenetv2", (64, 64, 3), weights="nope.keras")


@pytest.mark.parametrize("num_classes", [1, 0, 256, 2.5, "21", True, None])
def test_num_classes_outside_2_to_255_is_named(num_classes):
    with pytest.raises(
        ValueError, match=f"num_classes must be an integer from 2 to 255.*got {num_classes!r}"
    ):
        build_pspnet(num_classes, "mobilenetv2", (32, 32, 3), alpha=0.35)


def test_rebuild_of_a_path_or_another_model_says_what_it_needs(tmp_path):
    with pytest.raises(ValueError, match="got PosixPath: load it first"):
        rebuild(tmp_path / "m.keras")
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1)], name="plain")
    with pytest.raises(ValueError, match="model 'plain' has no pspnet_tf Preprocessing layer"):
        rebuild(plain)
    model = build_pspnet(3, "mobilenetv2", (32, 32, 3), alpha=0.35)
    set_metadata(model, architecture=None)
    with pytest.raises(ValueError, match="is not a PSPNet built by build_pspnet"):
        rebuild(model)
