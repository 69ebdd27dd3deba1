"""Checks of a dataset's files, as the training pipeline will read them: every problem of
every image/label pair (missing or unreadable files, a format the pipeline does not decode,
sizes that differ, label values out of range), each naming the file.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from pspnet_tf.data.classes import IGNORE_LABEL
from pspnet_tf.data.images import REASONS, UnreadableImage, read_rgb
from pspnet_tf.data.layouts import LAYOUTS, label_lut, list_pairs
from pspnet_tf.data.pipeline import IMAGE_MAGIC, read_label


def _check_pair(image_path, label_path, lut, num_classes):
    """Every problem of one pair, as messages naming the file."""
    problems = [f"{p}: file missing" for p in (image_path, label_path) if not os.path.isfile(p)]
    if problems:
        return problems
    try:
        image_size = read_rgb(image_path, exif_transpose=False).shape[:2]
    except UnreadableImage as error:
        problems.append(f"{image_path}: unreadable or truncated image ({error.reason})")
        image_size = None
    with open(image_path, "rb") as file:  # what the tf.data pipeline decodes, by content
        head = file.read(8)
    if image_size is not None and not head.startswith(IMAGE_MAGIC):
        problems.append(
            f"{image_path}: not a JPEG, PNG, BMP or GIF file (training decodes only those; "
            "convert it)"
        )
    try:
        with open(label_path, "rb") as file:
            label = lut[read_label(file.read(), label_path)]
    except ValueError as error:
        return [*problems, str(error)]
    if image_size is not None and label.shape != image_size:
        problems.append(
            f"{label_path}: label size {label.shape[0]}x{label.shape[1]} differs from image "
            f"size {image_size[0]}x{image_size[1]} of {image_path}"
        )
    bad = label[(label != IGNORE_LABEL) & (label >= num_classes)]
    if bad.size:
        problems.append(
            f"{label_path}: {bad.size} pixels with label values >= num_classes ({num_classes}): "
            f"{sorted(set(bad.tolist()))[:10]}; only 255 (ignore) may exceed it"
        )
    return problems


def find_bad_pairs(
    root, layout, split, num_classes, *, list_file=None, label_map=None, workers=None
) -> dict:
    """Scans one split and returns its bad pairs with their problems.

    Args:
        root, layout, split, num_classes, list_file, label_map: as in :func:`load_dataset`.
        workers: int, threads reading files; defaults to the number of CPUs.

    Returns:
        dict ``(image path, label path) -> list of str`` problems (each naming its
        file), in split order; empty if every pair is good.

    Raises:
        FileNotFoundError, ValueError: a missing or bad split file, an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    pairs = list_pairs(root, layout, split, list_file=list_file)
    results = check_pairs(pairs, layout, num_classes, label_map=label_map, workers=workers)
    return {tuple(pair): found for pair, found in zip(pairs, results, strict=True) if found}


def check_dataset(
    root, layout, split, num_classes, *, list_file=None, label_map=None, workers=None
) -> list[str]:
    """Scans one split and returns every problem found, each message naming its file.

    Checks what :func:`load_dataset` checks (missing split file, image or label; unreadable,
    truncated or damaged image or label; RGB colour label; label size differing from the
    image; label values >= ``num_classes`` other than 255), but reads every file with
    Pillow (images through :func:`pspnet_tf.data.images.read_rgb`) and carries on after a
    problem.

    Args:
        root, layout, split, num_classes, list_file, label_map, workers: as in
            :func:`find_bad_pairs`.

    Returns:
        list of str, empty if the split is clean.
    """
    try:
        bad = find_bad_pairs(
            root, layout, split, num_classes, list_file=list_file, label_map=label_map,
            workers=workers,
        )  # fmt: skip
    except (OSError, ValueError) as error:
        return [str(error)]
    return [problem for found in bad.values() for problem in found]


def check_pairs(pairs, layout, num_classes, *, label_map=None, workers=None) -> list[list[str]]:
    """The problems of each ``(image_path, label_path)`` pair, as :func:`check_dataset` finds.

    Returns:
        list (one entry per pair, in order) of lists of str, empty for a good pair.
    """
    lut = label_lut(layout, label_map)
    check = functools.partial(_check_pair, lut=lut, num_classes=int(num_classes))
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda pair: check(*pair), pairs))


def short_reason(problems):
    """A short reason from :func:`check_pairs`' messages: ``truncated``, ``bad label``, ..."""
    text = " ".join(problems)
    for reason in REASONS:
        if f"image ({reason})" in text:
            return reason
    if "not a JPEG, PNG, BMP or GIF" in text:
        return "a format training does not read"
    return "file missing" if "file missing" in text else "bad label"
