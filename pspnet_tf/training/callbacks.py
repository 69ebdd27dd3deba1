"""Callbacks of a training run: freezing, checkpoints, logs, resume, NaN guard.

:func:`make_callbacks` assembles them in the order they must run; Keras ships
``TensorBoard`` and the progress bar, :mod:`pspnet_tf.training.run_folder` the resume state
(``BackupAndRestore`` made safe to kill) and the CSV log (``CSVLogger`` that holds each
epoch once), the rest is here because Keras' versions do not do what a resumable
segmentation run needs (each class says why).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import time

import keras
import numpy as np

from pspnet_tf.files import atomic_path
from pspnet_tf.model.network import backbone_layers, inference_model
from pspnet_tf.training.run_folder import Backup, History, keras_file_problem, note


def log_key(model, name):
    """The ``fit`` log key of a metric on ``main``: ``"main_crop_miou"`` with an aux head,
    else ``"crop_miou"`` (Keras prefixes metric names with the output name for dict outputs)."""
    return f"main_{name}" if isinstance(model.output, dict) else name


class BackboneFreeze(keras.callbacks.Callback):
    """Freezes the backbone for the first ``epochs`` epochs, then unfreezes it.

    Frozen layers also run BatchNorm in inference mode (Keras' rule for
    ``trainable=False``). The train function is rebuilt when the state changes.

    Args:
        epochs: int. Epochs (counted from 0 of the whole run, so resuming keeps the
            schedule) during which the backbone is frozen.
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = int(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        layers = backbone_layers(self.model)
        trainable = epoch >= self.epochs
        if any(layer.trainable != trainable for layer in layers):
            for layer in layers:
                layer.trainable = trainable
            self.model.make_train_function(force=True)


class Checkpoints(keras.callbacks.Callback):
    """Saves the inference model (``main`` output) as ``last.keras`` and ``best.keras``.

    Not ``keras.callbacks.ModelCheckpoint`` because a checkpoint here must (1) be
    the inference model, not the training model with its aux head, (2) be written
    atomically, as runs are killed and resumed, (3) remember the best score
    across a resume (read back from the CSV log), and (4) name a corrupt checkpoint
    found at the start, remove it and write ``last.keras`` again.

    Args:
        directory: str. Folder of the two files.
        monitor: str. Log key, e.g. ``"val_main_crop_miou"``.
        mode: ``"max"`` or ``"min"``.
        history_csv: str or None. The ``CSVLogger`` file of this run.
    """

    def __init__(self, directory, monitor, mode="max", history_csv=None):
        super().__init__()
        self.directory, self.monitor, self.mode = directory, monitor, mode
        self.history_csv = history_csv
        self.best = None

    def _better(self, value, best):
        return best is None or (value > best if self.mode == "max" else value < best)

    def on_train_begin(self, logs=None):
        if self.history_csv and os.path.isfile(self.history_csv):
            with open(self.history_csv, newline="") as file:
                for row in csv.DictReader(file):
                    value = _float(row.get(self.monitor))
                    if math.isfinite(value) and self._better(value, self.best):
                        self.best = value
        self._remove_corrupt_files()

    def _remove_corrupt_files(self):
        """A corrupt checkpoint is named and removed; last.keras is written again at the end."""
        for name in ("last.keras", "best.keras"):
            path = os.path.join(self.directory, name)
            problem = os.path.isfile(path) and keras_file_problem(path)
            if not problem:
                continue
            os.remove(path)
            if name == "best.keras":
                self.best = None
                note(f"{path}: corrupt checkpoint ({problem}): removed; its weights are lost, "
                     "best.keras will be the best of the epochs still to run")  # fmt: skip
            else:
                note(f"{path}: corrupt checkpoint ({problem}): removed; written again from the "
                     "restored training state")  # fmt: skip

    def on_train_end(self, logs=None):
        last = os.path.join(self.directory, "last.keras")
        if not os.path.isfile(last):  # removed as corrupt, and no epoch left to run
            with atomic_path(last) as temporary:
                inference_model(self.model).save(temporary)

    def on_epoch_end(self, epoch, logs=None):
        last = os.path.join(self.directory, "last.keras")
        with atomic_path(last) as temporary:
            inference_model(self.model).save(temporary)
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(value) and self._better(value, self.best):
            self.best = float(value)
            with atomic_path(os.path.join(self.directory, "best.keras")) as temporary:
                shutil.copyfile(last, temporary)


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


class EpochSummary(keras.callbacks.Callback):
    """Adds ``learning_rate`` to the epoch logs and prints a one-line summary per epoch.

    ``epoch 3/10: loss 0.5123 - val crop mIoU 0.4310 - lr 0.00871 - 12.3 s`` (the
    learning rate of the next step; "crop": validation images fitted into the training
    crop, see :func:`pspnet_tf.training.recipe.compile_for_training`). Put it
    before ``CSVLogger`` and ``TensorBoard`` so that they log the learning rate too.

    Args:
        epochs: int. Total epochs of the run.
        miou_key: str. Log key of the validation mIoU.
        print_fn: callable taking a str. Defaults to ``print``.
        skipped_files: int. Bad pairs left out of the run (``bad_files: skip``); said
            on every line when not 0.
    """

    def __init__(self, epochs, miou_key="val_crop_miou", print_fn=print, skipped_files=0):
        super().__init__()
        self.epochs, self.miou_key, self.print_fn = epochs, miou_key, print_fn
        self.skipped_files = int(skipped_files)
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["learning_rate"] = lr
        parts = [f"epoch {epoch + 1}/{self.epochs}: loss {logs.get('loss', float('nan')):.4f}"]
        if self.miou_key in logs:
            parts.append(f"val crop mIoU {logs[self.miou_key]:.4f}")
        parts += [f"lr {lr:.3g}", f"{time.perf_counter() - self._start:.1f} s"]
        if self.skipped_files:
            parts.append(f"{self.skipped_files} bad files skipped")
        self.print_fn(" - ".join(parts))


class TerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """Stops training with an error that says what to try when the loss is NaN or Inf.

    Keras' own callback stops quietly (or raises a bare error); this raises
    ``FloatingPointError`` naming the epoch and batch. The last backup (previous
    epoch) stays in place, so a rerun with a lower learning rate resumes from it.
    """

    def __init__(self):
        super().__init__(raise_error=True)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {float(loss)} at epoch {self._epoch + 1}, batch {batch + 1}."
                " Usual causes: a learning rate too high for this batch size (try a lower"
                " learning_rate or warmup_steps), float16 overflow (use precision"
                " bfloat16 or float32), or labels outside 0..num_classes-1 other than 255"
                " (run pspnet-tf check-data)."
            )


# The callbacks that change training and write nothing: every worker of a multi-worker
# run keeps them (pspnet_tf.training.distributed); the others run on the chief only.
WORKER_CALLBACKS = (TerminateOnNaN, BackboneFreeze)


def make_callbacks(
    output_dir, model, *, epochs, freeze_backbone_epochs=0, validation=True, skipped_files=0
):
    """The callbacks of a training run writing into ``output_dir``.

    Args:
        output_dir: str. Gets ``backup/`` (:class:`pspnet_tf.training.run_folder.Backup`:
            weights, optimizer state and epoch, for resuming), ``checkpoints/{last,best}.keras``,
            ``history.csv`` and ``logs/`` (TensorBoard, if the ``tensorboard``
            package is installed: ``pip install pspnet_tf[tensorboard]``).
        model: the compiled training model (for the log key names).
        epochs: int. Total epochs.
        freeze_backbone_epochs: int. See :class:`BackboneFreeze`.
        validation: bool. Whether ``fit`` gets validation data (``best.keras`` then
            follows val mIoU, else the training loss).
        skipped_files: int. Bad image/label pairs left out of the run, said in every
            epoch's summary line.

    Returns:
        list of callbacks, in the order they must run.
    """
    miou = "val_" + log_key(model, "crop_miou")
    history_csv = os.path.join(output_dir, "history.csv")
    callbacks = [TerminateOnNaN()]
    if freeze_backbone_epochs:
        callbacks.append(BackboneFreeze(freeze_backbone_epochs))
    callbacks += [  # History and Backup: pspnet_tf.training.run_folder says why not Keras' own
        # Here rather than appended by fit, so that the bar ends its line before the summary.
        keras.callbacks.ProgbarLogger(),
        EpochSummary(epochs, miou, skipped_files=skipped_files),
        Checkpoints(
            os.path.join(output_dir, "checkpoints"),
            monitor=miou if validation else "loss",
            mode="max" if validation else "min",
            history_csv=history_csv,
        ),
        History(history_csv),
        # Last, so that an epoch counts as done only once everything above is written.
        Backup(os.path.join(output_dir, "backup")),
    ]
    if importlib.util.find_spec("tensorboard"):  # TF >= 2.20 no longer installs it
        callbacks.insert(-1, keras.callbacks.TensorBoard(os.path.join(output_dir, "logs")))
    else:
        print("TensorBoard logs need `pip install tensorboard`; the CSV log is", history_csv)
    return callbacks
