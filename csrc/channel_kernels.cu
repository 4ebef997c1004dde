// Per-channel reductions over NHWC tensors (see channel_kernels.h).
//
// Stage 1: a block of kVectorsPerBlock x kRowLanes threads covers kVectorsPerBlock vectors of
// consecutive channels; each thread walks every (gridDim.x * kRowLanes)-th pixel, keeping one
// state per channel of its vector in registers, then the block merges its row lanes in order
// into one partial per channel. Stage 2: a block of kMergeChannels x kMergeLanes threads
// merges the partials of kMergeChannels channels (channel_states.cuh merge_partials: lanes in
// parallel, then in lane order). The number of row blocks depends only on the tensor and the
// GPU, so results repeat bitwise run to run.
#include "channel_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "batch_norm_gradients.cuh"
#include "channel_states.cuh"

namespace fused_resnet {
namespace {

constexpr int kVectorBytes = 16;
constexpr int kVectorsPerBlock = 8;  // blockDim.x
constexpr int kRowLanes = 32;        // blockDim.y
const dim3 kMergeThreads(kMergeChannels, kMergeLanes);  // stage 2

// Stage 2's blocks for `channels` channels.
int merge_blocks(int64_t channels) {
  return static_cast<int>((channels + kMergeChannels - 1) / kMergeChannels);
}

template <typename T>
struct alignas(kVectorBytes) Vector {
  static constexpr int kWidth = kVectorBytes / sizeof(T);
  T value[kWidth];
};

template <typename T>
__device__ __forceinline__ Vector<T> load(const T* p) {
  return *reinterpret_cast<const Vector<T>*>(p);
}

// The second affine input of a BN-add-ReLU, y = relu(x * scale + residual * r_scale + ...):
// with `residual` given, the kernel also writes grad_residual = g' * r_scale (g' where
// r_scale is null) and sums g' * residual.
template <typename T>
struct ResidualInput {
  const T* residual = nullptr;
  const float* scale = nullptr;
  T* grad = nullptr;
};

// First channel of this thread's vector; the whole vector is in range when this is
// (channels is a multiple of the vector width).
template <int kWidth>
__device__ __forceinline__ int first_channel() {
  return (blockIdx.y * kVectorsPerBlock + threadIdx.x) * kWidth;
}

// Merges the block's row lanes in order and writes partials[blockIdx.x * channels + c].
template <typename State, int kWidth>
__device__ void store_block_partials(const State (&state)[kWidth], State* partials,
                                     int channels) {
  __shared__ State lanes[kRowLanes][kVectorsPerBlock * kWidth];
  const int column = threadIdx.x * kWidth;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) lanes[threadIdx.y][column + k] = state[k];
  __syncthreads();
  const int c0 = first_channel<kWidth>();
  if (threadIdx.y != 0 || c0 >= channels) return;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    State merged = lanes[0][column + k];
    for (int lane = 1; lane < kRowLanes; ++lane) merged.merge(lanes[lane][column + k]);
    partials[int64_t(blockIdx.x) * channels + c0 + k] = merged;
  }
}

template <typename T>
__global__ void welford_partials_kernel(const T* __restrict__ x, int64_t rows, int channels,
                                        Welford* __restrict__ partials) {
  constexpr int kWidth = Vector<T>::kWidth;
  const int c0 = first_channel<kWidth>();
  Welford state[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) state[k] = Welford::zero();
  if (c0 < channels) {
    for (int64_t row = int64_t(blockIdx.x) * kRowLanes + threadIdx.y; row < rows;
         row += int64_t(gridDim.x) * kRowLanes) {
      const Vector<T> v = load(x + row * channels + c0);
#pragma unroll
      for (int k = 0; k < kWidth; ++k) state[k].add(static_cast<float>(v.value[k]));
    }
  }
  store_block_partials(state, partials, channels);
}

// Stage 2 of the channel reductions: blockDim (kMergeChannels, kMergeLanes), a channel per
// threadIdx.x.
__device__ int merged_channel() { return blockIdx.x * kMergeChannels + threadIdx.x; }

__global__ void welford_finish_kernel(const Welford* __restrict__ partials, int64_t row_blocks,
                                      int channels, float* __restrict__ mean,
                                      float* __restrict__ var) {
  const int c = merged_channel();
  const Welford merged = merge_partials(partials, row_blocks, channels, c);
  if (threadIdx.y != 0 || c >= channels) return;
  mean[c] = merged.mean;
  var[c] = merged.m2 / merged.count;  // biased, as BatchNorm normalizes with
}

enum class Mask { kNone, kOutput, kPrologue };

template <typename T, bool kResidual>
__global__ void affine_relu_backward_kernel(
    const T* __restrict__ grad, const T* __restrict__ x, const float* __restrict__ scale,
    const float* __restrict__ shift, const T* __restrict__ output, Mask mask, int64_t rows,
    int channels, T* __restrict__ grad_x, ResidualInput<T> residual,
    Sums* __restrict__ partials) {
  constexpr int kWidth = Vector<T>::kWidth;
  const int c0 = first_channel<kWidth>();
  Sums state[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) state[k] = Sums::zero();
  if (c0 < channels) {
    float s[kWidth], b[kWidth], rs[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      s[k] = scale != nullptr ? scale[c0 + k] : 1.f;
      b[k] = shift != nullptr ? shift[c0 + k] : 0.f;
      rs[k] = residual.scale != nullptr ? residual.scale[c0 + k] : 1.f;
    }
    for (int64_t row = int64_t(blockIdx.x) * kRowLanes + threadIdx.y; row < rows;
         row += int64_t(gridDim.x) * kRowLanes) {
      const int64_t offset = row * channels + c0;
      const Vector<T> g = load(grad + offset);
      const Vector<T> xv = load(x + offset);
      Vector<T> y, r;
      if (mask == Mask::kOutput) y = load(output + offset);
      if constexpr (kResidual) r = load(residual.residual + offset);
      Vector<T> out, out_residual;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        const float xk = static_cast<float>(xv.value[k]);
        // `> 0` as torch's threshold_backward: a NaN pre-activation passes no gradient.
        bool passed = true;
        if (mask == Mask::kOutput) passed = static_cast<float>(y.value[k]) > 0.f;
        if (mask == Mask::kPrologue) passed = xk * s[k] + b[k] > 0.f;
        const float gk = passed ? static_cast<float>(g.value[k]) : 0.f;
        state[k].sum += gk;
        state[k].dot += gk * xk;
        out.value[k] = static_cast<T>(gk * s[k]);
        if constexpr (kResidual) {
          state[k].dot_residual += gk * static_cast<float>(r.value[k]);
          out_residual.value[k] = static_cast<T>(gk * rs[k]);
        }
      }
      *reinterpret_cast<Vector<T>*>(grad_x + offset) = out;
      if constexpr (kResidual) {
        *reinterpret_cast<Vector<T>*>(residual.grad + offset) = out_residual;
      }
    }
  }
  store_block_partials(state, partials, channels);
}

__global__ void sums_finish_kernel(const Sums* __restrict__ partials, int64_t row_blocks,
                                   int channels, float* __restrict__ sum,
                                   float* __restrict__ dot, float* __restrict__ dot_residual) {
  const int c = merged_channel();
  const Sums merged = merge_partials(partials, row_blocks, channels, c);
  if (threadIdx.y != 0 || c >= channels) return;
  sum[c] = merged.sum;
  dot[c] = merged.dot;
  if (dot_residual != nullptr) dot_residual[c] = merged.dot_residual;
}

// The per-channel terms of a conv output's gradient through its batch statistics: given
// (grad_mean, grad_var), or derived from the gradients of the scale and shift of the training
// BN the output feeds (batch_norm_gradients.cuh), when the BN weight's and bias's gradients
// are written too. The BN's parameters and their gradients are in their own dtype, param_t
// (a .half() module's), so that no conversion launches around the kernel.
template <typename param_t>
struct StatisticsTerms {
  const float* mean;
  const float* grad_mean = nullptr;  // given, or null: derived from the BN's gradients
  const float* grad_var = nullptr;
  const float* grad_bn_scale = nullptr;
  const float* grad_bn_shift = nullptr;
  const float* var = nullptr;
  const param_t* weight = nullptr;  // null: 1
  float eps = 0.f;
  param_t* grad_weight = nullptr;  // null: not wanted
  param_t* grad_bias = nullptr;

  // (grad_mean, grad_var) of channel c; `parameters`: write the BN's parameter gradients.
  __device__ float2 of(int c, bool parameters) const {
    if (grad_mean != nullptr) return {grad_mean[c], grad_var[c]};
    const ScaleShiftGradients g = scale_shift_gradients(
        grad_bn_scale[c], grad_bn_shift[c], mean[c], var[c],
        weight != nullptr ? static_cast<float>(weight[c]) : 1.f, eps);
    if (parameters && grad_weight != nullptr) grad_weight[c] = static_cast<param_t>(g.weight);
    if (parameters && grad_bias != nullptr) grad_bias[c] = static_cast<param_t>(g.bias);
    return {g.mean, g.var};
  }
};

// out = grad [* grad_scale[c]] + (grad_mean[c] + 2 grad_var[c] (y - mean[c])) / count: the
// gradient of y when its batch statistics also reach the loss, one pass over 16-byte vectors.
// Each block first puts every channel's (mean, grad_mean, grad_var) in shared memory (3 *
// channels floats of dynamic shared memory); block 0 writes the BN's parameter gradients.
template <typename T, typename param_t>
__global__ void statistics_backward_kernel(const T* __restrict__ grad, const T* __restrict__ y,
                                           StatisticsTerms<param_t> terms,
                                           const float* __restrict__ grad_scale, float count,
                                           int64_t num_vectors, int channels,
                                           T* __restrict__ out) {
  extern __shared__ float shared_terms[];
  float* const mean = shared_terms;
  float* const grad_mean = shared_terms + channels;
  float* const grad_var = shared_terms + 2 * channels;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    const float2 of_c = terms.of(c, blockIdx.x == 0);
    mean[c] = terms.mean[c];
    grad_mean[c] = of_c.x;
    grad_var[c] = of_c.y;
  }
  __syncthreads();
  constexpr int kWidth = Vector<T>::kWidth;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < num_vectors;
       v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t offset = v * kWidth;
    const int c0 = static_cast<int>(offset % channels);
    const Vector<T> g = load(grad + offset);
    const Vector<T> yv = load(y + offset);
    Vector<T> result;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      const int c = c0 + k;
      float gk = static_cast<float>(g.value[k]);
      if (grad_scale != nullptr) gk *= grad_scale[c];
      const float centred = static_cast<float>(yv.value[k]) - mean[c];
      result.value[k] = static_cast<T>(gk + (grad_mean[c] + 2.f * grad_var[c] * centred) / count);
    }
    *reinterpret_cast<Vector<T>*>(out + offset) = result;
  }
}

struct Grid {
  int64_t rows;
  int channels;
  dim3 blocks;
  dim3 threads{kVectorsPerBlock, kRowLanes};
};

Grid grid_for(const at::Tensor& x, int width) {
  Grid grid;
  grid.channels = static_cast<int>(x.size(1));
  grid.rows = x.numel() / grid.channels;
  const int channel_blocks =
      (grid.channels + kVectorsPerBlock * width - 1) / (kVectorsPerBlock * width);
  // About eight blocks per SM in all: enough to cover the memory latency.
  const int64_t wanted =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8 / channel_blocks;
  const int64_t row_blocks = std::min<int64_t>(std::max<int64_t>(wanted, 1),
                                               (grid.rows + kRowLanes - 1) / kRowLanes);
  grid.blocks = dim3(static_cast<unsigned>(std::max<int64_t>(row_blocks, 1)), channel_blocks);
  return grid;
}

int vector_width(const at::Tensor& x) { return kVectorBytes / static_cast<int>(x.element_size()); }

bool is_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kVectorBytes == 0;
}

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kFloat,
              op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
              " must be contiguous in channels_last memory format, got strides ", t.strides());
  TORCH_CHECK(t.size(1) % vector_width(t) == 0, op, ": ", name, " has ", t.size(1),
              " channels, expected a multiple of ", vector_width(t), " (16-byte vectors)");
  TORCH_CHECK(is_aligned(t), op, ": ", name, " must be 16-byte aligned");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              op, ": ", name, " must match x (shape ", x.sizes(), ", ", x.scalar_type(), ", ",
              x.device(), "), got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
  check_activation(op, name, t);
}

void check_channel_vector(const char* op, const char* name, const at::Tensor& v,
                          const at::Tensor& x) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1) && v.scalar_type() == at::kFloat &&
                  v.device() == x.device() && v.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 vector of x.size(1) = ", x.size(1),
              " elements on ", x.device(), ", got shape ", v.sizes(), ", ", v.scalar_type(),
              ", ", v.device());
}

template <typename State>
at::Tensor partials_buffer(const at::Tensor& x, const Grid& grid) {
  static_assert(sizeof(State) % sizeof(float) == 0, "partials are stored as floats");
  return at::empty({int64_t(grid.blocks.x) * grid.channels,
                    int64_t(sizeof(State) / sizeof(float))},
                   x.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_statistics_cuda(const at::Tensor& x) {
  constexpr const char* op = "channel_statistics";
  check_activation(op, "x", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty_like(mean);
  if (x.numel() == 0) {  // no values: as 0 / 0 in PyTorch's batch_norm
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  const Grid grid = grid_for(x, vector_width(x));
  at::Tensor partials = partials_buffer<Welford>(x, grid);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    welford_partials_kernel<scalar_t>
        <<<grid.blocks, grid.threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), grid.rows, grid.channels,
            reinterpret_cast<Welford*>(partials.mutable_data_ptr<float>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return merged_statistics_cuda(partials, grid.channels);
}

namespace {

// The rows of per-block three-float states [rows, channels] in `partials`, checked.
int64_t partial_rows(const char* op, const at::Tensor& partials, int64_t channels) {
  TORCH_CHECK(partials.is_cuda() && partials.scalar_type() == at::kFloat &&
                  partials.is_contiguous() && channels > 0 &&
                  partials.numel() % (channels * 3) == 0,
              op, ": partials must be contiguous float32 states of three floats for ", channels,
              " channels on a GPU, got ", partials.sizes(), ", ", partials.scalar_type(), ", ",
              partials.device());
  return partials.numel() / (channels * 3);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merged_statistics_cuda(const at::Tensor& partials,
                                                          int64_t channels) {
  const int64_t rows = partial_rows("merged_statistics", partials, channels);
  const auto options = partials.options();
  at::Tensor mean = at::empty({channels}, options), var = at::empty({channels}, options);
  welford_finish_kernel<<<merge_blocks(channels), kMergeThreads, 0,
                          at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Welford*>(partials.const_data_ptr<float>()), rows,
      static_cast<int>(channels), mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> merged_sums_cuda(const at::Tensor& partials,
                                                    int64_t channels) {
  const int64_t rows = partial_rows("merged_sums", partials, channels);
  const auto options = partials.options();
  at::Tensor dot = at::empty({channels}, options), sum = at::empty({channels}, options);
  sums_finish_kernel<<<merge_blocks(channels), kMergeThreads, 0,
                       at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Sums*>(partials.const_data_ptr<float>()), rows,
      static_cast<int>(channels), sum.mutable_data_ptr<float>(), dot.mutable_data_ptr<float>(),
      nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dot, sum};
}

namespace {

// The masked pass and its sums' merge, for affine_relu_backward_cuda and add_relu_backward_cuda
// (which gives `residual`): returns (grad_x, dot, sum, grad_residual, dot_residual), the last
// two undefined without a residual.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_affine_backward(
    const char* op, const at::Tensor& grad, const at::Tensor& x,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& output, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& residual_scale) {
  check_activation(op, "x", x);
  check_like(op, "grad", grad, x);
  if (scale.has_value()) check_channel_vector(op, "scale", *scale, x);
  if (shift.has_value()) check_channel_vector(op, "shift", *shift, x);
  if (output.has_value()) check_like(op, "output", *output, x);
  if (residual.has_value()) check_like(op, "residual", *residual, x);
  if (residual_scale.has_value()) check_channel_vector(op, "residual_scale", *residual_scale, x);
  TORCH_CHECK(!(shift.has_value() && !scale.has_value()), op,
              ": shift (a prologue's ReLU mask) needs scale");
  TORCH_CHECK(!(shift.has_value() && output.has_value()), op,
              ": give either output (mask y > 0) or shift (mask x * scale + shift > 0)");
  const Mask mask = output.has_value() ? Mask::kOutput
                    : shift.has_value() ? Mask::kPrologue
                                        : Mask::kNone;
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  // The finish kernel writes every channel's sums; only an empty x leaves them to fill here.
  at::Tensor sum = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor dot = at::empty_like(sum);
  at::Tensor grad_residual, dot_residual;
  if (residual.has_value()) {
    grad_residual = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    dot_residual = at::empty_like(sum);
  }
  if (x.numel() == 0) {
    if (residual.has_value()) dot_residual.zero_();
    return {grad_x, dot.zero_(), sum.zero_(), grad_residual, dot_residual};
  }
  const Grid grid = grid_for(x, vector_width(x));
  at::Tensor partials = partials_buffer<Sums>(x, grid);
  auto* states = reinterpret_cast<Sums*>(partials.mutable_data_ptr<float>());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "masked_affine_backward", [&] {
    ResidualInput<scalar_t> second;
    if (residual.has_value()) {
      second.residual = residual->const_data_ptr<scalar_t>();
      second.scale =
          residual_scale.has_value() ? residual_scale->const_data_ptr<float>() : nullptr;
      second.grad = grad_residual.mutable_data_ptr<scalar_t>();
    }
    const auto launch = [&](auto kernel) {
      kernel<<<grid.blocks, grid.threads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          scale.has_value() ? scale->const_data_ptr<float>() : nullptr,
          shift.has_value() ? shift->const_data_ptr<float>() : nullptr,
          output.has_value() ? output->const_data_ptr<scalar_t>() : nullptr, mask, grid.rows,
          grid.channels, grad_x.mutable_data_ptr<scalar_t>(), second, states);
    };
    residual.has_value() ? launch(affine_relu_backward_kernel<scalar_t, true>)
                         : launch(affine_relu_backward_kernel<scalar_t, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sums_finish_kernel<<<merge_blocks(grid.channels), kMergeThreads, 0, stream>>>(
      states, grid.blocks.x, grid.channels, sum.mutable_data_ptr<float>(),
      dot.mutable_data_ptr<float>(),
      residual.has_value() ? dot_residual.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, dot, sum, grad_residual, dot_residual};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& output) {
  auto [grad_x, dot, sum, unused_grad, unused_dot] = masked_affine_backward(
      "affine_relu_backward", grad, x, scale, shift, output, c10::nullopt, c10::nullopt);
  return {grad_x, dot, sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_relu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& output, const at::Tensor& x,
    const c10::optional<at::Tensor>& scale, const at::Tensor& residual,
    const c10::optional<at::Tensor>& residual_scale) {
  return masked_affine_backward("add_relu_backward", grad, x, scale, c10::nullopt, output,
                                residual, residual_scale);
}

namespace {

// statistics_backward_kernel over y (checked like grad) with `terms`.
template <typename param_t>
at::Tensor launch_statistics_backward(const char* op, const at::Tensor& grad, const at::Tensor& y,
                                      const StatisticsTerms<param_t>& terms,
                                      const c10::optional<at::Tensor>& grad_scale) {
  at::Tensor out = at::empty_like(y, at::MemoryFormat::ChannelsLast);
  const int64_t channels = y.size(1);
  const int64_t num_vectors = y.numel() / vector_width(y);
  constexpr int kThreads = 256;
  // At least one block, which writes a BN's parameter gradients even for an empty y.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(
      (num_vectors + kThreads - 1) / kThreads,
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16));
  const float count = static_cast<float>(y.numel() / std::max<int64_t>(channels, 1));
  const size_t shared_bytes = 3 * sizeof(float) * channels;
  TORCH_CHECK(shared_bytes <= 48 * 1024, op, ": at most 4096 channels, got ", channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "statistics_backward", [&] {
    statistics_backward_kernel<scalar_t, param_t><<<static_cast<unsigned>(blocks), kThreads,
                                                    shared_bytes,
                                                    at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), terms,
        grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr, count,
        num_vectors, static_cast<int>(channels), out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor statistics_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                    const at::Tensor& mean, const at::Tensor& grad_mean,
                                    const at::Tensor& grad_var,
                                    const c10::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "statistics_backward";
  check_activation(op, "y", y);
  check_like(op, "grad", grad, y);
  check_channel_vector(op, "mean", mean, y);
  check_channel_vector(op, "grad_mean", grad_mean, y);
  check_channel_vector(op, "grad_var", grad_var, y);
  if (grad_scale.has_value()) check_channel_vector(op, "grad_scale", *grad_scale, y);
  const c10::cuda::CUDAGuard device_guard(y.device());
  if (y.numel() == 0) return at::empty_like(y, at::MemoryFormat::ChannelsLast);
  StatisticsTerms<float> terms;
  terms.mean = mean.const_data_ptr<float>();
  terms.grad_mean = grad_mean.const_data_ptr<float>();
  terms.grad_var = grad_var.const_data_ptr<float>();
  return launch_statistics_backward(op, grad, y, terms, grad_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_statistics_backward_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& grad_bn_scale,
    const at::Tensor& grad_bn_shift, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps) {
  constexpr const char* op = "bn_statistics_backward";
  check_activation(op, "y", y);
  check_like(op, "grad", grad, y);
  check_channel_vector(op, "grad_scale", grad_bn_scale, y);
  check_channel_vector(op, "grad_shift", grad_bn_shift, y);
  check_channel_vector(op, "mean", mean, y);
  check_channel_vector(op, "var", var, y);
  const at::ScalarType param_type = weight.has_value() ? weight->scalar_type()
                                    : bias.has_value() ? bias->scalar_type() : at::kFloat;
  for (const auto& [name, v] : {std::pair<const char*, const c10::optional<at::Tensor>&>{
                                    "weight", weight}, {"bias", bias}}) {
    if (!v.has_value()) continue;
    TORCH_CHECK(v->dim() == 1 && v->size(0) == y.size(1) && v->is_contiguous() &&
                    v->device() == y.device() && v->scalar_type() == param_type,
                op, ": ", name, " must be a contiguous vector of y.size(1) = ", y.size(1),
                " elements on ", y.device(), " in the other parameter's dtype, got ",
                v->sizes(), ", ", v->scalar_type(), " on ", v->device());
  }
  const c10::cuda::CUDAGuard device_guard(y.device());
  // An absent parameter's gradient: an empty fp32 vector, as bn_scale_shift_backward's.
  const auto gradient_of = [&](const c10::optional<at::Tensor>& p) {
    return p.has_value() ? at::empty_like(*p) : at::empty({0}, y.options().dtype(at::kFloat));
  };
  at::Tensor grad_weight = gradient_of(weight), grad_bias = gradient_of(bias);
  at::Tensor grad_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_type, op, [&] {
    StatisticsTerms<scalar_t> terms;
    terms.mean = mean.const_data_ptr<float>();
    terms.grad_bn_scale = grad_bn_scale.const_data_ptr<float>();
    terms.grad_bn_shift = grad_bn_shift.const_data_ptr<float>();
    terms.var = var.const_data_ptr<float>();
    terms.weight = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    terms.eps = static_cast<float>(eps);
    terms.grad_weight = weight.has_value() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
    terms.grad_bias = bias.has_value() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    grad_y = launch_statistics_backward(op, grad, y, terms, c10::nullopt);
  });
  return {grad_y, grad_weight, grad_bias};
}

}  // namespace fused_resnet
