"""Which tensors of each published PSPNet checkpoint feed which pspnet_tf layer.

The tables of ``weights/README.md`` ("Keys"), as code. Keras layer names are
pspnet_tf's (``keras.applications`` names for the backbones, ``conv1_{1,2,3}``
for the deep stem, ``ppm_*``, ``main_*`` and ``aux_*`` for the head).
"""

from __future__ import annotations

import re

_HEADS = {
    "semseg": {
        "main_head_conv": "cls.0",
        "main_head_bn": "cls.1",
        "main_classifier": "cls.4",
        "aux_head_conv": "aux.0",
        "aux_head_bn": "aux.1",
        "aux_classifier": "aux.4",
    },
    "bubbliiiing": {
        "main_head_conv": "master_branch.0.bottleneck.0",
        "main_head_bn": "master_branch.0.bottleneck.1",
        "main_classifier": "master_branch.1",
        "aux_head_conv": "auxiliary_branch.0",
        "aux_head_bn": "auxiliary_branch.1",
        "aux_classifier": "auxiliary_branch.4",
    },
    "caffe": {
        "main_head_conv": "conv5_4",
        "main_head_bn": "conv5_4_bn",
        "main_classifier": "conv6",
    },
}
_CAFFE_STEM = ("conv1_1_3x3_s2", "conv1_2_3x3", "conv1_3_3x3")
_CAFFE_BLOCK = ("1x1_proj", "1x1_reduce", "3x3", "1x1_increase")  # our _0 .. _3 convs
# seed 002's InvertedResidual.conv indices of expand, depthwise and project (conv, BN).
_MBV2 = {
    "expand": 0,
    "expand_BN": 1,
    "depthwise": 3,
    "depthwise_BN": 4,
    "project": 6,
    "project_BN": 7,
}


def source_name(source: str, name: str, bins: tuple) -> str | None:
    """The source's key prefix (PyTorch) or layer name (Caffe) of Keras layer ``name``.

    Args:
        source: str. ``"semseg"``, ``"bubbliiiing"`` or ``"caffe"``.
        name: str. A layer name of a pspnet_tf model.
        bins: tuple of int. The model's pyramid bins (PyTorch indexes branches).

    Returns:
        E.g. ``"layer3.0.conv2"`` (semseg), ``"backbone.features.5.conv.3"``
        (bubbliiiing) or ``"conv4_1_3x3"`` (caffe); None when the source has
        no counterpart.
    """
    if name in _HEADS[source]:
        return _HEADS[source][name]
    bn = name.endswith(("_bn", "_BN")) or name.startswith("bn_")
    if m := re.fullmatch(r"ppm_branch(\d+)_(conv|bn)", name):
        b = int(m[1])
        if source == "caffe":
            return f"conv5_3_pool{b}_conv" + ("_bn" if bn else "")
        base = "ppm.features" if source == "semseg" else "master_branch.0.stages"
        return f"{base}.{bins.index(b)}.{2 if bn else 1}"
    if m := re.fullmatch(r"conv1_(\d)_(conv|bn)", name):
        i = int(m[1])
        if source == "caffe":
            return _CAFFE_STEM[i - 1] + ("_bn" if bn else "")
        if source == "semseg":  # layer0 = Sequential(conv1, bn1, relu, conv2, bn2, relu, ...)
            return f"layer0.{3 * (i - 1) + bn}"
        return f"backbone.{'bn' if bn else 'conv'}{i}"
    if m := re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", name):
        stage, block, i = int(m[1]), int(m[2]), int(m[3])
        if source == "caffe":
            return f"conv{stage}_{block}_{_CAFFE_BLOCK[i]}" + ("_bn" if bn else "")
        root = "backbone." if source == "bubbliiiing" else ""
        part = f"downsample.{int(bn)}" if i == 0 else f"{'bn' if bn else 'conv'}{i}"
        return f"{root}layer{stage - 1}.{block - 1}.{part}"
    if source == "bubbliiiing":
        return _mobilenetv2_name(name)
    return None


def _mobilenetv2_name(name):
    if name in ("Conv1", "bn_Conv1"):
        return f"backbone.features.0.{int(name == 'bn_Conv1')}"
    if m := re.fullmatch(r"expanded_conv_(depthwise|depthwise_BN|project|project_BN)", name):
        return f"backbone.features.1.conv.{_MBV2[m[1]] - 3}"  # no expand conv in block 0
    if m := re.fullmatch(r"block_(\d+)_(\w+)", name):
        if m[2] in _MBV2:
            return f"backbone.features.{int(m[1]) + 1}.conv.{_MBV2[m[2]]}"
    return None
