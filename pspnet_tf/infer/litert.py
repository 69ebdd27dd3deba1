"""LiteRT (TFLite) models for CPUs and phones: export for one input size, and run them.

:func:`export_litert` writes a ``.tflite`` file for one input size, float32 or quantised:
``float16`` (weights), ``dynamic`` (int8 weights, float activations) or ``int8``
(full-integer: int8 weights and activations, calibrated on the user's images). Every file
takes ``uint8`` RGB 0-255 images ``(1, height, width, 3)``, as the SavedModel does, and
returns ``labels``, ``probabilities`` and ``logits``. The model's metadata (class names,
palette, input size, preprocessing, quantisation) is stored inside the file, so a
``.tflite`` needs nothing beside it: :func:`read_litert_metadata`.

:class:`LiteRTPredictor` runs a file with the LiteRT interpreter (the ``ai-edge-litert``
package, or TensorFlow's ``tf.lite.Interpreter`` where it is not installed) and is a
:class:`pspnet_tf.infer.predictor.Predictor`: evaluation and prediction take it as they take
a Keras model (``single`` fits each image into the file's size, ``sliding`` windows at it).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from pspnet_tf import files
from pspnet_tf.data.images import UnreadableImage, read_rgb
from pspnet_tf.infer import export
from pspnet_tf.infer.modes import pad_image, resize
from pspnet_tf.infer.predictor import Predictor, mean_pixel
from pspnet_tf.model.network import get_metadata
from pspnet_tf.options import LITERT_QUANTIZATIONS

METADATA_NAME = "pspnet_tf"  # the entry of the flatbuffer's metadata map holding the JSON
DEFAULT_CALIBRATION_IMAGES = 100


def export_litert(
    model, path, input_size, quantization="none", calibration=None, calibration_images=None
):
    """Exports a LiteRT (``.tflite``) model for one input size.

    Args:
        model: a PSPNet (rebuilt for ``input_size`` with its own bins) or any Keras model
            taking RGB 0-255 images of that size.
        path: str. Output ``.tflite`` file; an existing file is replaced only if it is a
            TFLite model.
        input_size: int or ``(height, width)``.
        quantization: ``"none"`` (float32), ``"float16"`` (float16 weights, about half the
            size), ``"dynamic"`` (int8 weights, float activations) or ``"int8"``
            (full-integer, needs ``calibration``).
        calibration: for ``"int8"``: RGB images (a list of ``(H, W, 3)`` arrays of any size)
            or a folder of image files. Each is fitted into ``input_size`` as prediction
            does (resized, aspect kept, padded with the model's mean pixel).
        calibration_images: int or None. How many to use (default 100, or all there are).

    Returns:
        ``path``. Inputs: ``images`` uint8 ``(1, height, width, 3)``; outputs ``labels``
        int32 ``(1, height, width)``, ``probabilities`` and ``logits`` float32
        ``(1, height, width, classes)``.

    Raises:
        ValueError: an unknown quantisation, a bad size, or ``"int8"`` without images.
    """
    quantization = "none" if quantization is None else quantization
    if quantization not in LITERT_QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {LITERT_QUANTIZATIONS}, got {quantization!r}"
        )
    size = (input_size, input_size) if np.ndim(input_size) == 0 else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be a positive int or (height, width), got {input_size}")
    files.check_output(path, export.OUTPUT_KINDS["tflite"])
    fixed = export.fixed_size_model(model, size)
    pad_value = mean_pixel(fixed)  # no rebuild: read off its preprocessing layer
    samples = None
    if quantization == "int8":
        samples = calibration_samples(calibration, size, pad_value, calibration_images)
    content = _convert(fixed, size, quantization, samples)
    metadata = _metadata(fixed, size, quantization, pad_value, len(samples or ()))
    content = _with_metadata(content, metadata)
    with files.atomic_path(path, export.OUTPUT_KINDS["tflite"]) as temporary:
        with open(temporary, "wb") as file:
            file.write(content)
    return os.fspath(path)


def _convert(model, size, quantization, samples):
    # From a SavedModel: the converter freezes variables reliably from one (from a concrete
    # function of a Keras 3 model it silently produced NaN outputs).
    with tempfile.TemporaryDirectory() as directory:
        export.write_archive(model, directory, (1, *size, 3), check_input=False, logits=True)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantization == "int8":
            converter.representative_dataset = lambda: ([sample[None]] for sample in samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return converter.convert()


def calibration_samples(source, size, pad_value, count=None):
    """uint8 ``(h, w, 3)`` calibration images, fitted into ``size`` as prediction does.

    Args:
        source: a list of RGB images (any size), or a folder of image files.
        size: ``(h, w)``.
        pad_value: ``(3,)`` RGB 0-255 fill (the model's mean pixel).
        count: int or None: at most this many (default 100).

    Raises:
        ValueError: no images, or a folder without readable ones.
    """
    count = DEFAULT_CALIBRATION_IMAGES if count is None else int(count)
    if count < 1:
        raise ValueError(f"calibration_images must be >= 1, got {count}")
    if isinstance(source, (str, os.PathLike)):
        source = _folder_images(os.fspath(source), count)
    images = [np.asarray(image) for image in (source or [])][:count]
    if not images:
        raise ValueError("int8 quantisation needs calibration images (calibration=...)")
    return [_fit(image, size, pad_value) for image in images]


def _folder_images(folder, count):
    from pspnet_tf.infer.predict import list_images

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"calibration folder {folder!r}: no such folder")
    images = []
    for path in list_images(folder):
        try:
            images.append(read_rgb(path))
        except UnreadableImage:
            continue  # a bad file is no calibration sample; the rest are enough
        if len(images) == count:
            break
    if not images:
        raise ValueError(f"calibration folder {folder!r}: no readable images")
    return images


def _fit(image, size, pad_value):
    """``image`` resized into ``size`` (aspect kept) and padded, as single-scale prediction."""
    image = np.asarray(image, np.float32)
    image = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    scale = min(size[0] / image.shape[0], size[1] / image.shape[1])
    fitted = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    padded, _ = pad_image(resize(image, fitted), *size, pad_value)
    return np.clip(np.rint(padded), 0, 255).astype(np.uint8)


def _metadata(model, size, quantization, pad_value, calibrated):
    try:
        metadata = json.loads(json.dumps(get_metadata(model)))  # plain dicts and lists
    except ValueError:  # not a pspnet_tf model
        metadata = {}
    metadata.update(
        input_size=list(size),
        quantization=quantization,
        pad_value=[float(v) for v in pad_value],
        calibration_images=calibrated,
        input="uint8 RGB images (1, height, width, 3), values 0-255",
        outputs={
            "labels": "int32 (1, height, width)",
            "probabilities": "float32",
            "logits": "float32",
        },  # fmt: skip
    )
    return metadata


def _flatbuffer():
    from tensorflow.lite.tools import flatbuffer_utils  # shipped with TensorFlow

    return flatbuffer_utils


def _with_metadata(content, metadata):
    """The flatbuffer with ``metadata`` as JSON under :data:`METADATA_NAME`."""
    utils = _flatbuffer()
    model = utils.convert_bytearray_to_object(bytearray(content))
    buffer = utils.schema_fb.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = utils.schema_fb.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(utils.convert_object_to_bytearray(model))


def is_litert_file(path):
    """Whether ``path`` is a TFLite flatbuffer (by its content, not its name)."""
    return export.OUTPUT_KINDS["tflite"].recognise(os.fspath(path))


def read_litert_metadata(path):
    """The metadata :func:`export_litert` stored in a ``.tflite`` file ({} if none).

    Raises:
        ValueError: ``path`` is not a TFLite file.
    """
    path = os.fspath(path)
    if not is_litert_file(path):
        raise ValueError(f"{path}: not a TFLite (LiteRT) model")
    utils = _flatbuffer()
    with open(path, "rb") as file:
        model = utils.convert_bytearray_to_object(bytearray(file.read()))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    return {}


def _interpreter(path, threads):
    """The LiteRT interpreter of ``ai-edge-litert``, or TensorFlow's where it is missing."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import logging

        logging.getLogger("pspnet_tf").info(
            "ai-edge-litert is not installed (pip install 'pspnet_tf[litert]'): running %s "
            "with tf.lite.Interpreter", path
        )  # fmt: skip
        with warnings.catch_warnings():  # tf.lite.Interpreter warns that it moves to LiteRT
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=path, num_threads=threads)
    return Interpreter(model_path=path, num_threads=threads)


class LiteRTPredictor(Predictor):
    """A ``.tflite`` file from :func:`export_litert` as a :class:`Predictor`.

    Calling it maps a ``(batch, h, w, 3)`` float32 RGB 0-255 batch at the file's size to
    ``(batch, h, w, classes)`` float32 logits (one interpreter call per image).

    Args:
        path: str. The ``.tflite`` file.
        threads: int. Interpreter threads. Defaults to 2.
    """

    def __init__(self, path, threads=2):
        path = os.fspath(path)
        metadata = read_litert_metadata(path)
        self.path, self.threads = path, int(threads)
        self._runner = _interpreter(path, self.threads).get_signature_runner(export.SIGNATURE)
        details = self._runner.get_input_details()["images"]
        size = tuple(int(d) for d in details["shape"][1:3])
        outputs = self._runner.get_output_details()
        if "logits" not in outputs:
            raise ValueError(f"{path}: no 'logits' output; export it with export_litert")
        super().__init__(
            model=None,
            num_classes=int(outputs["logits"]["shape"][-1]),
            pad_value=np.asarray(metadata.get("pad_value", [0.0] * 3), np.float32),
            input_size=size,
            crop_size=size,
            class_names=metadata.get("class_names"),
            palette=metadata.get("palette"),
            frozen=False,
        )
        self.quantization = metadata.get("quantization", "unknown")

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        if images.shape[1:3] != self.input_size:
            raise ValueError(
                f"{self.path}: takes images of {self.input_size}, got {images.shape[1:3]}"
            )
        pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        return np.concatenate([self._runner(images=p[None])["logits"] for p in pixels])


def export_tflite(model, path, input_size, quantization=None):
    """:func:`export_litert` under its former name (``quantization`` None: float32)."""
    return export_litert(model, path, input_size, quantization or "none")


def run_tflite(path, images, num_threads=None):
    """Runs a ``.tflite`` file once on uint8 images at its size.

    Args:
        path: str. A file written by :func:`export_litert`.
        images: uint8 ``(height, width, 3)`` or ``(1, height, width, 3)`` at the file's size.
        num_threads: int or None.

    Returns:
        dict of numpy arrays ``labels`` ``(1, h, w)``, ``probabilities``, ``logits``.
    """
    runner = _interpreter(os.fspath(path), num_threads).get_signature_runner(export.SIGNATURE)
    expected = tuple(int(d) for d in runner.get_input_details()["images"]["shape"])
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    if images.shape != expected or images.dtype != np.uint8:
        raise ValueError(
            f"{path}: takes uint8 images of shape {expected}, got {images.dtype} {images.shape}"
        )
    return runner(images=images)
