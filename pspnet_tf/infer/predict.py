"""Prediction on an image, files, folders or a video, written as label PNGs, masks, overlays.

:func:`predict_image` is the one-call API for a numpy image of any size::

    labels = predict_image(model, image)  # (H, W) int32 class indices

:func:`predict_path` takes one image, a folder or a list of images and folders (with
a progress bar, :func:`predict_files`), or a video (:func:`predict_video`, which the
``pspnet-tf predict`` command calls directly, as it calls :func:`predict_files`).
They write label PNGs (palette PNGs: the index is the class, the palette colours
it), coloured masks and overlays blended on the image, optionally with a legend;
videos are written back as videos. Colours and names come from the arguments, else from the
model's own metadata, else from the VOC-style bit palette and ``class_<k>``.
"""

from __future__ import annotations

import contextlib
import logging
import os

import cv2
import keras
import numpy as np

from pspnet_tf import files
from pspnet_tf.data import classes
from pspnet_tf.data.images import UnreadableImage, read_rgb
from pspnet_tf.files import FOLDER, VIDEO, atomic_path
from pspnet_tf.infer.modes import predict_scores
from pspnet_tf.infer.pictures import (
    IMAGE_KINDS,
    as_rgb,
    image_format,
    render,
    save_image,
    save_label_png,
)
from pspnet_tf.infer.predictor import as_predictor
from pspnet_tf.options import OUTPUTS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg")
# Each output's folder and file extension: labels/NAME.png, masks/NAME.png, overlays/NAME.jpg.
_EXTENSIONS = {"labels": "png", "masks": "png", "overlays": "jpg"}
log = logging.getLogger("pspnet_tf")


def predict_image(model, image, mode="single", **options):
    """Class labels of one image of any size.

    Args:
        model: a Keras segmentation model (e.g. a PSPNet built or loaded at any
            size; RGB 0-255 in, logits out) or a
            :class:`pspnet_tf.infer.predictor.Predictor`. A PSPNet built for a fixed
            size is rebuilt for the image's size on every call: for many images,
            wrap it once with :func:`pspnet_tf.infer.predictor.as_predictor`.
        image: numpy ``(H, W, 3)`` RGB (or grayscale/RGBA) array, values 0-255.
        mode: ``"single"`` (whole image), ``"sliding"`` or ``"multiscale"``.
        **options: ``crop_size``, ``stride``, ``base_size``, ``scales``,
            ``flip``, ``precision``: see :func:`pspnet_tf.infer.modes.predict_scores`.

    Returns:
        ``(H, W)`` int32 class indices.

    Example:
    >>> import numpy as np
    >>> from pspnet_tf import build_pspnet
    >>> model = build_pspnet(3, "mobilenetv2", (None, None, 3), alpha=0.35)
    >>> predict_image(model, np.zeros((50, 70, 3), "uint8")).shape
    (50, 70)
    """
    scores = predict_scores(model, as_rgb(image), mode, **options)
    return np.argmax(scores, axis=-1).astype(np.int32)


def list_images(folder):
    """Image files directly inside ``folder`` (by extension), sorted by name."""
    names = sorted(os.listdir(folder))
    return [
        os.path.join(folder, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
    ]


def _warn_about_other_files(folder, images):
    """Names each visible file of an input folder that is not read as an image."""
    taken = set(images)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or path in taken or not os.path.isfile(path):
            continue
        why = "a video: give it alone as --input" if is_video(path) else "not an image type read"
        log.warning("skipped %s (%s; images are %s)", path, why, " ".join(IMAGE_EXTENSIONS))


def is_video(source):
    """Whether ``source`` is a video file, by its extension."""
    return os.path.splitext(os.fspath(source))[1].lower() in VIDEO_EXTENSIONS


def image_paths(sources):
    """The image files of one input or a list of them (image files and folders).

    Args:
        sources: str, path-like or a list of them. A folder stands for the images
            directly in it (by extension, sorted by name).

    Returns:
        list of str.

    Raises:
        FileNotFoundError: an input that is neither a file nor a folder.
        ValueError: a folder without images, a file that is not an image by its
            extension (a video among several inputs included).
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    paths = []
    for source in map(os.fspath, sources):
        extension = os.path.splitext(source)[1].lower()
        if os.path.isdir(source):
            found = list_images(source)
            _warn_about_other_files(source, found)
            if not found:
                raise ValueError(f"input folder {source!r} holds no images ({IMAGE_EXTENSIONS})")
            paths += found
        elif not os.path.isfile(source):
            raise FileNotFoundError(f"input {source!r}: no such file or folder")
        elif extension in IMAGE_EXTENSIONS:
            paths.append(source)
        else:
            raise ValueError(
                f"input {source!r}: unknown extension {extension!r}; expected an image "
                f"{IMAGE_EXTENSIONS}, a folder, or a video {VIDEO_EXTENSIONS} on its own"
            )
    return paths


def predict_path(model, source, output_dir, **options):
    """Predicts an image file, every image in a folder, a list of them, or a video file.

    Args:
        model: a Keras segmentation model or a :class:`pspnet_tf.infer.predictor.Predictor`.
        source: str. An image, a folder of images (not recursive) or a video
            (by extension: ``.mp4``, ``.avi``, ...); or a list of images and folders.
        output_dir: str. Created if needed.
        **options: see :func:`predict_files` (images; ``skipped`` there) and
            :func:`predict_video`.

    Returns:
        list of the files written.
    """
    if isinstance(source, (str, os.PathLike)) and is_video(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"input {os.fspath(source)!r}: no such file or folder")
        return predict_video(model, source, output_dir, **options)
    return predict_files(model, image_paths(source), output_dir, **options)


def _visuals(predictor, class_names, palette):
    """Resolves the colours and names once for many images."""
    stored = (predictor.class_names, predictor.palette)
    names, colours, _ = classes.resolve_classes(
        predictor.num_classes, class_names, palette, model=stored
    )
    return np.asarray(colours, np.uint8), names


def predict_files(
    model,
    paths,
    output_dir,
    outputs=OUTPUTS,
    legend=False,
    alpha=0.5,
    class_names=None,
    palette=None,
    mode="single",
    verbose=1,
    precision=None,
    skipped=None,
    **options,
):
    """Predicts image files and writes their outputs, with a Keras progress bar.

    For each image ``NAME.ext``: ``labels/NAME.png`` (palette PNG of class
    indices), ``masks/NAME.png`` (colours) and ``overlays/NAME.jpg`` (colours
    blended on the image), as selected by ``outputs``. Images from several folders
    keep their folders below the folders' common parent (``labels/dirA/NAME.png``),
    so no output is written twice (see :func:`output_names`). Every target is
    checked before the first image is predicted: an existing file that is not an
    image of the same format is refused (:func:`pspnet_tf.files.check_output`).

    Args:
        model: a Keras segmentation model or a :class:`pspnet_tf.infer.predictor.Predictor`.
        paths: list of image files.
        output_dir: str.
        outputs: any of ``"labels"``, ``"masks"``, ``"overlays"``.
        legend: bool. Append a legend of the classes present to masks and overlays.
        alpha: float. Weight of the colours in overlays.
        class_names: list, names file, dataset name or None (the model's own).
        palette: colours, dataset name or None (the model's own, else VOC-style).
        mode: evaluation mode, see :func:`predict_image`; ``**options`` its settings.
        verbose: int. 1 shows a progress bar.
        precision: None, ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"mixed"``:
            the compute dtype, see :class:`pspnet_tf.infer.predictor.Predictor`.
        skipped: None or a list. None: an unreadable image (missing, empty, truncated,
            damaged) raises :class:`pspnet_tf.data.images.UnreadableImage` naming it,
            after the images before it were written. A list: such an image is skipped
            with a warning and ``(path, reason)`` appended to the list; the rest are
            written.

    Returns:
        list of the files written (each complete: written under a temporary name
        and renamed).
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    predictor = as_predictor(model, precision=precision)
    palette, names = _visuals(predictor, class_names, palette)
    planned = planned_outputs(paths, output_dir, outputs)
    progress = keras.utils.Progbar(len(paths), verbose=verbose, unit_name="image")
    written = []
    for i, (path, targets) in enumerate(zip(paths, planned, strict=True)):
        try:
            image = read_rgb(path)
        except UnreadableImage as error:
            if skipped is None:
                raise
            log.warning("skipped %s", error)
            skipped.append((path, error.reason))
            continue
        labels = predict_image(predictor, image, mode, **options)
        for what, target in targets.items():
            if what == "labels":
                written.append(save_label_png(labels, target, palette))
            else:
                picture = render(image, labels, what, palette, names, alpha, legend)
                written.append(save_image(picture, target))
        progress.update(i + 1)
    return written


def planned_outputs(paths, output_dir, outputs=OUTPUTS):
    """The files :func:`predict_files` will write, checked before anything is predicted.

    Args:
        paths: list of image files.
        output_dir: str. The output folder (need not exist).
        outputs: any of :data:`OUTPUTS`.

    Returns:
        list (one per path) of dicts ``{output: file}``.

    Raises:
        ValueError: an image given twice.
        pspnet_tf.files.OutputExistsError: ``output_dir`` is a file, or a target holds
            something other than an image of its format.
    """
    files.check_output(output_dir, FOLDER)
    planned = []
    for name in output_names(paths):
        targets = {w: os.path.join(output_dir, w, f"{name}.{_EXTENSIONS[w]}") for w in outputs}
        for target in targets.values():
            files.check_output(target, IMAGE_KINDS[image_format(target)])
        planned.append(targets)
    return planned


def output_names(paths):
    """Unique output names (no extension, ``/`` for folders) for image files.

    A name is the image's path below the common folder of all images, without its
    extension: ``dirA/img.jpg`` and ``dirB/img.jpg`` become ``dirA/img`` and
    ``dirB/img``; images of one folder keep their file names. Where two images differ
    only in the extension (``a.jpg``, ``a.png``), it is kept: ``a_jpg``, ``a_png``.

    Args:
        paths: list of str. Image files; the same file twice is an error.

    Returns:
        list of str, one per path.

    Raises:
        ValueError: a file given twice.
    """
    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    if len(set(absolute)) < len(absolute):
        twice = sorted({p for p in absolute if absolute.count(p) > 1})
        raise ValueError(f"input given twice: {', '.join(twice)}")
    if not absolute:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    relative = [os.path.relpath(p, common) for p in absolute]
    names = [os.path.splitext(r)[0] for r in relative]
    if len(set(names)) < len(names):  # a.jpg and a.png: keep the extension in the name
        names = [os.path.join(os.path.dirname(r), os.path.basename(r).replace(".", "_"))
                 for r in relative]  # fmt: skip
    return [name.replace(os.sep, "/") for name in names]


def predict_video(
    model,
    path,
    output_dir,
    outputs=("overlays",),
    legend=False,
    alpha=0.5,
    class_names=None,
    palette=None,
    mode="single",
    verbose=1,
    precision=None,
    **options,
):
    """Predicts every frame of a video and writes the results back as videos.

    ``masks`` and ``overlays`` become ``NAME_masks.EXT`` and ``NAME_overlays.EXT``
    (``.avi`` input: Motion JPEG in ``.avi``; otherwise MPEG-4 in ``.mp4``).
    ``labels`` are written losslessly as ``NAME_labels/000000.png``, ... (a
    video codec would blur class indices). Arguments as :func:`predict_files`.

    Returns:
        list of the files written.
    """
    path = os.fspath(path)
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"video {path!r}: OpenCV cannot open it")
    predictor = as_predictor(model, precision=precision)
    palette, names = _visuals(predictor, class_names, palette)
    stem = os.path.splitext(os.path.basename(path))[0]
    extension, codec = (".avi", "MJPG") if path.lower().endswith(".avi") else (".mp4", "mp4v")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    progress = keras.utils.Progbar(frames, verbose=verbose, unit_name="frame")
    videos = [w for w in ("masks", "overlays") if w in outputs]
    targets = {w: os.path.join(output_dir, f"{stem}_{w}{extension}") for w in videos}
    for target in targets.values():
        files.check_output(target, VIDEO)
    written, writers, index = [], {}, 0
    with contextlib.ExitStack() as stack:
        temporaries = {w: stack.enter_context(atomic_path(t, VIDEO)) for w, t in targets.items()}
        stack.callback(capture.release)
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            image = np.ascontiguousarray(frame[..., ::-1])  # OpenCV reads BGR
            labels = predict_image(predictor, image, mode, **options)
            if "labels" in outputs:
                target = os.path.join(output_dir, f"{stem}_labels", f"{index:06d}.png")
                written.append(save_label_png(labels, target, palette))
            for what in videos:
                picture = render(image, labels, what, palette, names, alpha, legend, True)
                if what not in writers:  # sized by the first frame
                    writers[what] = _video_writer(temporaries[what], codec, fps, picture.shape)
                    stack.callback(writers[what].release)
                writers[what].write(np.ascontiguousarray(picture[..., ::-1]))
            index += 1
            progress.update(index)
        if index == 0:
            raise ValueError(f"video {path!r}: no frames could be read")
        if frames and index < frames:  # the container's count, not always exact
            log.warning("video %r: read %d of the %d frames it announces", path, index, frames)
        for writer in writers.values():
            writer.release()  # flush before atomic_path renames the file
    return written + list(targets.values())


def _video_writer(path, codec, fps, shape):
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write a {codec} video to {path!r}")
    return writer
