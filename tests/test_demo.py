"""`pspnet-tf demo --quick` end to end: every output exists and is valid."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image


@pytest.mark.slow
def test_quick_demo_writes_valid_outputs(tmp_path):
    output = tmp_path / "demo"
    command = [sys.executable, "-m", "pspnet_tf", "demo", "--quick", "--quiet", "--output"]
    result = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output / "summary.json") as file:
        summary = json.load(file)
    assert set(summary["val_miou"]) == {"single", "sliding"}
    # It learnt: well above predicting the most frequent class everywhere.
    assert summary["val_miou"]["single"] >= summary["majority_class_miou"] + 0.15
    assert summary["val_miou"]["sliding"] >= summary["majority_class_miou"] + 0.1
    assert summary["settings"]["train"]["crop_size"] == 320
    for mode in ("single", "sliding"):
        with open(summary["paths"][f"report_{mode}"]) as file:
            report = json.load(file)
        assert {"miou", "pixel_accuracy", "per_class_iou", "confusion_matrix"} <= set(report)
        assert np.isclose(report["miou"], summary["val_miou"][mode])
        assert len(report["per_class_iou"]) == 6
        # The confusion matrix is the source of the scores (independent recomputation).
        confusion = np.asarray(report["confusion_matrix"], np.float64)
        union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
        assert np.isclose(np.mean(np.diag(confusion)[union > 0] / union[union > 0]), report["miou"])
    assert summary["saved_model_label_agreement"] >= 0.999
    for name in ("overlays", "curves", "confusion"):
        with Image.open(summary["paths"][name]) as picture:
            assert picture.size[0] > 100 and picture.size[1] > 100
            picture.load()  # decodes the whole file
    served = tf.saved_model.load(summary["paths"]["saved_model"])
    labels = served.serving_default(tf.zeros((1, 40, 56, 3), tf.uint8))["labels"]
    assert labels.shape == (1, 40, 56)
    assert os.path.isfile(summary["paths"]["model"])
    keras_row, lite = summary["litert_int8"]
    assert (keras_row["name"], lite["name"]) == ("Keras float32", "LiteRT int8")
    assert keras_row["agreement"] == 1.0 and lite["agreement"] > 0.9, lite
    assert np.isclose(keras_row["miou"], summary["val_miou"]["single"])  # the same images
    assert lite["size_bytes"] < 0.5 * keras_row["size_bytes"]
    assert "LiteRT int8: val mIoU" in result.stdout
    assert "val mIoU (single)" in result.stdout
    # Rerunning into the same folder reuses what is there instead of crashing.
    again = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(output / "summary.json") as file:
        assert np.isclose(json.load(file)["val_miou"]["single"], summary["val_miou"]["single"])
