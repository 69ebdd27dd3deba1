"""Weights: loading by layer name, the registry of published weights, converters.

``keras.applications`` layer names are this project's public interface for the
backbones, so ImageNet weights (and any file holding them) are matched to our
layers by name, with every mismatch reported at once.

Files read by name:
- legacy Keras HDF5 (``.h5``): what ``keras.applications`` downloads;
- full Keras models (``.keras``);
- Keras 3 weight files (``.weights.h5``) of a ``keras.applications`` backbone
  (these store weights by position, so they are read through that model).

Published PSPNet checkpoints: :mod:`pspnet_tf.weights.registry` (``PRETRAINED``,
``describe``, ``fetch``) and :mod:`pspnet_tf.weights.convert`
(``convert_checkpoint``, ``read_checkpoint``), re-exported here.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile

import h5py
import keras
import numpy as np


def named_weights_from_model(model):
    """Returns ``{layer name: [arrays]}`` for every layer of ``model`` that has weights."""
    return {layer.name: layer.get_weights() for layer in _weighted_layers(model)}


def named_weights_from_h5(path):
    """Reads a legacy Keras HDF5 weights file as ``{layer name: [arrays]}``."""
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise ValueError(
                f"{path}: not a legacy Keras HDF5 weights file (no 'layer_names' attribute)"
            )
        result = {}
        for raw in group.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            layer_group = group[name]
            weight_names = [
                w.decode() if isinstance(w, bytes) else str(w)
                for w in layer_group.attrs["weight_names"]
            ]
            if weight_names:
                result[name] = [np.asarray(layer_group[w]) for w in weight_names]
        return result


def _weighted_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _weighted_layers(layer)
        elif layer.weights:
            yield layer


def assign_by_name(model, named, *, skip=(), ignore_unused=(), source="weights"):
    """Copies ``named`` weights into the layers of ``model`` with the same names.

    Args:
        model: keras.Model. Receives the weights.
        named: dict ``{layer name: [arrays]}``.
        skip: iterable of str. Layer names of ``model`` left as they are.
        ignore_unused: iterable of str. Names in ``named`` that may stay unused
            (e.g. ``keras.applications`` layers PSPNet does not build).
        source: str. Where ``named`` came from, for error messages.

    Returns:
        The list of layer names that received weights.

    Raises:
        ValueError: listing every layer of ``model`` missing from ``named``,
            every shape mismatch, and every unused entry of ``named``.
    """
    skip, ignore_unused = set(skip), set(ignore_unused)
    missing, mismatched, assigned = [], [], []
    for layer in _weighted_layers(model):
        if layer.name in skip:
            continue
        if layer.name not in named:
            missing.append(layer.name)
            continue
        ours = [tuple(w.shape) for w in layer.weights]
        theirs = [tuple(np.shape(w)) for w in named[layer.name]]
        if ours != theirs:
            mismatched.append(f"{layer.name}: model {ours} vs {source} {theirs}")
            continue
        assigned.append(layer.name)
    ours_names = {layer.name for layer in _weighted_layers(model)}
    unused = sorted(set(named) - ours_names - ignore_unused)
    problems = []
    if missing:
        problems.append(f"layers missing from {source}: {', '.join(missing)}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if unused:
        problems.append(f"{source} layers the model does not have: {', '.join(unused)}")
    if problems:
        raise ValueError(f"Cannot load {source}: " + " | ".join(problems))
    layer_by_name = {layer.name: layer for layer in _weighted_layers(model)}
    for name in assigned:
        layer_by_name[name].set_weights(named[name])
    return assigned


def named_weights_from_file(path, reference=None):
    """Reads a weights file as ``{layer name: [arrays]}``.

    Args:
        path: str. A legacy ``.h5``, a ``.keras`` model, or a ``.weights.h5``.
        reference: callable returning a keras.Model, or None. Needed for
            ``.weights.h5`` files, which store weights by position: the file is
            loaded into this model and read back by name.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".keras"):
        return named_weights_from_model(keras.models.load_model(path, compile=False))
    if path.endswith(".weights.h5"):
        if reference is None:
            raise ValueError(f"{path}: a .weights.h5 file needs the model it was saved from")
        model = reference()
        model.load_weights(path)
        return named_weights_from_model(model)
    return named_weights_from_h5(path)


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The pspnet_tf metadata dict stored in a ``.keras`` file, without building the model.

    Returns:
        The metadata of the model's ``preprocessing`` layer (see
        :mod:`pspnet_tf.model`), or None for a file without one.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError):
        return None
    for layer in config.get("config", {}).get("layers", []):
        layer_config = layer.get("config", {})
        if layer_config.get("name") == "preprocessing" and "metadata" in layer_config:
            return layer_config["metadata"] or None
    return None


def locate(weights: str | os.PathLike) -> tuple[str, dict | None]:
    """Resolves the ``weights`` argument of ``build_pspnet``.

    Args:
        weights: a registry name (see ``PRETRAINED``) or the path of a
            ``.keras``, ``.h5`` or ``.weights.h5`` file.

    Returns:
        ``(path, metadata)``: the local file (a registry name is fetched and
        converted on first use) and its pspnet_tf metadata, or None when the
        file carries none.
    """
    from pspnet_tf.weights import registry

    if isinstance(weights, str) and weights in registry.PRETRAINED:
        path = registry.fetch(weights)
        return path, read_metadata(path)
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights {path!r}: no such file, and not a registry name "
            f"(known: {', '.join(registry.PRETRAINED)})"
        )
    return path, read_metadata(path) if path.endswith(".keras") else None


# Build arguments that define the trained network, with their defaults: left at
# the default, they follow the weights' metadata (see build_pspnet's `weights`).
_NETWORK_DEFAULTS = {
    "backbone": "resnet50",
    "output_stride": 8,
    "alpha": 1.0,
    "bins": None,
    "align_corners": True,
    "preprocessing": "imagenet",
    "backbone_variant": None,
}


def follow_weights(network: dict, trained: dict, label: str) -> dict:
    """``build_pspnet``'s network arguments, completed from the weights' architecture.

    Arguments left at their defaults (``_NETWORK_DEFAULTS``) take the value the
    weights were trained with; any other value must match it.

    Args:
        network: dict of ``build_pspnet`` arguments (backbone, output_stride,
            alpha, bins, align_corners, preprocessing, backbone_variant).
        trained: dict. The ``"architecture"`` metadata stored with the weights.
        label: str. The weights' name, for error messages.

    Returns:
        The merged dict.
    """
    merged = dict(network)
    for key, default in _NETWORK_DEFAULTS.items():
        if key in trained and network[key] == default:
            merged[key] = trained[key]
    backbone = merged["backbone"]
    for key in _NETWORK_DEFAULTS:
        if key not in trained or network[key] == _NETWORK_DEFAULTS[key]:
            continue
        ours = _normalise(key, network[key], backbone)
        if ours != trained[key]:
            raise ValueError(
                f"{key}={network[key]!r} does not match the weights {label!r}, which were "
                f"trained with {key}={trained[key]!r}; leave {key} out to follow the weights"
            )
    return merged


def _normalise(key, value, backbone):
    """A build argument in the form the metadata stores it."""
    from pspnet_tf import backbones
    from pspnet_tf.model import choose_bins, resolve_preprocessing

    if key == "preprocessing":
        return resolve_preprocessing(value, backbone)
    if key == "backbone_variant":
        return backbones.resolve_variant(backbone, value)
    if key == "bins":
        return list(choose_bins((None, None), value))
    return float(value) if key == "alpha" else value


_CLASSIFIERS = ("main_classifier", "aux_classifier")


def load_pspnet_weights(
    model: keras.Model, path: str | os.PathLike, label: str | None = None
) -> keras.Model:
    """Loads a PSPNet weights file into ``model``.

    ``.weights.h5`` files are loaded by position (same architecture needed);
    ``.keras`` and legacy ``.h5`` files by layer name. By name, classifiers whose
    shape differs (another ``num_classes``: fine-tuning) are left freshly
    initialised, an auxiliary head the file lacks starts fresh, and one the
    model lacks is left behind; a warning names these layers. Every other
    missing, extra or mis-shaped layer is an error.

    Args:
        model: a model built by ``build_pspnet``.
        path: str. The weights file.
        label: str or None. What to record as the weights' origin in the
            metadata (e.g. a registry name); defaults to ``path``.

    Returns:
        ``model``.
    """
    from pspnet_tf.model import set_metadata

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {path!r}: no such file")
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        set_metadata(model, weights=label or path)
        return model
    named = named_weights_from_file(path)
    ours = named_weights_from_model(model)
    shapes = {n: [tuple(w.shape) for w in ws] for n, ws in named.items()}
    fresh = [
        n
        for n in ours
        if (n in _CLASSIFIERS and n in named and shapes[n] != [w.shape for w in ours[n]])
        or (n.startswith("aux_") and n not in named)
    ]
    left_behind = [n for n in named if n.startswith("aux_") and n not in ours]
    assign_by_name(model, named, skip=fresh, ignore_unused=left_behind, source=path)
    if fresh or left_behind:
        warnings.warn(
            f"{path}: kept freshly initialised (not in the file, or another number of "
            f"classes): {', '.join(fresh) or 'none'}; not loaded (the model has no "
            f"auxiliary head): {', '.join(left_behind) or 'none'}",
            stacklevel=3,
        )
    stored = read_metadata(path) or {}
    updates = {"weights": label or path}
    if "weights_source" in stored:
        updates["weights_source"] = stored["weights_source"]
    set_metadata(model, **updates)
    return model


def __getattr__(name):
    # The registry and converters import pspnet_tf.model, which imports this
    # package: load them on first use rather than at import.
    lazy = {
        "PRETRAINED": "registry",
        "describe": "registry",
        "fetch": "registry",
        "cache_dir": "registry",
        "SOURCES": "convert",
        "convert_checkpoint": "convert",
        "read_checkpoint": "convert",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f"pspnet_tf.weights.{lazy[name]}"), name)
    raise AttributeError(f"module 'pspnet_tf.weights' has no attribute {name!r}")
