"""Exact converters from the published PSPNet checkpoints to Keras models.

Three sources (key names, preprocessing and BatchNorm epsilon are documented in
``weights/README.md``):

- ``"semseg"``: the official PyTorch release (hszhao/semseg), PSPNet-50/101.
  ``{"state_dict": ...}`` saved from DataParallel (``module.`` prefix); deep
  stem, stride in the 3x3 conv, every 3x3 of layer3/layer4 dilated 2/4.
- ``"bubbliiiing"``: the PyTorch PSPNet of bubbliiiing/pspnet-pytorch,
  MobileNetV2 or ResNet-50; a bare state_dict (``backbone.``, ``master_branch.``,
  ``auxiliary_branch.``); the formerly strided conv of a dilated stage keeps
  half the dilation (``_nostride_dilate``).
- ``"caffe"``: the original Caffe model (hszhao/PSPNet) as the ``.npy`` dicts of
  its Keras port (``{layer: {"weights", "biases"} or {"scale", "offset",
  "mean", "variance"}}``); deep stem, stride in the 1x1 conv, Caffe's pooling
  arithmetic, and the pyramid concatenated in reverse order (6, 3, 2, 1).

Every tensor is mapped by name: a Keras layer without its tensors, a tensor no
layer uses, and any shape mismatch are errors that name the key. PyTorch files
are read with ``torch.load(weights_only=True)`` (torch is imported only here and
only for them); ``.npy`` pickles are read by an unpickler that allows numpy
arrays and nothing else.
"""

from __future__ import annotations

import importlib
import os
import pickle
import warnings

import keras
import numpy as np

from pspnet_tf.data.classes import DATASETS
from pspnet_tf.model.network import assemble, get_metadata, set_metadata
from pspnet_tf.weights.keys import source_name

_DEEP_RESNET = {"stem": "deep", "conv_bias": False, "bn_epsilon": 1e-5}
# What each source's network and input pipeline are (see weights/README.md).
SOURCES = {
    "semseg": {
        "format": "torch",
        "preprocessing": "torch",  # RGB, ImageNet mean/std in 0-255 units
        "output_stride": 8,
        "variant": {**_DEEP_RESNET, "stride_in": "3x3", "padding": "symmetric"},
        "aux_prefix": "aux.",
    },
    "bubbliiiing": {
        "format": "torch",
        "preprocessing": {"mean": [0.0, 0.0, 0.0], "std": [255.0] * 3, "channel_order": "rgb"},
        "output_stride": 16,  # the repository's train.py / pspnet.py default
        "variant": {
            **_DEEP_RESNET,
            "stride_in": "3x3",
            "padding": "symmetric",
            "first_dilation": "half",
        },
        "mobilenetv2_variant": {
            "padding": "symmetric",
            "first_dilation": "half",
            "bn_epsilon": 1e-5,
        },
        "aux_prefix": "auxiliary_branch.",
    },
    "caffe": {
        "format": "npy",
        "preprocessing": "caffe",  # BGR, mean subtracted, no scaling
        "output_stride": 8,
        "variant": {**_DEEP_RESNET, "stride_in": "1x1", "padding": "caffe"},
        "aux_prefix": None,  # the deploy models have no auxiliary head
    },
}
BINS = (1, 2, 3, 6)  # every published PSPNet
_DATASET_BY_CLASSES = {150: "ade20k", 21: "voc", 19: "cityscapes"}
_IGNORED_SUFFIX = ".num_batches_tracked"  # BatchNorm step counters: no Keras counterpart


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint or a Caffe-converted ``.npy`` as flat arrays.

    Args:
        path: str. A ``.pth``/``.pt``/``.tar`` file saved by ``torch.save`` (zip or
            legacy serialization; a bare state_dict or ``{"state_dict": ...}``,
            with or without DataParallel's ``module.`` prefix), or a ``.npy``
            dict of Caffe layers.

    Returns:
        dict ``{key: np.ndarray}``: state_dict keys for PyTorch files,
        ``"layer/field"`` for ``.npy`` files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".npy"):
        return _read_npy(path)
    return _read_torch(path)


def _read_torch(path):
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading the PyTorch checkpoint {path} needs PyTorch: "
            "pip install 'pspnet_tf[convert]' (or pip install torch==2.13.0, the CPU build)"
        ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad files
        raise ValueError(
            f"{path}: not a PyTorch checkpoint readable with weights_only=True"
        ) from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a state_dict or {{'state_dict': ...}}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entries that are not tensors: {', '.join(bad)}")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts and strings; refuses every other global."""

    _ALLOWED = {"_reconstruct", "scalar", "ndarray", "dtype"}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            # How protocol-2 pickles written by Python 3 rebuild bytes (torch's
            # weights_only unpickler allows it too): a pure function.
            return super().find_class(module, name)
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            if name in self._ALLOWED:
                if name in ("ndarray", "dtype"):
                    return getattr(np, name)
                # numpy 2 moved numpy.core to numpy._core; old pickles name the former.
                return getattr(importlib.import_module("numpy._core.multiarray"), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")


def _read_npy(path):
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
        if not dtype.hasobject:
            raise ValueError(
                f"{path}: expected a pickled dict of Caffe layers, got a {dtype} array"
            )
        try:
            # latin1: the published files were pickled by Python 2.
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err
    layers = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: expected a dict of Caffe layers, got {type(layers).__name__}")
    tensors = {}
    for layer, fields in layers.items():
        for field, value in fields.items():
            tensors[f"{_text(layer)}/{_text(field)}"] = np.asarray(value, "float32")
    return tensors


def _text(key):
    return key.decode("latin1") if isinstance(key, bytes) else str(key)


def _describe(source, tensors, label):
    """Backbone, number of classes and auxiliary head of a checkpoint."""
    if source == "caffe":
        classifier, blocks = (
            "conv6/weights",
            {k.split("_")[1] for k in tensors if k.startswith("conv4_")},
        )
        num_classes = tensors[classifier].shape[-1] if classifier in tensors else None
    else:
        root = "backbone." if source == "bubbliiiing" else ""
        classifier = "master_branch.1.weight" if source == "bubbliiiing" else "cls.4.weight"
        num_classes = tensors[classifier].shape[0] if classifier in tensors else None
        blocks = {k.split(".")[1 + bool(root)] for k in tensors if k.startswith(f"{root}layer3.")}
    if num_classes is None:
        raise ValueError(f"{label}: no classifier tensor {classifier!r}; is this a {source} file?")
    if source == "bubbliiiing" and any(k.startswith("backbone.features.") for k in tensors):
        backbone = "mobilenetv2"
    else:
        backbone = {6: "resnet50", 23: "resnet101"}.get(len(blocks))
        if backbone is None:
            raise ValueError(f"{label}: {len(blocks)} blocks in layer3/conv4: not ResNet-50/101")
    prefix = SOURCES[source]["aux_prefix"]
    has_aux = bool(prefix) and any(k.startswith(prefix) for k in tensors)
    return {"backbone": backbone, "num_classes": int(num_classes), "aux": has_aux}


def convert_checkpoint(
    source: str,
    path: str | os.PathLike,
    *,
    input_shape: tuple = (None, None, 3),
    output_stride: int | None = None,
    aux_head: bool | None = None,
    dataset: str | None = None,
) -> keras.Model:
    """Converts a published checkpoint to a PSPNet ``keras.Model``, exactly.

    Args:
        source: str. ``"semseg"``, ``"bubbliiiing"`` or ``"caffe"`` (see the
            module docstring).
        path: str. The checkpoint file.
        input_shape: tuple. Input shape of the Keras model; the default takes
            any size (the pyramid pools adaptively, bins 1, 2, 3, 6).
        output_stride: int or None. None takes the source's (8, or 16 for
            bubbliiiing's published models).
        aux_head: bool or None. None keeps the auxiliary head when the
            checkpoint has one; False drops it (the dropped tensors are listed
            in a warning and in the metadata).
        dataset: ``"voc"``, ``"ade20k"``, ``"cityscapes"`` or None (guessed from
            the number of classes: 21, 150, 19). Gives class names and palette.

    Returns:
        A model whose logits equal the source's, taking RGB 0-255 input and
        applying the source's preprocessing itself; its metadata records the
        source, the checkpoint file and what was dropped.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
    is_npy = os.fspath(path).endswith(".npy")
    if is_npy != (SOURCES[source]["format"] == "npy"):
        wanted = "a .npy file" if SOURCES[source]["format"] == "npy" else "a PyTorch file"
        raise ValueError(f"{os.fspath(path)}: {source} checkpoints are {wanted}")
    tensors = read_checkpoint(path)
    return convert_tensors(
        source,
        tensors,
        label=os.path.basename(os.fspath(path)),
        input_shape=input_shape,
        output_stride=output_stride,
        aux_head=aux_head,
        dataset=dataset,
    )


def convert_tensors(
    source: str,
    tensors: dict[str, np.ndarray],
    *,
    label: str,
    input_shape: tuple = (None, None, 3),
    output_stride: int | None = None,
    aux_head: bool | None = None,
    dataset: str | None = None,
) -> keras.Model:
    """:func:`convert_checkpoint` for tensors already read (``label`` names them in errors)."""
    spec, info = SOURCES[source], _describe(source, tensors, label)
    if aux_head and not info["aux"]:
        raise ValueError(f"{label}: the checkpoint has no auxiliary head to convert")
    aux = info["aux"] if aux_head is None else bool(aux_head)
    dataset = dataset or _DATASET_BY_CLASSES.get(info["num_classes"])
    names = DATASETS[dataset]["classes"] if dataset in DATASETS else None
    if names is not None and len(names) != info["num_classes"]:
        raise ValueError(f"{label}: {info['num_classes']} classes, {dataset} has {len(names)}")
    network = {
        "backbone": info["backbone"],
        "output_stride": output_stride or spec["output_stride"],
        "alpha": 1.0,
        "bins": BINS,
        "align_corners": True,
        "preprocessing": spec["preprocessing"],
        "backbone_variant": spec.get(f"{info['backbone']}_variant", spec["variant"]),
    }
    model = assemble(
        info["num_classes"],
        input_shape,
        network,
        aux_head=aux,
        backbone_weights=None,
        dropout=0.1,
        class_names=names,
        palette=[list(c) for c in DATASETS[dataset]["palette"]] if names else None,
        name=None,
    )
    dropped = _assign(model, tensors, source, label, drop_aux=info["aux"] and not aux)
    if dropped:
        warnings.warn(
            f"{label}: dropped {len(dropped)} auxiliary-head tensors (the model has no "
            f"auxiliary head): {', '.join(dropped)}",
            stacklevel=2,
        )
    set_metadata(
        model,
        weights=f"{source}:{label}",
        weights_source={"source": source, "checkpoint": label, "dropped": dropped},
    )
    return model


def _assign(model, tensors, source, label, drop_aux):
    """Copies every tensor into its Keras layer; raises listing every problem."""
    bins = tuple(int(b) for b in get_metadata(model)["architecture"]["bins"])
    used, problems, values = set(), [], {}
    for layer in (lay for lay in model.layers if lay.weights):
        prefix = source_name(source, layer.name, bins)
        if prefix is None:
            problems.append(f"no {source} tensor maps to Keras layer {layer.name}")
            continue
        arrays = []
        for key, want in zip(_keys(source, prefix, layer), layer.weights, strict=True):
            if key not in tensors:
                problems.append(f"missing key {key} (for Keras layer {layer.name})")
                continue
            used.add(key)
            value = _to_keras(source, layer, key, tensors[key], bins)
            if value.shape != tuple(want.shape):
                problems.append(
                    f"wrong shape for {key}: {tensors[key].shape} in {label} gives "
                    f"{value.shape}, Keras layer {layer.name} needs {tuple(want.shape)}"
                )
            arrays.append(value)
        values[layer.name] = arrays
    prefix = SOURCES[source]["aux_prefix"]
    dropped = sorted(k for k in tensors if drop_aux and k.startswith(prefix))
    unused = sorted(set(tensors) - used - set(dropped))
    unused = [k for k in unused if not k.endswith(_IGNORED_SUFFIX)]
    if unused:
        problems.append(f"unmapped keys no Keras layer uses: {', '.join(unused)}")
    if problems:
        raise ValueError(f"cannot convert {label} ({source}): " + "; ".join(problems))
    for layer_name, arrays in values.items():
        model.get_layer(layer_name).set_weights(arrays)
    return [k for k in dropped if not k.endswith(_IGNORED_SUFFIX)]


def _keys(source, prefix, layer):
    """Source keys of ``layer``'s weights, in Keras weight order."""
    batch_norm = isinstance(layer, keras.layers.BatchNormalization)
    if source == "caffe":
        fields = ["scale", "offset", "mean", "variance"] if batch_norm else ["weights", "biases"]
        return [f"{prefix}/{f}" for f in fields][: len(layer.weights)]
    fields = ["weight", "bias", "running_mean", "running_var"] if batch_norm else ["weight", "bias"]
    return [f"{prefix}.{f}" for f in fields][: len(layer.weights)]


def _to_keras(source, layer, key, value, bins):
    """Source layout to Keras layout (OIHW -> HWIO, Caffe's (1, C, 1, 1) -> (C,))."""
    if value.ndim != 4 or not key.endswith(("weight", "weights")):
        return value.reshape(-1) if source == "caffe" else value
    if source == "caffe":  # already HWIO (the .npy converter transposed it)
        if layer.name == "main_head_conv":
            value = _caffe_pyramid_order(value, bins)
        return value
    if type(layer).__name__ == "DepthwiseConv2D":
        return value.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    return value.transpose(2, 3, 1, 0)


def _caffe_pyramid_order(kernel, bins):
    """Caffe concatenates [x, pool6, pool3, pool2, pool1]; we concatenate [x, 1, 2, 3, 6]."""
    width = (kernel.shape[2] // 2) // len(bins)
    features = kernel.shape[2] - width * len(bins)
    caffe_order = sorted(bins, reverse=True)
    parts = [kernel[:, :, :features]]
    for b in bins:
        start = features + caffe_order.index(b) * width
        parts.append(kernel[:, :, start : start + width])
    return np.concatenate(parts, axis=2)
