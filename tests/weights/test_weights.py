"""The weights registry: download (from a local file), verification, caching, fine-tuning, CLI."""

import hashlib
import json
import re
import sys

import keras
import numpy as np
import pytest

from pspnet_tf import build_pspnet, get_metadata
from pspnet_tf.cli import main as cli_main
from pspnet_tf.weights import PRETRAINED, describe, fetch, read_checkpoint


@pytest.fixture
def torch():
    torch = pytest.importorskip(
        "torch", reason="converting PyTorch checkpoints needs torch==2.13.0 (CPU build)"
    )
    torch.set_num_threads(2)
    return torch


def test_every_entry_documents_source_terms_classes_and_scores():
    for name in PRETRAINED:
        entry = describe(name)
        assert entry["source"] in ("semseg", "bubbliiiing", "caffe")
        assert entry["url"].startswith("https://") and entry["licence"]
        assert entry["download"] in ("direct", "manual")
        # No source publishes a checksum: None, recorded on first download (tested below).
        assert entry["sha256"] is None or re.fullmatch("[0-9a-f]{64}", entry["sha256"])
        assert len(entry["class_names"]) == len(entry["palette"]) == entry["num_classes"]
        assert entry["crop_size"] in (473, 713)
        assert set(entry["preprocessing"]) == {"mean", "std", "channel_order"}
        assert any(k.startswith("miou") for k in entry["reported"])
    assert describe("pspnet50_ade20k")["reported"]["miou_single_scale"] == 41.89
    assert describe("caffe_pspnet101_voc2012")["preprocessing"]["channel_order"] == "bgr"
    assert describe("bubbliiiing_mobilenetv2_voc")["preprocessing"]["std"] == [255.0] * 3
    with pytest.raises(ValueError, match="unknown pretrained weights 'psp'"):
        describe("psp")


def test_manual_source_says_where_to_get_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PSPNET_TF_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_pspnet(150, weights="pspnet50_ade20k")
    message = str(err.value)
    assert "Google Drive" in message and "exp/ade20k/pspnet50/model/train_epoch_100.pth" in message
    assert str(tmp_path / "downloads" / "pspnet50_ade20k.pth") in message
    assert "pspnet-tf convert --from semseg" in message


def test_missing_torch_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    path = tmp_path / "model.pth"
    path.write_bytes(b"PK")
    with pytest.raises(ImportError, match=r"pip install 'pspnet_tf\[convert\]'"):
        read_checkpoint(path)


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    """A seed-002 MobileNetV2 checkpoint standing in for the published file."""
    torch = pytest.importorskip("torch", reason="needs torch==2.13.0 (CPU build)")
    from torch_references import BubbliiiingPSPNet, randomize

    reference = randomize(BubbliiiingPSPNet(21, 16, "mobilenet", aux_branch=True), seed=9)
    path = tmp_path_factory.mktemp("published") / "pspnet_mobilenetv2.pth"
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=False)
    return reference, path


@pytest.fixture
def entry(source_file, tmp_path, monkeypatch):
    """A registry entry whose download URL is the local file (no network)."""
    monkeypatch.setenv("PSPNET_TF_WEIGHTS_DIR", str(tmp_path / "cache"))
    published = dict(PRETRAINED["bubbliiiing_mobilenetv2_voc"])
    published.update(url=source_file[1].as_uri(), filename="test_mbv2.pth")
    monkeypatch.setitem(PRETRAINED, "test_mbv2", published)
    return "test_mbv2"


def test_download_converts_once_and_caches(entry, source_file, tmp_path, monkeypatch, torch):
    from torch_references import logits, relative_error

    path = fetch(entry)
    assert path == str(tmp_path / "cache" / "test_mbv2.keras")
    digest = hashlib.sha256(source_file[1].read_bytes()).hexdigest()
    recorded = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert recorded == {"test_mbv2.pth": digest}
    model = keras.models.load_model(path)
    meta = get_metadata(model)
    assert meta["weights"] == "test_mbv2"
    assert meta["weights_source"]["sha256"] == digest
    assert meta["weights_source"]["sha256_verified"] is False
    assert meta["weights_source"]["reported"]["miou_single_scale"] == 68.59
    assert meta["class_names"][15] == "person"
    image = np.random.default_rng(0).uniform(0, 255, (1, 97, 130, 3)).astype("float32")
    expected = logits(source_file[0], image, (0, 0, 0), (255, 255, 255))[0]
    assert relative_error(model(image, training=False)["main"], expected) < 1e-4

    def no_network(*args, **kwargs):
        raise AssertionError("the cached model must be used")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    assert fetch(entry) == path


def test_wrong_published_sha256_is_refused(entry, tmp_path, monkeypatch, torch):
    monkeypatch.setitem(PRETRAINED[entry], "sha256", "0" * 64)
    with pytest.raises(ValueError, match="does not match the published sha256 0000"):
        fetch(entry)
    assert not (tmp_path / "cache" / "downloads" / "test_mbv2.pth").exists()
    assert not (tmp_path / "cache" / "test_mbv2.keras").exists()


def test_file_changed_since_first_download_is_refused(entry, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sha256.json").write_text(json.dumps({"test_mbv2.pth": "f" * 64}))
    with pytest.raises(ValueError, match="differs from ffff.*recorded in .*sha256.json"):
        fetch(entry)
    assert not (cache / "test_mbv2.keras").exists()


def test_fine_tuning_keeps_all_but_the_classifiers(entry, torch):
    with pytest.warns(UserWarning, match=r"freshly initialised.*: main_classifier;.*aux_head_conv"):
        model = build_pspnet(num_classes=5, weights=entry, input_shape=(64, 64, 3))
    converted = keras.models.load_model(fetch(entry))
    for name in ("Conv1", "block_16_project_BN", "ppm_branch6_conv", "main_head_bn"):
        ours, theirs = model.get_layer(name), converted.get_layer(name)
        for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    assert model.get_layer("main_classifier").kernel.shape == (1, 1, 80, 5)
    arch = get_metadata(model)["architecture"]
    assert arch["backbone"] == "mobilenetv2" and arch["output_stride"] == 16
    assert arch["bins"] == [1, 2, 3, 6] and arch["backbone_variant"]["padding"] == "symmetric"
    assert get_metadata(model)["weights"] == entry
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
    )
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 5, (2, 64, 64)).astype("int32")
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    with pytest.raises(ValueError, match="backbone='resnet101' does not match the weights"):
        build_pspnet(5, "resnet101", weights=entry)


def test_cli_convert_writes_a_model_that_builds_again(source_file, tmp_path, capsys, torch):
    output = tmp_path / "out" / "voc.keras"
    argv = ["convert", "--from", "bubbliiiing", str(source_file[1]), "--output", str(output)]
    assert cli_main([*argv, "--no-aux"]) == 0
    printed = capsys.readouterr().out
    assert "voc.keras" in printed and "dropped 7 auxiliary-head tensors" in printed
    assert "channel_order rgb" in printed
    model = build_pspnet(21, weights=str(output), input_shape=(None, None, 3))
    meta = get_metadata(model)
    assert meta["weights_source"]["dropped"][0] == "auxiliary_branch.0.weight"
    assert meta["architecture"]["backbone"] == "mobilenetv2"
    assert cli_main(["convert", "--from", "caffe", str(tmp_path / "nope.npy"), "--output",
                     str(tmp_path / "x.keras")]) == 1  # fmt: skip
    assert "nope.npy" in capsys.readouterr().err
