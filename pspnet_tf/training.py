"""The paper's training recipe compiled into ``model.fit``, and whole training runs.

- :func:`compile_for_training`: SGD with momentum 0.9 and coupled L2 decay 1e-4
  (:class:`pspnet_tf.optimizers.CoupledDecaySGD`), poly learning rate from 0.01
  (:class:`pspnet_tf.optimizers.PolyDecay`), the chosen loss on ``main`` and, with
  weight 0.4, on ``aux``, mIoU and pixel accuracy on ``main``.
- :func:`train`: a resumable run from a config (:data:`DEFAULTS`; what
  ``pspnet-tf train`` calls): data, model, distribution strategy, mixed
  precision, callbacks (:mod:`pspnet_tf.callbacks`) and ``model.fit`` (or
  :func:`pspnet_tf.distributed.fit_multi_worker` for several workers).
"""

from __future__ import annotations

import json
import os

import keras
import yaml

from pspnet_tf import autotune, distributed
from pspnet_tf import losses as losses_lib
from pspnet_tf import metrics as metrics_lib
from pspnet_tf.callbacks import make_callbacks
from pspnet_tf.classes import resolve_classes
from pspnet_tf.files import atomic_path
from pspnet_tf.model import build_pspnet
from pspnet_tf.network import HEAD_PREFIXES, inference_model, rebuild
from pspnet_tf.optimizers import CoupledDecaySGD, PolyDecay
from pspnet_tf.precision import dtype_policy, resolve_precision


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
    jit_compile=False,
    kernels=None,
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
        jit_compile: bool. XLA (fails with MirroredStrategy). Defaults to False.
        kernels: str or None. The faster training kernels installed on ``model``'s
            layers in this process where they run and win a timed trial
            (:func:`pspnet_tf.autotune.for_training`): ``"auto"``, ``"probe"``,
            ``"off"`` or ``"NAME=on|off,..."``; None reads ``PSPNET_TF_KERNELS``. Same
            results either way; saved files hold the standard layers. Under XLA
            (``jit_compile=True``) none are installed: XLA compiles its own.

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
    autotune.for_training(model, kernels="off" if jit_compile else kernels)
    return model


OPTIMIZERS = ("sgd", "adamw")


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


# Every key of a training config, with its default. `pspnet-tf train --config FILE`
# reads the same keys (YAML or JSON); see examples/configs/.
DEFAULTS = {
    # Data: a dataset folder read by pspnet_tf.data.load_dataset.
    "data": None,  # dataset root
    "layout": "voc",  # voc | cityscapes | ade20k | list
    "num_classes": None,  # required
    "class_names": None,  # stored in the model; default: the dataset's, if known
    "train_split": "train",
    "val_split": "val",  # null: no validation
    "train_list": None,  # split/list file, absolute or relative to `data`
    "val_list": None,
    "cache": False,  # keep decoded images in memory
    # Training augmentation (the paper: scale 0.5-2 and flip everywhere; rotation +-10 degrees
    # and Gaussian blur for ADE20K and VOC, not Cityscapes).
    "scale_range": [0.5, 2.0],
    "max_rotation": 10.0,
    "blur": True,
    # Model (build_pspnet arguments).
    "backbone": "resnet50",
    "alpha": 1.0,
    "output_stride": 8,
    "aux_head": True,
    "backbone_weights": None,  # "imagenet" (downloads) or a file; None: random init
    "dropout": 0.1,
    # BatchNorm moving-average momentum while training, Keras convention: 0.9 is PyTorch's
    # default (momentum=0.1), which the authors' PyTorch code trains with. keras.applications
    # use 0.99 (ResNet) and 0.999 (MobileNetV2, whose moving statistics then keep most of
    # their initial values for a thousand steps: short runs validate far below what they
    # learned). None keeps the model's.
    "bn_momentum": 0.9,
    # Length of the run. batch_size is the global batch (over all replicas).
    "crop_size": 473,
    "batch_size": 8,
    "epochs": 50,
    "steps_per_epoch": None,  # default: one pass over the training set
    "validation_steps": None,  # default: the whole validation set
    # Recipe (compile_for_training arguments).
    "loss": "ce",
    "class_weights": None,
    "focal_gamma": 2.0,
    "focal_alpha": 0.5,
    "learning_rate": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "power": 0.9,
    "warmup_steps": 0,
    "head_lr_multiplier": 1.0,
    "aux_weight": 0.4,
    "optimizer": "sgd",  # sgd (the paper's) | adamw
    "freeze_backbone_epochs": 0,
    # Machine.
    "precision": "float32",  # float32 | bfloat16 | float16 | mixed (bf16 on CPU, fp16 on GPU)
    "strategy": "auto",  # auto | none | mirrored | multi_worker
    "sync_batchnorm": False,
    "jit_compile": False,
    "seed": 0,
    "output": None,  # required: the run's folder
    "verbose": "auto",
}
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
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("verbose", "cache")


def load_config(path):
    """Reads a YAML or JSON training config file into a dict, checking its keys."""
    with open(path) as file:
        try:
            config = yaml.safe_load(file) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML/JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a training config must be a mapping of keys to values")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known: {sorted(DEFAULTS)}")
    return config


def resolve_config(config=None, **overrides):
    """``DEFAULTS`` updated by ``config`` (dict or file path), then by ``overrides``.

    Returns:
        A complete config dict. Raises ``ValueError`` for unknown keys, missing
        ``num_classes``/``output`` or an unknown ``precision``/``loss``.
    """
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    resolved = {**DEFAULTS, **(config or {}), **overrides}
    unknown = sorted(set(resolved) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}; known: {sorted(DEFAULTS)}")
    for key in ("num_classes", "output"):
        if resolved[key] is None:
            raise ValueError(f"the training config needs {key!r}")
    resolve_precision(resolved["precision"], allow_none=False)  # names the choices
    losses_lib.make_loss(resolved["loss"])  # fails early, naming the choices
    return resolved


def _check_or_write_config(config, path, write):
    """Refuses to resume a run whose saved config differs; else saves the config."""
    if os.path.isfile(path):
        with open(path) as file:
            saved = yaml.safe_load(file) or {}
        changed = sorted(
            key
            for key in set(saved) | set(config)
            if key not in RESUMABLE_CHANGES and saved.get(key) != config.get(key)
        )
        if changed:
            raise ValueError(
                f"{path} holds a run with other settings ({', '.join(changed)}): "
                "use another output folder, or delete this one to start again"
            )
    if write:
        with atomic_path(path) as temporary, open(temporary, "w") as file:
            yaml.safe_dump(config, file, sort_keys=False)


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


def _datasets(config, train_dataset, val_dataset):
    """The training and validation datasets and the steps per epoch."""
    if train_dataset is None:
        from pspnet_tf.data import load_dataset

        if not config["data"]:
            raise ValueError("the training config needs 'data' (or pass train_dataset=)")
        common = dict(
            root=config["data"],
            layout=config["layout"],
            num_classes=config["num_classes"],
            crop_size=config["crop_size"],
            batch_size=config["batch_size"],
            aux_targets=config["aux_head"],
            cache=config["cache"],
        )
        train_dataset = load_dataset(
            split=config["train_split"],
            training=True,
            seed=config["seed"],
            list_file=config["train_list"],
            drop_remainder=True,  # equal batches: BatchNorm and replicas need them
            scale_range=tuple(config["scale_range"]),
            max_rotation=float(config["max_rotation"]),
            blur=bool(config["blur"]),
            **common,
        )
        if val_dataset is None and config["val_split"]:
            val_dataset = load_dataset(
                split=config["val_split"], list_file=config["val_list"], **common
            )
    steps = config["steps_per_epoch"] or int(train_dataset.cardinality())
    if steps <= 0:
        raise ValueError(
            "cannot tell the number of training batches per epoch (empty or unknown-size "
            "dataset): set steps_per_epoch"
        )
    return train_dataset, val_dataset, steps


def train(config=None, *, train_dataset=None, val_dataset=None, **overrides):
    """Trains a PSPNet with the paper's recipe; rerunning the same config resumes.

    Writes into ``config["output"]``: ``config.yaml`` (the resolved config),
    ``model.keras`` (the inference model for any image size, with class names),
    ``checkpoints/{last,best}.keras``, ``backup/`` (resume state),
    ``history.csv`` and ``logs/`` (TensorBoard). With ``TF_CONFIG`` naming more
    than one worker it trains with :func:`pspnet_tf.distributed.fit_multi_worker`.

    Args:
        config: dict, path of a YAML/JSON file, or None; keys and defaults in
            :data:`DEFAULTS`.
        train_dataset: ``tf.data.Dataset`` or None. Replaces the dataset read from
            ``config["data"]``: global batches of ``(images (B, H, W, 3) 0-255,
            labels (B, H, W))`` (targets ``{"main", "aux"}`` with an aux head), not
            repeated. Its images must be ``crop_size`` squares.
        val_dataset: ``tf.data.Dataset`` or None, the same structure.
        **overrides: config keys that take precedence over ``config``.

    Returns:
        ``(model, history)``: the trained training model (aux head included) and
        the ``keras.callbacks.History`` of the epochs run by this call.
    """
    config = resolve_config(config, **overrides)
    # MultiWorkerMirroredStrategy must exist before TensorFlow does any other work.
    strategy = distributed.choose_strategy(config["strategy"])
    chief = distributed.is_chief(strategy)
    output = os.path.abspath(config["output"])
    _check_or_write_config(config, os.path.join(output, "config.yaml"), write=chief)
    keras.utils.set_random_seed(int(config["seed"]))
    train_dataset, val_dataset, steps = _datasets(config, train_dataset, val_dataset)
    model = _build_and_compile(config, strategy, total_steps=config["epochs"] * steps)
    callbacks = make_callbacks(
        output,
        model,
        epochs=config["epochs"],
        freeze_backbone_epochs=config["freeze_backbone_epochs"],
        validation=val_dataset is not None,
    )
    history = _fit(model, strategy, train_dataset, val_dataset, steps, callbacks, config)
    if chief:
        serving = rebuild(inference_model(model), input_shape=(None, None, 3), aux_head=False)
        with atomic_path(os.path.join(output, "model.keras")) as temporary:
            serving.save(temporary)
    return model, history


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
