"""More than one device or host: strategy choice, synchronized BatchNorm, multi-worker loop.

- :func:`choose_strategy`: ``"auto"`` picks ``MultiWorkerMirroredStrategy`` when
  ``TF_CONFIG`` names more than one worker, ``MirroredStrategy`` when there is
  more than one GPU, else the default (one device).
- :func:`synchronize_batch_norm`: a copy of a model whose BatchNorm layers compute
  batch statistics over the global batch (``synchronized=True``).
- :func:`fit_multi_worker`: ``model.fit`` is broken under
  ``MultiWorkerMirroredStrategy`` in Keras 3.15 (keras-team/keras#20585: its
  per-replica output reduction fails), so multi-worker runs use this loop. It runs
  the same ``model.train_step``/``test_step`` (so the same losses, metrics,
  optimizer and schedule) under ``strategy.run``, and the same callbacks as
  ``fit``; only the chief writes files. Every worker restores from the chief's
  backup on start, so the workers need a shared file system for the output folder.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from pspnet_tf.options import STRATEGIES
from pspnet_tf.training.callbacks import WORKER_CALLBACKS


def tf_config_workers():
    """Number of tasks (chief + workers) in the ``TF_CONFIG`` environment variable."""
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def choose_strategy(name="auto"):
    """The ``tf.distribute`` strategy for ``name``; call it before any other TF work.

    Args:
        name: ``"auto"``, ``"none"`` (one device), ``"mirrored"`` (every GPU, else
            every logical CPU device of this host) or ``"multi_worker"``
            (``MultiWorkerMirroredStrategy`` configured by ``TF_CONFIG``).

    Returns:
        A ``tf.distribute.Strategy``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        name = (
            "multi_worker" if tf_config_workers() > 1 else "mirrored" if len(gpus) > 1 else "none"
        )
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """True on the task that writes files: the ``chief``, else worker 0, else a lone process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def synchronize_batch_norm(model):
    """A copy of ``model`` (same weights) whose BatchNorm layers are ``synchronized=True``.

    Under a ``tf.distribute`` strategy their batch statistics then cover the global
    batch instead of each replica's share; without a strategy they behave as before,
    and a saved model loads anywhere. Call it inside the strategy scope.

    Args:
        model: a functional ``keras.Model``, e.g. from :func:`pspnet_tf.build_pspnet`.

    Returns:
        A new ``keras.Model``; the other layers are copies from their configs.
    """

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    synced = keras.models.clone_model(model, clone_function=clone)
    synced.set_weights(model.get_weights())
    return synced


class _RestoreOnly(keras.callbacks.BackupAndRestore):
    """A non-chief worker restores from the chief's backup and never writes or deletes it."""

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


def _worker_callbacks(callbacks):
    """What a non-chief worker keeps: the callbacks that change training, none that write."""
    kept = [c for c in callbacks if isinstance(c, WORKER_CALLBACKS)]
    for c in callbacks:
        if isinstance(c, keras.callbacks.BackupAndRestore):
            kept.append(
                _RestoreOnly(
                    c.backup_dir, double_checkpoint=c.double_checkpoint, delete_checkpoint=False
                )
            )
    return kept


def _distributed_step(model, strategy, step):
    """A ``tf.function`` running ``step`` (train_step/test_step) on every replica; the
    returned logs are averaged over replicas (for the progress bar)."""

    @tf.function(reduce_retracing=True)
    def run(data):
        logs = strategy.run(step, args=(data,))
        return {key: strategy.reduce("MEAN", value, axis=None) for key, value in logs.items()}

    return run


def _metrics_logs(model, prefix=""):
    # Read in cross-replica context: the metric variables are summed over all replicas.
    return {prefix + k: float(v) for k, v in model.get_metrics_result().items()}


def _evaluate(model, test, dataset, steps):
    model.reset_metrics()
    for step, batch in enumerate(dataset):
        if steps is not None and step >= steps:
            break
        test(batch)
    return _metrics_logs(model, prefix="val_")


def fit_multi_worker(
    model,
    strategy,
    train_dataset,
    *,
    epochs,
    steps_per_epoch,
    validation_data=None,
    validation_steps=None,
    callbacks=(),
    verbose=1,
):
    """``model.fit`` for ``MultiWorkerMirroredStrategy``: same steps, callbacks and resume.

    Args:
        model: compiled inside ``strategy.scope()`` (optimizer built, see
            :func:`pspnet_tf.training.recipe.compile_for_training`).
        strategy: the ``MultiWorkerMirroredStrategy`` (also works with others).
        train_dataset: ``tf.data.Dataset`` of global batches, not repeated (it is
            repeated here). Every worker must produce the same order (same seed):
            batches are split between workers by position.
        epochs: int. Total epochs; a resumed run starts after the last backed-up one.
        steps_per_epoch: int.
        validation_data: ``tf.data.Dataset`` or None.
        validation_steps: int or None (the whole validation set).
        callbacks: list of callbacks as for ``fit`` (see
            :func:`pspnet_tf.training.callbacks.make_callbacks`). Non-chief workers keep
            only the ones that change training and restore from the chief's backup.
        verbose: 0 or 1 (progress bar on the chief).

    Returns:
        The ``keras.callbacks.History`` of the epochs run here.
    """
    chief = is_chief(strategy)
    history = keras.callbacks.History()
    callbacks = list(callbacks) if chief else _worker_callbacks(callbacks)
    callbacks = keras.callbacks.CallbackList(
        [*callbacks, history],
        add_progbar=bool(verbose) and chief,
        verbose=verbose if chief else 0,
        epochs=epochs,
        steps=steps_per_epoch,
        model=model,
    )
    iterator = iter(strategy.experimental_distribute_dataset(train_dataset.repeat()))
    validation = validation_data and strategy.experimental_distribute_dataset(validation_data)
    model.stop_training = False
    callbacks.on_train_begin()
    # BackupAndRestore restored the optimizer: its step count says where the run stopped.
    initial_epoch = int(model.optimizer.iterations.numpy()) // steps_per_epoch
    test = _distributed_step(model, strategy, model.test_step)
    train, trainable, logs = None, None, {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        if len(model.trainable_weights) != trainable:  # first epoch, or (un)frozen layers
            train = _distributed_step(model, strategy, model.train_step)
            trainable = len(model.trainable_weights)
        for step in range(steps_per_epoch):
            callbacks.on_train_batch_begin(step)
            step_logs = train(next(iterator))
            callbacks.on_train_batch_end(step, {k: float(v) for k, v in step_logs.items()})
        logs = _metrics_logs(model)
        if validation:
            logs.update(_evaluate(model, test, validation, validation_steps))
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)
    return history
