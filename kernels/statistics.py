"""Per-channel BatchNorm statistics from tiles, merged without cancellation.

Kernels write, for each tile of rows (pixels) and each channel, the row count, the mean
and M2 (the sum of squared deviations from that mean) of the tile, and the number of
tiles they launched. :func:`merge` combines them with Chan et al.'s pairwise formula,
which stays exact when |mean| >> std, where a plain fp32 sum and sum of squares loses the
variance. The merge is one kernel that visits the tiles in a fixed order, so results are
deterministic run to run; nothing is zeroed beforehand, since it reads only the tiles
that were written.
"""

import torch
import triton
import triton.language as tl

from . import tuning

# Tiles the merge combines per step, and channels per merge program.
MERGE_TILES = 32
MERGE_CHANNELS = 64


@triton.jit
def store_tile_statistics(values, row_valid, tile, tiles, channels, channel_valid, count_ptr,
                          mean_ptr, m2_ptr, tiles_ptr, num_channels):
    """Write count, mean and M2 of ``values`` [rows, channels] (fp32) over valid rows, as
    row ``tile`` of the partial buffers; tile 0 also writes how many (``tiles``) there are."""
    count = tl.sum(row_valid.to(tl.float32), axis=0)
    valid = row_valid[:, None] & channel_valid[None, :]
    mean = tl.sum(tl.where(valid, values, 0.0), axis=0) / tl.maximum(count, 1.0)
    deviation = tl.where(valid, values - mean[None, :], 0.0)
    m2 = tl.sum(deviation * deviation, axis=0)
    offsets = tile * num_channels + channels
    tl.store(count_ptr + offsets, tl.zeros_like(mean) + count, mask=channel_valid)
    tl.store(mean_ptr + offsets, mean, mask=channel_valid)
    tl.store(m2_ptr + offsets, m2, mask=channel_valid)
    record_tile_count(tiles_ptr, tile, tiles)


@triton.jit
def record_tile_count(tiles_ptr, tile, tiles):
    """How many row tiles (``tiles``) wrote partials, for the reduction that reads them
    (so that the partial buffers need no zeroing): written by the programs of tile 0."""
    if tile == 0:
        tl.store(tiles_ptr, tiles)


@triton.jit
def with_statistics_term(g, y, mean, grad_mean, grad_var, count):
    """``g + (grad_mean + 2 grad_var (y - mean)) / count`` in fp32: the gradient of ``y``
    when its per-channel mean and biased variance over ``count`` values also reach the
    loss (per-channel operands broadcast by the caller). Centred on the mean before the
    product, so it stays exact when |mean| >> std. The backward kernels apply it while
    loading the output gradient, so it costs no pass of its own."""
    centred = y.to(tl.float32) - mean
    return g.to(tl.float32) + (grad_mean + 2.0 * grad_var * centred) / count


@triton.jit
def summed_tiles(partials_ptr, tiles, channels, channel_valid, C, BLOCK_T: tl.constexpr):
    """The sum over the first ``tiles`` rows of [tiles, C] ``partials`` for ``channels``,
    BLOCK_T rows at a time, in a fixed order."""
    total = tl.zeros(channels.shape, tl.float32)
    for first in range(0, tiles, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        mask = (rows < tiles)[:, None] & channel_valid[None, :]
        total += tl.sum(tl.load(partials_ptr + rows.to(tl.int64)[:, None] * C
                                + channels[None, :], mask=mask, other=0.0), axis=0)
    return total


@triton.jit
def sum_tiles_kernel(partials_ptr, tiles_ptr, sum0_ptr, sum1_ptr, sum2_ptr, MAX_TILES, C,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum<k>[c] = the sum over the first ``tiles`` rows of partials[k, :, c]
    ([K <= 3, MAX_TILES, C], program axis 1 is k), in a fixed order. Separate outputs:
    an op may not return views of one tensor."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = channels < C
    kind = tl.program_id(1)
    total = summed_tiles(partials_ptr + kind.to(tl.int64) * MAX_TILES * C, tl.load(tiles_ptr),
                         channels, channel_valid, C, BLOCK_T)
    if kind == 0:
        tl.store(sum0_ptr + channels, total, mask=channel_valid)
    elif kind == 1:
        tl.store(sum1_ptr + channels, total, mask=channel_valid)
    else:
        tl.store(sum2_ptr + channels, total, mask=channel_valid)


@triton.jit
def merged_statistics(count_ptr, mean_ptr, m2_ptr, tiles, channels, channel_valid, C,
                      BLOCK_T: tl.constexpr):
    """Per-channel (mean, biased variance) of ``channels`` over the first ``tiles`` rows of
    the [tiles, C] partials: each block of BLOCK_T tiles is combined in parallel, then
    merged into the running result with Chan's formula, blocks in order. NaN for an empty
    input, as torch.mean gives (no 0 / 0 computed, even in lanes the caller masks: the
    interpreter warns about those)."""
    count = tl.zeros(channels.shape, tl.float32)
    mean = tl.zeros(channels.shape, tl.float32)
    m2 = tl.zeros(channels.shape, tl.float32)
    for first in range(0, tiles, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        mask = (rows < tiles)[:, None] & channel_valid[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + channels[None, :]
        tile_count = tl.load(count_ptr + offsets, mask=mask, other=0.0)
        tile_mean = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        block_count = tl.sum(tile_count, axis=0)
        block_mean = tl.sum(tile_count * tile_mean, axis=0) / tl.maximum(block_count, 1.0)
        spread = tl.where(mask, tile_mean - block_mean[None, :], 0.0)
        block_m2 = (tl.sum(tl.load(m2_ptr + offsets, mask=mask, other=0.0), axis=0)
                    + tl.sum(tile_count * spread * spread, axis=0))
        total = count + block_count
        delta = block_mean - mean
        mean += delta * block_count / tl.maximum(total, 1.0)
        m2 += block_m2 + delta * delta * count * block_count / tl.maximum(total, 1.0)
        count = total
    empty = count == 0
    return (tl.where(empty, float("nan"), mean),
            tl.where(empty, float("nan"), m2 / tl.maximum(count, 1.0)))


@triton.jit
def merge_kernel(count_ptr, mean_ptr, m2_ptr, tiles_ptr, merged_mean_ptr, merged_var_ptr, C,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`merged_statistics` of BLOCK_C channels per program, stored."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = channels < C
    mean, var = merged_statistics(count_ptr, mean_ptr, m2_ptr, tl.load(tiles_ptr), channels,
                                  channel_valid, C, BLOCK_T)
    tl.store(merged_mean_ptr + channels, mean, mask=channel_valid)
    tl.store(merged_var_ptr + channels, var, mask=channel_valid)


def _tile_count(max_tiles: int, device: torch.device) -> torch.Tensor:
    # No tile of an empty input writes the count: then it is 0 from the start.
    return (torch.empty if max_tiles else torch.zeros)(1, device=device, dtype=torch.int32)


def partial_buffers(max_tiles: int, channels: int, device: torch.device):
    """(count, mean, M2) buffers of [max_tiles, channels] and the tile count (int32 [1]),
    uninitialized: the kernels write each tile they launch and the count."""
    return (*(torch.empty(max_tiles, channels, device=device, dtype=torch.float32)
              for _ in range(3)), _tile_count(max_tiles, device))


def sum_buffers(kinds: int, max_tiles: int, channels: int, device: torch.device):
    """``kinds`` per-tile sum buffers as one [kinds, max_tiles, channels] tensor and the
    tile count (int32 [1]), uninitialized as in :func:`partial_buffers`."""
    return (torch.empty(kinds, max_tiles, channels, device=device, dtype=torch.float32),
            _tile_count(max_tiles, device))


def sum_tiles(partials: torch.Tensor, tiles: torch.Tensor) -> list[torch.Tensor]:
    """The per-channel sums (fp32 [channels] each) of the tiles written into
    :func:`sum_buffers`' buffer, one per kind."""
    kinds, max_tiles, channels = partials.shape
    sums = [torch.empty(channels, device=partials.device, dtype=torch.float32)
            for _ in range(kinds)]
    tuning.launcher(sum_tiles_kernel)[(triton.cdiv(channels, MERGE_CHANNELS), kinds)](
        partials, tiles, *(sums + sums[:1] * (3 - kinds)), max_tiles, channels,
        BLOCK_T=MERGE_TILES, BLOCK_C=MERGE_CHANNELS)
    return sums


def merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, tiles: torch.Tensor):
    """Per-channel (mean, biased variance) from the partials of :func:`partial_buffers`."""
    channels = count.shape[1]
    merged_mean, merged_var = (torch.empty(channels, device=count.device,
                                           dtype=torch.float32) for _ in range(2))
    tuning.launcher(merge_kernel)[(triton.cdiv(channels, MERGE_CHANNELS),)](
        count, mean, m2, tiles, merged_mean, merged_var, channels, BLOCK_T=MERGE_TILES,
        BLOCK_C=MERGE_CHANNELS)
    return merged_mean, merged_var
