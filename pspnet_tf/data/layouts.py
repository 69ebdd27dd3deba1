"""Dataset folder layouts: which files make up a split, and how raw label values map to ids.

Layouts (``root`` is the dataset folder):

- ``"voc"``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs; their
  palette *indices* are the labels) and ``ImageSets/Segmentation/<split>.txt``. Splits
  ending in ``_aug`` (``train_aug``) read the SBD-augmented ``SegmentationClassAug``
  (grayscale PNGs), which is also used when ``SegmentationClass`` does not exist. A split
  file line is an id or an ``image label`` path pair (as in the common ``train_aug.txt``).
  ``root`` may also be the folder holding ``VOC2012`` or ``VOCdevkit/VOC2012``.
- ``"cityscapes"``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``, mapped to the 19 train ids (others 255).
- ``"ade20k"``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``
  (split ``train``/``val``; ``root`` may be ``ADEChallengeData2016`` itself); annotation 0
  becomes 255 and 1..150 become 0..149.
- ``"list"``: a text file of ``image_path label_path`` lines, relative to ``root``
  (``list_file``, or ``<root>/<split>.txt``, or ``<root>/list/<split>.txt``), as in the
  official PyTorch code's lists.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from pspnet_tf.data.classes import CITYSCAPES_LABEL_TO_TRAIN_ID, IGNORE_LABEL
from pspnet_tf.options import LAYOUTS

ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation"}
ADE20K_SPLITS["validation"] = "validation"


def _read_lines(path, what):
    """``(line number, fields)`` of the non-empty, non-comment lines of a split file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    with open(path) as file:
        lines = [(n, line.split()) for n, line in enumerate(file, 1)]
    return [(n, fields) for n, fields in lines if fields and not fields[0].startswith("#")]


def _under(root, path):
    """A path from a split file: absolute if it exists as such, else relative to ``root``.

    The common ``train_aug.txt`` writes root-relative paths with a leading slash.
    """
    if os.path.isabs(path) and os.path.exists(path):
        return path
    return os.path.join(root, path.lstrip("/"))


def _voc_root(root):
    for candidate in (
        root,
        os.path.join(root, "VOC2012"),
        os.path.join(root, "VOCdevkit", "VOC2012"),
    ):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    return root


def _voc_pairs(root, split, list_file):
    root = _voc_root(root)
    label_dir = "SegmentationClass"
    has_aug = os.path.isdir(os.path.join(root, "SegmentationClassAug"))
    if has_aug and (split.endswith("_aug") or not os.path.isdir(os.path.join(root, label_dir))):
        label_dir = "SegmentationClassAug"
    default = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    ids_file = _under(root, list_file) if list_file else default
    pairs = []
    for number, fields in _read_lines(ids_file, f"VOC split file for {split!r}"):
        if len(fields) == 1:
            image = os.path.join(root, "JPEGImages", f"{fields[0]}.jpg")
            pairs.append((image, os.path.join(root, label_dir, f"{fields[0]}.png")))
        elif len(fields) == 2:
            pairs.append((_under(root, fields[0]), _under(root, fields[1])))
        else:
            line = " ".join(fields)
            raise ValueError(f"{ids_file}:{number}: expected an id or 'image label', got {line!r}")
    return pairs, ids_file


def _list_pairs(root, split, list_file):
    candidates = [os.path.join(root, f"{split}.txt"), os.path.join(root, "list", f"{split}.txt")]
    path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    path = _under(root, list_file) if list_file else path
    pairs = []
    for number, fields in _read_lines(path, f"list file for split {split!r}"):
        if len(fields) != 2:
            line = " ".join(fields)
            raise ValueError(f"{path}:{number}: expected 'image_path label_path', got {line!r}")
        pairs.append((_under(root, fields[0]), _under(root, fields[1])))
    return pairs, path


def _globbed_pairs(image_dir, pattern, label_of):
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    images = sorted(glob.glob(os.path.join(image_dir, pattern)))
    return [(image, label_of(image)) for image in images], os.path.join(image_dir, pattern)


def _cityscapes_pairs(root, split):
    image_dir = os.path.join(root, "leftImg8bit", split)

    def label_of(image):
        city, name = os.path.split(os.path.relpath(image, image_dir))
        name = name[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png"
        return os.path.join(root, "gtFine", split, city, name)

    return _globbed_pairs(image_dir, os.path.join("*", "*_leftImg8bit.png"), label_of)


def _ade20k_pairs(root, split):
    if split not in ADE20K_SPLITS:
        raise ValueError(f"ADE20K split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
    if not os.path.isdir(os.path.join(root, "images")):
        root = os.path.join(root, "ADEChallengeData2016")
    folder = ADE20K_SPLITS[split]

    def label_of(image):
        name = os.path.splitext(os.path.basename(image))[0] + ".png"
        return os.path.join(root, "annotations", folder, name)

    return _globbed_pairs(os.path.join(root, "images", folder), "*.jpg", label_of)


def list_pairs(root, layout, split, *, list_file=None) -> list[tuple[str, str]]:
    """The ``(image_path, label_path)`` pairs of one split, in the order the dataset yields them.

    Args:
        root: str or path, the dataset folder.
        layout: ``"voc"``, ``"cityscapes"``, ``"ade20k"`` or ``"list"``.
        split: str, e.g. ``"train"``, ``"val"``, ``"train_aug"``.
        list_file: optional split file (VOC ids or pairs, or a ``list`` pair file), absolute
            or relative to ``root``.

    Returns:
        list of ``(image_path, label_path)`` str pairs. Files are not opened; they may be
        missing (see :func:`raise_if_missing`).

    Raises:
        FileNotFoundError: the split file or image folder is missing.
        ValueError: unknown layout or split, a malformed line, or an empty split.
    """
    root = os.fspath(root)
    if layout == "voc":
        pairs, source = _voc_pairs(root, split, list_file)
    elif layout == "list":
        pairs, source = _list_pairs(root, split, list_file)
    elif layout == "cityscapes":
        pairs, source = _cityscapes_pairs(root, split)
    elif layout == "ade20k":
        pairs, source = _ade20k_pairs(root, split)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not pairs:
        raise ValueError(f"{source}: no images in split {split!r}")
    return pairs


def raise_if_missing(pairs, limit=10):
    """Raises FileNotFoundError naming the missing files of ``pairs`` (the first ``limit``)."""
    missing = [path for pair in pairs for path in pair if not os.path.isfile(path)]
    if missing:
        shown = "\n  ".join(missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        raise FileNotFoundError(f"{len(missing)} missing files (image or label):\n  {shown}{more}")


def label_lut(layout, label_map=None) -> np.ndarray:
    """The lookup table from raw label values to train ids.

    Args:
        layout: a layout name. ``"cityscapes"`` maps labelIds to the 19 train ids (others
            255), ``"ade20k"`` maps 0 to 255 and k to k - 1 (255 stays 255); ``"voc"`` and
            ``"list"`` keep values.
        label_map: dict of raw value -> train id replacing the layout's mapping; values it
            does not list become 255.

    Returns:
        uint8 ``(256,)`` array: ``lut[raw]`` is the train id.
    """
    if label_map is None and layout in ("voc", "list"):
        return np.arange(256, dtype=np.uint8)
    if label_map is None and layout == "cityscapes":
        label_map = CITYSCAPES_LABEL_TO_TRAIN_ID
    elif label_map is None:  # ade20k: "other" (0) is ignored
        label_map = {value: value - 1 for value in range(1, IGNORE_LABEL)}
    lut = np.full(256, IGNORE_LABEL, np.uint8)
    for raw, train_id in label_map.items():
        lut[int(raw)] = int(train_id)
    return lut
