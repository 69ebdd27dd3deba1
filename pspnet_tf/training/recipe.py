"""The paper's training recipe compiled into ``model.fit``, and whole training runs.

- :func:`compile_for_training`: SGD with momentum 0.9 and coupled L2 decay 1e-4
  (:class:`pspnet_tf.training.optimizers.CoupledDecaySGD`), poly learning rate from 0.01
  (:class:`pspnet_tf.training.optimizers.PolyDecay`), the chosen loss on ``main`` and, with
  weight 0.4, on ``aux``, mIoU and pixel accuracy on ``main``.
- :func:`train`: a resumable run from a config (:data:`DEFAULTS`, checked by
  :mod:`pspnet_tf.training.config`; what ``pspnet-tf train`` calls): data
  (:mod:`pspnet_tf.training.data`), model, distribution strategy, mixed precision, run
  folder (:mod:`pspnet_tf.training.run_folder`), callbacks (:mod:`pspnet_tf.training.callbacks`) and
  ``model.fit`` (or :func:`pspnet_tf.training.distributed.fit_multi_worker` for several workers).
"""

from __future__ import annotations

import contextlib
import json
import os

import keras
import tensorflow as tf

from pspnet_tf import losses as losses_lib
from pspnet_tf import metrics as metrics_lib
from pspnet_tf.data.classes import resolve_classes
from pspnet_tf.files import KERAS_MODEL, atomic_path, check_output
from pspnet_tf.model.build import build_pspnet
from pspnet_tf.model.network import HEAD_PREFIXES, inference_model, rebuild, set_metadata
from pspnet_tf.precision import dtype_policy
from pspnet_tf.training import data as train_data
from pspnet_tf.training import distributed, run_folder
from pspnet_tf.training.callbacks import make_callbacks
from pspnet_tf.training.config import (  # noqa: F401  (the config's API, also here)
    DEFAULTS,
    OPTIMIZERS,
    RESUMABLE_CHANGES,
    RULES,
    ConfigError,
    check_data_folder,
    load_config,
    resolve_config,
)
from pspnet_tf.training.optimizers import CoupledDecaySGD, PolyDecay


def compile_for_training(
    model,
    *,
    total_steps,
    loss="ce",
    class_weights=None,
    focal_gamma=2.0,
    focal_alpha=0.5,
    learning_rate=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    power=0.9,
    warmup_steps=0,
    head_lr_multiplier=1.0,
    aux_weight=0.4,
    optimizer="sgd",
    jit_compile="auto",
):
    """Compiles ``model`` with the paper's recipe; call it inside the strategy scope.

    Args:
        model: a PSPNet from :func:`pspnet_tf.build_pspnet` (with or without aux head).
        total_steps: int. Optimizer steps of the whole run (epochs x steps per
            epoch): the poly schedule reaches 0 there.
        loss: str. ``"ce"``, ``"dice"``, ``"focal"``, ``"ce+dice"``, ``"focal+dice"``.
        class_weights: list of floats or None. Per-class loss weights.
        focal_gamma, focal_alpha: focal loss parameters (see :class:`FocalLoss`).
        learning_rate: float. Initial learning rate. Defaults to 0.01 (the paper).
        momentum: float. Defaults to 0.9.
        weight_decay: float. Coupled L2 decay. Defaults to 1e-4.
        power: float. Poly exponent. Defaults to 0.9.
        warmup_steps: int. Linear warm-up steps. Defaults to 0.
        head_lr_multiplier: float. Learning rate factor of the PPM and heads (the
            original Caffe model used 10). Defaults to 1.
        aux_weight: float. Weight of the ``aux`` output's loss. Defaults to 0.4.
        optimizer: str. ``"sgd"`` (the paper: momentum, coupled L2 decay) or
            ``"adamw"`` (Keras' AdamW, ``weight_decay`` decoupled; ``momentum`` and
            ``head_lr_multiplier`` do not apply), which trains from scratch in far
            fewer steps. Defaults to ``"sgd"``.
        jit_compile: ``"auto"``, True or False. XLA compilation of the training step.
            ``"auto"`` follows Keras: XLA on a GPU without a distribution strategy, off
            on CPUs (where it ran no faster in ``benchmarks/speed.py``). True forces it
            (it fails under MirroredStrategy). Defaults to ``"auto"``.

    Returns:
        ``model``, compiled, with its optimizer built for every trainable variable
        (so that freezing and unfreezing layers later keeps the optimizer valid).
    """
    num_classes = model.get_layer("main").output.shape[-1]
    schedule = PolyDecay(learning_rate, total_steps, power=power, warmup_steps=warmup_steps)
    optimizer = _make_optimizer(optimizer, schedule, momentum, weight_decay, head_lr_multiplier)

    def make():
        return losses_lib.make_loss(loss, class_weights, gamma=focal_gamma, alpha=focal_alpha)

    # "crop_": during fit both are measured on crop_size inputs (validation images are
    # shrunk to fit the crop and padded), not on whole images as `pspnet-tf evaluate` does.
    metrics = [
        metrics_lib.MeanIoU(num_classes, name="crop_miou"),
        metrics_lib.PixelAccuracy(num_classes, name="crop_pixel_accuracy"),
    ]
    if isinstance(model.output, dict):
        outputs = sorted(model.output)
        model.compile(
            optimizer=optimizer,
            loss={name: make() for name in outputs},
            loss_weights={name: 1.0 if name == "main" else float(aux_weight) for name in outputs},
            metrics={"main": metrics},
            jit_compile=jit_compile,
        )
    else:
        model.compile(optimizer=optimizer, loss=make(), metrics=metrics, jit_compile=jit_compile)
    model.optimizer.build(model.trainable_variables)
    return model


def _make_optimizer(name, schedule, momentum, weight_decay, head_lr_multiplier):
    if name == "sgd":
        multipliers = {p: float(head_lr_multiplier) for p in HEAD_PREFIXES}
        return CoupledDecaySGD(
            schedule, momentum, weight_decay, multipliers if head_lr_multiplier != 1 else None
        )
    if name == "adamw":
        if head_lr_multiplier != 1:
            raise ValueError("head_lr_multiplier is for optimizer 'sgd'; 'adamw' takes none")
        return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


# The config keys passed to compile_for_training under their own names (listed, not read
# off its signature: a renamed parameter then fails loudly instead of dropping the key).
RECIPE_KEYS = (
    "loss",
    "class_weights",
    "focal_gamma",
    "focal_alpha",
    "learning_rate",
    "momentum",
    "weight_decay",
    "power",
    "warmup_steps",
    "head_lr_multiplier",
    "aux_weight",
    "optimizer",
    "jit_compile",
)


def _class_names(config):
    """Class names and palette to store in the model: the config's, the demo dataset's or
    the named dataset's (if its class count matches), else none."""
    names = config["class_names"]
    demo_info = os.path.join(config["data"] or "", "demo.json")
    if names is None and config["data"] and os.path.isfile(demo_info):
        with open(demo_info) as file:
            names = json.load(file).get("class_names")
    names, palette, known = resolve_classes(config["num_classes"], names, dataset=config["layout"])
    return (names, palette) if known else (None, None)


def train(config=None, *, train_dataset=None, val_dataset=None, **overrides):
    """Trains a PSPNet with the paper's recipe; rerunning the same config resumes.

    Writes into ``config["output"]``: ``config.yaml`` (the resolved config),
    ``model.keras`` (the inference model for any image size, with class names),
    ``checkpoints/{last,best}.keras``, ``backup/`` (resume state),
    ``history.csv`` and ``logs/`` (TensorBoard). With ``TF_CONFIG`` naming more
    than one worker it trains with :func:`pspnet_tf.training.distributed.fit_multi_worker`.

    Args:
        config: dict, path of a YAML/JSON file, or None; keys and defaults in
            :data:`DEFAULTS`.
        train_dataset: ``tf.data.Dataset`` or None. Replaces the dataset read from
            ``config["data"]``: global batches of ``(images (B, H, W, 3) 0-255,
            labels (B, H, W))`` (targets ``{"main", "aux"}`` with an aux head), not
            repeated. Its images must be ``crop_size`` squares.
        val_dataset: ``tf.data.Dataset`` or None, the same structure.
        **overrides: config keys that take precedence over ``config``.

    Before anything is built or written it checks every config value
    (:mod:`pspnet_tf.training.config`) and reads every image/label pair
    (:mod:`pspnet_tf.training.data`; ``bad_files`` says whether a bad one refuses the
    run); a damaged run folder is repaired or refused as :mod:`pspnet_tf.training.run_folder`
    says.

    Returns:
        ``(model, history)``: the trained training model (aux head included) and
        the ``keras.callbacks.History`` of the epochs run by this call.

    Raises:
        ConfigError: (a ``ValueError``) a bad config value or file, naming the key.
        ValueError, OSError: bad data or run folder, naming the file (also for a data
            error met while training).
    """
    config = resolve_config(config, **overrides)
    output = os.path.abspath(config["output"])
    scanned = None
    if train_dataset is None:
        check_data_folder(config)
        # Settings first (cheap), then every file (seconds per thousand pairs): all before
        # anything is built or written, so that a corrected command just runs.
        run_folder.prepare(output, config, write=False, resumable_changes=RESUMABLE_CHANGES)
        scanned = train_data.scan(config)
    # MultiWorkerMirroredStrategy must exist before TensorFlow does any other work.
    strategy = distributed.choose_strategy(config["strategy"])
    chief = distributed.is_chief(strategy)
    check_output(output, run_folder.RUN_FOLDER)
    with run_folder.locked(output) if chief else contextlib.nullcontext():
        return _train(config, output, strategy, chief, scanned, train_dataset, val_dataset)


def _train(config, output, strategy, chief, scanned, train_dataset, val_dataset):
    """:func:`train` after its checks, holding the run folder's lock."""
    run_folder.prepare(output, config, write=chief, resumable_changes=RESUMABLE_CHANGES)
    keras.utils.set_random_seed(int(config["seed"]))
    train_dataset, val_dataset, steps = train_data.datasets(
        config, scanned, train_dataset, val_dataset
    )
    model = _build_and_compile(config, strategy, total_steps=config["epochs"] * steps)
    callbacks = make_callbacks(
        output,
        model,
        epochs=config["epochs"],
        freeze_backbone_epochs=config["freeze_backbone_epochs"],
        validation=val_dataset is not None,
        skipped_files=scanned.skipped if scanned else 0,
    )
    history = _fit_naming_bad_files(
        model, strategy, (train_dataset, val_dataset, steps), callbacks, config, scanned
    )
    if chief:
        serving = rebuild(inference_model(model), input_shape=(None, None, 3), aux_head=False)
        # The crop it learned at: evaluate --mode sliding's default window.
        set_metadata(serving, crop_size=[config["crop_size"]] * 2)
        with atomic_path(os.path.join(output, "model.keras"), KERAS_MODEL) as temporary:
            serving.save(temporary)
    return model, history


def _fit_naming_bad_files(model, strategy, data, callbacks, config, scanned):
    """:func:`_fit`; a data error met while training becomes one line naming the file."""
    try:
        return _fit(model, strategy, *data, callbacks, config)
    except tf.errors.InvalidArgumentError as error:
        named = train_data.named_error(error, config, scanned)
        if named is None:
            raise
        raise named from None


def _fit(model, strategy, train_dataset, val_dataset, steps, callbacks, config):
    """``model.fit``, or the multi-worker loop where ``fit`` is broken; returns the History."""
    fit_args = dict(
        epochs=config["epochs"],
        steps_per_epoch=steps,
        validation_data=val_dataset,
        validation_steps=config["validation_steps"],
        callbacks=callbacks,
    )
    if distributed.is_multi_worker(strategy):
        verbose = 0 if config["verbose"] == 0 else 1
        return distributed.fit_multi_worker(
            model, strategy, train_dataset, verbose=verbose, **fit_args
        )
    # The pipeline shuffles; shuffle=False only silences fit's warning about it.
    return model.fit(train_dataset.repeat(), verbose=config["verbose"], shuffle=False, **fit_args)


def _build_and_compile(config, strategy, total_steps):
    names, palette = _class_names(config)
    recipe = {key: config[key] for key in RECIPE_KEYS}
    with dtype_policy(config["precision"]), strategy.scope():
        model = build_pspnet(
            config["num_classes"],
            backbone=config["backbone"],
            input_shape=(config["crop_size"], config["crop_size"], 3),
            output_stride=config["output_stride"],
            aux_head=config["aux_head"],
            backbone_weights=config["backbone_weights"],
            dropout=config["dropout"],
            alpha=config["alpha"],
            class_names=names,
            palette=palette,
        )
        if config["sync_batchnorm"]:
            model = distributed.synchronize_batch_norm(model)
        if config["bn_momentum"] is not None:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = float(config["bn_momentum"])
        return compile_for_training(model, total_steps=total_steps, **recipe)
