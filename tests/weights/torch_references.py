"""Test-only PyTorch twins of the published PSPNet architectures, with their exact keys.

Each class rebuilds one source's network as that source's code defines it
(module names, hence state_dict keys; where the stride sits; dilation;
padding; pyramid order) so that a randomly initialised instance, saved in the
source's checkpoint format, is a stand-in for the published file:

- :class:`SemsegPSPNet`: hszhao/semseg ``model/pspnet.py`` + ``model/resnet.py``.
- :class:`BubbliiiingPSPNet`: bubbliiiing/pspnet-pytorch ``nets/pspnet.py``
  (seed 002), ResNet-50 or MobileNetV2 backbone.
- :class:`CaffePSPNet`: the Caffe prototxt of hszhao/PSPNet, exported as the
  ``.npy`` dict of its Keras port by :func:`caffe_npy_dict`.

Written from the sources' documented structure; only the forward pass at
inference is reproduced (no losses, no training branches).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class Bottleneck(nn.Module):
    """torchvision-style bottleneck: stride on conv2 (the 3x3), as semseg and seed 002."""

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _resnet_layers(depth):
    """layer1..layer4 of an undilated ResNet with a 128-channel deep stem."""
    stages, cin = [], 128
    for planes, blocks, stride in zip(
        (64, 128, 256, 512), RESNET_BLOCKS[depth], (1, 2, 2, 2), strict=True
    ):
        downsample = nn.Sequential(
            nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
        layer = [Bottleneck(cin, planes, stride, downsample)]
        layer += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*layer))
        cin = planes * 4
    return stages


class PPM(nn.Module):
    def __init__(self, cin, width, bins):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b), nn.Conv2d(cin, width, 1, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(),
            )
            for b in bins
        )  # fmt: skip

    def forward(self, x):
        size = x.shape[2:]
        pyramid = [F.interpolate(f(x), size, mode="bilinear", align_corners=True)
                   for f in self.features]  # fmt: skip
        return torch.cat([x, *pyramid], 1)


def _head(cin, width, classes):
    return nn.Sequential(
        nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Dropout2d(0.1), nn.Conv2d(width, classes, 1),
    )  # fmt: skip


class SemsegPSPNet(nn.Module):
    """hszhao/semseg PSPNet: keys layer0.*, layer1-4.*, ppm.features.*, cls.*, aux.*."""

    def __init__(self, layers=50, classes=3, bins=(1, 2, 3, 6)):
        super().__init__()
        relu = nn.ReLU()
        self.layer0 = nn.Sequential(
            _conv3x3(3, 64, 2), nn.BatchNorm2d(64), relu, _conv3x3(64, 64), nn.BatchNorm2d(64),
            relu, _conv3x3(64, 128), nn.BatchNorm2d(128), relu, nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        self.layer1, self.layer2, self.layer3, self.layer4 = _resnet_layers(layers)
        # semseg's rule: every conv2 of layer3/layer4 dilated 2/4, no stride anywhere.
        for layer, dilation in ((self.layer3, 2), (self.layer4, 4)):
            for name, m in layer.named_modules():
                if "conv2" in name:
                    m.dilation, m.padding, m.stride = (dilation,) * 2, (dilation,) * 2, (1, 1)
                elif "downsample.0" in name:
                    m.stride = (1, 1)
        self.ppm = PPM(2048, 2048 // len(bins), bins)
        self.cls = _head(4096, 512, classes)
        self.aux = _head(1024, 256, classes)

    def forward(self, x):
        size = x.shape[2:]
        x = self.layer2(self.layer1(self.layer0(x)))
        x_aux = self.layer3(x)
        main = self.cls(self.ppm(self.layer4(x_aux)))
        aux = self.aux(x_aux)
        return [F.interpolate(y, size, mode="bilinear", align_corners=True) for y in (main, aux)]


def _nostride_dilate(module, dilate):
    """Seed 002's rule: strided convs lose their stride; a strided 3x3 gets dilate // 2."""
    if isinstance(module, nn.Conv2d):
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilate // 2,) * 2
        elif module.kernel_size == (3, 3):
            module.dilation = module.padding = (dilate,) * 2


class _SeedResnet(nn.Module):
    """seed 002's Resnet wrapper: keys conv1-3, bn1-3, layer1-4."""

    def __init__(self, downsample_factor):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(3, 64, 2), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = _conv3x3(64, 64), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = _conv3x3(64, 128), nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.layer3, self.layer4 = _resnet_layers(50)
        dilate = {8: ((self.layer3, 2), (self.layer4, 4)), 16: ((self.layer4, 2),)}
        for layer, d in dilate[downsample_factor]:
            layer.apply(lambda m, d=d: _nostride_dilate(m, d))

    def forward(self, x):
        for i in (1, 2, 3):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        x = self.layer2(self.layer1(self.maxpool(x)))
        x_aux = self.layer3(x)
        return x_aux, self.layer4(x_aux)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = round(cin * expand)
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class _SeedMobileNetV2(nn.Module):
    """seed 002's MobileNetV2 wrapper: keys features.0-17 (the 1280-channel conv dropped)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, downsample_factor):
        super().__init__()
        features = [nn.Sequential(_conv3x3(3, 32, 2), nn.BatchNorm2d(32), nn.ReLU6())]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*features)
        dilate = {8: ((7, 14, 2), (14, 18, 4)), 16: ((14, 18, 2),)}
        for start, stop, d in dilate[downsample_factor]:
            for i in range(start, stop):
                self.features[i].apply(lambda m, d=d: _nostride_dilate(m, d))

    def forward(self, x):
        x_aux = self.features[:14](x)
        return x_aux, self.features[14:](x_aux)


class _PSPModule(nn.Module):
    def __init__(self, cin, bins):
        super().__init__()
        width = cin // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(cin, width, 1, bias=False),
                          nn.BatchNorm2d(width), nn.ReLU())
            for b in bins
        )  # fmt: skip
        self.bottleneck = nn.Sequential(
            nn.Conv2d(cin + width * len(bins), width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout2d(0.1),
        )  # fmt: skip

    def forward(self, x):
        size = x.shape[2:]
        pyramid = [F.interpolate(s(x), size, mode="bilinear", align_corners=True)
                   for s in self.stages]  # fmt: skip
        return self.bottleneck(torch.cat([x, *pyramid], 1))


class BubbliiiingPSPNet(nn.Module):
    """seed 002's PSPNet: keys backbone.*, master_branch.*, auxiliary_branch.*."""

    def __init__(self, num_classes=3, downsample_factor=8, backbone="resnet50", aux_branch=True):
        super().__init__()
        if backbone == "resnet50":
            self.backbone, aux_channels, channels = _SeedResnet(downsample_factor), 1024, 2048
        else:
            self.backbone, aux_channels, channels = _SeedMobileNetV2(downsample_factor), 96, 320
        self.master_branch = nn.Sequential(
            _PSPModule(channels, (1, 2, 3, 6)), nn.Conv2d(channels // 4, num_classes, 1)
        )
        self.aux_branch = aux_branch
        if aux_branch:
            self.auxiliary_branch = _head(aux_channels, channels // 8, num_classes)

    def forward(self, x):
        size = x.shape[2:]
        x_aux, x = self.backbone(x)
        outputs = [self.master_branch(x)]
        if self.aux_branch:
            outputs.append(self.auxiliary_branch(x_aux))
        return [F.interpolate(y, size, mode="bilinear", align_corners=True) for y in outputs]


class CaffePSPNet(nn.Module):
    """The Caffe PSPNet (hszhao/PSPNet prototxt) with Caffe layer names as module keys.

    Deep stem, stride in the 1x1 convs (``conv3_1_1x1_reduce``/``_proj``), every
    3x3 of conv4/conv5 dilated 2/4, max pool rounding up (Caffe's ceil mode), the
    pyramid concatenated as [conv5_3, pool6, pool3, pool2, pool1], BN eps 1e-5.
    """

    def __init__(self, layers=50, classes=3, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins, self.depth = bins, layers
        m = {}
        for name, cin, cout, stride in (("conv1_1_3x3_s2", 3, 64, 2), ("conv1_2_3x3", 64, 64, 1),
                                        ("conv1_3_3x3", 64, 128, 1)):  # fmt: skip
            m[name], m[name + "_bn"] = (
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
        cin = 128
        for stage, planes, blocks in zip(
            (2, 3, 4, 5), (64, 128, 256, 512), RESNET_BLOCKS[layers], strict=True
        ):
            dilation = {4: 2, 5: 4}.get(stage, 1)
            for b in range(1, blocks + 1):
                stride = 2 if (stage == 3 and b == 1) else 1
                p = f"conv{stage}_{b}_"
                m[p + "1x1_reduce"] = nn.Conv2d(cin, planes, 1, stride, bias=False)
                m[p + "3x3"] = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
                m[p + "1x1_increase"] = nn.Conv2d(planes, planes * 4, 1, bias=False)
                for n in ("1x1_reduce", "3x3", "1x1_increase"):
                    m[p + n + "_bn"] = nn.BatchNorm2d(m[p + n].out_channels)
                if b == 1:
                    m[p + "1x1_proj"] = nn.Conv2d(cin, planes * 4, 1, stride, bias=False)
                    m[p + "1x1_proj_bn"] = nn.BatchNorm2d(planes * 4)
                cin = planes * 4
        for b in bins:
            m[f"conv5_3_pool{b}_conv"] = nn.Conv2d(2048, 512, 1, bias=False)
            m[f"conv5_3_pool{b}_conv_bn"] = nn.BatchNorm2d(512)
        m["conv5_4"], m["conv5_4_bn"] = (
            nn.Conv2d(4096, 512, 3, 1, 1, bias=False),
            nn.BatchNorm2d(512),
        )
        m["conv6"] = nn.Conv2d(512, classes, 1)
        self.net = nn.ModuleDict(m)

    def _cbr(self, name, x, relu=True):
        x = self.net[name + "_bn"](self.net[name](x))
        return F.relu(x) if relu else x

    def forward(self, x):
        size = x.shape[2:]
        for name in ("conv1_1_3x3_s2", "conv1_2_3x3", "conv1_3_3x3"):
            x = self._cbr(name, x)
        x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        for stage in (2, 3, 4, 5):
            for b in range(1, RESNET_BLOCKS[self.depth][stage - 2] + 1):
                p = f"conv{stage}_{b}_"
                y = self._cbr(p + "3x3", self._cbr(p + "1x1_reduce", x))
                y = self._cbr(p + "1x1_increase", y, relu=False)
                x = F.relu(y + (self._cbr(p + "1x1_proj", x, relu=False) if b == 1 else x))
        pyramid = [F.interpolate(self._cbr(f"conv5_3_pool{b}_conv", F.adaptive_avg_pool2d(x, b)),
                                 x.shape[2:], mode="bilinear", align_corners=True)
                   for b in sorted(self.bins, reverse=True)]  # fmt: skip
        x = self._cbr("conv5_4", torch.cat([x, *pyramid], 1))
        return [F.interpolate(self.net["conv6"](x), size, mode="bilinear", align_corners=True)]


def caffe_npy_dict(model):
    """The ``.npy`` layout of the Keras port: HWIO conv weights, BN blobs as (1, C, 1, 1)."""
    layers = {}
    for name, module in model.net.items():
        if isinstance(module, nn.BatchNorm2d):
            blob = {"scale": module.weight, "offset": module.bias,
                    "mean": module.running_mean, "variance": module.running_var}  # fmt: skip
            layers[name] = {k: v.detach().numpy().reshape(1, -1, 1, 1) for k, v in blob.items()}
        else:
            layers[name] = {"weights": module.weight.detach().numpy().transpose(2, 3, 1, 0)}
            if module.bias is not None:
                layers[name]["biases"] = module.bias.detach().numpy()
    return layers


def randomize(model, seed=0):
    """Random weights and BatchNorm statistics, like a trained network's.

    Fresh models have BatchNorm statistics 0/1 and hide bugs (a swapped mean
    and variance, a shifted padding). Purely random statistics make a deep
    network chaotic, so float rounding grows block by block; instead the
    statistics are measured on random input (as training would) and then
    perturbed, which keeps activations O(1) and every statistic distinct.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        model.train()
        model(torch.randn((2, 3, 65, 65), generator=gen))
        for m in bns:
            m.momentum = 0.1
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.4 + 0.8)
            noise = torch.randn(m.running_mean.shape, generator=gen) * 0.1
            m.running_mean.add_(noise * m.running_var.sqrt())
    return model.eval()


def logits(model, image_nhwc, mean, std, bgr=False):
    """Runs ``model`` the way its source does: normalise, NCHW, first output, back to NHWC."""
    x = np.asarray(image_nhwc, "float32")
    if bgr:
        x = x[..., ::-1]
    x = (x - np.asarray(mean, "float32")) / np.asarray(std, "float32")
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return [y.numpy().transpose(0, 2, 3, 1) for y in out]


def relative_error(got, expected):
    """max |got - expected| / max |expected|: the conversion tests' measure."""
    got, expected = np.asarray(got, "float64"), np.asarray(expected, "float64")
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert np.abs(expected).max() > 1e-3  # a vanishing reference would make any test pass
    return float(np.abs(got - expected).max() / np.abs(expected).max())
