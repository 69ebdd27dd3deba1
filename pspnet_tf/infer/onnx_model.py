"""ONNX files from :func:`pspnet_tf.infer.export.export_onnx`, run with ONNX Runtime.

:class:`OnnxPredictor` is a :class:`pspnet_tf.infer.predictor.Predictor`: evaluation and
prediction take it as they take a Keras model (any image size, as the file was exported).
"""

from __future__ import annotations

import json
import os

import numpy as np

from pspnet_tf.infer.export import OUTPUT_KINDS
from pspnet_tf.infer.predictor import Predictor


def is_onnx_file(path):
    """Whether ``path`` looks like an ONNX model (by its content: a ModelProto)."""
    return OUTPUT_KINDS["onnx"].recognise(os.fspath(path))


class OnnxPredictor(Predictor):
    """An ``.onnx`` file from ``export_onnx`` as a :class:`Predictor` (ONNX Runtime, CPU).

    Args:
        path: str. The ``.onnx`` file.
        threads: int. Intra-op threads. Defaults to 2.

    Raises:
        ImportError: onnxruntime is not installed (the ``onnx`` extra).
        ValueError: the file has no ``logits`` output (not written by ``export_onnx``).
    """

    def __init__(self, path, threads=2):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "running an ONNX model needs onnxruntime: pip install 'pspnet_tf[onnx]'"
            ) from error
        path = os.fspath(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        self.path, self.threads = path, int(threads)
        self._session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "logits" not in outputs:
            raise ValueError(f"{path}: no 'logits' output; export it with export_onnx")
        props = self._session.get_modelmeta().custom_metadata_map
        metadata = json.loads(props.get("pspnet_tf", "{}"))
        crop = metadata.get("crop_size")
        super().__init__(
            model=None,
            num_classes=int(outputs["logits"].shape[-1]),
            pad_value=np.asarray(metadata.get("pad_value", [0.0] * 3), np.float32),
            input_size=None,
            crop_size=tuple(crop) if crop else None,
            class_names=metadata.get("class_names"),
            palette=metadata.get("palette"),
            frozen=False,
        )

    def __call__(self, images):
        pixels = np.clip(np.rint(np.asarray(images, np.float32)), 0, 255).astype(np.uint8)
        return self._session.run(["logits"], {"images": pixels})[0]
