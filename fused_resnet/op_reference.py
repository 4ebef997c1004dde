"""The plain-PyTorch meaning of each fused op, beside the kernels that implement it.

The ``triton_*`` and ``cuda_*`` ops compute what these functions compute (up to rounding:
the kernels accumulate in fp32 and round once). They are the oracle of the op tests and
the CPU kernels of the ``cuda_*`` ops, so those ops' schemas, fakes and autograd formulas
are checked (``torch.library.opcheck``, ``gradcheck`` in fp64) without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import reference

_NON_CHANNEL_DIMS = (0, 2, 3)


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _prologue(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> Tensor:
    return x if in_scale is None else reference.scale_shift_add_relu(x, in_scale, in_shift)


def _padding(weight: Tensor) -> int:
    return weight.shape[-1] // 2


def fused_conv(x: Tensor, weight: Tensor, stride: int, in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], out_scale: Optional[Tensor],
               out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
               statistics: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``y = [relu]((conv(prologue(x), W) * out_scale + out_shift [+ residual])``,
    prologue(x) = relu(x * in_scale + in_shift) with zero padding after it; returns
    (y channels_last, mean, biased var of y), the statistics empty unless asked for."""
    y = reference.conv(_prologue(x, in_scale, in_shift), weight, stride)
    if out_scale is not None or out_shift is not None or residual is not None or out_relu:
        channels = y.shape[1]
        scale = out_scale if out_scale is not None else y.new_ones(channels)
        shift = out_shift if out_shift is not None else y.new_zeros(channels)
        y = reference.scale_shift_add_relu(y, scale, shift, residual, out_relu)
    y = _channels_last(y)
    if not statistics:
        empty = y.new_empty(0, dtype=_accumulation_dtype(x))
        return y, empty, empty.clone()
    mean, var = reference.batch_statistics(y)
    return y, mean, var


def affine_relu_backward(grad: Tensor, x: Tensor, scale: Optional[Tensor],
                         shift: Optional[Tensor],
                         output: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``y = relu?(x * scale + shift + ...)`` for one affine input ``x``:
    ``g' = grad`` where the ReLU passed (``output > 0`` when ``output`` is given, else
    ``x * scale + shift > 0`` when ``shift`` is given, else everywhere), 0 elsewhere.
    Returns (g' * scale in x's dtype, sum of g' * x, sum of g') per channel."""
    acc = _accumulation_dtype(x)
    g, xf = grad.to(acc), x.to(acc)
    if output is not None:
        g = g.where(output > 0, 0)
    elif shift is not None:
        g = g.where(xf * scale.to(acc).reshape(1, -1, 1, 1)
                    + shift.to(acc).reshape(1, -1, 1, 1) > 0, 0)
    grad_x = g if scale is None else g * scale.to(acc).reshape(1, -1, 1, 1)
    return (_channels_last(grad_x.to(x.dtype)), (g * xf).sum(_NON_CHANNEL_DIMS),
            g.sum(_NON_CHANNEL_DIMS))


def bn_train_finalize(mean: Tensor, var: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                      momentum: Optional[float], count: int) -> tuple[Tensor, Tensor]:
    """A training BN's finalize from its batch statistics over ``count`` values per channel:
    counts the batch, moves the running statistics ``momentum`` of the way (1 /
    num_batches_tracked when None), and returns (scale, shift), as
    :func:`fused_resnet.reference.normalization` does it step by step."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None:
        factor = (1.0 / float(num_batches_tracked.item()) if momentum is None else momentum)
        reference.blend_running_stats(mean.detach(), var.detach(), running_mean, running_var,
                                      factor, count)
    return reference.scale_shift_from_statistics(mean, var, weight, bias, eps)


def conv_bn_train(x: Tensor, weight: Tensor, stride: int, in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], bn_weight: Optional[Tensor],
                  bn_bias: Optional[Tensor], eps: float, running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                  momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A conv feeding a training BN: :func:`fused_conv` with statistics, then
    :func:`bn_train_finalize` of the BN; returns (y, mean, var, scale, shift)."""
    y, mean, var = fused_conv(x, weight, stride, in_scale, in_shift, None, None, None, False,
                              True)
    scale, shift = bn_train_finalize(mean, var, bn_weight, bn_bias, eps, running_mean,
                                     running_var, num_batches_tracked, momentum,
                                     y.numel() // y.shape[1])
    return y, mean, var, scale, shift


def add_relu_backward(grad: Tensor, output: Tensor, x: Tensor, scale: Optional[Tensor],
                      residual: Tensor, residual_scale: Optional[Tensor]) -> tuple:
    """Backward of ``y = relu(x * scale + residual * residual_scale + shifts)`` (a block's
    BN-add-ReLU; no scale: an identity) for both affine inputs, masked by ``output > 0``:
    (g' * scale, sum g' * x, sum g', g' * residual_scale, sum g' * residual), as
    :func:`affine_relu_backward` gives them for each input."""
    grad_x, dot_x, total = affine_relu_backward(grad, x, scale, None, output)
    grad_residual, dot_residual, _ = affine_relu_backward(grad, residual, residual_scale, None,
                                                          output)
    return grad_x, dot_x, total, grad_residual, dot_residual


def statistics_backward(grad: Tensor, y: Tensor, mean: Tensor, grad_mean: Tensor,
                        grad_var: Tensor, grad_scale: Optional[Tensor] = None) -> Tensor:
    """The gradient of ``y`` when its per-channel (mean, biased variance) over the count
    of values per channel also reach the loss with gradients ``grad_mean``, ``grad_var``:
    ``grad [* grad_scale] + (grad_mean + 2 grad_var (y - mean)) / count``, fp32 math,
    channels_last in y's dtype."""
    acc = _accumulation_dtype(y)
    count = y.numel() // y.shape[1]
    centred = y.to(acc) - mean.to(acc).reshape(1, -1, 1, 1)
    statistics_term = (grad_mean.to(acc).reshape(1, -1, 1, 1)
                       + 2 * grad_var.to(acc).reshape(1, -1, 1, 1) * centred)
    grad = grad.to(acc)
    if grad_scale is not None:
        grad = grad * grad_scale.to(acc).reshape(1, -1, 1, 1)
    return _channels_last((grad + statistics_term / count).to(y.dtype))


def bn_scale_shift_backward(grad_scale: Tensor, grad_shift: Tensor, mean: Tensor, var: Tensor,
                            weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float) -> list[Tensor]:
    """Gradients of ``scale = weight * rstd, shift = bias - mean * scale`` (rstd = (var +
    eps)^(-1/2)) from those of scale and shift: [grad_mean, grad_var, grad_weight,
    grad_bias], each in its input's dtype, fp32 math; an absent weight's or bias's an empty
    fp32 vector."""
    acc = torch.promote_types(mean.dtype, torch.float32)
    rstd = torch.rsqrt(var.to(acc) + eps)
    w = torch.ones_like(rstd) if weight is None else weight.to(acc)
    grad_shift = grad_shift.to(acc)
    through_scale = grad_scale.to(acc) - grad_shift * mean.to(acc)  # shift's part included
    def absent():
        return mean.new_empty(0, dtype=torch.float32)
    return [(-grad_shift * w * rstd).to(mean.dtype),
            (through_scale * w * -0.5 * rstd ** 3).to(var.dtype),
            absent() if weight is None else (through_scale * rstd).to(weight.dtype),
            absent() if bias is None else grad_shift.to(bias.dtype, copy=True)]


def bn_statistics_backward(grad: Tensor, y: Tensor, grad_scale: Tensor, grad_shift: Tensor,
                           mean: Tensor, var: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float) -> list[Tensor]:
    """The gradient of ``y``, whose batch statistics (mean, var) gave the training BN it
    feeds its ``scale`` and ``shift``, from ``grad`` (dL/dy by other paths) and the
    gradients of scale and shift: :func:`bn_scale_shift_backward` then
    :func:`statistics_backward`. Returns [grad_y, grad_weight, grad_bias], the last two as
    bn_scale_shift_backward gives them."""
    grad_mean, grad_var, grad_weight, grad_bias = bn_scale_shift_backward(
        grad_scale, grad_shift, mean, var, weight, bias, eps)
    return [statistics_backward(grad, y, mean, grad_mean, grad_var), grad_weight, grad_bias]


def _output_gradient(grad: Tensor, statistics: tuple) -> Tensor:
    """The gradient of a conv's raw output: ``grad``, plus the term through its batch
    statistics where ``statistics`` = (y, mean, grad_mean, grad_var, grad_scale) is
    given."""
    if statistics[0] is None:
        if statistics[-1] is not None:
            raise ValueError("grad_scale: only supported with the statistics arguments")
        return grad
    return statistics_backward(grad, *statistics)


def conv_dgrad(grad: Tensor, weight: Tensor, x: Tensor, stride: int,
               in_scale: Optional[Tensor], in_shift: Optional[Tensor],
               y: Optional[Tensor] = None, mean: Optional[Tensor] = None,
               grad_mean: Optional[Tensor] = None, grad_var: Optional[Tensor] = None,
               grad_scale: Optional[Tensor] = None,
               other: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of :func:`fused_conv`'s ``x`` (through the prologue) from the gradient of
    its raw conv output: (grad_x, grad_in_scale, grad_in_shift), the last two empty without
    a prologue. With ``y`` (that output, whose per-channel mean and biased var reached the
    loss with gradients ``grad_mean``, ``grad_var``), ``grad`` is dL/dy without that path
    (divided by ``grad_scale`` per channel, if given: the gradient a BN-apply's backward
    leaves before its scale): its :func:`statistics_backward` term is added first. With
    ``other`` (a gradient x gets from another consumer), grad_x is the sum of both."""
    grad = _output_gradient(grad, (y, mean, grad_mean, grad_var, grad_scale))
    grad_input = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride=stride,
                                            padding=_padding(weight))
    if in_scale is None:
        empty = x.new_empty(0, dtype=_accumulation_dtype(x))
        grad_scale, grad_shift = empty, empty.clone()
    else:
        grad_input, grad_scale, grad_shift = affine_relu_backward(grad_input, x, in_scale,
                                                                  in_shift, None)
    if other is not None:  # as autograd adds two gradients: each rounded, then the sum
        grad_input = grad_input.to(_accumulation_dtype(x)) + other
    return _channels_last(grad_input.to(x.dtype)), grad_scale, grad_shift


def conv_wgrad(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
               in_scale: Optional[Tensor], in_shift: Optional[Tensor],
               y: Optional[Tensor] = None, mean: Optional[Tensor] = None,
               grad_mean: Optional[Tensor] = None,
               grad_var: Optional[Tensor] = None,
               grad_scale: Optional[Tensor] = None) -> Tensor:
    """Gradient of :func:`fused_conv`'s ``weight``, in its dtype and memory layout;
    ``y`` .. ``grad_scale`` as in :func:`conv_dgrad`."""
    grad = _output_gradient(grad, (y, mean, grad_mean, grad_var, grad_scale))
    grad_weight = torch.nn.grad.conv2d_weight(_prologue(x, in_scale, in_shift), weight.shape,
                                              grad, stride=stride, padding=_padding(weight))
    return torch.empty_like(weight).copy_(grad_weight)
