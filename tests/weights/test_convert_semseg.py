"""hszhao/semseg (official PyTorch PSPNet) checkpoints convert exactly."""

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="conversion parity needs PyTorch: pip install torch==2.13.0 (CPU build)"
)
from torch_references import SemsegPSPNet, logits, randomize, relative_error  # noqa: E402

from pspnet_tf import get_metadata  # noqa: E402
from pspnet_tf.model.layers import PREPROCESSING_MODES  # noqa: E402
from pspnet_tf.weights import convert_checkpoint  # noqa: E402

torch.set_num_threads(2)
TORCH_MODE = PREPROCESSING_MODES["torch"]  # semseg's tool/test.py: RGB, ImageNet mean/std


def _save(model, path, legacy):
    """semseg's train.py format: DataParallel keys, plus epoch and optimizer state."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"epoch": 100, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    reference = randomize(SemsegPSPNet(50, classes=3), seed=50)
    path = tmp_path_factory.mktemp("semseg") / "train_epoch_100.pth"
    _save(reference, path, legacy=False)
    return reference, convert_checkpoint("semseg", path)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(473, 473), (512, 512), (320, 480)])
def test_resnet50_logits_equal_pytorch(resnet50, size):
    reference, model = resnet50
    image = np.random.default_rng(sum(size)).uniform(0, 255, (1, *size, 3)).astype("float32")
    expected = logits(reference, image, TORCH_MODE["mean"], TORCH_MODE["std"])
    got = model(image, training=False)
    for key, want in zip(("main", "aux"), expected, strict=True):
        error = relative_error(got[key], want)
        print(f"semseg resnet50 {size} {key}: max relative error {error:.2e}")
        assert error < 1e-4


def test_converted_model_records_source_and_preprocessing(resnet50):
    _, model = resnet50
    meta = get_metadata(model)
    assert meta["weights_source"] == {
        "source": "semseg",
        "checkpoint": "train_epoch_100.pth",
        "dropped": [],
    }
    arch = meta["architecture"]
    assert arch["preprocessing"] == {
        "mean": list(TORCH_MODE["mean"]),
        "std": list(TORCH_MODE["std"]),
        "channel_order": "rgb",
    }
    assert arch["backbone_variant"] == {
        "stem": "deep",
        "stride_in": "3x3",
        "first_dilation": "full",
        "padding": "symmetric",
        "bn_epsilon": 1e-5,
        "conv_bias": False,
    }
    assert arch["bins"] == [1, 2, 3, 6] and arch["aux_head"] and arch["output_stride"] == 8
    assert meta["class_names"] is None  # 3 classes: no known dataset


@pytest.mark.slow
def test_resnet101_legacy_checkpoint_without_aux(tmp_path):
    reference = randomize(SemsegPSPNet(101, classes=19), seed=101)
    path = tmp_path / "train_epoch_200.pth"
    _save(reference, path, legacy=True)
    with pytest.warns(UserWarning, match=r"dropped 7 auxiliary-head tensors.*aux\.4\.weight"):
        model = convert_checkpoint("semseg", path, input_shape=(473, 473, 3), aux_head=False)
    meta = get_metadata(model)
    assert "aux.0.weight" in meta["weights_source"]["dropped"]
    assert meta["class_names"][0] == "road"  # 19 classes: Cityscapes
    image = np.random.default_rng(7).uniform(0, 255, (1, 473, 473, 3)).astype("float32")
    expected = logits(reference, image, TORCH_MODE["mean"], TORCH_MODE["std"])[0]
    error = relative_error(model(image, training=False), expected)
    print(f"semseg resnet101 (473, 473) main: max relative error {error:.2e}")
    assert error < 1e-4
