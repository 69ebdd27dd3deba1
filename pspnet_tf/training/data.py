"""The data of a training run: checked before anything is built, read, and its errors named.

:func:`scan` lists the training and validation splits and reads every pair with
:func:`pspnet_tf.data.checks.check_pairs` (what ``pspnet-tf check-data`` does) before the model is
built or the run folder written; bad pairs refuse the run (the default) or are left out, as
the config's ``bad_files`` says. :func:`datasets` builds the ``tf.data`` pipelines from the
pairs that passed. :func:`named_error` turns an error met while training (a file that
changed after the scan, or that TensorFlow's decoders reject where Pillow's do not) into
one line naming the file.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf

from pspnet_tf.data import checks, layouts
from pspnet_tf.data import pipeline as data_lib

# The tf.data decode path itself, run again to find the file behind an error.
from pspnet_tf.data.pipeline import _decode_image, _decode_label, _load_pair
from pspnet_tf.errors import one_line

BAD_FILES = ("refuse", "skip")


@dataclasses.dataclass
class Scanned:
    """The pairs that passed the scan, per split, and how many were left out."""

    train: list
    val: list | None
    skipped: int = 0


def scan(config):
    """Lists and checks every pair of the training (and validation) split.

    Args:
        config: the resolved training config (``data``, ``layout``, splits, lists,
            ``num_classes``, ``bad_files``).

    Returns:
        :class:`Scanned`.

    Raises:
        FileNotFoundError, ValueError: naming the split file, an empty split, or (with
            ``bad_files: refuse``) the first bad file, after printing every problem.
    """
    train_source = (config["train_split"], config["train_list"])
    train, skipped = _scan_split(config, *train_source)
    val = None
    if (config["val_split"], config["val_list"]) == train_source:
        val = train  # validating on the training images: read them once
    elif config["val_split"]:
        val, val_skipped = _scan_split(config, config["val_split"], config["val_list"])
        skipped += val_skipped
    return Scanned(train, val, skipped)


def _scan_split(config, split, list_file):
    pairs = layouts.list_pairs(config["data"], config["layout"], split, list_file=list_file)
    results = checks.check_pairs(pairs, config["layout"], config["num_classes"])
    bad = [problems for problems in results if problems]
    if not bad:
        return pairs, 0
    for problems in bad:
        for problem in problems:
            print(problem)
    what = f"{len(bad)} of {len(pairs)} image/label pairs of split {split!r} are bad"
    if config["bad_files"] == "refuse":
        raise ValueError(
            f"{what} (listed above), first: {bad[0][0]}. Fix or remove them, or set "
            "bad_files: skip to train without them"
        )
    good = [pair for pair, problems in zip(pairs, results, strict=True) if not problems]
    if not good:
        raise ValueError(f"{what}: all of them, nothing to train on; first: {bad[0][0]}")
    print(f"{what} (listed above): left out (bad_files: skip)")
    return good, len(bad)


def datasets(config, scanned, train_dataset=None, val_dataset=None):
    """The training and validation datasets and the steps per epoch.

    Args:
        config: the resolved training config.
        scanned: :class:`Scanned` or None (datasets given).
        train_dataset, val_dataset: ``tf.data.Dataset`` or None: used as given.

    Returns:
        ``(train_dataset, val_dataset, steps_per_epoch)``.
    """
    if train_dataset is None:
        common = dict(
            root=config["data"],
            layout=config["layout"],
            num_classes=config["num_classes"],
            crop_size=config["crop_size"],
            batch_size=config["batch_size"],
            aux_targets=config["aux_head"],
            cache=config["cache"],
        )
        train_dataset = data_lib.load_dataset(
            split=config["train_split"],
            pairs=scanned.train,
            training=True,
            seed=config["seed"],
            drop_remainder=True,  # equal batches: BatchNorm and replicas need them
            scale_range=tuple(config["scale_range"]),
            max_rotation=float(config["max_rotation"]),
            blur=bool(config["blur"]),
            **common,
        )
        if val_dataset is None and scanned.val:
            val_dataset = data_lib.load_dataset(
                split=config["val_split"], pairs=scanned.val, **common
            )
    steps = config["steps_per_epoch"] or int(train_dataset.cardinality())
    if steps <= 0:
        raise ValueError(
            "no full training batch per epoch (fewer images than batch_size, or an "
            "unknown-size dataset): lower batch_size or set steps_per_epoch"
        )
    return train_dataset, val_dataset, steps


def named_error(error, config, scanned):
    """A ``ValueError`` naming the file behind a ``tf.errors.InvalidArgumentError``, or None.

    The decode checks of :mod:`pspnet_tf.data.pipeline` put the file first in their assertion
    message; TensorFlow's decoders name none, so the pairs are decoded again to find it.
    """
    asserted = re.search(r"assertion failed: \[(.+?)\]", error.message, re.DOTALL)
    if asserted:
        return ValueError(" ".join(asserted.group(1).split()))
    if scanned is None:
        return None
    pairs = scanned.train + (scanned.val or [])
    found = first_undecodable(pairs, config["layout"], config["num_classes"])
    if found is None:
        return None
    path, reason = found
    return ValueError(f"{path}: TensorFlow cannot decode it ({reason})")


def first_undecodable(pairs, layout, num_classes, *, label_map=None):
    """The first pair that the ``tf.data`` decode path rejects, and TensorFlow's reason.

    For errors that name no file (``jpeg::Uncompress failed``): decodes every pair as
    :func:`load_dataset` does, in parallel, keeping the indices that pass.

    Returns:
        ``(path, reason)`` (the image's path, or the label's if the image decodes), or None.
    """
    lut = layouts.label_lut(layout, label_map)
    lut = None if (lut == np.arange(256)).all() else lut
    images, labels = ([pair[i] for pair in pairs] for i in (0, 1))

    def decodes(index, image_path, label_path):
        image, label = _load_pair(image_path, label_path, lut, int(num_classes))
        with tf.control_dependencies([tf.size(image), tf.size(label)]):
            return tf.identity(index)

    indices = tf.data.Dataset.from_tensor_slices((tf.range(len(pairs)), images, labels))
    indices = indices.map(decodes, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    good = {int(i) for i in indices.as_numpy_iterator()}
    bad = [i for i in range(len(pairs)) if i not in good]
    if not bad:
        return None
    image_path, label_path = pairs[bad[0]]
    for path, decode in ((image_path, _decode_image), (label_path, _decode_label)):
        try:
            decode(tf.constant(path))
        except tf.errors.OpError as error:
            return path, one_line(error)
    return label_path, "rejected with its image by the decode checks"
