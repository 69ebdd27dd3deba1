"""Dilated backbones with ``keras.applications`` layer names.

Each builder maps an input tensor to the feature maps the PSPNet head needs and
returns them as a dict: ``"main"`` (input to the pyramid pooling module) and
``"aux"`` (input to the auxiliary head). Every layer that has weights carries the
name and weight shapes of its ``keras.applications`` counterpart, so ImageNet
weights load by name.

Padding never depends on whether the model was built for a static or a dynamic
size: every strided layer gives ``ceil(size / stride)`` outputs with TF "same"
semantics, decided at run time from the actual size. (``keras.applications``
MobileNetV2 pads its strided depthwise convs by a rule fixed at build time, so
built for ``(None, None, 3)`` it shifts odd-sized images by a pixel; we use
"same", which equals what it does for a static size.)

Variants for converted weights
------------------------------
Published PSPNet checkpoints were trained on ResNets that differ from
``keras.applications`` in a few places. :func:`resolve_variant` names them; the
defaults build the ``keras.applications``-compatible networks above.

- ``stem``: ``"keras"`` (7x7 conv, ``conv1_conv``) or ``"deep"`` (three 3x3
  convs 64-64-128 named ``conv1_1_conv``, ``conv1_2_conv``, ``conv1_3_conv``
  with ``_bn``/``_relu``, as in the original Caffe model and its PyTorch ports).
- ``stride_in``: ``"1x1"`` (Keras, Caffe) or ``"3x3"`` (PyTorch releases): which
  conv of a stage's first bottleneck carries the stride.
- ``first_dilation``: ``"full"`` (every 3x3 of a dilated stage uses the stage's
  dilation) or ``"half"`` (the formerly strided first block keeps the previous
  stage's dilation: the ``_nostride_dilate`` rule of bubbliiiing/pspnet-pytorch).
- ``padding``: ``"same"`` (TF), ``"symmetric"`` (PyTorch/Caffe: strided convs
  pad ``(k - 1) / 2`` on every side at every size, where TF's "same" pads only
  the bottom/right at even sizes) or ``"caffe"`` (symmetric, and the stem's
  max pool rounds its output size up as Caffe does: ``floor(H / 2) + 1``).
- ``bn_epsilon``: BatchNorm epsilon of the backbone.
- ``conv_bias``: whether ResNet convs have a bias (Keras: yes; PyTorch and
  Caffe releases: no).
"""

from __future__ import annotations

import keras
from keras import layers

from pspnet_tf.options import BACKBONES, OUTPUT_STRIDES

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}

# keras.applications-compatible defaults of each backbone's variant options.
RESNET_VARIANT = {
    "stem": "keras",
    "stride_in": "1x1",
    "first_dilation": "full",
    "padding": "same",
    "bn_epsilon": 1.001e-5,
    "conv_bias": True,
}
MOBILENETV2_VARIANT = {"first_dilation": "full", "padding": "same", "bn_epsilon": 1e-3}
_VARIANT_CHOICES = {
    "stem": ("keras", "deep"),
    "stride_in": ("1x1", "3x3"),
    "first_dilation": ("full", "half"),
    "padding": ("same", "symmetric", "caffe"),
    "conv_bias": (True, False),
}


def resolve_variant(backbone: str, variant: dict | None = None) -> dict:
    """Completes a backbone variant dict with the backbone's defaults.

    Args:
        backbone: str. One of :data:`BACKBONES`.
        variant: dict or None. Any of the options in the module docstring;
            None or ``{}`` gives the ``keras.applications``-compatible network.

    Returns:
        A new dict with every option of ``backbone``'s variant.

    Raises:
        ValueError: naming an unknown option or an invalid value.
    """
    defaults = MOBILENETV2_VARIANT if backbone == "mobilenetv2" else RESNET_VARIANT
    variant = dict(variant or {})
    unknown = sorted(set(variant) - set(defaults))
    if unknown:
        raise ValueError(
            f"backbone_variant options {unknown} do not apply to {backbone}; "
            f"it takes {sorted(defaults)}"
        )
    resolved = {**defaults, **variant}
    for key, value in resolved.items():
        choices = _VARIANT_CHOICES.get(key)
        if key == "padding" and backbone == "mobilenetv2":
            choices = ("same", "symmetric")
        if choices is not None and value not in choices:
            raise ValueError(f"backbone_variant {key} must be one of {choices}, got {value!r}")
    resolved["bn_epsilon"] = float(resolved["bn_epsilon"])
    if resolved["bn_epsilon"] <= 0:
        raise ValueError(f"backbone_variant bn_epsilon must be > 0, got {resolved['bn_epsilon']}")
    return resolved


def dilation_plan(strides, output_stride, stem_stride):
    """Turns strides beyond the output stride into dilation (timm's rule).

    Args:
        strides: sequence of int. Nominal stride of each stage (1 or 2).
        output_stride: int. Wanted ratio of input size to feature size.
        stem_stride: int. Stride accumulated before the first stage.

    Returns:
        A list of ``(stride, dilation)`` per stage: once the running stride
        reaches ``output_stride``, a stage keeps stride 1 and doubles the
        dilation instead.

    Example:
    >>> dilation_plan([1, 2, 2, 2], output_stride=8, stem_stride=4)
    [(1, 1), (2, 1), (1, 2), (1, 4)]
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    running, dilation, plan = stem_stride, 1, []
    for stride in strides:
        if running * stride > output_stride:
            dilation *= stride
            stride = 1
        running *= stride
        plan.append((stride, dilation))
    return plan


def _bn(name, epsilon=1.001e-5, momentum=0.99):
    return layers.BatchNormalization(axis=-1, epsilon=epsilon, momentum=momentum, name=name)


def _conv(x, filters, kernel, stride=1, dilation=1, padding="same", use_bias=True, name=None):
    """Conv2D (or DepthwiseConv2D when ``filters`` is None) with the variant's padding.

    TF's "same" pads a strided conv only at the bottom/right at even sizes;
    PyTorch and Caffe pad ``(k - 1) / 2`` on every side, so for those the
    strided convs get an explicit ZeroPadding2D. Stride-1 convs with odd
    kernels pad symmetrically under "same" already; 1x1 convs never pad.
    """
    pad = "valid" if kernel == 1 else "same"
    if padding != "same" and stride > 1 and kernel > 1:
        pad_name = f"{name.removesuffix('_conv')}_pad"
        x = layers.ZeroPadding2D(dilation * (kernel - 1) // 2, name=pad_name)(x)
        pad = "valid"
    options = dict(
        strides=stride, padding=pad, dilation_rate=dilation, use_bias=use_bias, name=name
    )
    if filters is None:
        return layers.DepthwiseConv2D(kernel, **options)(x)
    return layers.Conv2D(filters, kernel, **options)(x)


def _bottleneck(x, filters, stride, dilation, name, variant=RESNET_VARIANT):
    """ResNet v1 bottleneck; the stride sits in the 1x1 (Keras/Caffe) or the 3x3 conv."""
    eps, bias = variant["bn_epsilon"], variant["conv_bias"]
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv(x, 4 * filters, 1, stride, use_bias=bias, name=f"{name}_0_conv")
        shortcut = _bn(f"{name}_0_bn", eps)(shortcut)
    else:
        shortcut = x
    stride_1x1, stride_3x3 = (stride, 1) if variant["stride_in"] == "1x1" else (1, stride)
    x = _conv(x, filters, 1, stride_1x1, use_bias=bias, name=f"{name}_1_conv")
    x = _bn(f"{name}_1_bn", eps)(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = _conv(x, filters, 3, stride_3x3, dilation, variant["padding"], bias, f"{name}_2_conv")
    x = _bn(f"{name}_2_bn", eps)(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = _conv(x, 4 * filters, 1, use_bias=bias, name=f"{name}_3_conv")
    x = _bn(f"{name}_3_bn", eps)(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _resnet_stem(x, variant):
    """7x7 conv (Keras) or three 3x3 convs (deep stem), then 3x3 max pool, stride 4 in all."""
    eps, bias, padding = variant["bn_epsilon"], variant["conv_bias"], variant["padding"]
    if variant["stem"] == "keras":
        x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
        x = layers.Conv2D(64, 7, strides=2, use_bias=bias, name="conv1_conv")(x)
        x = _bn("conv1_bn", eps)(x)
        x = layers.Activation("relu", name="conv1_relu")(x)
    else:
        for i, (filters, stride) in enumerate(((64, 2), (64, 1), (128, 1)), start=1):
            x = _conv(x, filters, 3, stride, 1, padding, bias, f"conv1_{i}_conv")
            x = _bn(f"conv1_{i}_bn", eps)(x)
            x = layers.Activation("relu", name=f"conv1_{i}_relu")(x)
    # Zero padding equals -inf padding here: the input is a ReLU output (>= 0).
    # Caffe rounds the pooled size up, floor(H / 2) + 1: one more zero row/column
    # at the bottom/right gives exactly its windows at every size.
    x = layers.ZeroPadding2D(((1, 2), (1, 2)) if padding == "caffe" else 1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def resnet(x, depth="resnet50", output_stride=8, **variant):
    """Dilated ResNet v1 (50 or 101) named as ``keras.applications.ResNet50/101``.

    Args:
        x: 4-D input tensor ``(batch, height, width, 3)``, already normalised.
        depth: str. ``"resnet50"`` or ``"resnet101"``.
        output_stride: int. 8 (conv4_x dilation 2, conv5_x dilation 4: Zhao et al.
            2017, Sec. 4.1),
            16 (conv5_x dilation 2) or 32 (no dilation).
        **variant: the options of :func:`resolve_variant` (``stem``,
            ``stride_in``, ``first_dilation``, ``padding``, ``bn_epsilon``,
            ``conv_bias``); the defaults build the ``keras.applications`` network.

    Returns:
        dict with ``"main"``: conv5_x output ``(batch, ceil(H/os), ceil(W/os), 2048)``
        and ``"aux"``: conv4_x output with 1024 channels.
    """
    variant = resolve_variant(depth, variant)
    x = _resnet_stem(x, variant)
    plan = dilation_plan([1, 2, 2, 2], output_stride, stem_stride=4)
    features, previous = {}, 1
    for stage, (blocks, filters, (stride, dilation)) in enumerate(
        zip(RESNET_BLOCKS[depth], (64, 128, 256, 512), plan, strict=True), start=2
    ):
        first = previous if variant["first_dilation"] == "half" else dilation
        for block in range(1, blocks + 1):
            x = _bottleneck(
                x,
                filters,
                stride if block == 1 else 1,
                first if block == 1 else dilation,
                f"conv{stage}_block{block}",
                variant,
            )
        features[stage], previous = x, dilation
    return {"main": features[5], "aux": features[4]}


def make_divisible(value, divisor=8):
    """Rounds a channel count as ``keras.applications`` MobileNetV2 does."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


# (expansion, filters, repeats, stride) per group: the MobileNetV2 paper's table.
MOBILENETV2_GROUPS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _inverted_residual(x, expansion, filters, stride, dilation, block_id, variant):
    in_channels = x.shape[-1]
    inputs = x
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    eps = variant["bn_epsilon"]
    if block_id:
        x = layers.Conv2D(expansion * in_channels, 1, use_bias=False, name=f"{prefix}expand")(x)
        x = _bn(f"{prefix}expand_BN", eps, 0.999)(x)
        x = layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
    x = _conv(x, None, 3, stride, dilation, variant["padding"], False, f"{prefix}depthwise")
    x = _bn(f"{prefix}depthwise_BN", eps, 0.999)(x)
    x = layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}project")(x)
    x = _bn(f"{prefix}project_BN", eps, 0.999)(x)
    if in_channels == filters and stride == 1:
        x = layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def mobilenetv2(x, alpha=1.0, output_stride=8, **variant):
    """Dilated MobileNetV2 named as ``keras.applications.MobileNetV2``.

    The final 1x1 conv to 1280 channels (``Conv_1``) is not built: PSPNet uses
    the 320-channel output of ``block_16``.

    Args:
        x: 4-D input tensor ``(batch, height, width, 3)``, already normalised.
        alpha: float. Width multiplier (ImageNet weights exist for 0.35, 0.5,
            0.75, 1.0, 1.3 and 1.4).
        output_stride: int. 8 (blocks 6-12 dilation 2, blocks 13-16 dilation 4,
            as bubbliiiing/pspnet-pytorch), 16 (blocks 13-16 dilation 2) or 32.
        **variant: ``first_dilation``, ``padding`` (``"same"`` or
            ``"symmetric"``) and ``bn_epsilon`` of :func:`resolve_variant`.

    Returns:
        dict with ``"main"``: ``block_16`` output (320 x alpha channels, rounded
        to a multiple of 8) and ``"aux"``: output of the last 96-channel block.
    """
    variant = resolve_variant("mobilenetv2", variant)
    x = _conv(x, make_divisible(32 * alpha), 3, 2, 1, variant["padding"], False, "Conv1")
    x = _bn("bn_Conv1", variant["bn_epsilon"], 0.999)(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    plan = dilation_plan([g[3] for g in MOBILENETV2_GROUPS], output_stride, stem_stride=2)
    block_id, aux, previous = 0, None, 1
    for (expansion, filters, repeats, _), (stride, dilation) in zip(
        MOBILENETV2_GROUPS, plan, strict=True
    ):
        first = previous if variant["first_dilation"] == "half" else dilation
        for repeat in range(repeats):
            x = _inverted_residual(
                x,
                expansion,
                make_divisible(int(filters * alpha)),
                stride if repeat == 0 else 1,
                first if repeat == 0 else dilation,
                block_id,
                variant,
            )
            block_id += 1
        previous = dilation
        if filters == 96:
            aux = x
    return {"main": x, "aux": aux}


def build_backbone(x, backbone, output_stride=8, alpha=1.0, variant=None):
    """Dispatches to :func:`resnet` or :func:`mobilenetv2` by name."""
    if backbone in RESNET_BLOCKS:
        if alpha != 1.0:
            raise ValueError(f"alpha applies to mobilenetv2 only, got alpha={alpha} for {backbone}")
        return resnet(x, backbone, output_stride, **(variant or {}))
    if backbone == "mobilenetv2":
        return mobilenetv2(x, alpha, output_stride, **(variant or {}))
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def keras_application(backbone, alpha=1.0, weights=None, input_shape=(224, 224, 3)):
    """The ``keras.applications`` model whose weights our backbone shares by name."""
    if backbone == "resnet50":
        return keras.applications.ResNet50(
            include_top=False, weights=weights, input_shape=input_shape
        )
    if backbone == "resnet101":
        return keras.applications.ResNet101(
            include_top=False, weights=weights, input_shape=input_shape
        )
    if backbone == "mobilenetv2":
        return keras.applications.MobileNetV2(
            include_top=False, weights=weights, input_shape=input_shape, alpha=alpha
        )
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
