"""Fused convolution backward: dgrad with the BN-ReLU backward in its epilogue, and wgrad
with BN-ReLU recomputed in its prologue, so the activation is never stored."""

import torch
import triton
import triton.language as tl

from . import conv_forward, tuning
from .conv_forward import (dot_precision, grouped_grid, grouped_tile_indices, relu_keeping_nan,
                           split_pixel_index, tile_indices)
from .statistics import record_tile_count, sum_buffers, sum_tiles, with_statistics_term

_CONFIGS = tuning.gemm_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"))
# wgrad reduces over every output pixel; splitting that reduction over this many pixels
# per program keeps the GPU busy when C_out * C_in is small (and stays deterministic:
# the splits are summed in a fixed order).
_WGRAD_PIXELS_PER_SPLIT = 8192


def _dgrad_keeps(config, launch) -> bool:
    """The tiles a dgrad launch may take (tools/compile_gate.py): with a prologue 64x64
    (larger ones spill on sm_80); with a scaled gradient and no prologue 128x128x64 with 8
    warps (the others serialize the wgmma on sm_90, C7515)."""
    if launch["PROLOGUE"]:
        return tuning.tile(config)[:2] == (64, 64)
    return not launch["SCALED_GRAD"] or tuning.tile(config) == (128, 128, 64, 8)


def _wgrad_keeps(config, launch) -> bool:
    """wgrad takes the 8-warp tiles (with 4 warps ptxas serializes the wgmma on sm_90,
    C7515: tools/compile_gate.py)."""
    return tuning.tile(config)[3] == 8


@triton.autotune(configs=_CONFIGS, key=["M", "C_in", "C_out", "KH", "STRIDE", "PROLOGUE",
                                         "STATISTICS", "SCALED_GRAD", "ADD_OTHER"],
                 prune_configs_by=tuning.pruned_by(_dgrad_keeps))
@triton.jit
def conv_dgrad_kernel(
        g_ptr, w_ptr, x_ptr, in_scale_ptr, in_shift_ptr, grad_x_ptr, sum_ptr, sum_x_ptr,
        tiles_ptr, y_ptr, mean_ptr, grad_mean_ptr, grad_var_ptr, grad_scale_ptr, other_ptr,
        M, M_CLASS, H, W, C_in, Ho, Wo, C_out,
        sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, STATISTICS: tl.constexpr, SCALED_GRAD: tl.constexpr,
        ADD_OTHER: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M input pixels, BLOCK_N input channels] tile of the input gradient.

    Layout: ``g`` (the output gradient) and ``grad_x`` are channels_last-contiguous, a
    row-major [pixels, channels] matrix; ``x`` (N, C_in, H, W) and ``w`` (C_out, C_in, KH,
    KW) any strides. The input pixels are split by parity class (h % STRIDE, w % STRIDE):
    the programs of a class cover its M_CLASS = N * cdiv(H, STRIDE) * cdiv(W, STRIDE)
    pixel slots (in grouped order, ``grouped_tile_indices``) and run only the taps that
    reach its pixels, the kh with (h + PAD - kh) % STRIDE == 0 and likewise kw; with
    stride 2 each pixel meets a quarter of the taps, so no masked-out MMA work is done
    (a class a 1x1 tap does not reach runs none and writes zeros). K is one loop over
    (tap, BLOCK_K chunk of C_out), as in the forward.

    With ``PROLOGUE`` (the forward applied a = relu(x * scale + shift)) the epilogue
    recomputes the ReLU mask from ``x``, writes grad_x = dL/da * mask * scale, and per-tile
    sums of dL/da * mask and dL/da * mask * x: the gradients of shift and scale.

    With ``STATISTICS`` (the forward's output ``y`` also gave its batch statistics) ``g``
    is dL/dy without them, and the gradient through (mean, var) of ``y`` is added while
    loading g (:func:`with_statistics_term`; ``y`` channels_last-contiguous like ``g``).
    With ``SCALED_GRAD`` as well, ``g`` is that gradient divided by ``grad_scale`` per
    channel (y fed a BN-apply whose backward wrote its gradient before the scale), and
    the scale is applied while loading too.

    With ``ADD_OTHER`` the epilogue adds ``other`` (channels_last-contiguous like
    ``grad_x``): the gradient x gets from its other consumer (a block's shortcut), which
    autograd would otherwise add in a pass of its own.
    """
    programs_per_class = tl.cdiv(M_CLASS, BLOCK_M) * tl.cdiv(C_in, BLOCK_N)
    parity = tl.program_id(0) // programs_per_class
    tile_m, slots, channels, row_valid, channel_valid = grouped_tile_indices(
        tl.program_id(0) % programs_per_class, M_CLASS, C_in, BLOCK_M, BLOCK_N, GROUP_M)
    image, h_slot, w_slot = split_pixel_index(slots, tl.cdiv(H, STRIDE), tl.cdiv(W, STRIDE))
    h_parity = parity // STRIDE
    w_parity = parity % STRIDE
    h_ = h_slot * STRIDE + h_parity
    w_ = w_slot * STRIDE + w_parity
    row_valid = row_valid & (h_ < H) & (w_ < W)
    # The class's taps: kh = first_kh + STRIDE * t, where h + PAD - kh = STRIDE * (h_slot
    # + shift_h - t): the output row ho = h_slot + shift_h - t, no division per pixel.
    first_kh = (h_parity + PAD) % STRIDE
    first_kw = (w_parity + PAD) % STRIDE
    shift_h = (h_parity + PAD) // STRIDE
    shift_w = (w_parity + PAD) // STRIDE
    taps_w = tl.cdiv(KW - first_kw, STRIDE)
    taps = tl.cdiv(KH - first_kh, STRIDE) * taps_w
    k_range = tl.arange(0, BLOCK_K)
    chunks = tl.cdiv(C_out, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, taps * chunks):
        tap = step // chunks
        tap_h = tap // tl.maximum(taps_w, 1)
        tap_w = tap - tap_h * taps_w
        kh = first_kh + tap_h * STRIDE
        kw = first_kw + tap_w * STRIDE
        ho = h_slot + shift_h - tap_h
        wo = w_slot + shift_w - tap_w
        valid = row_valid & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        g_rows = (image * Ho + ho) * Wo + wo
        k = (step - tap * chunks) * BLOCK_K + k_range
        k_valid = k < C_out
        g_offsets = g_rows[:, None] * C_out + k[None, :]
        g_mask = valid[:, None] & k_valid[None, :]
        g = tl.load(g_ptr + g_offsets, mask=g_mask, other=0.0)
        if STATISTICS:
            if SCALED_GRAD:
                g = g.to(tl.float32) * tl.load(grad_scale_ptr + k, mask=k_valid,
                                               other=0.0)[None, :]
            g = with_statistics_term(
                g, tl.load(y_ptr + g_offsets, mask=g_mask, other=0.0),
                tl.load(mean_ptr + k, mask=k_valid, other=0.0)[None, :],
                tl.load(grad_mean_ptr + k, mask=k_valid, other=0.0)[None, :],
                tl.load(grad_var_ptr + k, mask=k_valid, other=0.0)[None, :],
                M // (H * W) * Ho * Wo)  # y's pixels: its count per channel
            # Padding taps and masked channels load g = 0 but not a 0 term.
            g = tl.where(g_mask, g, 0.0).to(g_ptr.dtype.element_ty)
        b = tl.load(w_ptr + k[:, None] * sw_o + channels[None, :] * sw_i + kh * sw_h
                    + kw * sw_w, mask=k_valid[:, None] & channel_valid[None, :], other=0.0)
        acc += tl.dot(g, b, input_precision=DOT_PRECISION)

    mask = row_valid[:, None] & channel_valid[None, :]
    if PROLOGUE:
        x = tl.load(x_ptr + image[:, None] * sx_n + h_[:, None] * sx_h + w_[:, None] * sx_w
                    + channels[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(in_scale_ptr + channels, mask=channel_valid, other=0.0)
        shift = tl.load(in_shift_ptr + channels, mask=channel_valid, other=0.0)
        grad_pre = tl.where(mask & (x * scale[None, :] + shift[None, :] > 0), acc, 0.0)
        tiles_m = tl.cdiv(M_CLASS, BLOCK_M)
        tile = parity * tiles_m + tile_m
        offsets = tile * C_in + channels
        tl.store(sum_ptr + offsets, tl.sum(grad_pre, axis=0), mask=channel_valid)
        tl.store(sum_x_ptr + offsets, tl.sum(grad_pre * x, axis=0), mask=channel_valid)
        record_tile_count(tiles_ptr, tile, STRIDE * STRIDE * tiles_m)
        acc = grad_pre * scale[None, :]
    pixels = (image * H + h_) * W + w_
    offsets = pixels[:, None] * C_in + channels[None, :]
    if ADD_OTHER:
        acc += tl.load(other_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offsets, acc.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["M", "C_in", "C_out", "KH", "STRIDE", "PROLOGUE",
                                         "STATISTICS", "SCALED_GRAD"],
                 prune_configs_by=tuning.pruned_by(_wgrad_keeps))
@triton.jit
def conv_wgrad_kernel(
        g_ptr, x_ptr, in_scale_ptr, in_shift_ptr, dw_ptr, y_ptr, mean_ptr, grad_mean_ptr,
        grad_var_ptr, grad_scale_ptr,
        M, H, W, C_in, Ho, Wo, C_out, pixels_per_split,
        sx_n, sx_c, sx_h, sx_w,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, STATISTICS: tl.constexpr, SCALED_GRAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M out channels, BLOCK_N in channels] tile of one tap of one split of dW.

    Layout: ``g`` channels_last-contiguous [M = N*Ho*Wo, C_out]; ``x`` (N, C_in, H, W) any
    strides; ``dw`` fp32 [splits, C_out, KH*KW, C_in], summed over splits by the caller.
    The reduction runs over this split's output pixels. With ``PROLOGUE`` the activation
    relu(x * scale + shift) is recomputed from ``x`` while loading, with zero padding
    applied after it, exactly as the forward saw it. ``STATISTICS`` and ``SCALED_GRAD`` as
    in :func:`conv_dgrad_kernel`.
    """
    out_channels, in_channels, out_valid, in_valid = tile_indices(C_out, C_in, BLOCK_M, BLOCK_N)
    tap = tl.program_id(2) % (KH * KW)
    split = tl.program_id(2) // (KH * KW)
    kh = tap // KW
    kw = tap % KW
    if PROLOGUE:
        scale = tl.load(in_scale_ptr + in_channels, mask=in_valid, other=0.0)
        shift = tl.load(in_shift_ptr + in_channels, mask=in_valid, other=0.0)
    if STATISTICS:
        mean = tl.load(mean_ptr + out_channels, mask=out_valid, other=0.0)[:, None]
        grad_mean = tl.load(grad_mean_ptr + out_channels, mask=out_valid, other=0.0)[:, None]
        grad_var = tl.load(grad_var_ptr + out_channels, mask=out_valid, other=0.0)[:, None]
        if SCALED_GRAD:
            grad_scale = tl.load(grad_scale_ptr + out_channels, mask=out_valid,
                                 other=0.0)[:, None]
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        pixels = p0 + tl.arange(0, BLOCK_K)
        pixel_valid = pixels < end
        image, ho, wo = split_pixel_index(pixels, Ho, Wo)
        hi = ho * STRIDE - PAD + kh
        wi = wo * STRIDE - PAD + kw
        x_valid = pixel_valid & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        g_offsets = pixels.to(tl.int64)[None, :] * C_out + out_channels[:, None]
        g_mask = out_valid[:, None] & pixel_valid[None, :]
        g = tl.load(g_ptr + g_offsets, mask=g_mask, other=0.0)
        if STATISTICS:
            if SCALED_GRAD:
                g = g.to(tl.float32) * grad_scale
            # Masked lanes get a nonzero term, but meet a = 0 (pixels past the split) or
            # are never stored (channels past C_out): no mask needed.
            g = with_statistics_term(g, tl.load(y_ptr + g_offsets, mask=g_mask, other=0.0),
                                     mean, grad_mean, grad_var, M).to(g_ptr.dtype.element_ty)
        a_mask = x_valid[:, None] & in_valid[None, :]
        a = tl.load(x_ptr + (image * sx_n + hi * sx_h + wi * sx_w)[:, None]
                    + in_channels[None, :] * sx_c, mask=a_mask, other=0.0)
        if PROLOGUE:
            a = relu_keeping_nan(a.to(tl.float32) * scale[None, :] + shift[None, :])
            a = tl.where(a_mask, a, 0.0).to(x_ptr.dtype.element_ty)
        acc += tl.dot(g, a, input_precision=DOT_PRECISION)
    offsets = ((split * C_out + out_channels[:, None]) * (KH * KW) + tap) * C_in \
        + in_channels[None, :]
    tl.store(dw_ptr + offsets, acc, mask=out_valid[:, None] & in_valid[None, :])


def _statistics_pointers(statistics, stand_in):
    """(y, mean, grad_mean, grad_var, grad_scale) as kernel arguments, ``stand_in`` for
    those absent (never read: constexpr flags)."""
    return [stand_in if t is None else t for t in (statistics or (None,) * 5)]


def _statistics_flags(statistics):
    return dict(STATISTICS=statistics is not None,
                SCALED_GRAD=statistics is not None and statistics[4] is not None)


def conv_dgrad(grad, weight, x, stride, in_scale=None, in_shift=None, statistics=None,
               other=None):
    """dL/dx of ``fused_conv_forward``, channels_last; with a prologue also the gradients
    of ``in_scale`` and ``in_shift``. ``grad`` must be channels_last-contiguous.

    ``statistics``: None, or (y, mean, grad_mean, grad_var, grad_scale) when the forward's
    output ``y`` (channels_last-contiguous) also gave its batch statistics: ``grad`` is
    then dL/dy without them (divided by ``grad_scale`` per channel unless it is None) and
    their term is added as g is loaded (no pass of its own).
    ``other``: None, or a gradient of x (channels_last-contiguous) added to the result."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, _, ho, wo = grad.shape
    classes = stride * stride  # pixel parity classes, one set of programs each
    pixels_per_class = n * triton.cdiv(h, stride) * triton.cdiv(w, stride)
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype,
                         memory_format=torch.channels_last)
    prologue = in_scale is not None
    # Per-tile sums of the scale/shift gradients: [shift, scale] rows of one buffer.
    sums, tiles = (sum_buffers(2, classes * tuning.max_tiles(conv_dgrad_kernel,
                                                             pixels_per_class),
                               c_in, x.device)
                   if prologue else ((grad_x, grad_x), grad_x))
    # Without a prologue x is not read (only its shape is used): grad_x stands in for it
    # and the other absent pointers, so that no launch is seen reading it.
    tuning.launcher(conv_dgrad_kernel)[grouped_grid(pixels_per_class, c_in, classes)](
        grad, weight, x if prologue else grad_x, in_scale if prologue else grad_x,
        in_shift if prologue else grad_x, grad_x, sums[0], sums[1], tiles,
        *_statistics_pointers(statistics, grad_x), grad_x if other is None else other,
        n * h * w, pixels_per_class, h, w, c_in, ho, wo, c_out, *x.stride(),
        *weight.stride(),
        KH=kh, KW=kw, STRIDE=stride, PAD=kh // 2, PROLOGUE=prologue,
        **_statistics_flags(statistics), ADD_OTHER=other is not None,
        DOT_PRECISION=dot_precision(x.dtype), GROUP_M=conv_forward._GROUP_M)
    if not prologue:
        return grad_x, None, None
    grad_shift, grad_scale = sum_tiles(sums, tiles)
    return grad_x, grad_scale, grad_shift


@triton.jit
def sum_splits_kernel(partial_ptr, out_ptr, SPLITS, C_out, C_in, so_o, so_i, so_h, so_w,
                      KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """out[o, i, kh, kw] = sum over s of partial[s, o, kh * KW + kw, i], splits in order,
    written in ``out``'s dtype and strides (the weight's). ``partial`` is fp32
    [SPLITS, C_out, KH * KW, C_in], contiguous; one program per BLOCK of its elements."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    size = C_out * KH * KW * C_in
    valid = index < size
    total = tl.zeros((BLOCK,), tl.float32)
    split_ptr = partial_ptr + index  # pointer arithmetic is 64-bit: no index overflow
    for _ in range(0, SPLITS):
        total += tl.load(split_ptr, mask=valid, other=0.0)
        split_ptr += size
    i = index % C_in
    tap = (index // C_in) % (KH * KW)
    o = index // (C_in * KH * KW)
    tl.store(out_ptr + o * so_o + i * so_i + (tap // KW) * so_h + (tap % KW) * so_w,
             total.to(out_ptr.dtype.element_ty), mask=valid)


_SUM_SPLITS_BLOCK = 1024


def conv_wgrad(grad, x, weight, stride, in_scale=None, in_shift=None, statistics=None):
    """dL/dW of ``fused_conv_forward``, in the dtype and memory layout of ``weight``.
    ``grad`` must be channels_last-contiguous; ``statistics`` as in :func:`conv_dgrad`."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, _, ho, wo = grad.shape
    m = n * ho * wo
    splits = max(1, triton.cdiv(m, _WGRAD_PIXELS_PER_SPLIT))
    partial = torch.empty((splits, c_out, kh * kw, c_in), device=x.device,
                          dtype=torch.float32)
    prologue = in_scale is not None
    grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]),
                         splits * kh * kw)
    tuning.launcher(conv_wgrad_kernel)[grid](
        grad, x, in_scale if prologue else partial, in_shift if prologue else partial,
        partial, *_statistics_pointers(statistics, partial), m, h, w, c_in, ho, wo, c_out,
        triton.cdiv(m, splits), *x.stride(),
        KH=kh, KW=kw, STRIDE=stride, PAD=kh // 2, PROLOGUE=prologue,
        **_statistics_flags(statistics), DOT_PRECISION=dot_precision(x.dtype))
    grad_weight = torch.empty_like(weight)
    tuning.launcher(sum_splits_kernel)[(triton.cdiv(partial[0].numel(), _SUM_SPLITS_BLOCK),)](
        partial, grad_weight, splits, c_out, c_in, *grad_weight.stride(), KH=kh, KW=kw,
        BLOCK=_SUM_SPLITS_BLOCK)
    return grad_weight
