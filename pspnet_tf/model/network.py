"""The PSPNet graph: pyramid pooling module, heads, the metadata a model carries.

:func:`assemble` builds the network for an architecture given in full (the public
builder with its defaults and published weights is :func:`pspnet_tf.model.build.build_pspnet`);
:func:`rebuild` builds it again for another input shape with the same weights;
:func:`backbone_layers` and ``HEAD_PREFIXES`` tell the backbone from the head.

How preprocessing and metadata travel with a model
--------------------------------------------------
Every model built here starts with a :class:`pspnet_tf.model.layers.Preprocessing`
layer named ``"preprocessing"``. It takes RGB pixel values 0-255 and applies the
normalisation the weights expect, so data pipelines, prediction and export never
normalise on their own. Its config also holds the model's metadata dict, so the
metadata is saved inside the ``.keras`` file and restored by ``load_model``:

- ``"architecture"``: the :func:`build_pspnet` arguments that define the network
  (backbone, num_classes, output_stride, bins, alpha, align_corners, aux_head,
  dropout, preprocessing). :func:`rebuild` uses it to build the same network
  for another input size (e.g. ``(None, None, 3)`` for export) with the same
  bins and weights.
- ``"class_names"``: list of str or None; ``"palette"``: list of ``[r, g, b]`` or None;
  ``"weights"``: str or None, where the weights came from.

Read it with :func:`get_metadata`, change it with :func:`set_metadata`.
Other modules may add keys of their own; keep values JSON-serialisable.
"""

from __future__ import annotations

import copy
import os

import keras
from keras import layers

from pspnet_tf.model import backbones
from pspnet_tf.model.layers import (
    PREPROCESSING_LAYER,
    PREPROCESSING_MODES,
    AdaptiveAveragePooling,
    Preprocessing,
    ResizeLike,
)
from pspnet_tf.model.named_weights import (
    assign_by_name,
    named_weights_from_file,
    named_weights_from_model,
)

# Pyramid bins by (square) input size: the kernel/stride table of seed 000 (the paper's
# bins at 473 and 713; 1, 2, 4, 8 where those divide the feature size). At output
# stride 8 the feature size divides by every bin (473 -> 60: kernels 60, 30, 20, 10).
TABLE_BINS = {473: (1, 2, 3, 6), 713: (1, 2, 3, 6), 320: (1, 2, 4, 8), 512: (1, 2, 4, 8)}
DEFAULT_BINS = (1, 2, 3, 6)
# What keras.applications ImageNet weights were trained with, per backbone.
IMAGENET_PREPROCESSING = {"resnet50": "caffe", "resnet101": "caffe", "mobilenetv2": "tf"}
# keras.applications MobileNetV2 layers PSPNet does not build (the 1280-channel conv).
_UNUSED_IMAGENET_LAYERS = ("Conv_1", "Conv_1_bn")


def choose_bins(input_shape, bins=None):
    """Pyramid bins for an input shape: explicit, from the table, or 1, 2, 3, 6."""
    if bins is not None:
        bins = tuple(int(b) for b in bins)
        if not bins or min(bins) < 1:
            raise ValueError(f"bins must be positive integers, got {bins!r}")
        return bins
    height, width = input_shape[0], input_shape[1]
    if height == width and height in TABLE_BINS:
        return TABLE_BINS[height]
    return DEFAULT_BINS


def resolve_preprocessing(preprocessing, backbone):
    """Turns the ``preprocessing`` argument into ``{mean, std, channel_order}``.

    ``"imagenet"`` means what this backbone's ``keras.applications`` ImageNet
    weights expect: Caffe-style BGR mean subtraction for ResNet, scaling to
    [-1, 1] for MobileNetV2. ``"torch"``, ``"caffe"`` and ``"tf"`` name a
    scheme directly, ``None`` means no normalisation, and a dict gives
    ``mean``, ``std`` (0-255 units) and ``channel_order`` explicitly.
    """
    if preprocessing is None:
        preprocessing = "none"
    if isinstance(preprocessing, dict):
        unknown = set(preprocessing) - {"mean", "std", "channel_order"}
        if unknown or not {"mean", "std"} <= set(preprocessing):
            raise ValueError(
                f"a preprocessing dict needs 'mean' and 'std' (and optionally 'channel_order'), "
                f"got keys {sorted(preprocessing)}"
            )
        return {"channel_order": "rgb", **copy.deepcopy(preprocessing)}
    if preprocessing == "imagenet":
        preprocessing = IMAGENET_PREPROCESSING[backbone]
    if preprocessing not in PREPROCESSING_MODES:
        raise ValueError(
            "preprocessing must be 'imagenet', one of "
            f"{sorted(PREPROCESSING_MODES)}, None or a dict; got {preprocessing!r}"
        )
    mode = PREPROCESSING_MODES[preprocessing]
    return {
        "mean": list(mode["mean"]),
        "std": list(mode["std"]),
        "channel_order": mode["channel_order"],
    }


def _conv_bn_relu(x, filters, kernel_size, name, dilation=1):
    x = layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _pool(x, bins, name):
    """Average pooling to ``bins x bins``: plain pooling where the size divides, else adaptive."""
    height, width = x.shape[1], x.shape[2]
    if height and width and height % bins == 0 and width % bins == 0:
        kernel = (height // bins, width // bins)
        return layers.AveragePooling2D(kernel, strides=kernel, name=name)(x)
    return AdaptiveAveragePooling(bins, name=name)(x)


def pyramid_pooling_module(x, bins, align_corners=True, name="ppm"):
    """The pyramid pooling module (Zhao et al. 2017, Fig. 3c).

    Args:
        x: feature map ``(batch, h, w, c)``.
        bins: sequence of int. Grid size of each branch's average pooling.
        align_corners: bool. Upsampling mode of the branches.
        name: str. Prefix of the layer names.

    Returns:
        ``(batch, h, w, c + len(bins) * (c // len(bins)))``: the input
        concatenated with each branch (pool -> 1x1 conv -> BN -> ReLU -> upsample).
    """
    width = x.shape[-1] // len(bins)
    branches = [x]
    for b in bins:
        y = _pool(x, b, name=f"{name}_pool{b}")
        y = _conv_bn_relu(y, width, 1, name=f"{name}_branch{b}")
        branches.append(ResizeLike(align_corners, name=f"{name}_upsample{b}")([y, x]))
    return layers.Concatenate(name=f"{name}_concat")(branches)


def _classifier_head(x, image, filters, num_classes, dropout, align_corners, name):
    """3x3 conv -> BN -> ReLU -> channel dropout -> 1x1 conv -> upsample to the image."""
    x = _conv_bn_relu(x, filters, 3, name=f"{name}_head")
    if dropout:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    x = layers.Conv2D(num_classes, 1, name=f"{name}_classifier")(x)
    # float32 output: logits stay float32 under mixed precision.
    return ResizeLike(align_corners, dtype="float32", name=name)([x, image])


# Layers that PSPNet adds on top of the backbone (the names used below).
HEAD_PREFIXES = ("ppm_", "main_", "aux_")
HEAD_OUTPUTS = ("main", "aux")
# The network arguments of build_pspnet (stored in the metadata's "architecture").
NETWORK_KEYS = (
    "backbone",
    "output_stride",
    "alpha",
    "bins",
    "align_corners",
    "preprocessing",
    "backbone_variant",
)


def is_head_layer(name):
    """True for the pyramid pooling module and the heads (``ppm_*``, ``main_*``, ``aux_*``)."""
    return name in HEAD_OUTPUTS or name.startswith(HEAD_PREFIXES)


def backbone_layers(model):
    """The backbone's layers: every layer except the input, preprocessing and head layers."""
    return [
        layer
        for layer in model.layers
        if not is_head_layer(layer.name)
        and layer.name != PREPROCESSING_LAYER
        and not isinstance(layer, keras.layers.InputLayer)
    ]


def assemble(num_classes, input_shape, network, **options):
    """The PSPNet graph for an architecture given in full, freshly initialised.

    Args:
        num_classes: int. Channels of the logits.
        input_shape: tuple ``(height, width, 3)``; height and width may be None.
        network: dict with every key of ``NETWORK_DEFAULTS`` in
            :mod:`pspnet_tf.model.build` (backbone, output_stride, alpha, bins,
            align_corners, preprocessing, backbone_variant).
        **options: ``aux_head``, ``backbone_weights`` (None, ``"imagenet"`` or a
            file), ``dropout``, ``class_names``, ``palette`` and ``name``, as in
            :func:`pspnet_tf.model.build.build_pspnet`.

    Returns:
        The ``keras.Model`` (see :func:`pspnet_tf.model.build.build_pspnet`).
    """
    backbone, output_stride, alpha = network["backbone"], network["output_stride"], network["alpha"]
    align_corners, aux_head, dropout = (
        network["align_corners"],
        options["aux_head"],
        options["dropout"],
    )
    if backbone not in backbones.BACKBONES:
        raise ValueError(f"backbone must be one of {backbones.BACKBONES}, got {backbone!r}")
    if not float(alpha) > 0:
        raise ValueError(f"alpha must be > 0 (the MobileNetV2 width multiplier), got {alpha!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[2] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape!r}")
    bins = choose_bins(input_shape, network["bins"])
    architecture = {
        "num_classes": int(num_classes),
        "backbone": backbone,
        "output_stride": int(output_stride),
        "bins": list(bins),
        "alpha": float(alpha),
        "align_corners": bool(align_corners),
        "aux_head": bool(aux_head),
        "dropout": float(dropout),
        "preprocessing": resolve_preprocessing(network["preprocessing"], backbone),
        "backbone_variant": backbones.resolve_variant(backbone, network["backbone_variant"]),
    }
    metadata = {
        "architecture": architecture,
        "class_names": _check_class_names(options["class_names"], num_classes),
        "palette": _check_palette(options["palette"]),
        "weights": None,
    }
    image = keras.Input(input_shape, name="image")
    x = Preprocessing(**architecture["preprocessing"], metadata=metadata, name=PREPROCESSING_LAYER)(
        image
    )
    features = backbones.build_backbone(
        x, backbone, output_stride, alpha, architecture["backbone_variant"]
    )
    if options["backbone_weights"] is not None:
        _load_backbone_weights(
            keras.Model(image, features["main"]), backbone, alpha, options["backbone_weights"]
        )
    main_channels = features["main"].shape[-1]
    is_resnet = backbone != "mobilenetv2"
    x = pyramid_pooling_module(features["main"], bins, align_corners)
    outputs = _classifier_head(
        x,
        image,
        512 if is_resnet else main_channels // 4,
        num_classes,
        dropout,
        align_corners,
        "main",
    )
    if aux_head:
        aux = _classifier_head(
            features["aux"],
            image,
            256 if is_resnet else main_channels // 8,
            num_classes,
            dropout,
            align_corners,
            "aux",
        )
        outputs = {"main": outputs, "aux": aux}
    return keras.Model(image, outputs, name=options["name"] or f"pspnet_{backbone}")


def _check_class_names(class_names, num_classes):
    if class_names is None:
        return None
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
    return class_names


def _check_palette(palette):
    if palette is None:
        return None
    palette = [[int(v) for v in colour] for colour in palette]
    if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
        raise ValueError("palette must be a list of [r, g, b] colours with values 0-255")
    return palette


def _load_backbone_weights(backbone_model, backbone, alpha, source):
    def reference():
        return backbones.keras_application(backbone, alpha)

    if source == "imagenet":
        named = named_weights_from_model(
            backbones.keras_application(backbone, alpha, weights="imagenet")
        )
        label = f"keras.applications {backbone} ImageNet weights"
    else:
        named = named_weights_from_file(source, reference=reference)
        label = os.fspath(source)
    assign_by_name(backbone_model, named, ignore_unused=_UNUSED_IMAGENET_LAYERS, source=label)


def get_metadata(model):
    """Returns a copy of the metadata dict carried by ``model`` (see module docstring)."""
    return copy.deepcopy(_preprocessing_layer(model).metadata)


def set_metadata(model, **updates):
    """Updates the metadata carried by ``model``; it is saved with the model.

    Args:
        model: a model built by :func:`build_pspnet` (or loaded from one).
        **updates: keys to set, e.g. ``class_names=[...]``, ``palette=[...]``,
            ``weights="..."``. ``class_names`` and ``palette`` are validated.
    """
    layer = _preprocessing_layer(model)
    metadata = copy.deepcopy(layer.metadata)
    num_classes = metadata.get("architecture", {}).get("num_classes")
    if "class_names" in updates and num_classes is not None:
        updates["class_names"] = _check_class_names(updates["class_names"], num_classes)
    if "palette" in updates:
        updates["palette"] = _check_palette(updates["palette"])
    metadata.update(copy.deepcopy(updates))
    layer.metadata = metadata


def _preprocessing_layer(model):
    if not isinstance(model, keras.Model):
        hint = (
            ": load it first (keras.models.load_model)"
            if isinstance(model, (str, os.PathLike))
            else ""
        )
        raise ValueError(
            f"expected a Keras model built by pspnet_tf, got {type(model).__name__}{hint}"
        )
    try:
        layer = model.get_layer(PREPROCESSING_LAYER)
    except ValueError:
        layer = None
    if not isinstance(layer, Preprocessing):
        raise ValueError(f"model {model.name!r} has no pspnet_tf Preprocessing layer")
    return layer


def inference_model(model):
    """The model with its ``main`` output only, sharing the same layers and weights."""
    if not isinstance(model.output, dict) and len(model.outputs) == 1:
        return model
    return keras.Model(model.input, model.get_layer("main").output, name=model.name)


def rebuild(model, input_shape=None, aux_head=None):
    """Builds the same PSPNet for another input shape, with the same bins and weights.

    Args:
        model: a model built by :func:`build_pspnet`.
        input_shape: tuple or None. E.g. ``(None, None, 3)`` for any size.
            None keeps the model's input shape.
        aux_head: bool or None. None keeps the model's outputs as they are;
            False drops the auxiliary head (its weights are left behind), True
            adds a freshly initialised one.

    Returns:
        A new ``keras.Model`` with copies of ``model``'s weights and metadata.
    """
    metadata = get_metadata(model)
    if not metadata.get("architecture"):
        raise ValueError(f"model {model.name!r} is not a PSPNet built by build_pspnet (its "
                         "metadata has no architecture to rebuild from)")  # fmt: skip
    arch = metadata["architecture"]
    if aux_head is None:  # what the given model has (inference_model drops it)
        aux_head = isinstance(model.output, dict) and "aux" in model.output
    network = {key: arch[key] for key in NETWORK_KEYS}
    new = assemble(
        arch["num_classes"],
        tuple(input_shape or model.input_shape[1:]),
        network,
        aux_head=aux_head,
        backbone_weights=None,
        dropout=arch["dropout"],
        class_names=None,
        palette=None,
        name=model.name,
    )
    named = named_weights_from_model(model)
    # The auxiliary head is dropped (its weights stay behind) or added (fresh).
    left_behind = [n for n in named if n.startswith("aux_")] if not aux_head else []
    fresh = [n for n in named_weights_from_model(new) if n not in named]
    assign_by_name(new, named, skip=fresh, ignore_unused=left_behind, source=model.name)
    set_metadata(new, **{k: v for k, v in metadata.items() if k != "architecture"})
    return new
