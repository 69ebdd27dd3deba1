"""bubbliiiing/pspnet-pytorch (seed 002) checkpoints convert exactly; bad files are named."""

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="conversion parity needs PyTorch: pip install torch==2.13.0 (CPU build)"
)
from torch_references import BubbliiiingPSPNet, logits, randomize, relative_error  # noqa: E402

from pspnet_tf import get_metadata, rebuild  # noqa: E402
from pspnet_tf.weights import convert_checkpoint  # noqa: E402

torch.set_num_threads(2)
SIZES = [(473, 473), (512, 512), (320, 480)]
SCALE = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))  # utils.preprocess_input: RGB / 255


def _convert(tmp_path, backbone, seed, legacy):
    reference = randomize(BubbliiiingPSPNet(3, 8, backbone, aux_branch=True), seed)
    path = tmp_path / f"pspnet_{backbone}.pth"  # train.py saves the bare state_dict
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    return reference, convert_checkpoint("bubbliiiing", path, output_stride=8)


def _check(reference, model, size, label):
    image = np.random.default_rng(sum(size)).uniform(0, 255, (1, *size, 3)).astype("float32")
    expected = logits(reference, image, *SCALE)
    got = model(image, training=False)
    for key, want in zip(("main", "aux"), expected, strict=True):
        error = relative_error(got[key], want)
        print(f"bubbliiiing {label} {size} {key}: max relative error {error:.2e}")
        assert error < 1e-4


@pytest.fixture(scope="module")
def mobilenetv2(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("mbv2"), "mobilenet", seed=2, legacy=False)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("r50"), "resnet50", seed=3, legacy=True)


@pytest.mark.parametrize("size", SIZES)
def test_mobilenetv2_logits_equal_pytorch(mobilenetv2, size):
    _check(*mobilenetv2, size, "mobilenetv2")


def test_mobilenetv2_static_size_model_equals_dynamic(mobilenetv2):
    # The registry converts for any size; a model rebuilt for 473 pools with
    # plain AveragePooling2D (60 / 1, 2, 3, 6) and must give the same logits.
    _, model = mobilenetv2
    static = rebuild(model, (473, 473, 3))
    image = np.random.default_rng(1).uniform(0, 255, (1, 473, 473, 3)).astype("float32")
    expected = model(image, training=False)["main"]
    assert relative_error(static(image, training=False)["main"], expected) < 1e-5
    variant = get_metadata(static)["architecture"]["backbone_variant"]
    assert variant == {"first_dilation": "half", "padding": "symmetric", "bn_epsilon": 1e-5}


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_resnet50_logits_equal_pytorch(resnet50, size):
    _check(*resnet50, size, "resnet50")


def test_resnet50_metadata(resnet50):
    meta = get_metadata(resnet50[1])
    assert meta["architecture"]["preprocessing"] == {
        "mean": [0.0, 0.0, 0.0],
        "std": [255.0, 255.0, 255.0],
        "channel_order": "rgb",
    }
    assert meta["architecture"]["backbone_variant"]["first_dilation"] == "half"
    assert meta["weights"] == "bubbliiiing:pspnet_resnet50.pth"


@pytest.fixture(scope="module")
def mobilenet_state():
    model = BubbliiiingPSPNet(21, 16, "mobilenet", aux_branch=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda s: s.update({"backbone.features.18.0.weight": torch.zeros(1280, 320, 1, 1)}),
            r"unmapped keys no Keras layer uses: backbone\.features\.18\.0\.weight",
        ),
        (
            lambda s: s.pop("master_branch.0.stages.2.2.running_var"),
            r"missing key master_branch\.0\.stages\.2\.2\.running_var "
            r"\(for Keras layer ppm_branch3_bn\)",
        ),
        (
            lambda s: s.update({"backbone.features.5.conv.3.weight": torch.zeros(144, 1, 5, 5)}),
            r"wrong shape for backbone\.features\.5\.conv\.3\.weight: \(144, 1, 5, 5\)",
        ),
    ],
    ids=["unmapped", "missing", "wrong-shape"],
)
def test_bad_checkpoints_are_refused_naming_the_key(tmp_path, mobilenet_state, edit, message):
    state = dict(mobilenet_state)
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message) as err:
        convert_checkpoint("bubbliiiing", path, input_shape=(64, 64, 3))
    assert "bad.pth" in str(err.value)


def test_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"):
        convert_checkpoint("bubbliiiing", path)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        convert_checkpoint("bubbliiiing", tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="source must be one of"):
        convert_checkpoint("detectron", path)
    with pytest.raises(ValueError, match="notes.pth: caffe checkpoints are a .npy file"):
        convert_checkpoint("caffe", path)
