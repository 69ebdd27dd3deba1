"""pspnet_tf: PSPNet (Pyramid Scene Parsing Network) for Keras 3 on TensorFlow.

Everything a user calls is importable from here; the names load their modules on first
use. ``import pspnet_tf`` registers the custom layers, so ``keras.models.load_model``
reads pspnet_tf's ``.keras`` files afterwards. It changes no process state (environment,
logging, seeds, file descriptors).

Example:
>>> from pspnet_tf import build_pspnet
>>> model = build_pspnet(num_classes=21, backbone="mobilenetv2", input_shape=(320, 320, 3))
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# Public name -> the module that holds it.
_API = {
    "build_pspnet": "pspnet_tf.model.build",
    "get_metadata": "pspnet_tf.model.network",
    "inference_model": "pspnet_tf.model.network",
    "rebuild": "pspnet_tf.model.network",
    "set_metadata": "pspnet_tf.model.network",
    "load_dataset": "pspnet_tf.data.pipeline",
    "compile_for_training": "pspnet_tf.training.recipe",
    "train": "pspnet_tf.training.recipe",
    "evaluate": "pspnet_tf.infer.evaluation",
    "Predictor": "pspnet_tf.infer.predictor",
    "as_predictor": "pspnet_tf.infer.predictor",
    "predict_image": "pspnet_tf.infer.predict",
    "predict_path": "pspnet_tf.infer.predict",
    "export_saved_model": "pspnet_tf.infer.export",
    "export_litert": "pspnet_tf.infer.litert",
    "export_tflite": "pspnet_tf.infer.litert",
    "LiteRTPredictor": "pspnet_tf.infer.litert",
    "OnnxPredictor": "pspnet_tf.infer.onnx_model",
    "export_onnx": "pspnet_tf.infer.export",
    "load_saved_model": "pspnet_tf.infer.export",
    "run_demo": "pspnet_tf.demo",
    "make_demo_dataset": "pspnet_tf.data.demo",
    "DEMO_CLASSES": "pspnet_tf.data.demo",
    "make_loss": "pspnet_tf.losses",
    "MeanIoU": "pspnet_tf.metrics",
    "PixelAccuracy": "pspnet_tf.metrics",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'pspnet_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _is_command_line():
    """Whether this process is the ``pspnet-tf`` command (or ``python -m pspnet_tf``)."""
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("pspnet-tf", "pspnet-tf.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return "-m" in orig and orig[orig.index("-m") + 1 :][:1] in (["pspnet_tf"], ["pspnet_tf.cli"])


# The command line imports TensorFlow only for the commands that need it (not --help or
# --version), quietly; it registers the layers itself where it loads a model.
if not _is_command_line():
    from pspnet_tf.model import layers  # noqa: F401  (registers the custom layers)
