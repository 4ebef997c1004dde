"""The Triton kernels as ``torch.library`` ops (``triton_op`` + ``wrap_triton``) with
autograd, in the ``fused_resnet`` namespace, so ``torch.compile`` traces them without
graph breaks and ``torch.library.opcheck`` applies.

On GPUs the ops are ``triton_op``s, which ``torch.compile`` traces into (so Inductor sees
the kernels). Under ``TRITON_INTERPRET=1`` they are opaque ``custom_op``s instead: there
``wrap_triton`` hands back the interpreted kernel itself, which would run on the fake
tensors of tracing. Either way each op has an explicit fake (shape-only) implementation.

Forward ops and what they fuse:
  triton_conv           y = epilogue(conv(prologue(x), W)) [+ batch statistics of y]
  triton_bn_add_relu    y = [relu](a * sa + ba [+ r [* sr + br]])
  triton_channel_stats  per-channel mean and biased variance
Their backward passes are ops too (triton_conv_dgrad, triton_conv_wgrad,
triton_bn_add_relu_backward). The plain-PyTorch meaning of each is in
:mod:`fused_resnet.reference` (``conv``, ``scale_shift_add_relu``, ``batch_statistics``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from fused_resnet.kernels import conv_backward, conv_forward, elementwise
from fused_resnet.kernels.tuning import INTERPRETED

_define_op = custom_op if INTERPRETED else triton_op

_CHANNELS_LAST = torch.channels_last


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=_CHANNELS_LAST)


def _empty_like_channel(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.float32)


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


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


@triton_conv.register_fake
def _triton_conv_fake(x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual,
                      out_relu, statistics):
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    y = torch.empty((n, c_out, conv_forward.output_size(h, kh, stride),
                     conv_forward.output_size(w, kw, stride)), dtype=x.dtype, device=x.device,
                    memory_format=_CHANNELS_LAST)
    stats_size = c_out if statistics else 0
    return (y, x.new_empty(stats_size, dtype=torch.float32),
            x.new_empty(stats_size, dtype=torch.float32))


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


@triton_conv_dgrad.register_fake
def _triton_conv_dgrad_fake(grad, weight, x, stride, in_scale, in_shift):
    size = 0 if in_scale is None else x.shape[1]
    return (torch.empty_like(x, memory_format=_CHANNELS_LAST),
            x.new_empty(size, dtype=torch.float32), x.new_empty(size, dtype=torch.float32))


@_define_op("fused_resnet::triton_conv_wgrad", mutates_args=())
def triton_conv_wgrad(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
                      in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> Tensor:
    """dL/dW in the dtype and memory layout of ``weight``."""
    grad_weight = torch.empty_like(weight)
    grad_weight.copy_(conv_backward.conv_wgrad(_channels_last(grad), x, weight.shape, stride,
                                               in_scale, in_shift))
    return grad_weight


@triton_conv_wgrad.register_fake
def _triton_conv_wgrad_fake(grad, x, weight, stride, in_scale, in_shift):
    return torch.empty_like(weight)


def _conv_setup_context(ctx, inputs, output):
    x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual, out_relu, stats = \
        inputs
    y, mean, _ = output
    ctx.stride, ctx.out_relu, ctx.statistics = stride, out_relu, stats
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, in_scale, in_shift, out_scale, y, mean)


def _conv_backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, in_scale, in_shift, out_scale, y, mean = ctx.saved_tensors
    if ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
        raise RuntimeError("triton_conv: gradients of out_scale/out_shift are not "
                           "implemented; fold BatchNorm into the epilogue only when no "
                           "gradient is needed (fused_resnet's blocks do)")
    grad = grad_y.float()
    if ctx.statistics:
        count = y.numel() // y.shape[1]
        if grad_mean is not None:
            grad = grad + _per_channel(grad_mean) / count
        if grad_var is not None:
            grad = grad + _per_channel(grad_var) * 2 / count * (y.float() - _per_channel(mean))
    if ctx.out_relu:
        grad = grad.where(y > 0, 0.0)
    grad_residual = grad.to(x.dtype) if ctx.has_residual else None
    if out_scale is not None:
        grad = grad * _per_channel(out_scale)
    grad = _channels_last(grad.to(x.dtype))
    grad_x = grad_weight = grad_in_scale = grad_in_shift = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        grad_x, grad_in_scale, grad_in_shift = triton_conv_dgrad(
            grad, weight, x, ctx.stride, in_scale, in_shift)
        if in_scale is None:
            grad_in_scale = grad_in_shift = None
    if ctx.needs_input_grad[1]:
        grad_weight = triton_conv_wgrad(grad, x, weight, ctx.stride, in_scale, in_shift)
    return (grad_x, grad_weight, None, grad_in_scale, grad_in_shift, None, None, grad_residual,
            None, None)


triton_conv.register_autograd(_conv_backward, setup_context=_conv_setup_context)


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


@triton_channel_stats.register_fake
def _triton_channel_stats_fake(x):
    return (x.new_empty(x.shape[1], dtype=torch.float32),
            x.new_empty(x.shape[1], dtype=torch.float32))


def _stats_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    count = x.numel() // x.shape[1]
    grad = torch.zeros_like(x, dtype=torch.float32)
    if grad_mean is not None:
        grad = grad + _per_channel(grad_mean) / count
    if grad_var is not None:
        grad = grad + _per_channel(grad_var) * 2 / count * (x.float() - _per_channel(mean))
    return grad.to(x.dtype)


triton_channel_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)
