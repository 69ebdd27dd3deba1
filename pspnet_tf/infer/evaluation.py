"""Evaluation as the PSPNet paper measures it: mIoU, accuracies, per-class IoU, reports.

:func:`evaluate` runs a model over a dataset in one of the modes of
:mod:`pspnet_tf.infer.predictor` (``single``, ``sliding``, ``multiscale``), always
scoring at the label's own resolution, and returns a report dict;
:func:`format_report` prints it as a table, :func:`write_json_report` saves it,
and :func:`plot_confusion_matrix` draws its confusion matrix as a PNG.
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from pspnet_tf.data import classes
from pspnet_tf.files import PNG, OutputKind, atomic_path, write_json
from pspnet_tf.infer.modes import MODES, SCALES, predict_scores, resize
from pspnet_tf.infer.predictor import as_predictor
from pspnet_tf.metrics import confusion_matrix, scores_from_confusion

__all__ = [
    "BASE_SIZES",
    "MODES",
    "SCALES",
    "evaluate",
    "format_report",
    "plot_confusion_matrix",
    "write_json_report",
    "compare",
    "format_comparison",
]

# Long side at scale 1.0 for multi-scale testing, per dataset (the paper's settings).
BASE_SIZES = {"voc": 512, "ade20k": 512, "cityscapes": 2048}


def evaluate(
    model,
    dataset,
    num_classes=None,
    mode="single",
    crop_size=None,
    stride=None,
    base_size=None,
    scales=SCALES,
    flip=True,
    class_names=None,
    ignore_label=classes.IGNORE_LABEL,
    max_images=None,
    verbose=1,
    precision=None,
):
    """Evaluates a segmentation model on a dataset: mIoU, accuracies, confusion matrix.

    Args:
        model: a Keras segmentation model (e.g. a PSPNet, any build size) or a
            :class:`Predictor`.
        dataset: iterable of ``(images, labels)`` batches: images ``(B, H, W, 3)``
            RGB 0-255, labels ``(B, H, W)`` int with ``ignore_label`` for
            unlabelled pixels (e.g. ``pspnet_tf.data.pipeline.load_dataset(..., training=False)``).
        num_classes: int or None (the model's output channels).
        mode: ``"single"``, ``"sliding"`` or ``"multiscale"``; see the module docstring.
        crop_size, stride, base_size, scales, flip: see :func:`predict_scores`.
        class_names: list, names file, dataset name or None (the model's own).
        ignore_label: int. Label value left out of the scores. Defaults to 255.
        max_images: int or None. Stop after this many images.
        verbose: int. 1 shows a Keras progress bar, 0 is silent.
        precision: None (the model's own), ``"float32"``, ``"bfloat16"``, ``"float16"``
            or ``"mixed"``: the compute dtype, see :class:`pspnet_tf.infer.predictor.Predictor`.

    Returns:
        dict with ``miou``, ``pixel_accuracy``, ``mean_class_accuracy`` (floats
        in [0, 1]), ``per_class_iou``, ``per_class_accuracy`` (lists, NaN for
        classes absent from labels and predictions), ``class_names``,
        ``confusion_matrix`` (rows: truth, columns: prediction), ``num_images``,
        ``mode`` and the ``settings`` used.
    """
    predictor = as_predictor(model, precision=precision)
    num_classes = int(num_classes or predictor.num_classes)
    if num_classes != predictor.num_classes:
        raise ValueError(f"num_classes={num_classes} but the model has {predictor.num_classes}")
    stored = (predictor.class_names, predictor.palette)
    names = classes.resolve_classes(num_classes, class_names, model=stored)[0]
    settings = {"crop_size": crop_size, "stride": stride, "base_size": base_size,
                "precision": predictor.precision}  # fmt: skip
    if mode == "multiscale":
        settings.update(scales=list(scales), flip=bool(flip))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    progress = keras.utils.Progbar(_length(dataset), verbose=verbose, unit_name="image")
    count = 0
    for image, label in _examples(dataset):
        if max_images is not None and count >= max_images:
            break
        scores = predict_scores(predictor, image, mode, crop_size, stride, base_size, scales, flip)
        confusion += _label_confusion(scores, label, num_classes, ignore_label, count)
        count += 1
        progress.update(count)
    report = scores_from_confusion(confusion)
    report.update(
        class_names=names,
        confusion_matrix=confusion.tolist(),
        num_classes=num_classes,
        num_images=count,
        mode=mode,
        settings=settings,
    )
    return report


def compare(
    predictors, dataset, num_classes=None, ignore_label=classes.IGNORE_LABEL, max_images=None
):
    """Scores several versions of one model on the same images, single-scale.

    What exporting or quantising costs, where a user sees it: each version's mIoU and pixel
    accuracy, the fraction of pixels whose label equals the first version's, and its
    latency per image (the median; the first image, which builds graphs, is not timed).

    Args:
        predictors: dict ``{name: Keras model or Predictor}`` (e.g. a
            :class:`pspnet_tf.infer.litert.LiteRTPredictor`); the first is the reference.
        dataset: as for :func:`evaluate`.
        num_classes: int or None (the first version's).
        ignore_label: int. Defaults to 255.
        max_images: int or None.

    Returns:
        list of dicts (one per version, in order): ``name``, ``miou``, ``pixel_accuracy``,
        ``agreement``, ``ms_per_image``, ``num_images``.
    """
    versions = {name: as_predictor(model) for name, model in predictors.items()}
    num_classes = int(num_classes or next(iter(versions.values())).num_classes)
    confusion = {name: np.zeros((num_classes, num_classes), np.int64) for name in versions}
    equal, times, pixels, count = dict.fromkeys(versions, 0), {n: [] for n in versions}, 0, 0
    for image, label in _examples(dataset):
        if max_images is not None and count >= max_images:
            break
        reference = None
        for name, predictor in versions.items():
            start = time.perf_counter()
            scores = predict_scores(predictor, image, "single")
            if count:
                times[name].append(time.perf_counter() - start)
            confusion[name] += _label_confusion(scores, label, num_classes, ignore_label, count)
            labels = np.argmax(scores, axis=-1)
            reference = labels if reference is None else reference
            equal[name] += int((labels == reference).sum())
        pixels, count = pixels + reference.size, count + 1
    rows = []
    for name in versions:
        scores = scores_from_confusion(confusion[name])
        rows.append({
            "name": name, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "agreement": equal[name] / max(pixels, 1), "num_images": count,
            "ms_per_image": 1000 * float(np.median(times[name])) if times[name] else None,
        })  # fmt: skip
    return rows


def format_comparison(rows, sizes=None):
    """:func:`compare`'s rows as a table; ``sizes``: ``{name: bytes}`` of each file."""
    sizes = sizes or {}
    lines = [f"{'model':<22} {'mIoU %':>7} {'pixel acc %':>11} {'same labels %':>13} "
             f"{'ms/image':>8} {'size MB':>7}"]  # fmt: skip
    for row in rows:
        ms = f"{row['ms_per_image']:.0f}" if row["ms_per_image"] is not None else "-"
        size = f"{sizes[row['name']] / 2**20:.1f}" if row["name"] in sizes else "-"
        lines.append(
            f"{row['name']:<22} {100 * row['miou']:>7.2f} {100 * row['pixel_accuracy']:>11.2f} "
            f"{100 * row['agreement']:>13.2f} {ms:>8} {size:>7}"
        )
    return "\n".join(lines)


def _length(dataset):
    if isinstance(dataset, tf.data.Dataset):
        n = int(dataset.cardinality())
        return n if n >= 0 else None  # batches; validation batches hold one image
    return len(dataset) if hasattr(dataset, "__len__") else None


def _examples(dataset):
    """Yields ``(image (H, W, 3), label (H, W))`` numpy pairs from a batched dataset."""
    for images, labels in dataset:
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim == 3:  # an unbatched example
            images, labels = images[None], labels[None]
        for image, label in zip(images, labels, strict=True):
            yield image, (label[..., 0] if label.ndim == 3 else label)


def _label_confusion(scores, label, num_classes, ignore_label, index):
    """Confusion counts of one image, scored at the label's own resolution."""
    if scores.shape[:2] != label.shape:
        scores = resize(scores, label.shape)
    bad = (label != ignore_label) & ((label < 0) | (label >= num_classes))
    if bad.any():
        raise ValueError(
            f"image {index}: label values {sorted(np.unique(label[bad]).tolist())[:10]} are "
            f"outside [0, {num_classes}) and not the ignore label {ignore_label}"
        )
    prediction = np.argmax(scores, axis=-1)
    return confusion_matrix(label, prediction, num_classes, ignore_label).numpy()


def format_report(report):
    """A plain-text summary of an :func:`evaluate` report: overall scores and a per-class table."""
    width = max([len("class"), *(len(n) for n in report["class_names"])])
    lines = [
        f"{report['mode']} evaluation on {report['num_images']} images",
        f"mIoU {100 * report['miou']:.2f}%   pixel accuracy {100 * report['pixel_accuracy']:.2f}%"
        f"   mean class accuracy {100 * report['mean_class_accuracy']:.2f}%",
        f"{'class':<{width}}  {'IoU %':>7}  {'acc %':>7}",
    ]
    for name, iou, acc in zip(
        report["class_names"], report["per_class_iou"], report["per_class_accuracy"], strict=True
    ):
        lines.append(f"{name:<{width}}  {_percent(iou):>7}  {_percent(acc):>7}")
    return "\n".join(lines)


def _percent(value):
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.2f}"


def _is_json_report(path):
    try:
        with open(path) as file:
            report = json.load(file)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(report, dict) and "miou" in report


# An existing JSON file is replaced only if it is a report (it has "miou").
JSON_REPORT = OutputKind("an evaluation report (JSON with 'miou')", _is_json_report)


def write_json_report(report, path):
    """Writes an :func:`evaluate` report as JSON (NaN becomes null), atomically.

    An existing ``path`` is replaced only if it is a previous report; anything else
    raises :class:`pspnet_tf.files.OutputExistsError`.
    """

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return write_json(path, clean(report), kind=JSON_REPORT)


def plot_confusion_matrix(report, path, class_names=None, normalize=True, title=None):
    """Draws a confusion matrix as a PNG (matplotlib), written atomically.

    Args:
        report: an :func:`evaluate` report, or a ``(C, C)`` array of counts
            (rows: truth, columns: prediction).
        path: str. Output PNG file.
        class_names: list of str or None (the report's names, else indices).
        normalize: bool. Colour each row by the fraction of its true class
            (so rare classes are as visible as common ones); else raw counts.
        title: str or None. Defaults to the report's mode and mIoU.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    is_report = isinstance(report, dict)
    confusion = np.asarray(report["confusion_matrix"] if is_report else report, np.float64)
    count = len(confusion)
    names = class_names or (report.get("class_names") if is_report else None)
    names = names or [str(k) for k in range(count)]
    shown = confusion / np.maximum(confusion.sum(1, keepdims=True), 1) if normalize else confusion
    side = min(3.0 + 0.3 * count, 40.0)
    figure = Figure(figsize=(side + 1.5, side), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04).set_label(
        "fraction of the true class" if normalize else "pixels"
    )
    if count <= 60:  # beyond that, names are unreadable at any size
        axes.set_xticks(range(count), names, rotation=90, fontsize=8)
        axes.set_yticks(range(count), names, fontsize=8)
    if count <= 12:
        for (t, p), value in np.ndenumerate(shown):
            colour = "white" if value > 0.5 * shown.max() else "black"
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            axes.text(p, t, text, ha="center", va="center", fontsize=7, color=colour)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if title is None and is_report:
        title = f"{report['mode']}: mIoU {100 * report['miou']:.2f}%"
    axes.set_title(title or "confusion matrix")
    figure.tight_layout()
    with atomic_path(path, PNG) as temporary:
        figure.savefig(temporary, format="png")
    return os.fspath(path)
