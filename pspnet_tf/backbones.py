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
"""

from __future__ import annotations

import keras
from keras import layers

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BACKBONES = ("resnet50", "resnet101", "mobilenetv2")
OUTPUT_STRIDES = (8, 16, 32)


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


def _bottleneck(x, filters, stride, dilation, name):
    """ResNet v1 bottleneck with the stride in the first 1x1 conv (Keras/Caffe)."""
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = _bn(f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = _bn(f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv")(x)
    x = _bn(f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = _bn(f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def resnet(x, depth="resnet50", output_stride=8):
    """Dilated ResNet v1 (50 or 101) named as ``keras.applications.ResNet50/101``.

    Args:
        x: 4-D input tensor ``(batch, height, width, 3)``, already normalised.
        depth: str. ``"resnet50"`` or ``"resnet101"``.
        output_stride: int. 8 (conv4_x dilation 2, conv5_x dilation 4: seed 000),
            16 (conv5_x dilation 2) or 32 (no dilation).

    Returns:
        dict with ``"main"``: conv5_x output ``(batch, ceil(H/os), ceil(W/os), 2048)``
        and ``"aux"``: conv4_x output with 1024 channels.
    """
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = _bn("conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    plan = dilation_plan([1, 2, 2, 2], output_stride, stem_stride=4)
    features = {}
    for stage, (blocks, filters, (stride, dilation)) in enumerate(
        zip(RESNET_BLOCKS[depth], (64, 128, 256, 512), plan, strict=True), start=2
    ):
        for block in range(1, blocks + 1):
            x = _bottleneck(
                x,
                filters,
                stride if block == 1 else 1,
                dilation,
                name=f"conv{stage}_block{block}",
            )
        features[stage] = x
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


def _inverted_residual(x, expansion, filters, stride, dilation, block_id):
    in_channels = x.shape[-1]
    inputs = x
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    if block_id:
        x = layers.Conv2D(expansion * in_channels, 1, use_bias=False, name=f"{prefix}expand")(x)
        x = _bn(f"{prefix}expand_BN", 1e-3, 0.999)(x)
        x = layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
    x = layers.DepthwiseConv2D(
        3,
        strides=stride,
        padding="same",
        dilation_rate=dilation,
        use_bias=False,
        name=f"{prefix}depthwise",
    )(x)
    x = _bn(f"{prefix}depthwise_BN", 1e-3, 0.999)(x)
    x = layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}project")(x)
    x = _bn(f"{prefix}project_BN", 1e-3, 0.999)(x)
    if in_channels == filters and stride == 1:
        x = layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def mobilenetv2(x, alpha=1.0, output_stride=8):
    """Dilated MobileNetV2 named as ``keras.applications.MobileNetV2``.

    The final 1x1 conv to 1280 channels (``Conv_1``) is not built: PSPNet uses
    the 320-channel output of ``block_16``.

    Args:
        x: 4-D input tensor ``(batch, height, width, 3)``, already normalised.
        alpha: float. Width multiplier (ImageNet weights exist for 0.35, 0.5,
            0.75, 1.0, 1.3 and 1.4).
        output_stride: int. 8 (blocks 6-12 dilation 2, blocks 13-16 dilation 4:
            seed 002), 16 (blocks 13-16 dilation 2) or 32.

    Returns:
        dict with ``"main"``: ``block_16`` output (320 x alpha channels, rounded
        to a multiple of 8) and ``"aux"``: output of the last 96-channel block.
    """
    x = layers.Conv2D(
        make_divisible(32 * alpha), 3, strides=2, padding="same", use_bias=False, name="Conv1"
    )(x)
    x = _bn("bn_Conv1", 1e-3, 0.999)(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    plan = dilation_plan([g[3] for g in MOBILENETV2_GROUPS], output_stride, stem_stride=2)
    block_id, aux = 0, None
    for (expansion, filters, repeats, _), (stride, dilation) in zip(
        MOBILENETV2_GROUPS, plan, strict=True
    ):
        for repeat in range(repeats):
            x = _inverted_residual(
                x,
                expansion,
                make_divisible(int(filters * alpha)),
                stride if repeat == 0 else 1,
                dilation,
                block_id,
            )
            block_id += 1
        if filters == 96:
            aux = x
    return {"main": x, "aux": aux}


def build_backbone(x, backbone, output_stride=8, alpha=1.0):
    """Dispatches to :func:`resnet` or :func:`mobilenetv2` by name."""
    if backbone in RESNET_BLOCKS:
        if alpha != 1.0:
            raise ValueError(f"alpha applies to mobilenetv2 only, got alpha={alpha} for {backbone}")
        return resnet(x, backbone, output_stride)
    if backbone == "mobilenetv2":
        return mobilenetv2(x, alpha, output_stride)
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
