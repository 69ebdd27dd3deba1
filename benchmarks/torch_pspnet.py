"""A PyTorch eager PSPNet with the same architecture as pspnet_tf's default model.

Used only by the benchmarks, to time the same network in PyTorch on the same machine.
Same layers, parameter count and FLOPs as ``pspnet_tf.build_pspnet`` (keras.applications
ResNet v1 with conv biases and the stride in the first 1x1 conv; MobileNetV2 with the same
dilation plan; PPM with adaptive pooling; align_corners=True upsampling), and
``load_from_keras`` copies a Keras model's weights so both give the same logits (at odd
input sizes, where PyTorch's symmetric padding equals TF's "same").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
MOBILENETV2_GROUPS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def dilation_plan(strides, output_stride, stem_stride):
    running, dilation, plan = stem_stride, 1, []
    for stride in strides:
        if running * stride > output_stride:
            dilation, stride = dilation * stride, 1
        running *= stride
        plan.append((stride, dilation))
    return plan


def make_divisible(value, divisor=8):
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvBN(nn.Sequential):
    """Conv -> BN (-> activation); ``name`` is the Keras layer prefix for weight loading."""

    def __init__(self, cin, cout, k, stride=1, dilation=1, groups=1, bias=False, eps=1e-5,
                 act=None, name=""):  # fmt: skip
        pad = dilation * (k - 1) // 2
        layers = [
            nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=bias),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if act is not None:
            layers.append(act)
        super().__init__(*layers)
        self.keras_names = name


class Bottleneck(nn.Module):
    def __init__(self, cin, filters, stride, dilation, name):
        super().__init__()
        eps = 1.001e-5
        self.shortcut = None
        if stride != 1 or cin != 4 * filters:
            self.shortcut = ConvBN(cin, 4 * filters, 1, stride, bias=True, eps=eps,
                                   name=(f"{name}_0_conv", f"{name}_0_bn"))  # fmt: skip
        self.c1 = ConvBN(cin, filters, 1, stride, bias=True, eps=eps, act=nn.ReLU(True),
                         name=(f"{name}_1_conv", f"{name}_1_bn"))  # fmt: skip
        self.c2 = ConvBN(filters, filters, 3, 1, dilation, bias=True, eps=eps, act=nn.ReLU(True),
                         name=(f"{name}_2_conv", f"{name}_2_bn"))  # fmt: skip
        self.c3 = ConvBN(filters, 4 * filters, 1, bias=True, eps=eps,
                         name=(f"{name}_3_conv", f"{name}_3_bn"))  # fmt: skip

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(shortcut + self.c3(self.c2(self.c1(x))))


class ResNet(nn.Module):
    def __init__(self, depth="resnet50", output_stride=8):
        super().__init__()
        self.stem = ConvBN(3, 64, 7, 2, bias=True, eps=1.001e-5, act=nn.ReLU(True),
                           name=("conv1_conv", "conv1_bn"))  # fmt: skip
        plan = dilation_plan([1, 2, 2, 2], output_stride, 4)
        cin, stages = 64, []
        for stage, (blocks, filters, (stride, dilation)) in enumerate(
            zip(RESNET_BLOCKS[depth], (64, 128, 256, 512), plan, strict=True), start=2
        ):
            mods = []
            for b in range(1, blocks + 1):
                mods.append(Bottleneck(cin, filters, stride if b == 1 else 1, dilation,
                                       f"conv{stage}_block{b}"))  # fmt: skip
                cin = 4 * filters
            stages.append(nn.Sequential(*mods))
        self.stages = nn.ModuleList(stages)
        self.channels = (1024, 2048)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, 2, 1)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == 2:
                aux = x
        return x, aux


class InvertedResidual(nn.Module):
    def __init__(self, cin, expansion, cout, stride, dilation, block_id):
        super().__init__()
        prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
        hidden = cin * expansion
        mods = []
        if block_id:
            mods.append(ConvBN(cin, hidden, 1, eps=1e-3, act=nn.ReLU6(True),
                               name=(f"{prefix}expand", f"{prefix}expand_BN")))  # fmt: skip
        mods.append(ConvBN(hidden, hidden, 3, stride, dilation, groups=hidden, eps=1e-3,
                           act=nn.ReLU6(True),
                           name=(f"{prefix}depthwise", f"{prefix}depthwise_BN")))  # fmt: skip
        mods.append(ConvBN(hidden, cout, 1, eps=1e-3,
                           name=(f"{prefix}project", f"{prefix}project_BN")))  # fmt: skip
        self.body = nn.Sequential(*mods)
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, alpha=1.0, output_stride=8):
        super().__init__()
        cin = make_divisible(32 * alpha)
        self.stem = ConvBN(3, cin, 3, 2, eps=1e-3, act=nn.ReLU6(True), name=("Conv1", "bn_Conv1"))
        plan = dilation_plan([g[3] for g in MOBILENETV2_GROUPS], output_stride, 2)
        blocks, block_id = [], 0
        for (t, c, n, _), (stride, dilation) in zip(MOBILENETV2_GROUPS, plan, strict=True):
            cout = make_divisible(int(c * alpha))
            for r in range(n):
                blocks.append(InvertedResidual(cin, t, cout, stride if r == 0 else 1, dilation,
                                               block_id))  # fmt: skip
                cin, block_id = cout, block_id + 1
            if c == 96:
                self.aux_index, aux_channels = len(blocks) - 1, cout
        self.blocks = nn.ModuleList(blocks)
        self.channels = (aux_channels, cin)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.aux_index:
                aux = x
        return x, aux


class Head(nn.Module):
    def __init__(self, cin, filters, num_classes, name, dropout=0.1):
        super().__init__()
        self.conv = ConvBN(cin, filters, 3, act=nn.ReLU(True),
                           name=(f"{name}_head_conv", f"{name}_head_bn"))  # fmt: skip
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(filters, num_classes, 1)
        self.classifier.keras_name = f"{name}_classifier"

    def forward(self, x, size):
        x = self.classifier(self.dropout(self.conv(x)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class PSPNet(nn.Module):
    def __init__(self, num_classes, backbone="resnet50", output_stride=8, bins=(1, 2, 3, 6),
                 aux_head=False, alpha=1.0):  # fmt: skip
        super().__init__()
        if backbone == "mobilenetv2":
            self.backbone = MobileNetV2(alpha, output_stride)
        else:
            self.backbone = ResNet(backbone, output_stride)
        aux_channels, channels = self.backbone.channels
        resnet = backbone != "mobilenetv2"
        width = channels // len(bins)
        self.bins = bins
        self.branches = nn.ModuleList(
            ConvBN(
                channels,
                width,
                1,
                act=nn.ReLU(True),
                name=(f"ppm_branch{b}_conv", f"ppm_branch{b}_bn"),
            )  # fmt: skip
            for b in bins
        )
        self.main = Head(channels + width * len(bins), 512 if resnet else channels // 4,
                         num_classes, "main")  # fmt: skip
        # Input normalisation, set from the Keras model by load_from_keras.
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.bgr = False
        self.aux = None
        if aux_head:
            self.aux = Head(aux_channels, 256 if resnet else channels // 8, num_classes, "aux")

    def forward(self, x):
        size = x.shape[-2:]
        if self.bgr:
            x = x.flip(1)
        feature, aux_feature = self.backbone((x - self.mean) / self.std)
        fsize = feature.shape[-2:]
        pyramid = [feature] + [
            F.interpolate(
                branch(F.adaptive_avg_pool2d(feature, b)),
                size=fsize,
                mode="bilinear",
                align_corners=True,
            )  # fmt: skip
            for b, branch in zip(self.bins, self.branches, strict=True)
        ]
        main = self.main(torch.cat(pyramid, 1), size)
        if self.aux is None:
            return main
        return main, self.aux(aux_feature, size)


@torch.no_grad()
def load_from_keras(torch_model, keras_model):
    """Copies weights and input normalisation from a pspnet_tf Keras model, by layer name."""
    preprocessing = keras_model.get_layer("preprocessing")
    torch_model.mean.copy_(torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
    torch_model.std.copy_(torch.tensor(preprocessing.std).view(1, 3, 1, 1))
    torch_model.bgr = preprocessing.channel_order == "bgr"
    for module in torch_model.modules():
        if isinstance(module, ConvBN):
            conv_name, bn_name = module.keras_names
            _copy_conv(module[0], keras_model.get_layer(conv_name).get_weights())
            gamma, beta, mean, var = keras_model.get_layer(bn_name).get_weights()
            bn = module[1]
            for param, value in ((bn.weight, gamma), (bn.bias, beta),
                                 (bn.running_mean, mean), (bn.running_var, var)):  # fmt: skip
                param.copy_(torch.from_numpy(value))
        elif isinstance(module, nn.Conv2d) and hasattr(module, "keras_name"):
            _copy_conv(module, keras_model.get_layer(module.keras_name).get_weights())


def _copy_conv(conv, weights):
    kernel = torch.from_numpy(weights[0])
    if conv.groups > 1:  # depthwise (kh, kw, C, 1) -> (C, 1, kh, kw)
        conv.weight.copy_(kernel.permute(2, 3, 0, 1))
    else:  # (kh, kw, in, out) -> (out, in, kh, kw)
        conv.weight.copy_(kernel.permute(3, 2, 0, 1))
    if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(weights[1]))


def conv_flops(model, height, width):
    """Multiply-adds x 2 of every convolution for one image, counted with forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * k * module.in_channels // module.groups * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, height, width))
    for h in handles:
        h.remove()
    return total
