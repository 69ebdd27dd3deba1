"""tf.distribute: MirroredStrategy on two logical CPUs, MultiWorkerMirroredStrategy on two
processes, synchronized BatchNorm. Each run is a subprocess: logical devices and the
multi-worker strategy must be set up before TensorFlow does anything else."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO

from pspnet_tf import build_pspnet
from pspnet_tf.training.callbacks import BackboneFreeze, TerminateOnNaN, make_callbacks
from pspnet_tf.training.distributed import (
    _RestoreOnly,
    _worker_callbacks,
    choose_strategy,
    fit_multi_worker,
    synchronize_batch_norm,
    tf_config_workers,
)
from pspnet_tf.training.recipe import compile_for_training

ENV = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_python(code, timeout=600):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


MIRRORED = """
import json, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from pspnet_tf.training.recipe import train

rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
labels = rng.integers(0, 3, (4, 32, 32)).astype("int32")
labels[:, :5] = 255  # the same number of ignored pixels in every image
data = tf.data.Dataset.from_tensor_slices((images, {"main": labels, "aux": labels})).batch(4)
results = {}
for strategy in ("none", "mirrored"):
    model, history = train(
        dict(num_classes=3, backbone="mobilenetv2", alpha=0.35, crop_size=32, batch_size=4,
             epochs=1, dropout=0.0, sync_batchnorm=True, strategy=strategy, verbose=0,
             output=f"{OUTPUT}/{strategy}"),
        train_dataset=data,
    )
    results[strategy] = {
        "replicas": model.distribute_strategy.num_replicas_in_sync,
        "history": {k: v[0] for k, v in history.history.items()},
        "kernel": model.get_layer("main_classifier").kernel.numpy().ravel().tolist(),
        "conv1": model.get_layer("Conv1").kernel.numpy().ravel()[:50].tolist(),
    }
print(json.dumps(results))
"""


@pytest.mark.slow
def test_mirrored_two_cpus_equals_one_device(tmp_path):
    results = _run_python(f"OUTPUT = {str(tmp_path)!r}\n" + textwrap.dedent(MIRRORED))
    one, two = results["none"], results["mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # Synchronized BatchNorm: each replica's half of the batch sees global statistics, so
    # the first step's loss and its gradients (summed over replicas) match one device.
    for key in ("loss", "main_loss", "aux_loss", "main_crop_miou", "main_crop_pixel_accuracy"):
        np.testing.assert_allclose(two["history"][key], one["history"][key], rtol=2e-4, err_msg=key)
    np.testing.assert_allclose(two["kernel"], one["kernel"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(two["conv1"], one["conv1"], rtol=1e-3, atol=1e-5)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_run_completes_through_the_cli(demo_root, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "pspnet_tf", "train", "--data", demo_root, "--layout", "voc",
        "--num-classes", "6", "--backbone", "mobilenetv2", "--alpha", "0.35", "--crop-size",
        "32", "--batch-size", "4", "--epochs", "2", "--steps-per-epoch", "2",
        "--validation-steps", "2", "--verbose", "0", "--output", str(output),
    ]  # fmt: skip
    workers = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**ENV, "TF_CONFIG": json.dumps(tf_config)}
        log = open(tmp_path / f"worker{index}.log", "w")  # closed below
        workers.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
    try:
        codes = [process.wait(timeout=300) for process, _ in workers]
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
            log.close()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "epoch 2/2: loss" in logs[0] and "epoch 2/2" not in logs[1]  # only the chief logs
    rows = (output / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_main_crop_miou" in rows[0]
    model = keras.models.load_model(output / "model.keras")
    assert model.input_shape == (None, None, None, 3) and model.output_names == ["main"]


def test_synchronized_copy_has_the_same_outputs():
    keras.utils.set_random_seed(0)
    model = build_pspnet(3, "mobilenetv2", (32, 32, 3), alpha=0.35, aux_head=True)
    synced = synchronize_batch_norm(model)
    batch_norms = [
        layer for layer in synced.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert batch_norms and all(layer.synchronized for layer in batch_norms)
    assert synced.get_layer("preprocessing").metadata == model.get_layer("preprocessing").metadata
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    for key in ("main", "aux"):
        np.testing.assert_allclose(synced(x)[key].numpy(), model(x)[key].numpy(), atol=1e-6)


def test_strategy_choice(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tf_config_workers() == 0
    assert choose_strategy("auto").num_replicas_in_sync == 1
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {}}),
    )
    assert tf_config_workers() == 2
    with pytest.raises(ValueError, match="strategy must be one of"):
        choose_strategy("tpu")


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt


def test_multi_worker_loop_trains_and_resumes_like_fit(tmp_path):
    """The loop itself, in one process (default strategy): logs, callbacks and resume."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 3, (4, 32, 32)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
    strategy = tf.distribute.get_strategy()

    def run(epochs, extra=()):
        keras.utils.set_random_seed(0)
        # A one-layer stand-in for PSPNet (output named "main"): the loop is under test.
        image = keras.Input((32, 32, 3))
        model = keras.Model(image, keras.layers.Conv2D(3, 3, padding="same", name="main")(image))
        compile_for_training(model, total_steps=8)
        callbacks = [*make_callbacks(str(tmp_path), model, epochs=4, validation=False), *extra]
        history = fit_multi_worker(
            model, strategy, data, epochs=epochs, steps_per_epoch=2, callbacks=callbacks,
            verbose=0,
        )  # fmt: skip
        return model, history

    with pytest.raises(KeyboardInterrupt):
        run(4, [_Interrupt()])
    model, history = run(4)
    assert history.epoch == [2, 3]
    assert int(model.optimizer.iterations.numpy()) == 8
    assert set(history.history) >= {"loss", "crop_miou", "crop_pixel_accuracy", "learning_rate"}
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2", "3"]
    assert (tmp_path / "checkpoints" / "best.keras").is_file()


def test_non_chief_workers_keep_training_callbacks_and_only_restore(tmp_path):
    model = build_pspnet(3, "mobilenetv2", (32, 32, 3), alpha=0.35)
    model.compile(loss="mse")
    kept = _worker_callbacks(
        make_callbacks(str(tmp_path), model, epochs=2, freeze_backbone_epochs=1)
    )
    assert [type(c) for c in kept] == [TerminateOnNaN, BackboneFreeze, _RestoreOnly]
    assert kept[-1].backup_dir == str(tmp_path / "backup") and not kept[-1].delete_checkpoint
