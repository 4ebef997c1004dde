"""Python side of the ops compiled into ``fused_resnet._C``: wrappers, fake kernels
(for ``torch.compile`` and meta tensors) and autograd formulas.

The schemas and the CPU/CUDA kernels are registered in C++ (``csrc/``) under the
``fused_resnet`` namespace; each op's plain-PyTorch reference is in
:mod:`fused_resnet.reference` under the same name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import extension

_NON_CHANNEL_DIMS = (0, 2, 3)


def scale_shift_add_relu(x: Tensor, scale: Tensor, shift: Tensor,
                         residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``[relu](x * scale[c] + shift[c] [+ residual])`` in one pass (BN-apply + add + ReLU).

    ``x``: (N, C, H, W), contiguous in NCHW or channels_last; ``residual``: same shape,
    dtype and memory format; ``scale``, ``shift``: (C,), any floating dtype, used in fp32
    (fp64 for fp64 ``x``). The output has ``x``'s dtype and memory format. Differentiable
    in all tensor arguments. Reference: :func:`fused_resnet.reference.scale_shift_add_relu`.
    """
    extension.require()
    return torch.ops.fused_resnet.scale_shift_add_relu(x, scale, shift, residual, relu)


def _scale_shift_add_relu_fake(x, scale, shift, residual, relu):
    return torch.empty_like(x)


def _scale_shift_add_relu_setup_context(ctx, inputs, output):
    x, scale, shift, residual, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(x, scale, output)


def _scale_shift_add_relu_backward(ctx, grad_output):
    x, scale, output = ctx.saved_tensors
    grad = grad_output.where(output > 0, 0) if ctx.relu else grad_output
    acc = torch.promote_types(x.dtype, torch.float32)
    grad_acc = grad.to(acc)
    grad_x = (grad_acc * scale.to(acc).reshape(1, -1, 1, 1)).to(x.dtype)
    grad_scale = (grad_acc * x.to(acc)).sum(_NON_CHANNEL_DIMS).to(scale.dtype)
    grad_shift = grad_acc.sum(_NON_CHANNEL_DIMS).to(ctx.shift_dtype)
    grad_residual = grad if ctx.has_residual else None
    return grad_x, grad_scale, grad_shift, grad_residual, None


def register_python_parts() -> None:
    """Attach fake kernels and autograd to the C++ ops; called once the library is loaded."""
    name = "fused_resnet::scale_shift_add_relu"
    torch.library.register_fake(name)(_scale_shift_add_relu_fake)
    torch.library.register_autograd(name, _scale_shift_add_relu_backward,
                                    setup_context=_scale_shift_add_relu_setup_context)
