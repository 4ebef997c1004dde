"""The Triton kernels as ``torch.library`` ops (``triton_op`` + ``wrap_triton``) with
autograd, in the ``fused_resnet`` namespace, so ``torch.compile`` traces them without
graph breaks and ``torch.library.opcheck`` applies.

On GPUs the ops are ``triton_op``s, which ``torch.compile`` traces into (so Inductor sees
the kernels). Under ``TRITON_INTERPRET=1`` they are opaque ``custom_op``s instead, which
launch the interpreted kernels directly (``kernels.tuning.launcher``): traced into, they
would run on the fake tensors of tracing. Either way each op has an explicit fake (shape-only) implementation.

Forward ops and what they fuse:
  triton_conv           y = epilogue(conv(prologue(x), W)) [+ batch statistics of y]
  triton_bn_add_relu    y = [relu](a * sa + ba [+ r [* sr + br]])
  triton_channel_stats  per-channel mean and biased variance
Their backward passes are ops too (triton_conv_dgrad, triton_conv_wgrad,
triton_statistics_backward, triton_bn_add_relu_backward). The fakes and the conv and statistics autograd formulas are
shared with the cuda backend (:mod:`fused_resnet.op_support`); the plain-PyTorch meaning of
each op is in :mod:`fused_resnet.reference` (``fused_conv``, ``conv_dgrad``, ``conv_wgrad``,
``scale_shift_add_relu``, ``batch_statistics``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from fused_resnet import op_support
from fused_resnet.fused_blocks import Kernels
from fused_resnet.kernels import conv_backward, conv_forward, elementwise
from fused_resnet.kernels.tuning import INTERPRETED

_define_op = custom_op if INTERPRETED else triton_op

_CHANNELS_LAST = torch.channels_last
_channels_last = op_support.channels_last


def _empty_like_channel(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.float32)


# --- the fused convolution -------------------------------------------------------------

@_define_op("fused_resnet::triton_conv", mutates_args=())
def triton_conv(x: Tensor, weight: Tensor, stride: int, in_scale: Optional[Tensor],
                in_shift: Optional[Tensor], out_scale: Optional[Tensor],
                out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
                statistics: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y channels_last, mean, var); mean/var are empty unless ``statistics``."""
    if statistics and (out_scale is not None or residual is not None or out_relu):
        raise ValueError("triton_conv: statistics are of the raw conv output; they cannot "
                         "be combined with an epilogue (out_scale, residual, out_relu)")
    y, stats = conv_forward.fused_conv_forward(
        x, weight, stride, in_scale, in_shift, out_scale, out_shift,
        None if residual is None else _channels_last(residual), out_relu, statistics)
    if stats is None:
        return y, _empty_like_channel(x), _empty_like_channel(x)
    return y, stats[0], stats[1]


triton_conv.register_fake(op_support.conv_fake)


@_define_op("fused_resnet::triton_conv_dgrad", mutates_args=())
def triton_conv_dgrad(grad: Tensor, weight: Tensor, x: Tensor, stride: int,
                      in_scale: Optional[Tensor],
                      in_shift: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_in_scale, grad_in_shift); the last two empty without a prologue."""
    grad_x, grad_scale, grad_shift = conv_backward.conv_dgrad(
        _channels_last(grad), weight, x, stride, in_scale, in_shift)
    if grad_scale is None:
        return grad_x, _empty_like_channel(x), _empty_like_channel(x)
    return grad_x, grad_scale, grad_shift


triton_conv_dgrad.register_fake(op_support.conv_dgrad_fake)


@_define_op("fused_resnet::triton_conv_wgrad", mutates_args=())
def triton_conv_wgrad(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
                      in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> Tensor:
    """dL/dW in the dtype and memory layout of ``weight``."""
    grad_weight = torch.empty_like(weight)
    grad_weight.copy_(conv_backward.conv_wgrad(_channels_last(grad), x, weight.shape, stride,
                                               in_scale, in_shift))
    return grad_weight


triton_conv_wgrad.register_fake(op_support.conv_wgrad_fake)


@_define_op("fused_resnet::triton_statistics_backward", mutates_args=())
def triton_statistics_backward(grad: Tensor, y: Tensor, mean: Tensor, slope: Tensor,
                               offset: Tensor) -> Tensor:
    """grad + offset[c] + slope[c] * (y - mean[c]), channels_last, in y's dtype."""
    return elementwise.statistics_backward(_channels_last(grad), _channels_last(y), mean,
                                           slope, offset)


triton_statistics_backward.register_fake(op_support.statistics_backward_fake)


op_support.register_conv_autograd(triton_conv, triton_conv_dgrad, triton_conv_wgrad,
                                  triton_statistics_backward)


# --- BN-apply + shortcut + ReLU --------------------------------------------------------

@_define_op("fused_resnet::triton_bn_add_relu", mutates_args=())
def triton_bn_add_relu(a: Tensor, a_scale: Tensor, a_shift: Tensor, residual: Optional[Tensor],
                       r_scale: Optional[Tensor], r_shift: Optional[Tensor],
                       relu: bool) -> Tensor:
    return elementwise.bn_add_relu(_channels_last(a), a_scale, a_shift,
                                   None if residual is None else _channels_last(residual),
                                   r_scale, r_shift, relu)


@triton_bn_add_relu.register_fake
def _triton_bn_add_relu_fake(a, a_scale, a_shift, residual, r_scale, r_shift, relu):
    return torch.empty_like(a, memory_format=_CHANNELS_LAST)


@_define_op("fused_resnet::triton_bn_add_relu_backward", mutates_args=())
def triton_bn_add_relu_backward(grad: Tensor, y: Tensor, a: Tensor, a_scale: Tensor,
                                residual: Optional[Tensor], r_scale: Optional[Tensor],
                                relu: bool) -> list[Tensor]:
    """[grad_a, grad_a_scale, grad_a_shift, grad_r, grad_r_scale, grad_r_shift]; the
    residual's entries are empty where there is no residual (or no residual affine)."""
    grads = elementwise.bn_add_relu_backward(
        _channels_last(grad), y, _channels_last(a), a_scale,
        None if residual is None else _channels_last(residual), r_scale, relu)
    return [_empty_like_channel(a) if g is None else g for g in grads]


@triton_bn_add_relu_backward.register_fake
def _triton_bn_add_relu_backward_fake(grad, y, a, a_scale, residual, r_scale, relu):
    channels = a.shape[1]

    def per_channel(present):
        return a.new_empty(channels if present else 0, dtype=torch.float32)

    def like(t):
        return (a.new_empty(0, dtype=torch.float32) if t is None
                else torch.empty_like(t, memory_format=_CHANNELS_LAST))

    affine = r_scale is not None
    return [like(a), per_channel(True), per_channel(True), like(residual),
            per_channel(affine), per_channel(affine)]


def _bn_add_relu_setup_context(ctx, inputs, output):
    a, a_scale, a_shift, residual, r_scale, r_shift, relu = inputs
    ctx.relu = relu
    ctx.has_residual, ctx.residual_affine = residual is not None, r_scale is not None
    ctx.save_for_backward(a, a_scale, residual, r_scale, output)


def _bn_add_relu_backward(ctx, grad_y):
    a, a_scale, residual, r_scale, y = ctx.saved_tensors
    grads = triton_bn_add_relu_backward(grad_y, y, a, a_scale, residual, r_scale, ctx.relu)
    grads[3] = grads[3] if ctx.has_residual else None
    grads[4:] = grads[4:] if ctx.residual_affine else [None, None]
    return (*grads, None)


triton_bn_add_relu.register_autograd(_bn_add_relu_backward,
                                     setup_context=_bn_add_relu_setup_context)


# --- batch statistics of a block input -------------------------------------------------

@_define_op("fused_resnet::triton_channel_stats", mutates_args=())
def triton_channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    return elementwise.channel_statistics(_channels_last(x))


triton_channel_stats.register_fake(op_support.channel_stats_fake)


op_support.register_channel_stats_autograd(triton_channel_stats)


KERNELS = Kernels(conv=triton_conv, bn_add_relu=triton_bn_add_relu,
                  channel_stats=triton_channel_stats)
