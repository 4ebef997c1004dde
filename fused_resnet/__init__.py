"""fused_resnet: ResNet residual blocks with BatchNorm, ReLU, the residual add and the
convolution fused, as drop-in ``torch.nn`` modules with Triton and C++/CUDA backends.

    import fused_resnet
    model = fused_resnet.convert(torchvision.models.resnet50())   # same function, fused
    print(model.fusion_report)
    net = fused_resnet.models.preact_resnet18(num_classes=10, stem="cifar")

The plain-PyTorch definition of every block is :mod:`fused_resnet.reference`.
"""

from fused_resnet import models, reference
from fused_resnet.backends import (BackendUnavailableError, get_backend, set_backend,
                                   use_backend)
from fused_resnet.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from fused_resnet.convert import ConversionReport, convert, unfuse

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BasicBlock", "Bottleneck", "ConversionReport",
    "PreActBasicBlock", "PreActBottleneck", "convert", "get_backend", "models", "reference",
    "set_backend", "unfuse", "use_backend",
]
