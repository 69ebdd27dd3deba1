"""Export for serving: a SavedModel for any image size, and ONNX (LiteRT: ``litert``).

Every export takes ``uint8`` RGB images, normalises them inside the graph (the
model's own preprocessing layer) and returns two outputs:

- ``labels``: int32 ``(batch, height, width)`` class indices at the input's size;
- ``probabilities``: float32 ``(batch, height, width, num_classes)`` softmax scores.

:func:`export_saved_model` writes a SavedModel (through Keras' ``ExportArchive``)
whose ``serving_default`` signature takes ``(None, None, None, 3)`` images: any
batch, height and width. Its ``metadata`` signature returns the model's class
names, palette and build arguments as a JSON string. Bad input fails with a
clear message before the network runs: a wrong dtype is rejected by the
signature, a wrong rank or channel count by a shape check (a restored signature
does not check shapes itself, and a rank-3 image would otherwise crash inside
a convolution), an empty image by an explicit assertion.

Dtypes: a *tensor* of another dtype is refused by the signature, but a *numpy
array* is not: TensorFlow converts it to the signature's uint8 in Python, before
the graph runs, with a C cast (0.5 -> 0, 300 -> 44, -1 -> 255), both through
``loaded.serving_default`` and ``loaded.signatures["serving_default"]``. Nothing
inside a SavedModel can see or stop that (a graph that took several dtypes to
refuse the others made the restored function retrace for every image size), so
load it with :func:`load_saved_model`, which refuses anything but uint8, or pass
uint8 arrays yourself. TF Serving checks the request's dtype itself.

LiteRT (TFLite) files for one input size are :mod:`pspnet_tf.infer.litert`'s.
:func:`export_onnx` converts the
any-size serving function with ``tf2onnx`` (the ``onnx`` extra).
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from pspnet_tf import files
from pspnet_tf.files import OutputKind, atomic_path
from pspnet_tf.infer.predictor import any_size_model, as_predictor
from pspnet_tf.model.network import get_metadata, inference_model, rebuild
from pspnet_tf.precision import precision_copy, resolve_precision

SIGNATURE = "serving_default"
# What a SavedModel folder holds; a folder with anything else is not replaced.
_SAVED_MODEL_ENTRIES = {"saved_model.pb", "variables", "assets", "fingerprint.pb",
                        "keras_metadata.pb"}  # fmt: skip


def _is_saved_model(path):
    if files.is_empty_folder(path):
        return True
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    entries = set(os.listdir(path))
    return "saved_model.pb" in entries and entries <= _SAVED_MODEL_ENTRIES


def _is_tflite(path):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        return file.read(8)[4:8] == b"TFL3"  # the flatbuffer's file identifier


def _is_onnx(path):
    # An ONNX ModelProto starts with field 1 (ir_version, a varint): byte 0x08.
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        return file.read(1) == b"\x08"


# What each format writes, so that only a previous export of it is ever replaced.
OUTPUT_KINDS = {
    "saved_model": OutputKind("a SavedModel folder", _is_saved_model),
    "tflite": OutputKind("a TFLite model", _is_tflite),
    "litert": OutputKind("a TFLite model", _is_tflite),
    "onnx": OutputKind("an ONNX model", _is_onnx),
}


def serving_model(model):
    """The model for images of any size: main output only, dynamic height and width.

    Raises:
        ValueError: the model takes only a fixed size and is not a PSPNet that
            :func:`pspnet_tf.rebuild` can rebuild.
    """
    model, _ = any_size_model(model)
    static = tuple(model.input_shape[1:3])
    if None not in static:
        raise ValueError(
            f"model {model.name!r} takes only {static} images and has no PSPNet metadata to "
            "rebuild it for any size; export it with export_litert"
        )
    return model


def _metadata_json(model, precision=None):
    try:
        metadata = get_metadata(model)
    except ValueError:
        metadata = {}
    if precision:
        metadata["precision"] = precision
    metadata["input"] = "uint8 RGB images (batch, height, width, 3), values 0-255"
    metadata["outputs"] = {"labels": "int32 (batch, height, width)", "probabilities": "float32"}
    return json.dumps(metadata)


def serving_function(model, check_input=True, logits=False):
    """The serving computation: ``uint8`` images -> ``{"labels", "probabilities"}``.

    Args:
        model: a Keras model taking RGB 0-255 images and returning logits.
        check_input: bool. Check shape and size at run time (see the module docstring).
        logits: bool. Also return the ``logits`` (float32), as LiteRT files do.

    Returns:
        A Python function of one ``images`` tensor, to be traced with an input signature.
    """

    def serve(images):
        if check_input:
            # ensure_shape runs in the graph; a restored signature skips static checks.
            images = tf.ensure_shape(images, (None, None, None, 3))
            nonempty = tf.debugging.assert_greater(
                tf.reduce_min(tf.shape(images)[:3]),
                0,
                message="images must have batch, height and width >= 1; got an empty tensor",
            )
            with tf.control_dependencies([nonempty]):
                images = tf.identity(images)
        scores = model(tf.cast(images, tf.float32), training=False)
        outputs = {
            "labels": tf.argmax(scores, axis=-1, output_type=tf.int32),
            "probabilities": tf.nn.softmax(scores, axis=-1),
        }
        return {**outputs, "logits": scores} if logits else outputs

    return serve


def write_archive(model, directory, input_shape, check_input, metadata=None, logits=False):
    """A SavedModel of :func:`serving_function` (and a ``metadata`` signature) in ``directory``."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SIGNATURE,
        serving_function(model, check_input, logits),
        input_signature=[tf.TensorSpec(input_shape, tf.uint8, name="images")],
    )
    if metadata is not None:
        archive.add_endpoint(
            "metadata",
            tf.function(lambda: {"json": tf.constant(metadata)}, input_signature=[]),
        )
    archive.write_out(directory, verbose=False)


def export_saved_model(model, path, precision=None):
    """Exports a SavedModel serving ``uint8`` images of any size.

    Args:
        model: a PSPNet (any build size, with or without aux head) or any Keras
            model taking ``(batch, None, None, 3)`` RGB 0-255 images.
        path: str. Output directory. An existing one is replaced only if it is empty
            or a previous SavedModel export; anything else raises
            :class:`pspnet_tf.files.OutputExistsError`.
        precision: None (the model's own), ``"float32"``, ``"bfloat16"``, ``"float16"``
            or ``"mixed"`` (bfloat16 on CPUs, float16 on GPUs; decided where it exports):
            the exported graph's compute dtype. Inputs, outputs and weights keep their
            dtypes. bfloat16 is about twice as fast on CPUs with bf16 instructions
            (AVX512-BF16, AMX) and slow where they are emulated.

    Returns:
        ``path``. Load with :func:`load_saved_model` (it refuses anything but uint8), or
        with ``tf.saved_model.load(path)`` and call ``loaded.serving_default(images)``
        with **uint8** images: a numpy array of another dtype is cast to uint8 by
        TensorFlow before the graph runs, silently (0.5 -> 0, 300 -> 44, -1 -> 255), so
        convert first: ``np.clip(images, 0, 255).astype(np.uint8)``.
    """
    files.check_output(path, OUTPUT_KINDS["saved_model"])  # before the slow part
    serving = precision_copy(serving_model(model), precision)
    metadata = _metadata_json(serving, precision=resolve_precision(precision))
    with atomic_path(path, OUTPUT_KINDS["saved_model"]) as temporary:
        write_archive(serving, temporary, (None, None, None, 3), True, metadata)
    return os.fspath(path)


def fixed_size_model(model, size):
    """The inference model built for ``size = (h, w)`` (a PSPNet with static pools there)."""
    model = inference_model(model) if isinstance(model.output, dict) else model
    try:
        has_architecture = "architecture" in get_metadata(model)
    except ValueError:
        has_architecture = False
    if has_architecture:  # static pools where the size allows: simpler TFLite graphs
        return rebuild(model, input_shape=(*size, 3), aux_head=False)
    static = tuple(model.input_shape[1:3])
    if None not in static and static != tuple(size):
        raise ValueError(f"model {model.name!r} takes only {static} images, not {tuple(size)}")
    return model


def export_onnx(model, path, opset=17):
    """Exports the any-size serving function to ONNX with ``tf2onnx`` (the ``onnx`` extra).

    Args:
        model: as for :func:`export_saved_model`.
        path: str. Output ``.onnx`` file; an existing file is replaced only if it
            is an ONNX model.
        opset: int. ONNX opset.

    Returns:
        ``path``. Input ``images`` uint8 ``(batch, height, width, 3)``; outputs
        ``labels``, ``probabilities`` and ``logits`` (ONNX runtimes may list them in
        another order: fetch them by name). The model's metadata (class names, palette,
        pad value, crop size) is in the file's metadata under ``pspnet_tf`` (JSON), which
        :class:`pspnet_tf.infer.onnx_model.OnnxPredictor` reads.
    """
    try:
        import onnx
        import tf2onnx
    except ImportError as error:
        raise ImportError("ONNX export needs tf2onnx: pip install 'pspnet_tf[onnx]'") from error
    files.check_output(path, OUTPUT_KINDS["onnx"])
    serving = serving_model(model)
    signature = [tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")]
    serve = tf.function(serving_function(serving, logits=True), input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    predictor = as_predictor(serving)
    metadata = json.loads(_metadata_json(serving))
    metadata.update(
        pad_value=[float(v) for v in predictor.pad_value],
        crop_size=list(predictor.crop_size) if predictor.crop_size else None,
    )
    onnx.helper.set_model_props(proto, {"pspnet_tf": json.dumps(metadata)})
    with atomic_path(path, OUTPUT_KINDS["onnx"]) as temporary:
        onnx.save(proto, temporary)
    return os.fspath(path)


def load_saved_model(path):
    """Loads an exported SavedModel as a function that refuses non-uint8 images.

    Args:
        path: str. A directory written by :func:`export_saved_model`.

    Returns:
        A function of ``images`` (uint8 ``(batch, height, width, 3)`` numpy array or
        tensor) returning the dict of ``labels`` and ``probabilities`` tensors. Another
        dtype raises ``ValueError`` ("images must be uint8 ..."): TensorFlow would
        otherwise wrap it to uint8 silently (see the module docstring). The loaded
        object is ``function.loaded``.
    """
    loaded = tf.saved_model.load(os.fspath(path))

    def serve(images):
        dtype = getattr(images, "dtype", None)
        if dtype is None or tf.as_dtype(dtype) != tf.uint8:
            got = tf.as_dtype(dtype).name if dtype is not None else type(images).__name__
            raise ValueError(
                f"{path}: images must be uint8 RGB 0-255, got {got}; convert them yourself, "
                "e.g. np.clip(images, 0, 255).astype(np.uint8) (TensorFlow would wrap 300 "
                "to 44 and -1 to 255)"
            )
        return loaded.serving_default(tf.convert_to_tensor(images))

    serve.loaded = loaded  # the variables live as long as the loaded object
    return serve


def saved_model_agreement(model, path, images):
    """Fraction of pixels where a SavedModel's labels equal the Keras model's.

    Args:
        model: the Keras model that was exported (any build size).
        path: str. The SavedModel directory.
        images: list of ``(H, W, 3)`` uint8 images, any sizes.

    Returns:
        float in [0, 1], over all pixels of all images.
    """
    serve = load_saved_model(path)
    predictor = as_predictor(model)
    equal = total = 0
    for image in images:
        image = np.asarray(image, np.uint8)
        exported = serve(image[None])["labels"].numpy()[0]
        expected = np.argmax(predictor(image[None].astype(np.float32))[0], axis=-1)
        equal += int((exported == expected).sum())
        total += expected.size
    return equal / max(total, 1)
