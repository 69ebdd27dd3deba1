"""A generated segmentation dataset in the PASCAL VOC layout: nothing to download.

Each scene is a textured background with several shapes (disc, square, triangle, ring,
cross) that overlap and vary in size, rotation, aspect, colour and texture. From difficulty
0.5 up, colours and textures are drawn from one distribution for every class, background
included, so a pixel's colour says nothing about its class: the outline around it does (the
middle of a disc and the hole of a ring look alike; only the surroundings tell them apart).
Thin background "scribbles" in object colours make "colourful means object" wrong too. A
2-pixel band along every class boundary is labelled 255 (ignore), as in VOC.

Below difficulty 0.5 colour becomes a partial cue (:func:`colour_cue`): each shape class has
a hue of its own, mixed with a random colour (fully at difficulty 0, fading out by 0.5).
Against a background of random colour the hue alone is weak (a per-colour vote scores about
0.2 mIoU even at difficulty 0), but with it a network learns in minutes on a CPU what the
outlines alone teach only after thousands of steps.

``difficulty`` (0-1) also sets how many and how small the shapes are, how strongly shapes
and background are textured (inner edges compete with the outlines), how close object
colours may come to the background's, how many scribbles and how much noise.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image

from pspnet_tf.data.classes import IGNORE_LABEL, default_palette
from pspnet_tf.files import atomic_path, folder_kind, write_json

DEMO_CLASSES = ("background", "disc", "square", "triangle", "ring", "cross")
DEFAULT_DIFFICULTY = 0.5
# Bump when the generator changes, so an existing folder is not mistaken for current output.
GENERATOR_VERSION = 2
SPLIT_CODES = {"train": 0, "val": 1}
SHAPE_SIZES = ("large", "small")
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertex positions give smooth outlines


# Only an empty folder or an earlier demo dataset (recognised by demo.json) is replaced.
DEMO_DATASET = folder_kind("a demo dataset (it has no demo.json)", "demo.json")


def _texture(rng, yy, xx, contrast):
    """A random (H, W) float32 pattern in [0, 1]: flat, stripes, checks or blobs."""
    kind = rng.integers(4)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        pattern = np.full(yy.shape, 0.5, np.float32)
    elif kind == 1:
        pattern = 0.5 + 0.5 * np.sin(u * (2 * np.pi / rng.uniform(6, 30)))
    elif kind == 2:
        v = yy * np.cos(angle) - xx * np.sin(angle)
        cell = rng.uniform(6, 24)
        pattern = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    else:
        height, width = yy.shape
        step = rng.uniform(12, 40)
        grid = rng.random((max(2, int(height / step)), max(2, int(width / step))))
        pattern = cv2.resize(
            grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC
        )
    return (0.5 + (pattern - 0.5) * contrast).astype(np.float32)


def _paint(rng, yy, xx, colour, contrast):
    """An (H, W, 3) float32 textured surface around a base RGB ``colour``."""
    colour = colour.astype(np.float32)
    second = np.clip(colour + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
    pattern = _texture(rng, yy, xx, contrast)[..., None]
    return colour + (second - colour) * pattern


def _outline(kind, radius, angle, aspect, hole):
    """Polygons ``[(points (N, 2), value)]`` of a shape centred at 0; value 0 cuts a hole.

    ``hole`` is the ring's inner radius as a fraction of its outer one.
    """
    if kind in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = [np.stack([np.cos(t), np.sin(t)], 1)]
    elif kind == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        points = [np.stack([np.cos(t), np.sin(t)], 1)]
    elif kind == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        points = [1.3 * np.stack([np.cos(t), np.sin(t)], 1)]  # about the area of the others
    else:  # cross: a plus sign with arms 0.6 radius wide
        w = 0.3
        half = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1)]
        points = [np.array(half + [(-x, -y) for x, y in half], np.float64)]
    values = [1]
    if kind == "ring":
        points.append(points[0] * hole)
        values.append(0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    stretch = np.array([aspect, 1 / aspect])
    return [((p * stretch * radius) @ rotation.T, v) for p, v in zip(points, values, strict=True)]


def _shape_mask(outline, centre, shape):
    """Fills ``outline`` at ``centre``: ``(bool mask (H, W), window)``.

    ``window`` is the pair of slices of the shape's bounding box (plus a 2-pixel margin),
    where all drawing for the shape happens.
    """
    mask = np.zeros(shape, np.uint8)
    for points, value in outline:
        vertices = np.round((points + centre) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [vertices], value, cv2.LINE_8, shift=_SHIFT)
    low = np.maximum(np.floor(outline[0][0].min(0) + centre) - 2, 0).astype(int)
    high = np.ceil(outline[0][0].max(0) + centre + 3).astype(int)
    return mask.astype(bool), (slice(low[1], high[1]), slice(low[0], high[0]))


def _shape_count(rng, d, shapes):
    """How many shapes a scene gets: harder scenes get more."""
    if shapes == "small":
        return int(rng.integers(5 + round(2 * d), 9 + round(4 * d)))
    return int(rng.integers(1 + round(2 * d), 4 + round(3 * d)))


def _shape_place(rng, d, shapes, frame):
    """Radius (pixels) and centre ``(x, y)`` of one shape in a ``frame = (h, w)`` scene.

    ``"large"``: 0.16-0.3 of the short side (0.08-0.3 at difficulty 1), anywhere (often
    cut off by the frame). ``"small"``: 0.06-0.13 (0.04-0.09), kept inside the frame on
    easy scenes (a cut-off shape can look like another one).
    """
    frame = np.array(frame[::-1], np.float64)  # (w, h), as centres are (x, y)
    if shapes == "large":
        return min(frame) * rng.uniform(0.16 - 0.08 * d, 0.3), rng.uniform(0, 1, 2) * frame
    radius = min(frame) * rng.uniform(0.06 - 0.02 * d, 0.13 - 0.04 * d)
    margin = radius * (1 - d)
    return radius, margin + rng.uniform(0, 1, 2) * np.maximum(frame - 2 * margin, 1)


def _add_shape(rng, image, label, grid, d, background_colour, shapes):
    """Draws one random shape into ``image`` (float32) and ``label`` in place."""
    kind = int(rng.integers(1, len(DEMO_CLASSES)))
    radius, centre = _shape_place(rng, d, shapes, label.shape)
    angle, aspect, hole = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15), rng.uniform(0.45, 0.6)
    outline = _outline(DEMO_CLASSES[kind], radius, angle, aspect, hole)
    mask, window = _shape_mask(outline, centre, label.shape)
    colour = _object_colour(rng, background_colour, 140 * (1 - d), kind, colour_cue(d))
    yy, xx = grid[0][window], grid[1][window]
    # Inner texture edges compete with the outline: faint on easy scenes, strong on hard ones.
    surface = _paint(rng, yy, xx, colour, contrast=rng.uniform(0.0, 0.2 + 0.6 * d))
    # Soft edges for the image (as a camera would see them), hard ones for the label.
    alpha = cv2.GaussianBlur(mask[window].astype(np.float32), (3, 3), 0.7)[..., None]
    image[window] = image[window] * (1 - alpha) + surface * alpha
    label[mask] = kind


def colour_cue(difficulty):
    """How much an object's colour tells its class: 1 at difficulty 0, none from 0.5 on."""
    return max(0.0, 1.0 - 2.0 * float(difficulty))


def _class_colours(rng, kind, count):
    """``count`` random RGB colours of class ``kind``'s own hue (hues evenly spaced)."""
    hue = (kind - 1) / (len(DEMO_CLASSES) - 1) * 180 + rng.uniform(-8, 8, count)  # OpenCV: 0-180
    saturation, value = rng.uniform(150, 255, count), rng.uniform(120, 255, count)
    hsv = np.stack([hue % 180, saturation, value], -1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float64)


def _object_colour(rng, background_mean, min_distance, kind, cue):
    """A colour at least ``min_distance`` from the background's, if one of 16 is.

    The candidates mix a colour of the class's own hue (weight ``cue``) with a random one.
    """
    candidates = rng.uniform(0, 255, (16, 3))
    if cue > 0:
        candidates = cue * _class_colours(rng, kind, 16) + (1 - cue) * candidates
    distance = np.linalg.norm(candidates - background_mean, axis=1)
    far = distance >= min_distance
    return candidates[np.argmax(far) if far.any() else np.argmax(distance)]


def _scribbles(rng, image, count, colour_of):
    """Draws ``count`` thin random polylines (background class) onto ``image`` in place."""
    height, width = image.shape[:2]
    for _ in range(count):
        points = rng.uniform(0, 1, (int(rng.integers(2, 5)), 2)) * (width, height)
        colour = tuple(float(c) for c in colour_of())
        vertices = np.round(points).astype(np.int32)
        cv2.polylines(image, [vertices], False, colour, int(rng.integers(2, 5)), cv2.LINE_AA)


def render_scene(rng, size, difficulty=DEFAULT_DIFFICULTY, shapes="large"):
    """One synthetic scene.

    Args:
        rng: ``numpy.random.Generator``.
        size: ``(height, width)`` in pixels.
        difficulty: float in [0, 1].
        shapes: ``"large"`` (1-3 shapes of 0.16-0.3 of the short side at difficulty 0, up
            to 7 at difficulty 1) or ``"small"`` (5-8 of 0.06-0.13, up to 12): many small
            whole shapes teach a network from scratch fastest. See :data:`SHAPE_SIZES`.

    Returns:
        ``(image uint8 (H, W, 3) RGB, label uint8 (H, W))``; label values index
        :data:`DEMO_CLASSES`, 255 on the boundary bands.
    """
    if shapes not in SHAPE_SIZES:
        raise ValueError(f"shapes must be one of {SHAPE_SIZES}, got {shapes!r}")
    d = float(np.clip(difficulty, 0.0, 1.0))
    height, width = size
    grid = np.mgrid[0:height, 0:width].astype(np.float32)
    background_colour = rng.uniform(0, 255, 3)
    image = _paint(rng, grid[0], grid[1], background_colour, contrast=0.15 + 0.65 * d)
    label = np.zeros((height, width), np.uint8)
    _scribbles(rng, image, int(rng.integers(0, 1 + round(8 * d))), lambda: rng.uniform(0, 255, 3))
    for _ in range(_shape_count(rng, d, shapes)):
        _add_shape(rng, image, label, grid, d, background_colour, shapes)
    square = np.ones((3, 3), np.uint8)
    label[cv2.dilate(label, square) != cv2.erode(label, square)] = IGNORE_LABEL
    image += rng.standard_normal(image.shape, np.float32) * np.float32(3 + 12 * d)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _write_example(folder, name, rng, size, scene, palette):
    image, label = render_scene(rng, size, **scene)
    ok, jpeg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"could not encode {name}.jpg")
    with open(os.path.join(folder, "JPEGImages", f"{name}.jpg"), "wb") as file:
        file.write(jpeg.tobytes())
    png = Image.fromarray(label, mode="L")
    png.putpalette(palette)  # makes it a palette ("P") PNG, as VOC's are
    png.save(os.path.join(folder, "SegmentationClass", f"{name}.png"))


def _generate(folder, counts, size, seed, scene, workers):
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(folder, sub))
    palette = [value for colour in default_palette(256) for value in colour]
    jobs = []
    for split, count in counts.items():
        names = [f"{split}_{i:05d}" for i in range(count)]
        with open(os.path.join(folder, "ImageSets", "Segmentation", f"{split}.txt"), "w") as file:
            file.write("".join(f"{name}\n" for name in names))
        # One generator per image: image i is the same whatever the split sizes are.
        jobs += [(name, (seed, SPLIT_CODES[split], i)) for i, name in enumerate(names)]

    def write(job):
        name, key = job
        rng = np.random.default_rng(key)
        _write_example(folder, name, rng, size, scene, palette)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(write, jobs))


def make_demo_dataset(
    root,
    num_train=400,
    num_val=100,
    size=320,
    seed=0,
    difficulty=DEFAULT_DIFFICULTY,
    shapes="large",
    *,
    workers=None,
) -> str:
    """Writes a synthetic VOC-layout dataset and returns its path.

    The folder holds ``JPEGImages/<split>_<i>.jpg``, ``SegmentationClass/<split>_<i>.png``
    (palette PNGs, VOC colours, classes :data:`DEMO_CLASSES`, 255 on boundaries),
    ``ImageSets/Segmentation/{train,val}.txt`` and ``demo.json`` (the arguments and class
    names). The output depends only on the arguments. If ``root`` already holds the demo
    dataset for the same arguments it is returned as is; another demo dataset there is
    replaced. Files are written to a temporary folder first, which is renamed at the end.

    Args:
        root: str or path of the folder to create.
        num_train: int, training images.
        num_val: int, validation images.
        size: int or ``(height, width)`` of the images, pixels.
        seed: int.
        difficulty: float in [0, 1]; see the module docstring.
        shapes: ``"large"`` or ``"small"``; see :func:`render_scene`.
        workers: threads to render with; defaults to the number of CPUs.

    Returns:
        str, ``root``; use it with ``load_dataset(root, "voc", ...)``.

    Raises:
        FileExistsError: ``root`` exists and is neither empty nor a demo dataset.
    """
    if shapes not in SHAPE_SIZES:
        raise ValueError(f"shapes must be one of {SHAPE_SIZES}, got {shapes!r}")
    root = os.path.abspath(os.fspath(root))
    height, width = (size, size) if isinstance(size, int) else (int(s) for s in size)
    info = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "size": [height, width],
        "seed": int(seed),
        "difficulty": float(difficulty),
        "shapes": shapes,
        "class_names": list(DEMO_CLASSES),
    }
    info_path = os.path.join(root, "demo.json")
    if os.path.isfile(info_path):
        with open(info_path) as file:
            if json.load(file) == info:
                return root
    with atomic_path(root, DEMO_DATASET) as staging:
        counts = {"train": int(num_train), "val": int(num_val)}
        scene = {"difficulty": float(difficulty), "shapes": shapes}
        _generate(staging, counts, (height, width), int(seed), scene, workers)
        write_json(os.path.join(staging, "demo.json"), info, indent=1)
    return root
