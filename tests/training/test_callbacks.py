"""The recipe's compile and callbacks on a tiny PSPNet: freeze, checkpoints, logs, NaN."""

import csv
import os

import keras
import numpy as np
import pytest
from conftest import tiny_pspnet

from pspnet_tf.model.network import backbone_layers
from pspnet_tf.training.callbacks import (
    BackboneFreeze,
    Checkpoints,
    EpochSummary,
    TerminateOnNaN,
    make_callbacks,
)
from pspnet_tf.training.recipe import compile_for_training

SIZE, CLASSES = 32, 3


def tiny_model(aux_head=True):
    return tiny_pspnet(aux_head, CLASSES, SIZE)


@pytest.fixture(scope="module")
def data(tiny_batch):
    return tiny_batch


class _Snapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append({v.path: v.numpy().copy() for v in self.model.weights})


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Three epochs with the backbone frozen for the first, and every callback."""
    images, labels = data
    output = str(tmp_path_factory.mktemp("run"))
    model = compile_for_training(tiny_model(), total_steps=6, learning_rate=0.05)
    before = {v.path: v.numpy().copy() for v in model.weights}
    snapshots, printed = _Snapshots(), []
    callbacks = make_callbacks(output, model, epochs=3, freeze_backbone_epochs=1)
    for callback in callbacks:
        if isinstance(callback, EpochSummary):
            callback.print_fn = printed.append
    targets = {"main": labels, "aux": labels}
    history = model.fit(
        images,
        targets,
        batch_size=4,
        epochs=3,
        validation_data=(images, targets),
        callbacks=[*callbacks, snapshots],
        verbose=0,
    )
    return model, output, before, snapshots.weights, printed, history


def test_frozen_backbone_does_not_move_then_does(run):
    model, _, before, after, _, _ = run
    backbone = {v.path for layer in backbone_layers(model) for v in layer.weights}
    assert "Conv1/kernel" in backbone and "bn_Conv1/moving_mean" in backbone
    assert "main_classifier/kernel" not in backbone
    for path in backbone:  # weights and BatchNorm statistics alike
        np.testing.assert_array_equal(after[0][path], before[path], err_msg=path)
    assert not np.allclose(after[0]["main_classifier/kernel"], before["main_classifier/kernel"])
    assert not np.allclose(after[1]["Conv1/kernel"], after[0]["Conv1/kernel"])
    assert all(layer.trainable for layer in backbone_layers(model))


def test_checkpoints_are_inference_models_of_the_last_and_best_epoch(run, data):
    model, output, _, _, _, history = run
    last = keras.models.load_model(os.path.join(output, "checkpoints", "last.keras"))
    assert last.output_names == ["main"]
    np.testing.assert_allclose(
        last(data[0][:2]).numpy(), model(data[0][:2])["main"].numpy(), rtol=1e-5, atol=1e-5
    )
    miou = history.history["val_main_crop_miou"]
    best = keras.models.load_model(os.path.join(output, "checkpoints", "best.keras"))
    best_miou = keras.metrics.MeanIoU(CLASSES, ignore_class=255, sparse_y_pred=False)
    best_miou.update_state(data[1], best(data[0]))
    assert float(best_miou.result()) == pytest.approx(max(miou), abs=1e-5)


def test_logs_have_the_learning_rate_and_a_summary_line(run):
    _, output, _, _, printed, history = run
    with open(os.path.join(output, "history.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    lrs = [float(r["learning_rate"]) for r in rows]
    np.testing.assert_allclose(lrs, [0.05 * (1 - s / 6) ** 0.9 for s in (2, 4, 6)], atol=1e-7)
    assert len(printed) == 3 and printed[0].startswith("epoch 1/3: loss ")
    assert f"val crop mIoU {history.history['val_main_crop_miou'][0]:.4f}" in printed[0]
    assert os.listdir(os.path.join(output, "backup"))
    if importlib_util_find("tensorboard"):
        assert os.listdir(os.path.join(output, "logs"))


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_best_score_survives_a_resume(tmp_path):
    history_csv = tmp_path / "history.csv"
    history_csv.write_text("epoch,val_miou\n0,0.5\n1,0.7\n2,nan\n")
    checkpoints = Checkpoints(str(tmp_path), "val_miou", history_csv=str(history_csv))
    checkpoints.set_model(tiny_model(aux_head=False))
    checkpoints.on_train_begin()
    assert checkpoints.best == 0.7
    checkpoints.on_epoch_end(3, {"val_miou": 0.6})
    assert sorted(os.listdir(tmp_path)) == ["history.csv", "last.keras"]
    checkpoints.on_epoch_end(4, {"val_miou": 0.8})
    assert "best.keras" in os.listdir(tmp_path)


def test_nan_loss_stops_with_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    x[5] = np.nan  # in the second batch of 4
    with pytest.raises(FloatingPointError, match="epoch 1, batch 2.*learning rate"):
        model.fit(x, y, batch_size=4, shuffle=False, callbacks=[TerminateOnNaN()], verbose=0)


def test_backbone_freeze_counts_epochs_from_the_start_of_the_run():
    model = tiny_model(aux_head=False)
    model.compile(loss="mse")
    freeze = BackboneFreeze(2)
    freeze.set_model(model)
    freeze.on_epoch_begin(1)  # a resumed run starting at epoch 1: still frozen
    assert not any(layer.trainable for layer in backbone_layers(model))
    assert model.get_layer("main_classifier").trainable
    freeze.on_epoch_begin(2)
    assert all(layer.trainable for layer in backbone_layers(model))
