"""A model saved with oneDNN on loads, trains and predicts with it off, and the other way.

TensorFlow turns oneDNN on by default only on some CPUs (``TF_ENABLE_ONEDNN_OPTS``
decides it either way, read once when TensorFlow loads), so each side runs in its own
process. The model holds only standard Keras layers and the registered custom ones,
with dilated (depthwise) convolutions, which TF's own kernels run only in Keras' form.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_SAVE = textwrap.dedent(
    """
    import sys, numpy as np, keras
    from pspnet_tf import build_pspnet, compile_for_training
    keras.utils.set_random_seed(0)
    model = build_pspnet(3, "mobilenetv2", (None, None, 3), alpha=0.35, aux_head=True)
    compile_for_training(model, total_steps=10)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 40, 40, 3)).astype("float32")
    labels = rng.integers(0, 3, (2, 40, 40)).astype("int32")
    model.train_on_batch(images, {"main": labels, "aux": labels})
    model.save(sys.argv[1] + "/model.keras")
    np.save(sys.argv[1] + "/logits.npy", model(images[:1], training=False)["main"].numpy())
    """
)
_LOAD = textwrap.dedent(
    """
    import sys, numpy as np, keras
    from pspnet_tf import as_predictor, compile_for_training
    model = keras.models.load_model(sys.argv[1] + "/model.keras", compile=False)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 40, 40, 3)).astype("float32")
    labels = rng.integers(0, 3, (2, 40, 40)).astype("int32")
    np.save(sys.argv[1] + "/loaded.npy", as_predictor(model)(images[:1]))
    compile_for_training(model, total_steps=10)
    loss = model.train_on_batch(images, {"main": labels, "aux": labels}, return_dict=True)
    assert np.isfinite(loss["loss"]), loss
    print("trained", loss["loss"])
    """
)


def _run(script, folder, onednn):
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": str(onednn), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("saved_with", [1, 0], ids=["onednn-on-to-off", "onednn-off-to-on"])
def test_a_model_moves_between_onednn_settings(tmp_path, saved_with):
    _run(_SAVE, tmp_path, saved_with)
    assert "trained" in _run(_LOAD, tmp_path, 1 - saved_with)
    saved, loaded = np.load(tmp_path / "logits.npy"), np.load(tmp_path / "loaded.npy")
    # oneDNN sums in another order: float32 rounding apart, same labels.
    np.testing.assert_allclose(loaded, saved, atol=1e-4 * np.abs(saved).max())
    assert (loaded.argmax(-1) == saved.argmax(-1)).mean() > 0.999
