"""build_pspnet: the public builder, its defaults, and loading PSPNet weights into it.

The network itself (pyramid pooling module, heads, metadata) is :mod:`pspnet_tf.model.network`;
this module decides what to build from the caller's arguments and the weights asked for
(a registry name of :mod:`pspnet_tf.weights` or a file), then loads them.
"""

from __future__ import annotations

import numbers
import os
import warnings

import keras

from pspnet_tf.model import backbones
from pspnet_tf.model.named_weights import (
    assign_by_name,
    named_weights_from_file,
    named_weights_from_model,
    read_metadata,
)
from pspnet_tf.model.network import (
    NETWORK_KEYS,
    assemble,
    choose_bins,
    resolve_preprocessing,
    set_metadata,
)
from pspnet_tf.weights import registry


class _FromWeights:
    """The default of a network argument: what the weights say, else ``NETWORK_DEFAULTS``."""

    def __repr__(self):
        return "<default, or the weights'>"


FROM_WEIGHTS = _FromWeights()
# The network arguments' defaults when neither the caller nor the weights set them.
NETWORK_DEFAULTS = {
    "backbone": "resnet50",
    "output_stride": 8,
    "alpha": 1.0,
    "bins": None,
    "align_corners": True,
    "preprocessing": "imagenet",
    "backbone_variant": None,
}
assert tuple(NETWORK_DEFAULTS) == NETWORK_KEYS


def build_pspnet(
    num_classes,
    backbone=FROM_WEIGHTS,
    input_shape=(473, 473, 3),
    output_stride=FROM_WEIGHTS,
    aux_head=False,
    backbone_weights=None,
    weights=None,
    bins=FROM_WEIGHTS,
    align_corners=FROM_WEIGHTS,
    dropout=0.1,
    preprocessing=FROM_WEIGHTS,
    alpha=FROM_WEIGHTS,
    backbone_variant=FROM_WEIGHTS,
    class_names=None,
    palette=None,
    name=None,
):
    """Builds PSPNet as a Keras functional model.

    Args:
        num_classes: int. Number of classes (channels of the logits).
        backbone: str. ``"resnet50"``, ``"resnet101"`` or ``"mobilenetv2"``. Defaults
            to ``"resnet50"``, or what ``weights`` were trained with.
        input_shape: tuple ``(height, width, 3)``; height and width may be None.
        output_stride: int. 8 (the paper) or 16 (32 builds an undilated backbone).
            Defaults to 8, or what ``weights`` were trained with.
        aux_head: bool. Adds the auxiliary head; the model then has the dict
            outputs ``{"main", "aux"}``. Defaults to False.
        backbone_weights: None, ``"imagenet"`` (``keras.applications`` weights,
            downloaded once) or a weights file path (legacy ``.h5``, ``.keras``
            or ``.weights.h5`` of the matching ``keras.applications`` model).
        weights: None, the name of published weights (see
            ``pspnet_tf.weights.PRETRAINED``; downloaded and converted once) or
            the path of a ``.keras``/``.weights.h5`` PSPNet file. The network
            arguments not given (``backbone``, ``output_stride``, ``alpha``,
            ``bins``, ``align_corners``, ``preprocessing``, ``backbone_variant``)
            follow what the weights were trained with; one given with another
            value than the weights' is an error naming both. A different
            ``num_classes`` keeps everything but the classifiers, which start
            fresh (a warning names them).
        bins: sequence of int or None. Pyramid bins; None takes
            ``pspnet_tf.model.network.TABLE_BINS`` for square inputs of 473 and 713 (the
            paper's 1, 2, 3, 6, Fig. 3), 320 and 512 (1, 2, 4, 8, which divide their
            40 and 64 feature sizes), else 1, 2, 3, 6 (or what ``weights`` were
            trained with). Stored in the
            model, so :func:`pspnet_tf.rebuild` keeps them.
        align_corners: bool. Bilinear upsampling as the original (True) or
            half-pixel (False). Defaults to True, or the weights'.
        dropout: float. Channel dropout rate before the classifiers. Defaults to 0.1.
        preprocessing: ``"imagenet"`` (what the backbone's ImageNet weights
            expect), ``"torch"``, ``"caffe"``, ``"tf"``, None or a dict; see
            :func:`pspnet_tf.model.network.resolve_preprocessing`. Defaults to
            ``"imagenet"``, or the weights'.
        alpha: float. MobileNetV2 width multiplier (> 0). Defaults to 1.0, or the weights'.
        backbone_variant: dict or None. How the backbone differs from
            ``keras.applications`` (deep stem, stride in the 3x3 conv, padding,
            BatchNorm epsilon, ...): see :func:`pspnet_tf.model.backbones.resolve_variant`.
            None (the default, unless ``weights`` say otherwise) builds the
            ``keras.applications``-compatible backbone.
        class_names: list of str or None. Stored in the model's metadata.
        palette: list of ``[r, g, b]`` or None. Stored in the model's metadata.
        name: str or None. Model name; defaults to ``"pspnet_<backbone>"``.

    Returns:
        A ``keras.Model`` mapping ``(batch, height, width, 3)`` RGB 0-255 images
        to ``(batch, height, width, num_classes)`` float32 logits (a dict
        ``{"main": ..., "aux": ...}`` of them with ``aux_head=True``).

    Example:
    >>> model = build_pspnet(21, "mobilenetv2", (320, 320, 3), alpha=0.35)
    >>> model.output_shape
    (None, 320, 320, 21)
    """
    _check_num_classes(num_classes)
    given = {
        "backbone": backbone,
        "output_stride": output_stride,
        "alpha": alpha,
        "bins": bins,
        "align_corners": align_corners,
        "preprocessing": preprocessing,
        "backbone_variant": backbone_variant,
    }
    label, stored = weights, None
    if weights is not None:
        weights, stored = locate(weights)
    trained = (stored or {}).get("architecture", {})
    network = follow_weights(given, trained, label)
    if trained and class_names is None and trained.get("num_classes") == num_classes:
        class_names, palette = stored.get("class_names"), palette or stored.get("palette")
    model = assemble(
        num_classes,
        input_shape,
        network,
        aux_head=aux_head,
        backbone_weights=backbone_weights,
        dropout=dropout,
        class_names=class_names,
        palette=palette,
        name=name,
    )
    if weights is not None:
        load_pspnet_weights(model, weights, label=label)
    return model


def follow_weights(given: dict, trained: dict, label: str | None) -> dict:
    """The network arguments of :func:`build_pspnet`: given, else the weights', else the default.

    Args:
        given: dict of the network arguments, ``FROM_WEIGHTS`` where the caller gave none.
        trained: dict. The ``"architecture"`` metadata stored with the weights ({} if none).
        label: str or None. The weights' name, for error messages.

    Returns:
        A dict with a value for every key of ``NETWORK_DEFAULTS``.

    Raises:
        ValueError: a given argument differs from what the weights were trained with.
    """
    merged = {
        key: given[key]
        if given[key] is not FROM_WEIGHTS
        else trained.get(key, NETWORK_DEFAULTS[key])
        for key in NETWORK_DEFAULTS
    }
    for key in NETWORK_DEFAULTS:
        if key in trained and given[key] is not FROM_WEIGHTS:
            if _normalise(key, given[key], merged["backbone"]) != trained[key]:
                raise ValueError(
                    f"{key}={given[key]!r} does not match the weights {label!r}, which were "
                    f"trained with {key}={trained[key]!r}; leave {key} out to follow the weights"
                )
    return merged


def _normalise(key, value, backbone):
    """A build argument in the form the metadata stores it."""
    if key == "preprocessing":
        return resolve_preprocessing(value, backbone)
    if key == "backbone_variant":
        return backbones.resolve_variant(backbone, value)
    if key == "bins":
        return list(choose_bins((None, None), value))
    return float(value) if key == "alpha" else value


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


def _check_num_classes(num_classes):
    """``num_classes`` as the training config takes it: an integer from 2 to 255."""
    is_int = isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
    if not is_int or not 2 <= int(num_classes) <= 255:
        raise ValueError(
            f"num_classes must be an integer from 2 to 255 (background counts as a class; "
            f"255 is the ignore label), got {num_classes!r}"
        )
