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
    assert 0.0 <= summary["val_miou"]["single"] <= 1.0
    assert summary["saved_model_label_agreement"] >= 0.999
    for name in ("overlays", "curves", "confusion"):
        with Image.open(summary["paths"][name]) as picture:
            assert picture.size[0] > 100 and picture.size[1] > 100
            picture.load()  # decodes the whole file
    served = tf.saved_model.load(summary["paths"]["saved_model"])
    labels = served.serving_default(tf.zeros((1, 40, 56, 3), tf.uint8))["labels"]
    assert labels.shape == (1, 40, 56)
    assert os.path.isfile(summary["paths"]["model"])
    assert "val mIoU (single)" in result.stdout
    # Rerunning into the same folder reuses what is there instead of crashing.
    again = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(output / "summary.json") as file:
        assert np.isclose(json.load(file)["val_miou"]["single"], summary["val_miou"]["single"])
