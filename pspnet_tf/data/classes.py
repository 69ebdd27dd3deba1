"""Class names, palettes and label mappings of the datasets PSPNet is trained on.

Facts, not code: names in each dataset's own order (index = train id), colours
as ``[r, g, b]`` lists.
"""

from __future__ import annotations

import os

IGNORE_LABEL = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# Cityscapes gtFine labelIds -> the 19 train ids (every other id is ignored).
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# ADE20K SceneParsing (ADEChallengeData2016): annotation value k (1..150) is
# train id k - 1; value 0 ("other") is ignored.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


def bit_palette(num_colours=256):
    """The PASCAL VOC colour map: class index bits spread over the r, g, b channels.

    Colour ``k`` takes bit ``3j + c`` of ``k`` into bit ``7 - j`` of channel ``c``.
    VOC's palette PNGs use it, and it gives any number of distinct colours.
    """
    palette = []
    for k in range(num_colours):
        rgb, value = [0, 0, 0], k
        for j in range(8):
            for c in range(3):
                rgb[c] |= ((value >> c) & 1) << (7 - j)
            value >>= 3
        palette.append(tuple(rgb))
    return tuple(palette)


VOC_PALETTE = bit_palette(len(VOC_CLASSES))
# ADE20K publishes no palette of its own in the challenge data; use the bit map.
ADE20K_PALETTE = bit_palette(len(ADE20K_CLASSES) + 1)[1:]

DATASETS = {
    "voc": {"classes": VOC_CLASSES, "palette": VOC_PALETTE},
    "cityscapes": {"classes": CITYSCAPES_CLASSES, "palette": CITYSCAPES_PALETTE},
    "ade20k": {"classes": ADE20K_CLASSES, "palette": ADE20K_PALETTE},
}


def default_palette(num_classes):
    """A palette for ``num_classes`` classes: VOC's colours (index 0 black) extended."""
    return bit_palette(num_classes)


def read_class_names(path):
    """Reads custom class names from a text file: one name per line, in class order.

    Blank lines and lines starting with ``#`` are skipped; surrounding spaces removed.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except OSError as error:
        raise ValueError(f"class names file {path!r}: {error.strerror}") from error
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise ValueError(f"class names file {path!r} holds no names")
    return names


def resolve_classes(num_classes, class_names=None, palette=None, *, model=None, dataset=None):
    """Class names and colours, each from the first source that has them.

    The order: the argument (a list, a names file, or a dataset name of :data:`DATASETS`),
    the model's metadata (``model``: ``(names, palette)`` as the model stores them), the
    named ``dataset`` if its class count matches (e.g. not for a subset), else
    ``class_<k>`` and :func:`default_palette`. Every caller (training, evaluation,
    prediction, the command line) resolves them here.

    Args:
        num_classes: int.
        class_names: list of str, a path to a names file (one per line), a dataset name
            or None.
        palette: list of ``[r, g, b]``, a dataset name or None.
        model: ``(class_names, palette)`` from a model's metadata, or None.
        dataset: str or None. A layout or dataset name (``"voc"``, ...): a fallback.

    Returns:
        ``(names, palette, known)``: ``num_classes`` str, a ``(num_classes, 3)`` list of
        ``[r, g, b]`` ints, and whether the names came from a source (False for
        ``class_<k>``).

    Raises:
        ValueError: a source with another number of names, too few colours, or an
            unknown dataset name.
    """
    stored_names, stored_palette = model or (None, None)
    fallback = DATASETS.get(dataset, {})
    if fallback and len(fallback["classes"]) != num_classes:
        fallback = {}
    names = _names(class_names) or stored_names or fallback.get("classes")
    known = names is not None
    names = list(names) if known else [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for {num_classes} classes")
    if isinstance(palette, str):
        if palette not in DATASETS:
            raise ValueError(f"unknown palette {palette!r}; known: {sorted(DATASETS)}")
        palette = DATASETS[palette]["palette"]
    colours = palette or stored_palette or fallback.get("palette") or default_palette(num_classes)
    colours = [[int(v) for v in colour] for colour in colours]
    if len(colours) < num_classes or any(len(c) != 3 for c in colours):
        raise ValueError(f"palette has {len(colours)} colours for {num_classes} classes")
    return [str(name) for name in names], colours[:num_classes], known


def _names(class_names):
    if isinstance(class_names, (str, os.PathLike)):
        if str(class_names) in DATASETS:
            return DATASETS[str(class_names)]["classes"]
        return read_class_names(class_names)
    return class_names
