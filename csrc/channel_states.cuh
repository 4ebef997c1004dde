// The per-channel states the reductions over pixels keep, and the merge of per-block partial
// states: Welford (batch statistics: count, mean and sum of squared deviations M2, updated with
// Welford's step and merged with Chan et al.'s pairwise formula, so that it stays exact when
// |mean| >> std: no sum of squares anywhere) and Sums (a BN-ReLU backward's sums). Used by the
// channel reductions (channel_kernels.cu), the convolutions' epilogue reductions
// (epilogue_reductions.cuh) and the merges of their partials (channel_kernels.cu,
// batch_norm_finalize.cu). The states are host and device code, so the epilogue's bookkeeping
// can be checked on a CPU (tests/cuda_host/epilogue_reductions.cu).
#pragma once

#if defined(__CUDACC__)
#define FUSED_RESNET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_RESNET_HOST_DEVICE inline
#endif

namespace fused_resnet {

// Trivially constructible (an aggregate), so it can live in shared memory and in unions.
struct Welford {
  float count, mean, m2;

  FUSED_RESNET_HOST_DEVICE static Welford zero() { return {0.f, 0.f, 0.f}; }

  FUSED_RESNET_HOST_DEVICE void add(float value) {
    count += 1.f;
    const float delta = value - mean;
    mean += delta / count;
    m2 += delta * (value - mean);
  }

  // Welford's step with 1 / (count + 1) given: states that always take values together (the
  // channels of one vector) share one reciprocal instead of a division each.
  FUSED_RESNET_HOST_DEVICE void add(float value, float inverse_new_count) {
    count += 1.f;
    const float delta = value - mean;
    mean += delta * inverse_new_count;
    m2 += delta * (value - mean);
  }

  FUSED_RESNET_HOST_DEVICE void merge(const Welford& other) {
    if (other.count == 0.f) return;
    const float total = count + other.count;
    const float delta = other.mean - mean;
    mean += delta * (other.count / total);
    m2 += other.m2 + delta * delta * (count * other.count / total);
    count = total;
  }
};

// sum of g, sum of g * x and, for a second affine input r (a block's shortcut), sum of g * r.
struct Sums {
  float sum, dot, dot_residual;

  FUSED_RESNET_HOST_DEVICE static Sums zero() { return {0.f, 0.f, 0.f}; }

  FUSED_RESNET_HOST_DEVICE void merge(const Sums& other) {
    sum += other.sum;
    dot += other.dot;
    dot_residual += other.dot_residual;
  }
};

#if defined(__CUDACC__)
// The merge of per-block partial states [rows, channels] (row-major; Welford, or any State with
// zero() and an associative merge()) into one per channel, by
// a block of (kMergeChannels, kMergeLanes) threads, one channel per threadIdx.x: lane y merges
// rows y, y + kMergeLanes, ... in order, then the lanes' results are merged in lane order. The
// order depends on neither the grid nor the GPU, so the result repeats bitwise. Every thread
// of the block calls it (it synchronizes); the merged state is lane 0's (threadIdx.y == 0),
// all zero for a channel >= channels.
constexpr int kMergeChannels = 32;
constexpr int kMergeLanes = 16;

template <typename State>
__device__ State merge_partials(const State* __restrict__ partials, int64_t rows, int channels,
                                int channel) {
  __shared__ State lanes[kMergeLanes][kMergeChannels];
  State merged = State::zero();
  if (channel < channels) {
    for (int64_t row = threadIdx.y; row < rows; row += kMergeLanes) {
      merged.merge(partials[row * channels + channel]);
    }
  }
  lanes[threadIdx.y][threadIdx.x] = merged;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int lane = 1; lane < kMergeLanes; ++lane) merged.merge(lanes[lane][threadIdx.x]);
  }
  __syncthreads();  // the buffer is free again for a caller that loops over channel groups
  return merged;
}
#endif

}  // namespace fused_resnet
