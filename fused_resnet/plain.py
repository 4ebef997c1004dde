"""Plain eager residual blocks: ``nn.Conv2d``, ``nn.BatchNorm2d`` and ReLU, nothing fused.

These define the module structure (constructor arguments, attribute names, state_dict
keys) that the fused modules in :mod:`fused_resnet.blocks` inherit, and they are what
:func:`fused_resnet.unfuse` returns: TorchScript- and ONNX-friendly code, and the eager
contender in benchmarks. Post-activation blocks follow torchvision (``conv1 bn1 conv2
bn2 [conv3 bn3] downsample``); pre-activation blocks follow timm ``resnetv2`` (``norm1
conv1 norm2 conv2 [norm3 conv3] downsample.conv``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _reject_grouped_or_dilated(block: str, groups: int, dilation: int) -> None:
    _require(groups == 1, f"{block}: groups={groups} is not supported, expected groups=1")
    _require(dilation == 1, f"{block}: dilation={dilation} is not supported, expected 1")


class BasicBlock(nn.Module):
    """Post-activation BasicBlock with torchvision's constructor and attribute names."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        _reject_grouped_or_dilated(type(self).__name__, groups, dilation)
        _require(base_width == 64, f"{type(self).__name__}: base_width={base_width} is not "
                 "supported, expected 64 (as torchvision's BasicBlock)")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """Post-activation Bottleneck v1.5 (stride on the 3x3 ``conv2``), torchvision's API."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        _reject_grouped_or_dilated(type(self).__name__, groups, dilation)
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PreActProjection(nn.Module):
    """Projection shortcut of a pre-activation block: a strided 1x1 conv, no norm.

    Named ``conv`` inside ``downsample`` so that state_dict keys match timm's
    ``DownsampleConv(preact=True)``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = conv1x1(in_chs, out_chs, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _pre_act_projection(in_chs: int, out_chs: int, stride: int) -> Optional[PreActProjection]:
    # A projection exactly when the identity would not fit, as in He et al. 2016.
    if stride == 1 and in_chs == out_chs:
        return None
    return PreActProjection(in_chs, out_chs, stride)


class PreActBasicBlock(nn.Module):
    """Pre-activation BasicBlock (He et al. 2016) with timm ``PreActBasic`` names.

    ``mid_chs = int(out_chs * bottle_ratio)``; a projection shortcut is made when the
    stride or the channel count changes.
    """

    expansion = 1  # out_chs / planes in a ResNet stage

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, bottle_ratio: float = 1.0,
                 stride: int = 1, dilation: int = 1, groups: int = 1,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        _reject_grouped_or_dilated(type(self).__name__, groups, dilation)
        norm_layer = norm_layer or nn.BatchNorm2d
        out_chs = out_chs or in_chs
        mid_chs = int(out_chs * bottle_ratio)
        self.downsample = _pre_act_projection(in_chs, out_chs, stride)
        self.norm1 = norm_layer(in_chs)
        self.conv1 = conv3x3(in_chs, mid_chs, stride)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = conv3x3(mid_chs, out_chs)

    def forward(self, x: Tensor) -> Tensor:
        x_preact = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        out = self.conv1(x_preact)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation Bottleneck (He et al. 2016) with timm ``PreActBottleneck`` names.

    ``mid_chs = int(out_chs * bottle_ratio)``; the stride is on the 3x3 ``conv2``.
    """

    expansion = 4  # out_chs / planes in a ResNet stage, with the default bottle_ratio

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, bottle_ratio: float = 0.25,
                 stride: int = 1, dilation: int = 1, groups: int = 1,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        _reject_grouped_or_dilated(type(self).__name__, groups, dilation)
        norm_layer = norm_layer or nn.BatchNorm2d
        out_chs = out_chs or in_chs
        mid_chs = int(out_chs * bottle_ratio)
        self.downsample = _pre_act_projection(in_chs, out_chs, stride)
        self.norm1 = norm_layer(in_chs)
        self.conv1 = conv1x1(in_chs, mid_chs)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = conv3x3(mid_chs, mid_chs, stride)
        self.norm3 = norm_layer(mid_chs)
        self.conv3 = conv1x1(mid_chs, out_chs)

    def forward(self, x: Tensor) -> Tensor:
        x_preact = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        out = self.conv1(x_preact)
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        return out + shortcut
