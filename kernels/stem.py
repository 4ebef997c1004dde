"""The end of an ImageNet ResNet stem: BatchNorm, ReLU and the 3x3 stride-2 max-pool in one
pass, and its backward in one pass.

Eager PyTorch runs three passes forward (BN, ReLU, max-pool, which also writes int64
indices as large as its input) and three backward (max-pool, ReLU, BN) over the stem's
conv output, ResNet-50's largest activation. Here the forward reads it once and writes
the pooled output and one byte per pooled value: which tap of the window won. The
backward routes the pooled gradient to the winning taps, applies the ReLU mask and
writes the gradient before the BN's scale, with the per-tile sums the BN's backward
needs; the gradient through the batch statistics is added by one elementwise pass
(``elementwise.statistics_backward``) once those sums are reduced.

Tensors are channels_last-contiguous, viewed as [pixels, channels].
"""

import torch
import triton
import triton.language as tl

from . import tuning
from .conv_forward import relu_keeping_nan, split_pixel_index, tile_indices
from .statistics import record_tile_count, sum_buffers

_CONFIGS = tuning.elementwise_configs(("BLOCK_M", "BLOCK_C"))


@triton.jit
def _normalized(x_ptr, offsets, mask, scale, shift):
    """relu(x * scale + shift) rounded to x's dtype: the value eager's max-pool compares."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return relu_keeping_nan(x * scale + shift).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.autotune(configs=_CONFIGS, key=["M", "C", "KERNEL", "STRIDE", "TAPS"])
@triton.jit
def bn_relu_maxpool_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, taps_ptr, M, C, H, W, Ho, Wo,
                           KERNEL: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                           TAPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = max_pool(relu(x * scale[c] + shift[c])) over KERNEL x KERNEL windows (padding
    PAD, which never wins), for a [BLOCK_M pooled pixels, BLOCK_C channels] tile; ``taps``
    (int8, y's shape) records the winning tap kh * KERNEL + kw, the first in scan order
    on ties and the last NaN where there is one, as PyTorch's max-pool chooses its index
    (only with ``TAPS``: training keeps them for the backward).
    ``x`` (N, C, H, W) and ``y`` (N, C, Ho, Wo) channels_last-contiguous."""
    rows, channels, row_valid, channel_valid = tile_indices(M, C, BLOCK_M, BLOCK_C)
    image, ho, wo = split_pixel_index(rows, Ho, Wo)
    scale = tl.load(scale_ptr + channels, mask=channel_valid, other=0.0)[None, :]
    shift = tl.load(shift_ptr + channels, mask=channel_valid, other=0.0)[None, :]
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    best_tap = tl.zeros((BLOCK_M, BLOCK_C), tl.int32)
    for tap in tl.static_range(KERNEL * KERNEL):
        hi = ho * STRIDE - PAD + tap // KERNEL
        wi = wo * STRIDE - PAD + tap % KERNEL
        valid = row_valid & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        offsets = ((image * H + hi) * W + wi)[:, None] * C + channels[None, :]
        mask = valid[:, None] & channel_valid[None, :]
        value = _normalized(x_ptr, offsets, mask, scale, shift)
        # As PyTorch's comparison: a NaN wins over everything, a later NaN included.
        wins = mask & ((value > best) | (value != value))
        best = tl.where(wins, value, best)
        best_tap = tl.where(wins, tap, best_tap)
    out_offsets = rows.to(tl.int64)[:, None] * C + channels[None, :]
    out_mask = row_valid[:, None] & channel_valid[None, :]
    tl.store(y_ptr + out_offsets, best.to(y_ptr.dtype.element_ty), mask=out_mask)
    if TAPS:
        tl.store(taps_ptr + out_offsets, best_tap.to(tl.int8), mask=out_mask)


@triton.autotune(configs=_CONFIGS, key=["M", "C", "KERNEL", "STRIDE"])
@triton.jit
def maxpool_relu_backward_kernel(g_ptr, taps_ptr, x_ptr, scale_ptr, shift_ptr, d_ptr, sum_ptr,
                                 sum_x_ptr, tiles_ptr, M, C, H, W, Ho, Wo,
                                 KERNEL: tl.constexpr, STRIDE: tl.constexpr,
                                 PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
    """For a [BLOCK_M input pixels, BLOCK_C channels] tile of x: D = the sum of the pooled
    gradients ``g`` of the windows whose winning tap (``taps``) is this pixel, times the
    ReLU mask relu(x * scale + shift) > 0, rounded to x's dtype; and per-tile sums of D
    and D * x (the BN's shift and scale gradients), taken of the rounded D, which is what
    the input gradient is made of. Each pixel visits the cdiv(KERNEL, STRIDE)^2 windows
    that can contain it, in a fixed order: no atomics."""
    rows, channels, row_valid, channel_valid = tile_indices(M, C, BLOCK_M, BLOCK_C)
    image, h, w = split_pixel_index(rows, H, W)
    mask = row_valid[:, None] & channel_valid[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    windows: tl.constexpr = (KERNEL + STRIDE - 1) // STRIDE  # per dimension
    for window in tl.static_range(windows * windows):
        ho = (h + PAD) // STRIDE - window // windows
        wo = (w + PAD) // STRIDE - window % windows
        kh = h + PAD - ho * STRIDE
        kw = w + PAD - wo * STRIDE
        valid = row_valid & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo) & (kh < KERNEL) \
            & (kw < KERNEL)
        offsets = ((image * Ho + ho) * Wo + wo)[:, None] * C + channels[None, :]
        window_mask = valid[:, None] & channel_valid[None, :]
        won = tl.load(taps_ptr + offsets, mask=window_mask, other=-1).to(tl.int32) \
            == (kh * KERNEL + kw)[:, None]
        acc += tl.where(won, tl.load(g_ptr + offsets, mask=window_mask, other=0.0)
                        .to(tl.float32), 0.0)
    offsets = rows.to(tl.int64)[:, None] * C + channels[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + channels, mask=channel_valid, other=0.0)[None, :]
    shift = tl.load(shift_ptr + channels, mask=channel_valid, other=0.0)[None, :]
    passed = (x * scale + shift).to(x_ptr.dtype.element_ty) > 0
    d = tl.where(mask & passed, acc, 0.0).to(d_ptr.dtype.element_ty)
    tl.store(d_ptr + offsets, d, mask=mask)
    d = d.to(tl.float32)
    tile = tl.program_id(0) * C + channels
    tl.store(sum_ptr + tile, tl.sum(d, axis=0), mask=channel_valid)
    tl.store(sum_x_ptr + tile, tl.sum(d * x, axis=0), mask=channel_valid)
    record_tile_count(tiles_ptr, tl.program_id(0), tl.num_programs(0))


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output extent of a max-pool (floor mode, no dilation)."""
    return (size + 2 * padding - kernel) // stride + 1


def bn_relu_maxpool(x, scale, shift, kernel, stride, padding, taps=True):
    """Launch :func:`bn_relu_maxpool_kernel`: (pooled y, winning taps int8 or None),
    channels_last."""
    n, c, h, w = x.shape
    ho, wo = (pooled_size(s, kernel, stride, padding) for s in (h, w))
    y = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    winners = torch.empty_like(y, dtype=torch.int8) if taps else None
    m = n * ho * wo
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))
    tuning.launcher(bn_relu_maxpool_kernel)[grid](
        x, scale, shift, y, y if winners is None else winners, m, c, h, w, ho, wo,
        KERNEL=kernel, STRIDE=stride, PAD=padding, TAPS=taps)
    return y, winners


def maxpool_relu_backward(grad, taps, x, scale, shift, kernel, stride, padding):
    """Launch :func:`maxpool_relu_backward_kernel`: (D channels_last in x's dtype, per-tile
    sums [D, D * x] as rows of one ``sum_buffers`` buffer, the tile count)."""
    n, c, h, w = x.shape
    _, _, ho, wo = grad.shape
    m = n * h * w
    d = torch.empty_like(x, memory_format=torch.channels_last)
    sums, tiles = sum_buffers(2, tuning.max_tiles(maxpool_relu_backward_kernel, m), c,
                              x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))
    tuning.launcher(maxpool_relu_backward_kernel)[grid](
        grad, taps, x, scale, shift, d, *sums, tiles, m, c, h, w, ho, wo, KERNEL=kernel,
        STRIDE=stride, PAD=padding)
    return d, sums, tiles
