"""PSPNet: pyramid pooling module, heads and :func:`build_pspnet`.

How preprocessing and metadata travel with a model
--------------------------------------------------
Every model built here starts with a :class:`pspnet_tf.layers.Preprocessing`
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

from pspnet_tf import backbones
from pspnet_tf import weights as weights_lib
from pspnet_tf.layers import (
    PREPROCESSING_MODES,
    AdaptiveAveragePooling,
    Preprocessing,
    ResizeLike,
)

# Pyramid bins by (square) input size: seed 000's kernel/stride table. At output
# stride 8 the feature size divides by every bin (473 -> 60: kernels 60, 30, 20, 10).
TABLE_BINS = {473: (1, 2, 3, 6), 713: (1, 2, 3, 6), 320: (1, 2, 4, 8), 512: (1, 2, 4, 8)}
DEFAULT_BINS = (1, 2, 3, 6)
# What keras.applications ImageNet weights were trained with, per backbone.
IMAGENET_PREPROCESSING = {"resnet50": "caffe", "resnet101": "caffe", "mobilenetv2": "tf"}
PREPROCESSING_LAYER = "preprocessing"
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


def build_pspnet(
    num_classes,
    backbone="resnet50",
    input_shape=(473, 473, 3),
    output_stride=8,
    aux_head=False,
    backbone_weights=None,
    weights=None,
    bins=None,
    align_corners=True,
    dropout=0.1,
    preprocessing="imagenet",
    alpha=1.0,
    backbone_variant=None,
    class_names=None,
    palette=None,
    name=None,
):
    """Builds PSPNet as a Keras functional model.

    Args:
        num_classes: int. Number of classes (channels of the logits).
        backbone: str. ``"resnet50"``, ``"resnet101"`` or ``"mobilenetv2"``.
        input_shape: tuple ``(height, width, 3)``; height and width may be None.
        output_stride: int. 8 (the paper) or 16 (32 builds an undilated backbone).
        aux_head: bool. Adds the auxiliary head; the model then has the dict
            outputs ``{"main", "aux"}``. Defaults to False.
        backbone_weights: None, ``"imagenet"`` (``keras.applications`` weights,
            downloaded once) or a weights file path (legacy ``.h5``, ``.keras``
            or ``.weights.h5`` of the matching ``keras.applications`` model).
        weights: None, the name of published weights (see
            ``pspnet_tf.weights.PRETRAINED``; downloaded and converted once) or
            the path of a ``.keras``/``.weights.h5`` PSPNet file. The network
            arguments left at their defaults (``backbone``, ``output_stride``,
            ``alpha``, ``bins``, ``align_corners``, ``preprocessing``,
            ``backbone_variant``) follow what the weights were trained with; a
            different ``num_classes`` keeps everything but the classifiers,
            which start fresh (a warning names them).
        bins: sequence of int or None. Pyramid bins; None takes seed 000's table
            for inputs of 473, 713 (1, 2, 3, 6), 320 and 512 (1, 2, 4, 8), else
            1, 2, 3, 6. Stored in the model, so :func:`rebuild` keeps them.
        align_corners: bool. Bilinear upsampling as the original (True) or
            half-pixel (False). Defaults to True.
        dropout: float. Channel dropout rate before the classifiers. Defaults to 0.1.
        preprocessing: ``"imagenet"`` (what the backbone's ImageNet weights
            expect), ``"torch"``, ``"caffe"``, ``"tf"``, None or a dict; see
            :func:`resolve_preprocessing`.
        alpha: float. MobileNetV2 width multiplier. Defaults to 1.0.
        backbone_variant: dict or None. How the backbone differs from
            ``keras.applications`` (deep stem, stride in the 3x3 conv, padding,
            BatchNorm epsilon, ...): see :func:`pspnet_tf.backbones.resolve_variant`.
            None builds the ``keras.applications``-compatible backbone.
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
    network = {
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
        weights, stored = weights_lib.locate(weights)
    if stored and "architecture" in stored:
        network = weights_lib.follow_weights(network, stored["architecture"], label)
        if class_names is None and stored["architecture"].get("num_classes") == num_classes:
            class_names, palette = stored.get("class_names"), palette or stored.get("palette")
    model = _assemble(
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
        weights_lib.load_pspnet_weights(model, weights, label=label)
    return model


def _assemble(num_classes, input_shape, network, **options):
    """The network of :func:`build_pspnet`, with freshly initialised (or ImageNet) weights."""
    backbone, output_stride, alpha = network["backbone"], network["output_stride"], network["alpha"]
    align_corners, aux_head, dropout = (
        network["align_corners"],
        options["aux_head"],
        options["dropout"],
    )
    if backbone not in backbones.BACKBONES:
        raise ValueError(f"backbone must be one of {backbones.BACKBONES}, got {backbone!r}")
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
        named = weights_lib.named_weights_from_model(
            backbones.keras_application(backbone, alpha, weights="imagenet")
        )
        label = f"keras.applications {backbone} ImageNet weights"
    else:
        named = weights_lib.named_weights_from_file(source, reference=reference)
        label = os.fspath(source)
    weights_lib.assign_by_name(
        backbone_model, named, ignore_unused=_UNUSED_IMAGENET_LAYERS, source=label
    )


# Moved to pspnet_tf.weights with the registry; kept here for existing callers.
load_pspnet_weights = weights_lib.load_pspnet_weights


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
    arch = metadata["architecture"]
    if aux_head is None:  # what the given model has (inference_model drops it)
        aux_head = isinstance(model.output, dict) and "aux" in model.output
    new = build_pspnet(
        input_shape=tuple(input_shape or model.input_shape[1:]),
        **{**arch, "aux_head": aux_head},
        name=model.name,
    )
    named = weights_lib.named_weights_from_model(model)
    # The auxiliary head is dropped (its weights stay behind) or added (fresh).
    left_behind = [n for n in named if n.startswith("aux_")] if not aux_head else []
    fresh = [n for n in weights_lib.named_weights_from_model(new) if n not in named]
    weights_lib.assign_by_name(new, named, skip=fresh, ignore_unused=left_behind, source=model.name)
    set_metadata(new, **{k: v for k, v in metadata.items() if k != "architecture"})
    return new
