"""Per-channel elementwise passes over channels_last activations, viewed as [M, C].

The BN-apply + shortcut + ReLU that ends a post-activation training block (its BN needs
the whole batch's statistics, so it cannot sit in the producing conv's epilogue), its
backward, and the batch statistics of a tensor no kernel of ours produced (the input of
a pre-activation block).
"""

import torch
import triton
import triton.language as tl

from . import tuning
from .conv_forward import relu_keeping_nan, tile_indices
from .statistics import (merge, partial_buffers, record_tile_count, store_tile_statistics,
                         sum_buffers, sum_tiles, with_statistics_term)

_CONFIGS = tuning.elementwise_configs(("BLOCK_M", "BLOCK_C"))


@triton.jit
def _tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, channels, row_valid, channel_valid = tile_indices(M, C, BLOCK_M, BLOCK_C)
    offsets = rows.to(tl.int64)[:, None] * C + channels[None, :]
    return rows, channels, row_valid, channel_valid, offsets


@triton.jit
def _per_channel(ptr, channels, channel_valid):
    return tl.load(ptr + channels, mask=channel_valid, other=0.0)[None, :]


@triton.autotune(configs=_CONFIGS, key=["M", "C"])
@triton.jit
def bn_add_relu_kernel(a_ptr, a_scale_ptr, a_shift_ptr, r_ptr, r_scale_ptr, r_shift_ptr,
                       y_ptr, M, C, RESIDUAL: tl.constexpr, RESIDUAL_AFFINE: tl.constexpr,
                       RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = [relu](a * a_scale[c] + a_shift[c] [+ r [* r_scale[c] + r_shift[c]]]).

    ``a``, ``r``, ``y``: channels_last-contiguous [M, C]. One read of a and r, one write.
    """
    rows, channels, row_valid, channel_valid, offsets = _tile(M, C, BLOCK_M, BLOCK_C)
    mask = row_valid[:, None] & channel_valid[None, :]
    y = (tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
         * _per_channel(a_scale_ptr, channels, channel_valid)
         + _per_channel(a_shift_ptr, channels, channel_valid))
    if RESIDUAL:
        r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL_AFFINE:
            r = (r * _per_channel(r_scale_ptr, channels, channel_valid)
                 + _per_channel(r_shift_ptr, channels, channel_valid))
        y += r
    if RELU:
        y = relu_keeping_nan(y)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["M", "C"])
@triton.jit
def bn_add_relu_backward_kernel(g_ptr, y_ptr, a_ptr, a_scale_ptr, r_ptr, r_scale_ptr,
                                grad_a_ptr, grad_r_ptr, sum_ptr, sum_a_ptr, sum_r_ptr,
                                tiles_ptr, M, C,
                                RESIDUAL: tl.constexpr, RESIDUAL_AFFINE: tl.constexpr,
                                RELU: tl.constexpr, SCALED: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of :func:`bn_add_relu_kernel` in one pass over g, y, a (and r).

    Writes per-tile sums of g', g' * a and g' * r with g' = g * (y > 0): the gradients
    of the shifts and scales. With ``SCALED``, grad_a = g' * a_scale and grad_r = g'
    [* r_scale]; without, g' alone (as grad_a), for consumers that apply the scales as
    they load it (the backward of the block's last convs: one tensor written for both).
    """
    rows, channels, row_valid, channel_valid, offsets = _tile(M, C, BLOCK_M, BLOCK_C)
    mask = row_valid[:, None] & channel_valid[None, :]
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tile = tl.program_id(0) * C + channels
    tl.store(sum_ptr + tile, tl.sum(g, axis=0), mask=channel_valid)
    tl.store(sum_a_ptr + tile, tl.sum(g * a, axis=0), mask=channel_valid)
    record_tile_count(tiles_ptr, tl.program_id(0), tl.num_programs(0))
    if RESIDUAL_AFFINE:
        r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_r_ptr + tile, tl.sum(g * r, axis=0), mask=channel_valid)
    if SCALED:
        tl.store(grad_a_ptr + offsets,
                 (g * _per_channel(a_scale_ptr, channels, channel_valid)).to(
                     grad_a_ptr.dtype.element_ty), mask=mask)
        if RESIDUAL:
            grad_r = g
            if RESIDUAL_AFFINE:
                grad_r = g * _per_channel(r_scale_ptr, channels, channel_valid)
            tl.store(grad_r_ptr + offsets, grad_r.to(grad_r_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_a_ptr + offsets, g.to(grad_a_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["M", "C"])
@triton.jit
def channel_statistics_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, tiles_ptr, M, C,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile count/mean/M2 of channels_last-contiguous ``x`` [M, C], one read."""
    rows, channels, row_valid, channel_valid, offsets = _tile(M, C, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + offsets, mask=row_valid[:, None] & channel_valid[None, :], other=0.0)
    store_tile_statistics(x.to(tl.float32), row_valid, tl.program_id(0), tl.num_programs(0),
                          channels, channel_valid, count_ptr, mean_ptr, m2_ptr, tiles_ptr, C)


@triton.autotune(configs=_CONFIGS, key=["M", "C", "SCALED_GRAD"])
@triton.jit
def statistics_backward_kernel(g_ptr, y_ptr, mean_ptr, grad_mean_ptr, grad_var_ptr,
                               grad_scale_ptr, out_ptr, M, C, SCALED_GRAD: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = g [* grad_scale[c]] + (grad_mean[c] + 2 grad_var[c] (y - mean[c])) / M: the
    gradient of ``y`` [M, C] (channels_last-contiguous, as ``g`` and ``out``) whose
    per-channel batch statistics also reached the loss, for a consumer that cannot add
    the term as it loads (:func:`statistics.with_statistics_term`)."""
    rows, channels, row_valid, channel_valid, offsets = _tile(M, C, BLOCK_M, BLOCK_C)
    mask = row_valid[:, None] & channel_valid[None, :]
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if SCALED_GRAD:
        g = g * _per_channel(grad_scale_ptr, channels, channel_valid)
    out = with_statistics_term(g, tl.load(y_ptr + offsets, mask=mask, other=0.0),
                               _per_channel(mean_ptr, channels, channel_valid),
                               _per_channel(grad_mean_ptr, channels, channel_valid),
                               _per_channel(grad_var_ptr, channels, channel_valid), M)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_and_grid(x):
    m, c = x.numel() // x.shape[1], x.shape[1]
    return m, c, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))


def bn_add_relu(a, a_scale, a_shift, residual=None, r_scale=None, r_shift=None, relu=True):
    """Launch :func:`bn_add_relu_kernel`; tensors channels_last-contiguous."""
    m, c, grid = _rows_and_grid(a)
    y = torch.empty_like(a, memory_format=torch.channels_last)
    affine = r_scale is not None
    tuning.launcher(bn_add_relu_kernel)[grid](
        a, a_scale, a_shift, a if residual is None else residual,
        r_scale if affine else a_scale, r_shift if affine else a_shift, y, m, c,
        RESIDUAL=residual is not None, RESIDUAL_AFFINE=affine, RELU=relu)
    return y


def _launch_bn_add_relu_backward(grad, y, a, a_scale, residual, r_scale, affine, relu,
                                 scaled):
    """(grad_a, grad_r or None, per-tile sums [g', g' * a, g' * r] as rows of one buffer,
    the tile count) of :func:`bn_add_relu_backward_kernel`; ``affine``: the residual had
    a BN applied (r_scale, given when ``scaled``), whose scale's gradient is summed."""
    m, c, grid = _rows_and_grid(a)
    sums, tiles = sum_buffers(3, tuning.max_tiles(bn_add_relu_backward_kernel, m), c,
                              a.device)
    grad_a = torch.empty_like(a, memory_format=torch.channels_last)
    grad_r = (None if residual is None or not scaled
              else torch.empty_like(residual, memory_format=torch.channels_last))
    # The residual itself is read only for its scale's gradient: a stands in for it
    # otherwise, so that no launch is seen reading it.
    tuning.launcher(bn_add_relu_backward_kernel)[grid](
        grad, y, a, a_scale, residual if affine else a,
        a_scale if r_scale is None else r_scale, grad_a,
        grad_a if grad_r is None else grad_r, *sums, tiles, m, c, RESIDUAL=residual is not None, RESIDUAL_AFFINE=affine, RELU=relu,
        SCALED=scaled)
    return grad_a, grad_r, sums, tiles


def bn_add_relu_backward(grad, y, a, a_scale, residual=None, r_scale=None, relu=True):
    """Gradients of :func:`bn_add_relu`: (grad_a, grad_a_scale, grad_a_shift, grad_residual,
    grad_r_scale); the residual's are None where it has none (grad_r_shift is
    grad_a_shift)."""
    grad_a, grad_r, sums, tiles = _launch_bn_add_relu_backward(
        grad, y, a, a_scale, residual, r_scale, r_scale is not None, relu, scaled=True)
    grad_shift, grad_scale, grad_r_scale = sum_tiles(sums, tiles)
    return (grad_a, grad_scale, grad_shift, grad_r,
            grad_r_scale if r_scale is not None else None)


def masked_gradient(grad, y, a, projection=None, relu=True):
    """g' = grad * (y > 0) (channels_last, a's dtype) of :func:`bn_add_relu`'s output y, and
    per-tile sums [g', g' * a, g' * projection] (``statistics.sum_buffers``; the last only
    with ``projection``, a residual that had a BN applied): what the gradients of its
    inputs and per-channel vectors are made of, for consumers that apply the scales
    themselves."""
    # a stands in for the scales, which are not read without SCALED.
    g, _, sums, tiles = _launch_bn_add_relu_backward(
        grad, y, a, a, projection, None, projection is not None, relu, scaled=False)
    return g, sums, tiles


def channel_statistics(x):
    """Per-channel (mean, biased variance) of channels_last-contiguous ``x``, fp32."""
    m, c, grid = _rows_and_grid(x)
    partials = partial_buffers(tuning.max_tiles(channel_statistics_kernel, m), c, x.device)
    tuning.launcher(channel_statistics_kernel)[grid](x, *partials, m, c)
    return merge(*partials)


def statistics_backward(grad, y, mean, grad_mean, grad_var, grad_scale=None):
    """Launch :func:`statistics_backward_kernel`: the gradient of ``y`` (channels_last, y's
    dtype); tensors channels_last-contiguous."""
    m, c, grid = _rows_and_grid(y)
    out = torch.empty_like(y, memory_format=torch.channels_last)
    tuning.launcher(statistics_backward_kernel)[grid](
        grad, y, mean, grad_mean, grad_var, mean if grad_scale is None else grad_scale, out,
        m, c, SCALED_GRAD=grad_scale is not None)
    return out
