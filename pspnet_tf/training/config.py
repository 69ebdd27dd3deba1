"""A training run's config: every key with its default, and checks of every value.

:data:`DEFAULTS` lists the keys (``pspnet-tf train --config FILE`` reads the same, YAML or
JSON; see examples/configs/); :func:`resolve_config` merges a file or dict with overrides
and checks each value against :data:`RULES` before anything is built or written, raising
:class:`ConfigError` naming the key. :func:`pspnet_tf.training.recipe.train` runs a config.
"""

from __future__ import annotations

import math
import os

import yaml

from pspnet_tf import losses as losses_lib
from pspnet_tf.data.classes import IGNORE_LABEL
from pspnet_tf.data.layouts import LAYOUTS
from pspnet_tf.model.backbones import BACKBONES, OUTPUT_STRIDES
from pspnet_tf.options import OPTIMIZERS
from pspnet_tf.precision import PRECISIONS, resolve_precision
from pspnet_tf.training import data as train_data
from pspnet_tf.training import distributed

# Every key of a training config, with its default. `pspnet-tf train --config FILE`
# reads the same keys (YAML or JSON); see examples/configs/.
DEFAULTS = {
    # Data: a dataset folder read by pspnet_tf.data.pipeline.load_dataset.
    "data": None,  # dataset root
    "layout": "voc",  # voc | cityscapes | ade20k | list
    "num_classes": None,  # required
    "class_names": None,  # stored in the model; default: the dataset's, if known
    "train_split": "train",
    "val_split": "val",  # null: no validation
    "train_list": None,  # split/list file, absolute or relative to `data`
    "val_list": None,
    "cache": False,  # keep decoded images in memory
    # Every pair is read before training starts; bad ones (unreadable, size or label value
    # wrong: what `pspnet-tf check-data` lists) refuse the run, or with "skip" are left out.
    "bad_files": "refuse",  # refuse | skip
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
    "jit_compile": "auto",  # auto (Keras: XLA on GPUs, not on CPUs) | true | false
    "seed": 0,
    "output": None,  # required: the run's folder
    "verbose": "auto",
}
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("verbose", "cache", "output")  # output: a moved run folder resumes


class ConfigError(ValueError):
    """A bad training config value or file; ``key`` names the config key (None: the file)."""

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


def load_config(path):
    """Reads a YAML or JSON training config file into a dict, checking its keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file", key="config")
    with open(path) as file:
        try:
            config = yaml.safe_load(file) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML/JSON: {error}", key="config") from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path}: a training config must be a mapping of keys to values", "config"
        )
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown config keys {unknown}; known: {sorted(DEFAULTS)}", key="config"
        )
    return config


def _integer(low, high=None):
    def check(value):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return ok and (high is None or value <= high)

    return check


def _number_above(low):
    return lambda value: (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > low
    )


def _optional(check):
    return lambda value: value is None or check(value)


def _one_of(choices):
    return lambda value: value in choices


def _class_weights(value):
    """Checked against num_classes in :func:`_check_relations` (it needs two keys)."""
    if value is None:
        return True
    if not isinstance(value, (list, tuple)) or not value:
        return False
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return numbers and all(math.isfinite(v) and v >= 0 for v in value) and any(value)


def _precision(value):
    try:
        resolve_precision(value, allow_none=False)
    except ValueError:
        return False
    return True


# key: (check, what a valid value is). Checked before anything is built or written.
RULES = {
    "num_classes": (_integer(2, IGNORE_LABEL), f"an integer from 2 to {IGNORE_LABEL} "
                    f"({IGNORE_LABEL} is the ignore label; background counts as a class)"),
    "epochs": (_integer(1), "an integer >= 1"),
    "batch_size": (_integer(1), "an integer >= 1 (the global batch)"),
    "crop_size": (_integer(1), "an integer >= 1 (pixels)"),
    "alpha": (_number_above(0), "a number > 0 (MobileNetV2 width multiplier)"),
    "backbone": (_one_of(BACKBONES), f"one of {list(BACKBONES)}"),
    "output_stride": (_one_of(OUTPUT_STRIDES), f"one of {list(OUTPUT_STRIDES)}"),
    "layout": (_one_of(LAYOUTS), f"one of {list(LAYOUTS)}"),
    "steps_per_epoch": (_optional(_integer(1)), "null or an integer >= 1"),
    "validation_steps": (_optional(_integer(1)), "null or an integer >= 1"),
    "freeze_backbone_epochs": (_integer(0), "an integer >= 0"),
    "warmup_steps": (_integer(0), "an integer >= 0"),
    "learning_rate": (_number_above(0), "a number > 0"),
    "optimizer": (_one_of(OPTIMIZERS), f"one of {list(OPTIMIZERS)}"),
    "precision": (_precision, f"one of {list(PRECISIONS)}"),
    "strategy": (_one_of(distributed.STRATEGIES), f"one of {list(distributed.STRATEGIES)}"),
    "bad_files": (_one_of(train_data.BAD_FILES), f"one of {list(train_data.BAD_FILES)}"),
    "jit_compile": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "class_weights": (_class_weights, "null or a list of numbers >= 0, one per class, "
                      "not all 0 (all 0 would train nothing: the loss is always 0)"),
}  # fmt: skip


def resolve_config(config=None, **overrides):
    """``DEFAULTS`` updated by ``config`` (dict or file path), then by ``overrides``.

    Returns:
        A complete config dict.

    Raises:
        ConfigError: (a ``ValueError``) naming the key, for unknown keys, missing
            ``num_classes``/``output``, or a value outside :data:`RULES` or not a loss.
    """
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    resolved = {**DEFAULTS, **(config or {}), **overrides}
    unknown = sorted(set(resolved) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown training config keys {unknown}; known: {sorted(DEFAULTS)}")
    for key in ("num_classes", "output"):
        if resolved[key] is None:
            raise ConfigError(f"the training config needs {key!r}", key=key)
    for key, (check, what) in RULES.items():
        if not check(resolved[key]):
            raise ConfigError(f"{key} must be {what}, got {resolved[key]!r}", key=key)
    _check_relations(resolved)
    try:
        losses_lib.make_loss(resolved["loss"])  # fails early, naming the choices
    except ValueError as error:
        raise ConfigError(str(error), key="loss") from None
    return resolved


def _check_relations(config):
    """The checks that read two keys, or the machine."""
    weights, classes = config["class_weights"], config["num_classes"]
    if weights is not None and len(weights) != classes:
        raise ConfigError(f"class_weights must have num_classes = {classes} values, got "
                          f"{len(weights)}", key="class_weights")  # fmt: skip
    if config["freeze_backbone_epochs"] > config["epochs"]:
        raise ConfigError(
            f"freeze_backbone_epochs must be at most epochs = {config['epochs']} (the "
            f"backbone would stay frozen for the whole run), got "
            f"{config['freeze_backbone_epochs']}",
            key="freeze_backbone_epochs",
        )
    if config["precision"] == "float16" and not _has_gpu():
        raise ConfigError(
            "precision float16 needs a GPU (none here): on a CPU loss scaling skips every "
            "step; use bfloat16 or float32",
            key="precision",
        )


def _has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def check_data_folder(config):
    """Raises :class:`ConfigError` unless ``config["data"]`` names a folder."""
    if not config["data"]:
        raise ConfigError("the training config needs 'data', the dataset folder (--data)", "data")
    if not os.path.isdir(config["data"]):
        raise ConfigError(f"data folder {config['data']!r}: no such folder", key="data")
