"""The Triton kernels as ``torch.library`` ops (``triton_op`` + ``wrap_triton``) with
autograd, in the ``fused_resnet`` namespace, so ``torch.compile`` traces them without
graph breaks and ``torch.library.opcheck`` applies.

On GPUs the ops are ``triton_op``s, which ``torch.compile`` traces into (so Inductor sees
the kernels). Under ``TRITON_INTERPRET=1`` they are opaque ``custom_op``s instead, which
launch the interpreted kernels directly (``kernels.tuning.launcher``): traced into, they
would run on the fake tensors of tracing. Either way each op has an explicit fake
(shape-only) implementation.

Forward ops and what they fuse:
  triton_conv               y = epilogue(conv(prologue(x), W)) [+ batch statistics of y]
  triton_bn_add_relu        y = [relu](a * sa + ba [+ r [* sr + br]])
  triton_channel_stats      per-channel mean and biased variance
  triton_bn_scale_shift     a BN's statistics to the scale/shift its consumers apply
  triton_bn_train_finalize  the same in training, with the running statistics updated
Their backward passes are ops too (triton_conv_dgrad, triton_conv_wgrad,
triton_bn_add_relu_backward, triton_bn_scale_shift_backward); the gradient through a
conv's batch statistics is added inside its dgrad and wgrad.
The fakes and the conv and statistics autograd formulas are shared with the cuda backend
(:mod:`fused_resnet.op_support`); the plain-PyTorch meaning of each op is in
:mod:`fused_resnet.reference` and :mod:`fused_resnet.op_reference` (``fused_conv``,
``conv_dgrad``, ``conv_wgrad``, ``scale_shift_add_relu``,
``batch_statistics``, ``normalization``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from fused_resnet import op_support
from fused_resnet.fused_blocks import Kernels
from fused_resnet.reference import STEM_POOL, BatchNormParams, Finalize, Projection
from fused_resnet.kernels import (batch_norm_finalize, conv_backward, conv_forward,
                                  elementwise, stem, tuning)
from fused_resnet.kernels import statistics as statistics_kernels

_define_op = custom_op if tuning.INTERPRETED else triton_op

# Each op's Python implementation by op name (without the namespace): the traffic
# counter (fused_resnet.bench.traffic) runs it on meta tensors with the kernel launches
# recorded, so that it counts every aten call an op makes besides its kernels.
IMPLEMENTATIONS: dict[str, Callable] = {}


def _op(name: str, mutates_args=()):
    """Define the op ``fused_resnet::<name>`` from the decorated function."""
    def define(implementation: Callable):
        IMPLEMENTATIONS[name] = implementation
        return _define_op(f"fused_resnet::{name}", mutates_args=mutates_args)(implementation)
    return define

_CHANNELS_LAST = torch.channels_last
_channels_last = op_support.channels_last


def _empty_like_channel(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.float32)


def _dense(*vectors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Per-channel vectors as the kernels index them: contiguous (None stays None)."""
    return [None if v is None else v.contiguous() for v in vectors]


# --- the fused convolution -------------------------------------------------------------

@_op("triton_conv")
def triton_conv(x: Tensor, weight: Tensor, stride: int, in_scale: Optional[Tensor],
                in_shift: Optional[Tensor], out_scale: Optional[Tensor],
                out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
                statistics: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y channels_last, mean, var); mean/var are empty unless ``statistics``."""
    if statistics and (out_scale is not None or residual is not None or out_relu):
        raise ValueError("triton_conv: statistics are of the raw conv output; they cannot "
                         "be combined with an epilogue (out_scale, residual, out_relu)")
    y, partials = conv_forward.fused_conv_forward(
        x, weight, stride, in_scale, in_shift, out_scale, out_shift,
        None if residual is None else _channels_last(residual), out_relu, statistics)
    if partials is None:
        return y, _empty_like_channel(x), _empty_like_channel(x)
    return (y, *statistics_kernels.merge(*partials))


triton_conv.register_fake(op_support.conv_fake)


def _statistics_arguments(y: Optional[Tensor], mean: Optional[Tensor],
                          grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
                          grad_scale: Optional[Tensor]):
    """(y, mean, grad_mean, grad_var, grad_scale) as the backward kernels read them, or
    None."""
    if y is None:
        if grad_scale is not None:
            raise ValueError("grad_scale: only supported with the statistics arguments (y, "
                             "mean, grad_mean, grad_var); got it without y")
        return None
    return (_channels_last(y), *_dense(mean, grad_mean, grad_var, grad_scale))


@_op("triton_conv_dgrad")
def triton_conv_dgrad(grad: Tensor, weight: Tensor, x: Tensor, stride: int,
                      in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                      y: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                      grad_mean: Optional[Tensor] = None, grad_var: Optional[Tensor] = None,
                      grad_scale: Optional[Tensor] = None,
                      other: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_in_scale, grad_in_shift); the last two empty without a prologue.
    With ``y`` (the forward's output, whose batch statistics ``mean`` and var reached the
    loss with gradients ``grad_mean``, ``grad_var``), ``grad`` is dL/dy without them,
    divided by ``grad_scale`` per channel if given; with ``other``, grad_x includes that
    other gradient of x: see :func:`op_reference.conv_dgrad`."""
    grad_x, grad_scale, grad_shift = conv_backward.conv_dgrad(
        _channels_last(grad), weight, x, stride, in_scale, in_shift,
        _statistics_arguments(y, mean, grad_mean, grad_var, grad_scale),
        None if other is None else _channels_last(other))
    if grad_scale is None:
        return grad_x, _empty_like_channel(x), _empty_like_channel(x)
    return grad_x, grad_scale, grad_shift


triton_conv_dgrad.register_fake(op_support.conv_dgrad_fake)


@_op("triton_conv_wgrad")
def triton_conv_wgrad(grad: Tensor, x: Tensor, weight: Tensor, stride: int,
                      in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                      y: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                      grad_mean: Optional[Tensor] = None,
                      grad_var: Optional[Tensor] = None,
                      grad_scale: Optional[Tensor] = None) -> Tensor:
    """dL/dW in the dtype and memory layout of ``weight``; ``y`` .. ``grad_scale`` as in
    :func:`triton_conv_dgrad`."""
    return conv_backward.conv_wgrad(
        _channels_last(grad), x, weight, stride, in_scale, in_shift,
        _statistics_arguments(y, mean, grad_mean, grad_var, grad_scale))


triton_conv_wgrad.register_fake(op_support.conv_wgrad_fake)


_conv_backward = op_support.conv_backward(triton_conv_dgrad, triton_conv_wgrad,
                                          backward_ops_take_statistics=True)
op_support.register_conv_autograd(triton_conv, _conv_backward)


# --- BN-apply + shortcut + ReLU --------------------------------------------------------

@_op("triton_bn_add_relu")
def triton_bn_add_relu(a: Tensor, a_scale: Tensor, a_shift: Tensor, residual: Optional[Tensor],
                       r_scale: Optional[Tensor], r_shift: Optional[Tensor],
                       relu: bool) -> Tensor:
    return elementwise.bn_add_relu(_channels_last(a), a_scale, a_shift,
                                   None if residual is None else _channels_last(residual),
                                   r_scale, r_shift, relu)


@triton_bn_add_relu.register_fake
def _triton_bn_add_relu_fake(a, a_scale, a_shift, residual, r_scale, r_shift, relu):
    return torch.empty_like(a, memory_format=_CHANNELS_LAST)


@_op("triton_bn_add_relu_backward")
def triton_bn_add_relu_backward(grad: Tensor, y: Tensor, a: Tensor, a_scale: Tensor,
                                residual: Optional[Tensor], r_scale: Optional[Tensor],
                                relu: bool) -> list[Tensor]:
    """[grad_a, grad_a_scale, grad_a_shift, grad_r, grad_r_scale]; the residual's entries
    are empty where there is no residual (or no residual affine). grad_r_shift equals
    grad_a_shift (an op may not return one tensor twice)."""
    grads = elementwise.bn_add_relu_backward(
        _channels_last(grad), _channels_last(y), _channels_last(a), a_scale,
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

    return [like(a), per_channel(True), per_channel(True), like(residual),
            per_channel(r_scale is not None)]


def _bn_add_relu_setup_context(ctx, inputs, output):
    a, a_scale, a_shift, residual, r_scale, r_shift, relu = inputs
    ctx.relu = relu
    ctx.has_residual, ctx.residual_affine = residual is not None, r_scale is not None
    ctx.save_for_backward(a, a_scale, residual, r_scale, output)


def _bn_add_relu_backward(ctx, grad_y):
    a, a_scale, residual, r_scale, y = ctx.saved_tensors
    grad_a, grad_a_scale, grad_a_shift, grad_r, grad_r_scale = triton_bn_add_relu_backward(
        grad_y, y, a, a_scale, residual, r_scale, ctx.relu)
    affine = ctx.residual_affine
    return (grad_a, grad_a_scale, grad_a_shift, grad_r if ctx.has_residual else None,
            grad_r_scale if affine else None, grad_a_shift if affine else None, None)


triton_bn_add_relu.register_autograd(_bn_add_relu_backward,
                                     setup_context=_bn_add_relu_setup_context)


@_op("triton_masked_gradient")
def triton_masked_gradient(grad: Tensor, y: Tensor, a: Tensor, projection: Optional[Tensor],
                           relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`triton_bn_add_relu` (output ``y``) before its scales: (g' =
    grad * (y > 0), per-tile sums [3, tiles, C] of g', g' * a and g' * projection, the
    tile count), see ``elementwise.masked_gradient``."""
    return elementwise.masked_gradient(
        _channels_last(grad), _channels_last(y), _channels_last(a),
        None if projection is None else _channels_last(projection), relu)


def _gradient_with_tile_sums_fake(like: Tensor, kernel, kinds: int):
    """Fake of (a gradient like ``like``, ``kinds`` per-tile sums [kinds, tiles, C] over
    the row tiles of ``kernel``, the tile count)."""
    rows, channels = like.numel() // like.shape[1], like.shape[1]
    tiles = tuning.max_tiles(kernel, rows)
    return (torch.empty_like(like, memory_format=_CHANNELS_LAST),
            like.new_empty((kinds, tiles, channels), dtype=torch.float32),
            like.new_empty(1, dtype=torch.int32))


@triton_masked_gradient.register_fake
def _triton_masked_gradient_fake(grad, y, a, projection, relu):
    return _gradient_with_tile_sums_fake(a, elementwise.bn_add_relu_backward_kernel, 3)


# --- batch statistics of a block input -------------------------------------------------

@_op("triton_channel_stats")
def triton_channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    return elementwise.channel_statistics(_channels_last(x))


triton_channel_stats.register_fake(op_support.channel_stats_fake)


op_support.register_channel_stats_autograd(triton_channel_stats)


# --- the BatchNorm finalize: statistics to scale/shift, running statistics -------------

@_op("triton_bn_scale_shift")
def triton_bn_scale_shift(mean: Tensor, var: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """(weight / sqrt(var + eps), bias - mean * scale), fp32 per channel."""
    return batch_norm_finalize.bn_scale_shift(*_dense(mean, var, weight, bias), eps)


triton_bn_scale_shift.register_fake(op_support.bn_scale_shift_fake)


@_op("triton_bn_scale_shift_backward")
def triton_bn_scale_shift_backward(grad_scale: Tensor, grad_shift: Tensor, mean: Tensor,
                                   var: Tensor, weight: Optional[Tensor],
                                   bias: Optional[Tensor], eps: float) -> list[Tensor]:
    """[grad_mean, grad_var, grad_weight, grad_bias]; the last two empty without weight or
    bias."""
    grads = batch_norm_finalize.bn_scale_shift_backward(
        *_dense(grad_scale, grad_shift, mean, var, weight, bias), eps)
    return [_empty_like_channel(mean) if g is None else g for g in grads]


triton_bn_scale_shift_backward.register_fake(op_support.bn_scale_shift_backward_fake)


triton_bn_scale_shift.register_autograd(
    op_support.bn_scale_shift_backward(triton_bn_scale_shift_backward),
    setup_context=op_support.bn_scale_shift_setup_context)


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _check_running_contiguous(op: str, *running: Optional[Tensor]) -> None:
    if not all(t.is_contiguous() for t in running if t is not None):
        raise ValueError(f"{op}: running_mean, running_var and num_batches_tracked must be "
                         "contiguous (they are updated in place)")


@_op("triton_bn_scale_shift_backward_from_tiles")
def triton_bn_scale_shift_backward_from_tiles(sums: Tensor, tiles: Tensor, scale_kind: int,
                                              mean: Tensor, var: Tensor,
                                              weight: Optional[Tensor], bias: Optional[Tensor],
                                              eps: float) -> list[Tensor]:
    """:func:`triton_bn_scale_shift_backward` with the scale and shift gradients given as
    per-tile sums (:func:`triton_masked_gradient`'s: row 0 for the shift, ``scale_kind``
    for the scale), summed in the same launch."""
    grads = batch_norm_finalize.bn_scale_shift_backward_from_tiles(
        sums, tiles, scale_kind, *_dense(mean, var, weight, bias), eps)
    return [_empty_like_channel(mean) if g is None else g for g in grads]


@triton_bn_scale_shift_backward_from_tiles.register_fake
def _triton_bn_scale_shift_backward_from_tiles_fake(sums, tiles, scale_kind, mean, var,
                                                    weight, bias, eps):
    return op_support.bn_scale_shift_backward_fake(None, None, mean, var, weight, bias, eps)


@_op("triton_bn_train_finalize", mutates_args=_RUNNING)
def triton_bn_train_finalize(mean: Tensor, var: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], eps: float,
                             running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                             count: int) -> tuple[Tensor, Tensor]:
    """:func:`triton_bn_scale_shift` of a training BN, which also counts the batch and
    updates the running statistics (momentum, or the cumulative average when None) in
    the same launch."""
    _check_running_contiguous("triton_bn_train_finalize", running_mean, running_var,
                              num_batches_tracked)
    return batch_norm_finalize.bn_train_finalize(*_dense(mean, var, weight, bias), eps,
                                                 running_mean, running_var,
                                                 num_batches_tracked, momentum, count)


@triton_bn_train_finalize.register_fake
def _triton_bn_train_finalize_fake(mean, var, weight, bias, eps, *running_and_count):
    return op_support.bn_scale_shift_fake(mean, var, weight, bias, eps)


# --- a conv feeding a training BatchNorm: the statistics merge in the finalize ----------


@_op("triton_conv_bn_train", mutates_args=_RUNNING)
def triton_conv_bn_train(x: Tensor, weight: Tensor, stride: int, in_scale: Optional[Tensor],
                         in_shift: Optional[Tensor], bn_weight: Optional[Tensor],
                         bn_bias: Optional[Tensor], eps: float,
                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`triton_conv` with statistics, then :func:`triton_bn_train_finalize` of the
    BatchNorm its output feeds, in two launches: the finalize merges the conv's per-tile
    statistics itself. Returns (y, mean, var, scale, shift)."""
    _check_running_contiguous("triton_conv_bn_train", running_mean, running_var,
                              num_batches_tracked)
    y, partials = conv_forward.fused_conv_forward(x, weight, stride, in_scale, in_shift,
                                                  statistics=True)
    return (y, *batch_norm_finalize.bn_merge_train_finalize(
        partials, *_dense(bn_weight, bn_bias), eps, running_mean, running_var,
        num_batches_tracked, momentum, y.numel() // y.shape[1]))


triton_conv_bn_train.register_fake(op_support.conv_bn_train_fake)

# Kernels.conv_bn_train: its backward takes the statistics' gradients into dgrad and wgrad.
_conv_bn_train = op_support.conv_bn_train(triton_conv_bn_train, triton_bn_scale_shift_backward,
                                          _conv_backward)


# --- the end of a post-activation training block ------------------------------------------

class _ResidualTail(torch.autograd.Function):
    """``relu(bn(conv(h)) + shortcut(x))`` for training BNs, the shortcut x itself or
    bn_p(conv_p(x)), from :func:`triton_conv_bn_train` and :func:`triton_bn_add_relu`,
    with a backward that writes one full tensor where autograd over those ops writes two:
    the masked output gradient g' = dL/dout * (out > 0) (:func:`triton_masked_gradient`),
    which conv's and conv_p's dgrad and wgrad scale by their BN's scale as they load it
    (their ``grad_scale``), and which is the identity shortcut's gradient itself. The
    BNs' scale and shift gradients are summed from its per-tile sums by their finalize
    backward (:func:`triton_bn_scale_shift_backward_from_tiles`), with no launch of
    their own.

    Inputs: h, weight, stride, in_scale, in_shift (the conv and its prologue), x,
    projection weight (or None), its stride, then ``op_support.bn_arguments`` of the conv's BN
    and of the projection's (if any)."""

    @staticmethod
    def forward(ctx, h, weight, stride, in_scale, in_shift, x, proj_weight, proj_stride,
                *bn_arguments):
        count = op_support.BN_ARGUMENTS
        bn, proj_bn = bn_arguments[:count], bn_arguments[count:]
        a, mean, var, scale, shift = triton_conv_bn_train(h, weight, stride, in_scale,
                                                          in_shift, *bn)
        r, r_mean, r_var, r_scale, r_shift = x, None, None, None, None
        if proj_weight is not None:
            r, r_mean, r_var, r_scale, r_shift = triton_conv_bn_train(
                x, proj_weight, proj_stride, None, None, *proj_bn)
        out = triton_bn_add_relu(a, scale, shift, r, r_scale, r_shift, True)
        ctx.strides, ctx.eps = (stride, proj_stride), (bn[2], proj_bn[2] if proj_bn else None)
        ctx.save_for_backward(h, weight, in_scale, in_shift, a, mean, var, scale, bn[0], bn[1],
                              x, proj_weight, r, r_mean, r_var, r_scale,
                              *(proj_bn[:2] if proj_bn else (None, None)), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (h, weight, in_scale, in_shift, a, mean, var, scale, bn_weight, bn_bias, x,
         proj_weight, r, r_mean, r_var, r_scale, proj_bn_weight, proj_bn_bias,
         out) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        stride, proj_stride = ctx.strides
        g, sums, tiles = triton_masked_gradient(grad_out, out, a,
                                                None if proj_weight is None else r, True)
        grad_mean, grad_var, grad_bn_weight, grad_bn_bias = _gradients_from_tiles(
            sums, tiles, 1, mean, var, bn_weight, bn_bias, ctx.eps[0])
        statistics = (a, mean, grad_mean, grad_var, scale)
        grad_h = grad_in_scale = grad_in_shift = grad_weight = None
        if needs[0] or needs[3] or needs[4]:
            grad_h, grad_in_scale, grad_in_shift = triton_conv_dgrad(
                g, weight, h, stride, in_scale, in_shift, *statistics)
            if in_scale is None:
                grad_in_scale = grad_in_shift = None
        if needs[1]:
            grad_weight = triton_conv_wgrad(g, h, weight, stride, in_scale, in_shift,
                                            *statistics)
        bn_grads = (grad_bn_weight, grad_bn_bias) + (None,) * (op_support.BN_ARGUMENTS - 2)
        if proj_weight is None:
            return (grad_h, grad_weight, None, grad_in_scale, grad_in_shift, g, None, None,
                    *bn_grads)
        grad_mean, grad_var, grad_proj_bn_weight, grad_proj_bn_bias = _gradients_from_tiles(
            sums, tiles, 2, r_mean, r_var, proj_bn_weight, proj_bn_bias, ctx.eps[1])
        statistics = (r, r_mean, grad_mean, grad_var, r_scale)
        grad_x = grad_proj_weight = None
        if needs[5]:
            grad_x = triton_conv_dgrad(g, proj_weight, x, proj_stride, None, None,
                                       *statistics)[0]
        if needs[6]:
            grad_proj_weight = triton_conv_wgrad(g, x, proj_weight, proj_stride, None, None,
                                                 *statistics)
        return (grad_h, grad_weight, None, grad_in_scale, grad_in_shift, grad_x,
                grad_proj_weight, None, *bn_grads, grad_proj_bn_weight, grad_proj_bn_bias,
                *(None,) * (op_support.BN_ARGUMENTS - 2))


def _gradients_from_tiles(sums, tiles, scale_kind, mean, var, weight, bias, eps):
    return op_support.parameter_gradients(triton_bn_scale_shift_backward_from_tiles(
        sums, tiles, scale_kind, mean, var, weight, bias, eps), weight, bias)


def _residual_tail(h: Tensor, weight: Tensor, stride: int, prologue: tuple[Tensor, Tensor],
                   bn: BatchNormParams, x: Tensor, shortcut: Optional[Projection],
                   shortcut_stride: int) -> Tensor:
    """``Kernels.residual_tail``."""
    proj = () if shortcut is None else op_support.bn_arguments(shortcut.bn)
    return _ResidualTail.apply(h, weight, stride, *prologue, x,
                               None if shortcut is None else shortcut.weight, shortcut_stride,
                               *op_support.bn_arguments(bn), *proj)


# --- the end of an ImageNet stem: BN + ReLU + max-pool ---------------------------------------

@_op("triton_bn_relu_maxpool")
def triton_bn_relu_maxpool(x: Tensor, scale: Tensor, shift: Tensor, kernel: int, stride: int,
                           padding: int, taps: bool) -> tuple[Tensor, Tensor]:
    """(max_pool(relu(x * scale + shift)) channels_last, the winning tap of each pooled
    value as int8, empty unless ``taps``): see ``kernels.stem``."""
    y, winners = stem.bn_relu_maxpool(_channels_last(x), *_dense(scale, shift), kernel,
                                      stride, padding, taps)
    return y, x.new_empty(0, dtype=torch.int8) if winners is None else winners


@triton_bn_relu_maxpool.register_fake
def _triton_bn_relu_maxpool_fake(x, scale, shift, kernel, stride, padding, taps):
    n, c, h, w = x.shape
    size = [stem.pooled_size(s, kernel, stride, padding) for s in (h, w)]
    y = x.new_empty((n, c, *size)).contiguous(memory_format=_CHANNELS_LAST)
    return y, (torch.empty_like(y, dtype=torch.int8) if taps
               else x.new_empty(0, dtype=torch.int8))


@_op("triton_maxpool_relu_backward")
def triton_maxpool_relu_backward(grad: Tensor, taps: Tensor, x: Tensor, scale: Tensor,
                                 shift: Tensor, kernel: int, stride: int,
                                 padding: int) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`triton_bn_relu_maxpool` before the BN's scale: (D, per-tile
    sums [2, tiles, C] of D and D * x, the tile count), see ``kernels.stem``."""
    return stem.maxpool_relu_backward(_channels_last(grad), taps, _channels_last(x),
                                      *_dense(scale, shift), kernel, stride, padding)


@triton_maxpool_relu_backward.register_fake
def _triton_maxpool_relu_backward_fake(grad, taps, x, scale, shift, kernel, stride, padding):
    return _gradient_with_tile_sums_fake(x, stem.maxpool_relu_backward_kernel, 2)


@_op("triton_statistics_backward")
def triton_statistics_backward(grad: Tensor, y: Tensor, mean: Tensor, grad_mean: Tensor,
                               grad_var: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    """:func:`op_reference.statistics_backward` in one pass."""
    return elementwise.statistics_backward(_channels_last(grad), _channels_last(y),
                                           *_dense(mean, grad_mean, grad_var, grad_scale))


triton_statistics_backward.register_fake(op_support.statistics_backward_fake)


class _BatchNormReLUMaxPoolTraining(torch.autograd.Function):
    """``max_pool(relu(bn(x)))`` for a training BN: its statistics, finalize and the
    pooling pass forward; backward, the pooling pass (:func:`triton_maxpool_relu_backward`),
    the finalize's backward from its per-tile sums, and one pass adding the gradient
    through the batch statistics (eager: max-pool, ReLU and BN backward, each a pass
    writing a tensor the size of x, and int64 pooling indices as large)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean, running_var, num_batches_tracked,
                momentum):
        mean, var = triton_channel_stats(x)
        scale, shift = triton_bn_train_finalize(mean, var, weight, bias, eps, running_mean,
                                                running_var, num_batches_tracked, momentum,
                                                x.numel() // x.shape[1])
        y, taps = triton_bn_relu_maxpool(x, scale, shift, *STEM_POOL, True)
        ctx.eps = eps
        ctx.save_for_backward(x, taps, scale, shift, mean, var, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, taps, scale, shift, mean, var, weight, bias = ctx.saved_tensors
        d, sums, tiles = triton_maxpool_relu_backward(grad_y, taps, x, scale, shift,
                                                      *STEM_POOL)
        grad_mean, grad_var, grad_weight, grad_bias = _gradients_from_tiles(
            sums, tiles, 1, mean, var, weight, bias, ctx.eps)
        grad_x = triton_statistics_backward(d, x, mean, grad_mean, grad_var, scale)
        return (grad_x, grad_weight, grad_bias) + (None,) * 5


def _bn_relu_maxpool(x: Tensor, bn: BatchNormParams) -> Tensor:
    """``Kernels.bn_relu_maxpool``."""
    if bn.uses_batch_stats:
        return _BatchNormReLUMaxPoolTraining.apply(x, *op_support.bn_arguments(bn))
    scale, shift = triton_bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                         bn.eps)
    return triton_bn_relu_maxpool(x, scale, shift, *STEM_POOL, False)[0]


KERNELS = Kernels(conv=triton_conv, bn_add_relu=triton_bn_add_relu,
                  channel_stats=triton_channel_stats,
                  conv_sharing_input=op_support.conv_sharing_input(triton_conv,
                                                                   _conv_backward),
                  finalize=Finalize(scale_shift=triton_bn_scale_shift,
                                    training=op_support.train_finalize(
                                        triton_bn_train_finalize,
                                        triton_bn_scale_shift_backward)),
                  conv_bn_train=_conv_bn_train, residual_tail=_residual_tail,
                  bn_relu_maxpool=_bn_relu_maxpool)
