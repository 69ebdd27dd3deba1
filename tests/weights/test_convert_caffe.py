"""The original Caffe PSPNet, as the .npy of its Keras port, converts exactly and safely."""

import pickle

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="conversion parity needs PyTorch: pip install torch==2.13.0 (CPU build)"
)
from torch_references import (  # noqa: E402
    CaffePSPNet,
    caffe_npy_dict,
    logits,
    randomize,
    relative_error,
)

from pspnet_tf import get_metadata  # noqa: E402
from pspnet_tf.weights import convert_checkpoint, read_checkpoint  # noqa: E402

torch.set_num_threads(2)
BGR_MEAN = (103.939, 116.779, 123.68)  # PSPNet's evaluation code: BGR, mean only


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    reference = randomize(CaffePSPNet(50, classes=3), seed=5)
    path = tmp_path_factory.mktemp("caffe") / "pspnet50_ade20k.npy"
    # Python 2 pickled the published files: its str keys come back as bytes.
    layers = {
        name.encode(): {k.encode(): v for k, v in blobs.items()}
        for name, blobs in caffe_npy_dict(reference).items()
    }
    np.save(path, np.array(layers, dtype=object), allow_pickle=True)
    return reference, convert_checkpoint("caffe", path)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(473, 473), (512, 512), (320, 480)])
def test_resnet50_logits_equal_caffe_semantics(resnet50, size):
    # 512 and 480 are even: Caffe's max pool rounds up (129 rows after the
    # stem at 512, where PyTorch and TF give 128), which the model reproduces.
    reference, model = resnet50
    image = np.random.default_rng(sum(size)).uniform(0, 255, (1, *size, 3)).astype("float32")
    expected = logits(reference, image, BGR_MEAN, (1.0, 1.0, 1.0), bgr=True)[0]
    error = relative_error(model(image, training=False), expected)
    print(f"caffe resnet50 {size} main: max relative error {error:.2e}")
    assert error < 1e-4


def test_metadata_records_bgr_mean_subtraction(resnet50):
    meta = get_metadata(resnet50[1])
    assert meta["architecture"]["preprocessing"] == {
        "mean": list(BGR_MEAN),
        "std": [1.0, 1.0, 1.0],
        "channel_order": "bgr",
    }
    assert meta["architecture"]["backbone_variant"]["padding"] == "caffe"
    assert meta["architecture"]["backbone_variant"]["stride_in"] == "1x1"
    assert not meta["architecture"]["aux_head"]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_npy_with_foreign_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array({"conv6": {"weights": _Payload()}}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"evil\.npy: builtins\.print is not allowed"):
        read_checkpoint(path)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(ValueError, match="plain.npy: expected a pickled dict"):
        read_checkpoint(plain)


def test_npy_reads_str_and_bytes_keys_alike(tmp_path):
    blobs = {"conv6": {"weights": np.ones((1, 1, 2, 3), "float32"), "biases": np.arange(3.0)}}
    for keys in (str, bytes):
        encode = (lambda k: k) if keys is str else str.encode
        layers = {encode(n): {encode(k): v for k, v in b.items()} for n, b in blobs.items()}
        np.save(tmp_path / "w.npy", np.array(layers, dtype=object), allow_pickle=True)
        tensors = read_checkpoint(tmp_path / "w.npy")
        assert sorted(tensors) == ["conv6/biases", "conv6/weights"]
        np.testing.assert_array_equal(tensors["conv6/biases"], [0.0, 1.0, 2.0])


def test_reads_protocol_2_pickles(tmp_path):
    path = tmp_path / "py2.npy"
    layer = {b"conv6": {b"biases": np.arange(2, dtype="float32")}}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": ()}
        )
        pickle.dump(np.array(layer, dtype=object), f, protocol=2)
    np.testing.assert_array_equal(read_checkpoint(path)["conv6/biases"], [0.0, 1.0])
