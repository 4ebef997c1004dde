"""Fused convolution forward: ``y = epilogue(conv(prologue(x), W))`` as an implicit GEMM."""

import torch
import triton
import triton.language as tl

from .statistics import partial_buffers, store_tile_statistics
from . import tuning

_CONFIGS = tuning.gemm_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"))


@triton.jit
def relu_keeping_nan(v):
    # where(v < 0) rather than maximum(v, 0): NaN stays NaN, as torch.relu.
    return tl.where(v < 0, 0.0, v)


@triton.jit
def tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices of this program's [BLOCK_M, BLOCK_N] tile, and their masks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, columns, rows < M, columns < N


@triton.jit
def grouped_tile_indices(program, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """:func:`tile_indices` of ``program`` (of cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    programs) in grouped order, and the row tile's index. Consecutive programs cover GROUP_M row
    tiles of one column tile, then the same rows of the next column tile: they share
    their row tiles (the activations) in L2, where the 2-D grid, row tiles fastest,
    streams every row tile once per column tile from DRAM when the activations exceed L2.
    """
    tiles_m = tl.cdiv(M, BLOCK_M)
    programs_per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = program // programs_per_group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    in_group = program % programs_per_group
    tile_m = first_m + in_group % rows_in_group
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = in_group // rows_in_group * BLOCK_N + tl.arange(0, BLOCK_N)
    return tile_m, rows, columns, rows < M, columns < N


def grouped_grid(rows: int, columns: int, copies: int = 1):
    """The launch grid of a kernel tiled by :func:`grouped_tile_indices`, ``copies`` sets
    of programs (dgrad: one per pixel parity class)."""
    def grid(meta):
        tiles_m = triton.cdiv(rows, meta["BLOCK_M"])
        return (copies * tiles_m * triton.cdiv(columns, meta["BLOCK_N"]),)
    return grid


# Row tiles per group of the grouped tile order (grouped_tile_indices).
_GROUP_M = 8


@triton.jit
def split_pixel_index(index, height, width):
    """(image, row, column) of flat NHW pixel indices; image as int64 for the offsets."""
    return (index // (width * height)).to(tl.int64), (index // width) % height, index % width


def _keeps(config, launch) -> bool:
    """The tiles a forward launch may take: those the compile gate passes on sm_80 and
    sm_90 (tools/compile_gate.py). With a BN-ReLU prologue BLOCK_K = 64 only (with 32
    ptxas serializes the wgmma, warning C7515, and 128x64x32 spills on sm_80); with
    statistics but no prologue, not 64x64x64 (spills on sm_80)."""
    block_k = tuning.tile(config)[2]
    if launch["PROLOGUE"]:
        return block_k == 64
    return not launch["STATISTICS"] or tuning.tile(config)[:3] != (64, 64, 64)


@triton.autotune(configs=_CONFIGS, key=["M", "C_in", "C_out", "KH", "STRIDE", "PROLOGUE",
                                         "OUT_AFFINE", "RESIDUAL", "OUT_RELU", "STATISTICS"],
                 prune_configs_by=tuning.pruned_by(_keeps))
@triton.jit
def fused_conv_forward_kernel(
        x_ptr, w_ptr, y_ptr, in_scale_ptr, in_shift_ptr, out_scale_ptr, out_shift_ptr,
        residual_ptr, count_ptr, mean_ptr, m2_ptr, tiles_ptr,
        M, H, W, C_in, Ho, Wo, C_out,
        sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, OUT_AFFINE: tl.constexpr, RESIDUAL: tl.constexpr,
        OUT_RELU: tl.constexpr, STATISTICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    """One [BLOCK_M output pixels, BLOCK_N output channels] tile of a fused convolution.

    Layout: ``x`` is (N, C_in, H, W) with any strides (NHWC storage is the fast case);
    ``w`` is (C_out, C_in, KH, KW) with any strides; ``y`` and ``residual`` are
    channels_last-contiguous, i.e. a row-major [M = N*Ho*Wo, C_out] matrix. The GEMM's
    K dimension is one loop over (tap, BLOCK_K chunk of C_in), so that the loads of the
    next tap are in flight while this one's MMAs run (a loop per tap would drain the
    pipeline KH*KW times per tile); chunks are masked, so any channel count works. fp32
    accumulation. Programs in grouped order (:func:`grouped_tile_indices`).

    Fuses:
      prologue  a = relu(x * in_scale[c] + in_shift[c]), then zero padding: padded taps
                contribute 0, not relu(in_shift);
      epilogue  y = [relu](acc * out_scale[n] + out_shift[n] [+ residual]);
      statistics per-tile count/mean/M2 of acc for the next BatchNorm (one row per row tile).
    """
    tile_m, rows, channels, row_valid, channel_valid = grouped_tile_indices(
        tl.program_id(0), M, C_out, BLOCK_M, BLOCK_N, GROUP_M)
    image, ho, wo = split_pixel_index(rows, Ho, Wo)
    k_range = tl.arange(0, BLOCK_K)
    chunks = tl.cdiv(C_in, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, KH * KW * chunks):
        tap = step // chunks
        kh = tap // KW
        kw = tap % KW
        hi = ho * STRIDE - PAD + kh
        wi = wo * STRIDE - PAD + kw
        pixel_valid = row_valid & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        pixel_offset = image * sx_n + hi.to(tl.int64) * sx_h + wi.to(tl.int64) * sx_w
        k = (step - tap * chunks) * BLOCK_K + k_range
        k_valid = k < C_in
        a_mask = pixel_valid[:, None] & k_valid[None, :]
        a = tl.load(x_ptr + pixel_offset[:, None] + k[None, :] * sx_c, mask=a_mask, other=0.0)
        if PROLOGUE:
            scale = tl.load(in_scale_ptr + k, mask=k_valid, other=0.0)
            shift = tl.load(in_shift_ptr + k, mask=k_valid, other=0.0)
            a = relu_keeping_nan(a.to(tl.float32) * scale[None, :] + shift[None, :])
            a = tl.where(a_mask, a, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + channels[None, :] * sw_o + k[:, None] * sw_i + kh * sw_h
                    + kw * sw_w, mask=k_valid[:, None] & channel_valid[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)

    if STATISTICS:
        store_tile_statistics(acc, row_valid, tile_m, tl.cdiv(M, BLOCK_M), channels,
                              channel_valid, count_ptr, mean_ptr, m2_ptr, tiles_ptr, C_out)
    if OUT_AFFINE:
        scale = tl.load(out_scale_ptr + channels, mask=channel_valid, other=0.0)
        shift = tl.load(out_shift_ptr + channels, mask=channel_valid, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * C_out + channels[None, :]
    out_mask = row_valid[:, None] & channel_valid[None, :]
    if RESIDUAL:
        acc += tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    if OUT_RELU:
        acc = relu_keeping_nan(acc)
    tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def output_size(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 storage gets full fp32 products: tf32 would make fp32 results ~1e-3 off.
    return "ieee" if dtype == torch.float32 else "tf32"


def fused_conv_forward(x, weight, stride, in_scale=None, in_shift=None, out_scale=None,
                       out_shift=None, residual=None, out_relu=False, statistics=False):
    """Launch :func:`fused_conv_forward_kernel`; returns ``y`` (channels_last) and, with
    ``statistics``, the per-tile statistics of the pre-epilogue acc (``partial_buffers``:
    ``statistics.merge`` gives their per-channel mean and biased variance)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = output_size(h, kh, stride), output_size(w, kw, stride)
    m = n * ho * wo
    y = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    dummy = y  # stands in for absent optional pointers; never read (constexpr flags)
    partials = (partial_buffers(tuning.max_tiles(fused_conv_forward_kernel, m), c_out,
                                x.device) if statistics else (dummy,) * 4)
    tuning.launcher(fused_conv_forward_kernel)[grouped_grid(m, c_out)](
        x, weight, y,
        dummy if in_scale is None else in_scale, dummy if in_shift is None else in_shift,
        dummy if out_scale is None else out_scale, dummy if out_shift is None else out_shift,
        dummy if residual is None else residual, *partials,
        m, h, w, c_in, ho, wo, c_out, *x.stride(), *weight.stride(),
        KH=kh, KW=kw, STRIDE=stride, PAD=kh // 2,
        PROLOGUE=in_scale is not None, OUT_AFFINE=out_scale is not None,
        RESIDUAL=residual is not None, OUT_RELU=out_relu, STATISTICS=statistics,
        DOT_PRECISION=dot_precision(x.dtype), GROUP_M=_GROUP_M)
    return y, (partials if statistics else None)
