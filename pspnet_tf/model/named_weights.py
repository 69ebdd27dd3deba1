"""Loading weights by layer name, with every mismatch reported at once.

``keras.applications`` layer names are this project's public interface for the
backbones, so ImageNet weights (and any file holding them) are matched to our
layers by name. Files read by name:

- legacy Keras HDF5 (``.h5``): what ``keras.applications`` downloads;
- full Keras models (``.keras``);
- Keras 3 weight files (``.weights.h5``) of a ``keras.applications`` backbone
  (these store weights by position, so they are read through that model).

Nothing here knows PSPNet: :mod:`pspnet_tf.model.network` and :mod:`pspnet_tf.model.build` use it.
"""

from __future__ import annotations

import json
import os
import zipfile

import h5py
import keras
import numpy as np

from pspnet_tf.model.layers import PREPROCESSING_LAYER


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
        :mod:`pspnet_tf.model.build`), or None for a file without one.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError):
        return None
    for layer in config.get("config", {}).get("layers", []):
        layer_config = layer.get("config", {})
        if layer_config.get("name") == PREPROCESSING_LAYER and "metadata" in layer_config:
            return layer_config["metadata"] or None
    return None
