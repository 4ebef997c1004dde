"""The end of an ImageNet ResNet stem as one fused module: BatchNorm, ReLU, 3x3 max-pool.

:class:`BatchNormReLUMaxPool` is an ``nn.BatchNorm2d`` (same parameters, buffers and
``state_dict`` keys) whose forward also applies the ReLU and the stride-2 max-pool that
follow it in every ImageNet ResNet stem, on a backend's fused kernels
(:func:`fused_resnet.reference.bn_relu_maxpool` is its meaning). The ResNets of
:mod:`fused_resnet.models` use it as ``bn1``; :func:`fused_resnet.convert` swaps it in
for their plain ``bn1`` and :func:`fused_resnet.unfuse` swaps it back.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet import backends
from fused_resnet.fused_blocks import FusedBlocks
from fused_resnet.reference import STEM_POOL, BatchNormParams


class BatchNormReLUMaxPool(nn.BatchNorm2d):
    """``max_pool2d(relu(batch_norm(x)), 3, stride=2, padding=1)``; arguments as
    ``nn.BatchNorm2d``'s, plus ``backend`` (as the fused blocks'). Where the backend has
    no kernels for it (reference, cuda; a synchronized or frozen-with-gradient BN),
    PyTorch's own BatchNorm, ReLU and max-pool compute it, as the plain stem does."""

    # An attribute only this class has: a model's forward asks for it (with hasattr,
    # which TorchScript compiles) to know that bn1 also applies the ReLU and max-pool.
    applies_relu_and_maxpool = True

    def __init__(self, num_features: int, *args, backend: Optional[str] = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        backends.check_backend_name(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected input of shape "
                             f"(N, {self.num_features}, H, W), got {tuple(x.shape)}")
        functions = backends.select(self, x, {}, self.backend).functions
        bn = BatchNormParams.from_module(self)
        if (x.shape[0] > 0 and isinstance(functions, FusedBlocks)
                and functions.fuses_bn_relu_maxpool(x, bn)):
            return functions.bn_relu_maxpool(x, bn)
        return F.max_pool2d(F.relu(super().forward(x)), *STEM_POOL)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


def fused_from(bn: nn.BatchNorm2d, backend: Optional[str]) -> BatchNormReLUMaxPool:
    """A :class:`BatchNormReLUMaxPool` holding ``bn``'s parameters and buffers (not
    copies)."""
    fused = BatchNormReLUMaxPool.__new__(BatchNormReLUMaxPool)
    fused.__dict__.update(bn.__dict__)
    fused.backend = backend
    return fused


def plain_from(fused: BatchNormReLUMaxPool) -> nn.BatchNorm2d:
    """The ``nn.BatchNorm2d`` holding ``fused``'s parameters and buffers (not copies)."""
    bn = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
    bn.__dict__.update({k: v for k, v in fused.__dict__.items() if k != "backend"})
    return bn
