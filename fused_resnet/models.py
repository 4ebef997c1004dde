"""ResNets built from fused blocks.

``resnet18/34/50/101/152`` follow torchvision's layout and ``state_dict`` keys (so
torchvision checkpoints load); ``preact_resnet18/34/50/101/152`` are the pre-activation
networks of He et al. 2016, "Identity Mappings in Deep Residual Networks": the same
stages, BN-ReLU before each conv, and a final BN-ReLU (``norm``) before pooling.

``stem="imagenet"`` is the 7x7 stride-2 conv and 3x3 max-pool; ``stem="cifar"`` a 3x3
stride-1 conv without pooling, for 32x32 inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet import backends
from fused_resnet.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from fused_resnet.stem import BatchNormReLUMaxPool

STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """A ResNet of fused post-activation (torchvision layout) or pre-activation blocks."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000,
                 stem: str = "imagenet", zero_init_residual: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r}, expected one of {STEMS}")
        backends.check_backend_name(backend)
        self.pre_act = block.spec.pre_act
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        # Pre-activation networks normalize inside the first block instead. The ImageNet
        # stem's BN applies the ReLU and the max-pool after it in the same pass (while it
        # is a BatchNormReLUMaxPool: unfuse makes it a plain BN, and then they run apart).
        self.bn1 = None
        if not self.pre_act:
            self.bn1 = (BatchNormReLUMaxPool(64, backend=backend) if stem == "imagenet"
                        else nn.BatchNorm2d(64))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None
        self.layer1 = self._make_layer(block, 64, layers[0], 1, backend)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, backend)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, backend)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, backend)
        self.norm = nn.BatchNorm2d(self.inplanes) if self.pre_act else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        self._initialize(zero_init_residual)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int,
                    backend: Optional[str]) -> nn.Sequential:
        out_planes = planes * block.expansion
        layers = []
        for index in range(blocks):
            block_stride = stride if index == 0 else 1
            if self.pre_act:
                layers.append(block(self.inplanes, out_planes, stride=block_stride,
                                    backend=backend))
            else:
                downsample = None
                if block_stride != 1 or self.inplanes != out_planes:
                    downsample = nn.Sequential(
                        nn.Conv2d(self.inplanes, out_planes, 1, stride=block_stride,
                                  bias=False),
                        nn.BatchNorm2d(out_planes))
                layers.append(block(self.inplanes, planes, block_stride, downsample,
                                    backend=backend))
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def _initialize(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if not zero_init_residual:
            return
        # Each residual branch starts as zero, so every block starts as the identity:
        # the last BN's scale for post-activation blocks, the last conv for pre-activation.
        for module in self.modules():
            if isinstance(module, (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)):
                last = module.spec.convs[-1] if self.pre_act else module.spec.norms[-1]
                nn.init.zeros_(getattr(module, last).weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        # Whether bn1 is a BatchNormReLUMaxPool (TorchScript compiles hasattr with a
        # literal name, not an isinstance check against that class).
        if hasattr(self.bn1, "applies_relu_and_maxpool"):
            x = self.bn1(x)
        else:
            if self.bn1 is not None:
                x = F.relu(self.bn1(x))
            if self.maxpool is not None:
                x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.norm is not None:
            x = F.relu(self.norm(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 of fused BasicBlocks. Keyword arguments as :class:`ResNet`."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 of fused BasicBlocks. Keyword arguments as :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (v1.5) of fused Bottlenecks. Keyword arguments as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (v1.5) of fused Bottlenecks. Keyword arguments as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (v1.5) of fused Bottlenecks. Keyword arguments as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


def preact_resnet18(**kwargs) -> ResNet:
    """Pre-activation ResNet-18. Keyword arguments as :class:`ResNet`."""
    return ResNet(PreActBasicBlock, [2, 2, 2, 2], **kwargs)


def preact_resnet34(**kwargs) -> ResNet:
    """Pre-activation ResNet-34. Keyword arguments as :class:`ResNet`."""
    return ResNet(PreActBasicBlock, [3, 4, 6, 3], **kwargs)


def preact_resnet50(**kwargs) -> ResNet:
    """Pre-activation ResNet-50. Keyword arguments as :class:`ResNet`."""
    return ResNet(PreActBottleneck, [3, 4, 6, 3], **kwargs)


def preact_resnet101(**kwargs) -> ResNet:
    """Pre-activation ResNet-101. Keyword arguments as :class:`ResNet`."""
    return ResNet(PreActBottleneck, [3, 4, 23, 3], **kwargs)


def preact_resnet152(**kwargs) -> ResNet:
    """Pre-activation ResNet-152. Keyword arguments as :class:`ResNet`."""
    return ResNet(PreActBottleneck, [3, 8, 36, 3], **kwargs)
