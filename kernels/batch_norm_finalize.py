"""The BatchNorm finalize: per-channel vectors only, one launch each.

From a BN's batch statistics to the (scale, shift) its consumers apply (with, in
training, the running-statistics update and ``num_batches_tracked`` in the same launch),
and the backward of that step. In PyTorch each is a chain of five to ten
tiny ops per BatchNorm (about 1,000 launches per ResNet-50 training step); here each is
one kernel over the channels. fp32 math; parameters and running statistics are read and
written in their own dtype (``.half()`` modules included).
"""

import torch
import triton
import triton.language as tl

from . import tuning
from . import statistics
from .statistics import merged_statistics, summed_tiles

# Channels per program: ResNet-50's widest BN (2048 channels) takes two programs.
_BLOCK = 1024


@triton.jit
def _channels(C, BLOCK: tl.constexpr):
    channels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return channels, channels < C


@triton.jit
def _load(ptr, channels, valid, other):
    return tl.load(ptr + channels, mask=valid, other=other).to(tl.float32)


@triton.jit
def _inverse_std(var, eps):
    # Correctly rounded sqrt and division (not rsqrt.approx), as torch.rsqrt's CPU result.
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _store_scale_shift(mean, var, weight_ptr, bias_ptr, scale_ptr, shift_ptr, channels,
                       valid, eps, WEIGHT: tl.constexpr, BIAS: tl.constexpr):
    scale = _inverse_std(var, eps)
    if WEIGHT:
        scale *= _load(weight_ptr, channels, valid, 0.0)
    shift = -mean * scale
    if BIAS:
        shift += _load(bias_ptr, channels, valid, 0.0)
    tl.store(scale_ptr + channels, scale, mask=valid)
    tl.store(shift_ptr + channels, shift, mask=valid)


@triton.jit
def bn_scale_shift_kernel(mean_ptr, var_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, C,
                          eps, WEIGHT: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """scale = weight / sqrt(var + eps), shift = bias - mean * scale, per channel [C]."""
    channels, valid = _channels(C, BLOCK)
    _store_scale_shift(_load(mean_ptr, channels, valid, 0.0), _load(var_ptr, channels, valid, 1.0),
                       weight_ptr, bias_ptr, scale_ptr, shift_ptr, channels, valid, eps,
                       WEIGHT, BIAS)


@triton.jit
def _store_scale_shift_gradients(grad_scale, grad_shift, mean_ptr, var_ptr, weight_ptr,
                                 grad_mean_ptr, grad_var_ptr, grad_weight_ptr, grad_bias_ptr,
                                 channels, valid, eps, WEIGHT: tl.constexpr,
                                 BIAS: tl.constexpr):
    rstd = _inverse_std(_load(var_ptr, channels, valid, 1.0), eps)
    weight = tl.full(channels.shape, 1.0, tl.float32)
    if WEIGHT:
        weight = _load(weight_ptr, channels, valid, 0.0)
    mean = _load(mean_ptr, channels, valid, 0.0)
    through_scale = grad_scale - grad_shift * mean
    tl.store(grad_mean_ptr + channels, -grad_shift * weight * rstd, mask=valid)
    tl.store(grad_var_ptr + channels, through_scale * weight * -0.5 * rstd * rstd * rstd,
             mask=valid)
    if WEIGHT:
        tl.store(grad_weight_ptr + channels,
                 (through_scale * rstd).to(grad_weight_ptr.dtype.element_ty), mask=valid)
    if BIAS:
        tl.store(grad_bias_ptr + channels, grad_shift.to(grad_bias_ptr.dtype.element_ty),
                 mask=valid)


@triton.jit
def bn_scale_shift_backward_kernel(grad_scale_ptr, grad_shift_ptr, mean_ptr, var_ptr,
                                   weight_ptr, grad_mean_ptr, grad_var_ptr, grad_weight_ptr,
                                   grad_bias_ptr, C, eps, WEIGHT: tl.constexpr,
                                   BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of :func:`bn_scale_shift_kernel`'s inputs from those of scale and shift:
    with rstd = (var + eps)^(-1/2) and g = dL/dscale - dL/dshift * mean (the part of
    dL/dscale that reaches it through shift included),
    dL/dmean = -dL/dshift * scale, dL/dvar = -g * weight * rstd^3 / 2,
    dL/dweight = g * rstd, dL/dbias = dL/dshift; [C] each, in the inputs' dtypes."""
    channels, valid = _channels(C, BLOCK)
    _store_scale_shift_gradients(
        tl.load(grad_scale_ptr + channels, mask=valid, other=0.0),
        tl.load(grad_shift_ptr + channels, mask=valid, other=0.0), mean_ptr, var_ptr,
        weight_ptr, grad_mean_ptr, grad_var_ptr, grad_weight_ptr, grad_bias_ptr, channels,
        valid, eps, WEIGHT, BIAS)


@triton.jit
def bn_scale_shift_backward_from_tiles_kernel(
        sums_ptr, tiles_ptr, mean_ptr, var_ptr, weight_ptr, grad_mean_ptr, grad_var_ptr,
        grad_weight_ptr, grad_bias_ptr, MAX_TILES, C, eps, SCALE_KIND: tl.constexpr,
        WEIGHT: tl.constexpr, BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """:func:`bn_scale_shift_backward_kernel` with dL/dshift and dL/dscale summed here from
    per-tile sums ``sums`` [kinds, MAX_TILES, C] (row 0: dL/dshift's, row SCALE_KIND:
    dL/dscale's; ``tiles`` rows written), so that no launch of its own sums them first.
    BLOCK_C channels per program."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = channels < C
    tiles = tl.load(tiles_ptr)
    grad_shift = summed_tiles(sums_ptr, tiles, channels, valid, C, BLOCK_T)
    grad_scale = summed_tiles(sums_ptr + SCALE_KIND * MAX_TILES * C, tiles, channels, valid,
                              C, BLOCK_T)
    _store_scale_shift_gradients(grad_scale, grad_shift, mean_ptr, var_ptr, weight_ptr,
                                 grad_mean_ptr, grad_var_ptr, grad_weight_ptr, grad_bias_ptr,
                                 channels, valid, eps, WEIGHT, BIAS)


@triton.jit
def _blend(batch, running_ptr, channels, valid, factor, correction):
    running = _load(running_ptr, channels, valid, 0.0)
    updated = running * (1.0 - factor) + batch * correction * factor
    tl.store(running_ptr + channels, updated.to(running_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _count_batch(batches_ptr, momentum, COUNTED: tl.constexpr, CUMULATIVE: tl.constexpr):
    """``num_batches_tracked`` + 1, and the factor the running statistics move by:
    ``momentum``, or 1 / num_batches_tracked for the cumulative average."""
    factor = momentum
    if COUNTED:
        batches = tl.load(batches_ptr) + 1
        tl.store(batches_ptr, batches)
        if CUMULATIVE:
            factor = 1.0 / batches.to(tl.float32)
    return factor


@triton.jit
def _finalize_training(mean, var, weight_ptr, bias_ptr, scale_ptr, shift_ptr,
                       running_mean_ptr, running_var_ptr, channels, valid, eps, factor,
                       unbias, WEIGHT: tl.constexpr, BIAS: tl.constexpr,
                       RUNNING: tl.constexpr):
    _store_scale_shift(mean, var, weight_ptr, bias_ptr, scale_ptr, shift_ptr, channels, valid,
                       eps, WEIGHT, BIAS)
    if RUNNING:
        _blend(mean, running_mean_ptr, channels, valid, factor, 1.0)
        _blend(var, running_var_ptr, channels, valid, factor, unbias)


@triton.jit
def bn_train_finalize_kernel(mean_ptr, var_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr,
                             running_mean_ptr, running_var_ptr, batches_ptr, C, eps, momentum,
                             unbias, WEIGHT: tl.constexpr, BIAS: tl.constexpr,
                             RUNNING: tl.constexpr, COUNTED: tl.constexpr,
                             CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr):
    """A training BatchNorm's whole finalize in one program: ``num_batches_tracked`` + 1;
    (scale, shift) as :func:`bn_scale_shift_kernel`; running = (1 - factor) * running +
    factor * batch with the unbiased variance var * unbias (unbias = count / (count - 1)),
    factor = momentum, or 1 / num_batches_tracked for the cumulative average. One
    program, so that every channel reads the count before it is written."""
    factor = _count_batch(batches_ptr, momentum, COUNTED, CUMULATIVE)
    for start in range(0, C, BLOCK):
        channels = start + tl.arange(0, BLOCK)
        valid = channels < C
        _finalize_training(_load(mean_ptr, channels, valid, 0.0),
                           _load(var_ptr, channels, valid, 1.0), weight_ptr, bias_ptr,
                           scale_ptr, shift_ptr, running_mean_ptr, running_var_ptr, channels,
                           valid, eps, factor, unbias, WEIGHT, BIAS, RUNNING)


@triton.jit
def bn_merge_train_finalize_kernel(
        count_ptr, tile_mean_ptr, m2_ptr, tiles_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr,
        scale_ptr, shift_ptr, running_mean_ptr, running_var_ptr, batches_ptr, C, eps,
        momentum, unbias, WEIGHT: tl.constexpr, BIAS: tl.constexpr, RUNNING: tl.constexpr,
        COUNTED: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """:func:`bn_train_finalize_kernel` from the per-tile statistics a conv wrote
    (:func:`statistics.merged_statistics` of [tiles, C] count/mean/M2), which it also
    stores as (mean, var): the merge and the finalize in one launch. Programs take
    BLOCK_C channels at a time; program 0 counts the batch, and with the cumulative
    average (whose factor needs the new count) the grid is one program."""
    factor = momentum
    if tl.program_id(0) == 0:
        factor = _count_batch(batches_ptr, momentum, COUNTED, CUMULATIVE)
    tiles = tl.load(tiles_ptr)
    for start in range(tl.program_id(0) * BLOCK_C, C, tl.num_programs(0) * BLOCK_C):
        channels = start + tl.arange(0, BLOCK_C)
        valid = channels < C
        mean, var = merged_statistics(count_ptr, tile_mean_ptr, m2_ptr, tiles, channels,
                                      valid, C, BLOCK_T)
        tl.store(mean_ptr + channels, mean, mask=valid)
        tl.store(var_ptr + channels, var, mask=valid)
        _finalize_training(mean, var, weight_ptr, bias_ptr, scale_ptr, shift_ptr,
                           running_mean_ptr, running_var_ptr, channels, valid, eps, factor,
                           unbias, WEIGHT, BIAS, RUNNING)


def _grid(c: int) -> tuple[int]:
    return (triton.cdiv(c, _BLOCK),)


def bn_scale_shift(mean, var, weight, bias, eps):
    """Launch :func:`bn_scale_shift_kernel`: (scale, shift), fp32 [C] (mean and var may be
    running statistics in a lower precision)."""
    dtype = torch.promote_types(mean.dtype, torch.float32)
    scale, shift = (torch.empty_like(mean, dtype=dtype) for _ in range(2))
    c = mean.numel()
    tuning.launcher(bn_scale_shift_kernel)[_grid(c)](
        mean, var, mean if weight is None else weight, mean if bias is None else bias, scale,
        shift, c, eps, WEIGHT=weight is not None, BIAS=bias is not None, BLOCK=_BLOCK)
    return scale, shift


def _scale_shift_gradient_buffers(mean, weight, bias):
    """(grad_mean, grad_var, grad_weight, grad_bias) outputs, and the pointers the kernels
    take for them (``grad_mean`` stands in for the absent ones)."""
    grad_mean, grad_var = torch.empty_like(mean), torch.empty_like(mean)
    grad_weight = None if weight is None else torch.empty_like(weight)
    grad_bias = None if bias is None else torch.empty_like(bias)
    outputs = (grad_mean, grad_var, grad_weight, grad_bias)
    return outputs, [grad_mean if t is None else t for t in outputs]


def bn_scale_shift_backward(grad_scale, grad_shift, mean, var, weight, bias, eps):
    """Launch :func:`bn_scale_shift_backward_kernel`: (grad_mean, grad_var, grad_weight,
    grad_bias), the last two None without weight or bias."""
    outputs, pointers = _scale_shift_gradient_buffers(mean, weight, bias)
    c = mean.numel()
    tuning.launcher(bn_scale_shift_backward_kernel)[_grid(c)](
        grad_scale, grad_shift, mean, var, mean if weight is None else weight, *pointers, c,
        eps, WEIGHT=weight is not None, BIAS=bias is not None, BLOCK=_BLOCK)
    return outputs


def bn_scale_shift_backward_from_tiles(sums, tiles, scale_kind, mean, var, weight, bias, eps):
    """Launch :func:`bn_scale_shift_backward_from_tiles_kernel` on per-tile sums
    (``statistics.sum_buffers``: row 0 of dL/dshift, row ``scale_kind`` of dL/dscale):
    as :func:`bn_scale_shift_backward`."""
    outputs, pointers = _scale_shift_gradient_buffers(mean, weight, bias)
    kinds, max_tiles, c = sums.shape
    tuning.launcher(bn_scale_shift_backward_from_tiles_kernel)[
        (triton.cdiv(c, statistics.MERGE_CHANNELS),)](
        sums, tiles, mean, var, mean if weight is None else weight, *pointers, max_tiles, c,
        eps, SCALE_KIND=scale_kind, WEIGHT=weight is not None, BIAS=bias is not None,
        BLOCK_T=statistics.MERGE_TILES, BLOCK_C=statistics.MERGE_CHANNELS)
    return outputs


def _training_arguments(weight, bias, running_mean, running_var, num_batches_tracked,
                        momentum, count, stand_in):
    """The arguments after the statistics that both training finalize kernels take, and
    their flags; ``stand_in`` fills absent pointers (never read: constexpr flags)."""
    pointers = [stand_in if t is None else t
                for t in (weight, bias, running_mean, running_var, num_batches_tracked)]
    flags = dict(WEIGHT=weight is not None, BIAS=bias is not None,
                 RUNNING=running_mean is not None, COUNTED=num_batches_tracked is not None,
                 CUMULATIVE=momentum is None)
    return pointers, (0.0 if momentum is None else momentum, count / (count - 1)), flags


def bn_train_finalize(mean, var, weight, bias, eps, running_mean, running_var,
                      num_batches_tracked, momentum, count):
    """Launch :func:`bn_train_finalize_kernel`: (scale, shift), fp32 [C]; updates the
    running statistics and ``num_batches_tracked`` (each may be None)."""
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    (weight, bias, *running), scalars, flags = _training_arguments(
        weight, bias, running_mean, running_var, num_batches_tracked, momentum, count, mean)
    tuning.launcher(bn_train_finalize_kernel)[(1,)](
        mean, var, weight, bias, scale, shift, *running, mean.numel(), eps, *scalars,
        **flags, BLOCK=_BLOCK)
    return scale, shift


def bn_merge_train_finalize(partials, weight, bias, eps, running_mean, running_var,
                            num_batches_tracked, momentum, count):
    """Launch :func:`bn_merge_train_finalize_kernel` on a conv's per-tile statistics
    (``statistics.partial_buffers``): (mean, biased var, scale, shift), fp32 [C]; updates
    the running statistics and ``num_batches_tracked`` (each may be None)."""
    channels = partials[0].shape[1]
    mean, var, scale, shift = (torch.empty(channels, device=partials[0].device,
                                           dtype=torch.float32) for _ in range(4))
    (weight, bias, *running), scalars, flags = _training_arguments(
        weight, bias, running_mean, running_var, num_batches_tracked, momentum, count, mean)
    grid = (1 if momentum is None else triton.cdiv(channels, statistics.MERGE_CHANNELS),)
    tuning.launcher(bn_merge_train_finalize_kernel)[grid](
        *partials, weight, bias, mean, var, scale, shift, *running, channels, eps, *scalars,
        **flags, BLOCK_T=statistics.MERGE_TILES, BLOCK_C=statistics.MERGE_CHANNELS)
    return mean, var, scale, shift
