"""Per-channel BatchNorm statistics from tiles, merged without cancellation.

Kernels write, for each tile of rows (pixels) and each channel, the row count, the mean
and M2 (the sum of squared deviations from that mean) of the tile. :func:`merge` combines
them with Chan et al.'s pairwise formula, which stays exact when |mean| >> std, where a
plain fp32 sum and sum of squares loses the variance. The merge is a fixed-order torch
reduction over tiles, so results are deterministic run to run.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def store_tile_statistics(values, row_valid, tile, channels, channel_valid, count_ptr,
                          mean_ptr, m2_ptr, num_channels):
    """Write count, mean and M2 of ``values`` [rows, channels] (fp32) over valid rows."""
    count = tl.sum(row_valid.to(tl.float32), axis=0)
    valid = row_valid[:, None] & channel_valid[None, :]
    mean = tl.sum(tl.where(valid, values, 0.0), axis=0) / tl.maximum(count, 1.0)
    deviation = tl.where(valid, values - mean[None, :], 0.0)
    m2 = tl.sum(deviation * deviation, axis=0)
    offsets = tile * num_channels + channels
    tl.store(count_ptr + offsets, tl.zeros_like(mean) + count, mask=channel_valid)
    tl.store(mean_ptr + offsets, mean, mask=channel_valid)
    tl.store(m2_ptr + offsets, m2, mask=channel_valid)


def partial_buffers(max_tiles: int, channels: int, device: torch.device):
    """Zeroed (count, mean, M2) buffers of [max_tiles, channels]; unused tiles count 0."""
    return tuple(torch.zeros(max_tiles, channels, device=device, dtype=torch.float32)
                 for _ in range(3))


def merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Per-channel (mean, biased variance) from the per-tile partials."""
    total = count.sum(0)
    merged_mean = (count * mean).sum(0) / total
    merged_m2 = m2.sum(0) + (count * (mean - merged_mean).square()).sum(0)
    return merged_mean, merged_m2 / total
