// BatchNorm finalize on CUDA: from a layer's batch statistics to the per-channel scale and
// shift that the next kernel's prologue or epilogue applies, and the running-statistics
// update. One thread per channel each (the merge: a block per 32 channels); what they
// replace is about ten tiny aten launches per BatchNorm layer and step.
//
//   bn_scale_shift(mean, var, weight?, bias?, eps) -> (scale, shift)   fp32
//       scale = weight / sqrt(var + eps), shift = bias - mean * scale
//   bn_update_running_stats(mean, var, running_mean!, running_var!, factor, count)
//       running = (1 - factor) * running + factor * batch, variance unbiased
//       (var * count / (count - 1)); running statistics in their own dtype, math in fp32.
//   bn_train_finalize(mean, var, weight?, bias?, eps, running_mean!?, running_var!?,
//                     num_batches_tracked!?, momentum?, count) -> (scale, shift)
//       a training BN's finalize in one launch: scale/shift, the running statistics' update
//       and the batch count (momentum None: the cumulative average).
//   bn_merge_train_finalize_cuda (batch_norm_finalize.h): the same from a conv's per-tile
//       Welford partials, merged in the same launch (cuda_conv_bn_train).
//   bn_scale_shift_backward(grad_scale, grad_shift, mean, var, weight?, bias?, eps)
//       -> [grad_mean, grad_var, grad_weight, grad_bias] (the last two empty when absent):
//       with rstd = (var + eps)^(-1/2), g = grad_scale - grad_shift * mean,
//       grad_mean = -grad_shift * weight * rstd, grad_var = -g * weight * rstd^3 / 2,
//       grad_weight = g * rstd, grad_bias = grad_shift; in the inputs' dtypes.
//   scaled_filters_cuda (batch_norm_finalize.h): an inference BN's scale folded into the
//       conv's filters, one pass where the ATen expression took three launches.
//   stacked_vectors_cuda (batch_norm_finalize.h): a prologue's scale and shift converted to
//       the activation dtype in one launch where two conversions took two.
//
// References: scale_shift_from_statistics and blend_running_stats in
// fused_resnet/reference.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "batch_norm_finalize.h"
#include "batch_norm_gradients.cuh"
#include "channel_states.cuh"

namespace fused_resnet {
namespace {

constexpr int kThreads = 128;

// scale[c] and shift[c] from channel c's statistics and parameters. Statistics and
// parameters are read in their own dtypes (a .half() or .bfloat16() module's running
// statistics and affine parameters), so that no conversion launches before this one.
template <typename stat_t, typename param_t>
__device__ void store_scale_shift(int c, const stat_t* __restrict__ mean,
                                  const stat_t* __restrict__ var,
                                  const param_t* __restrict__ weight,
                                  const param_t* __restrict__ bias, float eps,
                                  float* __restrict__ scale, float* __restrict__ shift) {
  const float s = rsqrtf(static_cast<float>(var[c]) + eps) *
                  (weight != nullptr ? static_cast<float>(weight[c]) : 1.f);
  scale[c] = s;
  shift[c] = (bias != nullptr ? static_cast<float>(bias[c]) : 0.f) -
             static_cast<float>(mean[c]) * s;
}

// Channel c's running statistics moved `factor` of the way to the batch's (variance unbiased).
template <typename running_t>
__device__ void blend_running_stats(int c, const float* __restrict__ mean,
                                    const float* __restrict__ var,
                                    running_t* __restrict__ running_mean,
                                    running_t* __restrict__ running_var, double factor,
                                    double unbias) {
  using acc_t = at::opmath_type<running_t>;
  const acc_t keep = acc_t(1) - acc_t(factor);
  running_mean[c] = static_cast<running_t>(static_cast<acc_t>(running_mean[c]) * keep +
                                           acc_t(mean[c]) * acc_t(factor));
  running_var[c] = static_cast<running_t>(static_cast<acc_t>(running_var[c]) * keep +
                                          acc_t(var[c]) * acc_t(unbias) * acc_t(factor));
}

template <typename stat_t, typename param_t>
__global__ void bn_scale_shift_kernel(const stat_t* __restrict__ mean,
                                      const stat_t* __restrict__ var,
                                      const param_t* __restrict__ weight,
                                      const param_t* __restrict__ bias, float eps, int channels,
                                      float* __restrict__ scale, float* __restrict__ shift) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < channels) store_scale_shift(c, mean, var, weight, bias, eps, scale, shift);
}

template <typename running_t>
__global__ void bn_update_running_stats_kernel(const float* __restrict__ mean,
                                               const float* __restrict__ var,
                                               running_t* __restrict__ running_mean,
                                               running_t* __restrict__ running_var,
                                               double factor, double unbias, int channels) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < channels) blend_running_stats(c, mean, var, running_mean, running_var, factor, unbias);
}

// What a training BN's finalize takes besides its batch statistics: the affine parameters,
// the running statistics to blend (null: none) and the batch count to advance (null: none).
template <typename param_t, typename running_t>
struct TrainingUpdate {
  const param_t* weight;
  const param_t* bias;
  float eps;
  running_t* running_mean;
  running_t* running_var;
  int64_t* num_batches_tracked;
  double momentum;  // < 0: the cumulative average, 1 / num_batches_tracked
  double unbias;    // count / (count - 1)
  int channels;
  float* scale;
  float* shift;
};

// The factor the running statistics move by, for the whole block: momentum, or with the
// cumulative average 1 / the new batch count. Block 0 counts the batch; a launch with the
// cumulative average must be one block, so that no channel uses the count before it is
// written.
template <typename Update>
__device__ double count_batch(const Update& u) {
  __shared__ double factor;
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    double f = u.momentum;
    if (blockIdx.x == 0 && u.num_batches_tracked != nullptr) {
      const int64_t batches = *u.num_batches_tracked + 1;
      *u.num_batches_tracked = batches;
      if (u.momentum < 0) f = 1.0 / static_cast<double>(batches);
    }
    factor = f;
  }
  __syncthreads();
  return factor;
}

// Channel c's scale/shift and running statistics from its batch statistics.
template <typename Update>
__device__ void finalize_channel(int c, const float* mean, const float* var, const Update& u,
                                 double factor) {
  store_scale_shift(c, mean, var, u.weight, u.bias, u.eps, u.scale, u.shift);
  if (u.running_mean != nullptr) {
    blend_running_stats(c, mean, var, u.running_mean, u.running_var, factor, u.unbias);
  }
}

// A training BN's whole finalize in one launch of one block: the batch counted, the running
// statistics blended, scale/shift written.
template <typename Update>
__global__ void bn_train_finalize_kernel(const float* __restrict__ mean,
                                         const float* __restrict__ var, Update u) {
  const double factor = count_batch(u);
  for (int c = threadIdx.x; c < u.channels; c += blockDim.x) {
    finalize_channel(c, mean, var, u, factor);
  }
}

// bn_train_finalize_kernel from per-row-tile Welford states [tiles, channels] (a conv's
// statistics epilogue), merged in the same launch (channel_states.cuh merge_partials), which also
// stores the merged (mean, biased var). Blocks of (kMergeChannels, kMergeLanes) threads take
// kMergeChannels channels at a time.
template <typename Update>
__global__ void bn_merge_train_finalize_kernel(const Welford* __restrict__ partials,
                                               int64_t tiles, float* __restrict__ mean,
                                               float* __restrict__ var, Update u) {
  const double factor = count_batch(u);
  for (int first = blockIdx.x * kMergeChannels; first < u.channels;
       first += gridDim.x * kMergeChannels) {
    const int c = first + threadIdx.x;
    const Welford merged = merge_partials(partials, tiles, u.channels, c);
    if (threadIdx.y == 0 && c < u.channels) {
      mean[c] = merged.mean;
      var[c] = merged.m2 / merged.count;  // biased, as BatchNorm normalizes with
      finalize_channel(c, mean, var, u, factor);
    }
  }
}

void check_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& mean) {
  TORCH_CHECK(v.dim() == 1 && v.numel() == mean.numel() && v.device() == mean.device(), op,
              ": ", name, " must be a vector of ", mean.numel(), " elements on ",
              mean.device(), ", got shape ", v.sizes(), " on ", v.device());
}

// A statistics or parameter vector as the kernels read it: dense fp32.
at::Tensor as_float(const at::Tensor& v) { return v.to(at::kFloat).contiguous(); }

// The dtypes the finalize kernels read the statistics (mean, var) and the parameters
// (weight, bias) in: each pair's own when it has one (as a .half() module holds them, so that
// no conversion launches first), else fp32 (converted first). Checks the vectors too.
struct FinalizeTypes {
  at::ScalarType stats, params;
};

FinalizeTypes finalize_types(const char* op, const at::Tensor& mean, const at::Tensor& var,
                             const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(mean.dim() == 1 && mean.is_cuda(), op, ": mean must be a CUDA vector, got ",
              mean.sizes(), " on ", mean.device());
  check_vector(op, "var", var, mean);
  if (weight.has_value()) check_vector(op, "weight", *weight, mean);
  if (bias.has_value()) check_vector(op, "bias", *bias, mean);
  const auto param_type = weight.has_value() ? weight->scalar_type()
                          : bias.has_value() ? bias->scalar_type() : mean.scalar_type();
  const bool same_params = (!weight.has_value() || weight->scalar_type() == param_type) &&
                           (!bias.has_value() || bias->scalar_type() == param_type);
  return {var.scalar_type() == mean.scalar_type() ? mean.scalar_type() : at::kFloat,
          same_params ? param_type : at::kFloat};
}

// The running statistics a finalize updates in place: vectors like mean, contiguous, of one
// dtype, from a batch of count > 1 values per channel (the unbiased variance divides by
// count - 1).
void check_running_stats(const char* op, const at::Tensor& mean, const at::Tensor& running_mean,
                         const at::Tensor& running_var, int64_t count) {
  check_vector(op, "running_mean", running_mean, mean);
  check_vector(op, "running_var", running_var, mean);
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() &&
                  running_mean.scalar_type() == running_var.scalar_type(),
              op, ": running_mean and running_var must be contiguous, of one dtype");
  TORCH_CHECK(count > 1, op, ": count must be > 1 for the unbiased variance, got ", count);
}

// `v` as the kernels read it: `type`, dense; undefined when absent.
at::Tensor read_as(const c10::optional<at::Tensor>& v, at::ScalarType type) {
  return v.has_value() ? v->to(type).contiguous() : at::Tensor();
}

int blocks_for(int64_t channels) {
  return static_cast<int>((channels + kThreads - 1) / kThreads);
}

// One thread per channel; gradients of scale and shift in fp32, the rest in their dtypes.
template <typename stat_t, typename param_t>
__global__ void bn_scale_shift_backward_kernel(
    const float* __restrict__ grad_scale, const float* __restrict__ grad_shift,
    const stat_t* __restrict__ mean, const stat_t* __restrict__ var,
    const param_t* __restrict__ weight, float eps, int channels, stat_t* __restrict__ grad_mean,
    stat_t* __restrict__ grad_var, param_t* __restrict__ grad_weight,
    param_t* __restrict__ grad_bias) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const ScaleShiftGradients g = scale_shift_gradients(
      grad_scale[c], grad_shift[c], static_cast<float>(mean[c]), static_cast<float>(var[c]),
      weight != nullptr ? static_cast<float>(weight[c]) : 1.f, eps);
  grad_mean[c] = static_cast<stat_t>(g.mean);
  grad_var[c] = static_cast<stat_t>(g.var);
  if (grad_weight != nullptr) grad_weight[c] = static_cast<param_t>(g.weight);
  if (grad_bias != nullptr) grad_bias[c] = static_cast<param_t>(g.bias);
}

// out[i] = weight[i] * scale[i / per_filter]: KRSC filters, one filter per output channel.
template <typename scalar_t, typename scale_t>
__global__ void scaled_filters_kernel(const scalar_t* __restrict__ weight,
                                      const scale_t* __restrict__ scale, int64_t per_filter,
                                      int64_t total, scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<float>(weight[i]) *
                                   static_cast<float>(scale[i / per_filter]));
  }
}

// out[0] = a, out[1] = b, converted: a conv's BN-ReLU prologue vectors as its mainloop reads
// them, both in one launch.
template <typename in_t, typename out_t>
__global__ void stacked_vectors_kernel(const in_t* __restrict__ a, const in_t* __restrict__ b,
                                       int64_t size, out_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < 2 * size;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<out_t>(static_cast<float>(i < size ? a[i] : b[i - size]));
  }
}

}  // namespace

at::Tensor scaled_filters_cuda(const at::Tensor& weight, const at::Tensor& scale) {
  constexpr const char* op = "scaled_filters";
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": weight must be 4-D and dense in channels_last, got strides ", weight.strides());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0) &&
                  scale.device() == weight.device(),
              op, ": scale must be a vector of weight.size(0) = ", weight.size(0),
              " elements on ", weight.device(), ", got ", scale.sizes(), " on ", scale.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  at::Tensor out = at::empty_like(weight, at::MemoryFormat::ChannelsLast);
  const int64_t total = weight.numel();
  if (total == 0) return out;
  const at::Tensor scale_d = scale.contiguous();
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale_d.scalar_type(), op, [&] {
      scaled_filters_kernel<weight_t, scalar_t><<<blocks, kThreads, 0,
                                                  at::cuda::getCurrentCUDAStream()>>>(
          weight.const_data_ptr<weight_t>(), scale_d.const_data_ptr<scalar_t>(),
          total / weight.size(0), total, out.mutable_data_ptr<weight_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor stacked_vectors_cuda(const at::Tensor& a, const at::Tensor& b,
                               at::ScalarType dtype) {
  constexpr const char* op = "stacked_vectors";
  TORCH_CHECK(a.dim() == 1 && b.sizes() == a.sizes() && a.device() == b.device() && a.is_cuda(),
              op, ": two CUDA vectors of one size expected, got ", a.sizes(), " on ",
              a.device(), " and ", b.sizes(), " on ", b.device());
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": converts to float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard device_guard(a.device());
  // One input dtype for the kernel: theirs when they share it, else fp32 (no double rounding).
  const auto common = a.scalar_type() == b.scalar_type() ? a.scalar_type() : at::kFloat;
  const at::Tensor a_d = a.to(common).contiguous(), b_d = b.to(common).contiguous();
  at::Tensor out = at::empty({2, a.numel()}, a.options().dtype(dtype));
  if (a.numel() == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((2 * a.numel() + kThreads - 1) / kThreads,
                                                        1024));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, common, op, [&] {
    using in_t = scalar_t;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, op, [&] {
      stacked_vectors_kernel<in_t, scalar_t><<<blocks, kThreads, 0,
                                               at::cuda::getCurrentCUDAStream()>>>(
          a_d.const_data_ptr<in_t>(), b_d.const_data_ptr<in_t>(), a.numel(),
          out.mutable_data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_scale_shift_cuda(const at::Tensor& mean,
                                                       const at::Tensor& var,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias,
                                                       double eps) {
  constexpr const char* op = "bn_scale_shift";
  const FinalizeTypes types = finalize_types(op, mean, var, weight, bias);
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const at::Tensor mean_d = read_as(mean, types.stats), var_d = read_as(var, types.stats);
  const at::Tensor weight_d = read_as(weight, types.params), bias_d = read_as(bias, types.params);
  const auto options = mean.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({mean.numel()}, options), shift = at::empty({mean.numel()}, options);
  if (mean.numel() == 0) return {scale, shift};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, types.stats, op, [&] {
    using stat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, types.params, op, [&] {
          bn_scale_shift_kernel<stat_t, scalar_t><<<blocks_for(mean.numel()), kThreads, 0,
                                                    at::cuda::getCurrentCUDAStream()>>>(
              mean_d.const_data_ptr<stat_t>(), var_d.const_data_ptr<stat_t>(),
              weight_d.defined() ? weight_d.const_data_ptr<scalar_t>() : nullptr,
              bias_d.defined() ? bias_d.const_data_ptr<scalar_t>() : nullptr,
              static_cast<float>(eps), static_cast<int>(mean.numel()),
              scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>());
        });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // In the statistics' dtype when that is wider than fp32, as the reference gives it.
  const auto dtype = c10::promoteTypes(mean.scalar_type(), at::kFloat);
  return {scale.to(dtype), shift.to(dtype)};
}

namespace {

// What both training finalizes share on the host: the checks of the parameters, running
// statistics and batch count against `mean` (the batch mean, or the buffer the merge writes
// it to), and the dtype dispatch. Calls launch(update) with the TrainingUpdate of the
// dispatched types (scale and shift fresh fp32 vectors) and returns (scale, shift).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> training_finalize(
    const char* op, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    int64_t count, Launch&& launch) {
  const FinalizeTypes types = finalize_types(op, mean, var, weight, bias);
  const bool running = running_mean.has_value();
  TORCH_CHECK(running == running_var.has_value(), op,
              ": running_mean and running_var go together");
  if (running) {
    check_running_stats(op, mean, *running_mean, *running_var, count);
    TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value(), op,
                ": the cumulative average (momentum None) needs num_batches_tracked");
  }
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->scalar_type() == at::kLong &&
                    num_batches_tracked->device() == mean.device(),
                op, ": num_batches_tracked must be one int64 on ", mean.device());
  }
  const at::Tensor weight_d = read_as(weight, types.params), bias_d = read_as(bias, types.params);
  const auto options = mean.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({mean.numel()}, options), shift = at::empty({mean.numel()}, options);
  const auto running_type = running ? running_mean->scalar_type() : at::kFloat;
  // The dispatch names its kernels by a constant: both finalizes are "training_finalize".
  constexpr const char* kName = "training_finalize";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, types.params, kName, [&] {
    using param_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type, kName, [&] {
      launch(TrainingUpdate<param_t, scalar_t>{
          weight_d.defined() ? weight_d.const_data_ptr<param_t>() : nullptr,
          bias_d.defined() ? bias_d.const_data_ptr<param_t>() : nullptr,
          static_cast<float>(eps),
          running ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
          running ? running_var->mutable_data_ptr<scalar_t>() : nullptr,
          num_batches_tracked.has_value() ? num_batches_tracked->mutable_data_ptr<int64_t>()
                                          : nullptr,
          momentum.value_or(-1.0), running ? static_cast<double>(count) / (count - 1) : 1.0,
          static_cast<int>(mean.numel()), scale.mutable_data_ptr<float>(),
          shift.mutable_data_ptr<float>()});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scale, shift};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_train_finalize_cuda(
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    int64_t count) {
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const at::Tensor mean_f = as_float(mean), var_f = as_float(var);
  const int threads = static_cast<int>(std::min<int64_t>(
      1024, std::max<int64_t>(32, (mean.numel() + 31) / 32 * 32)));
  return training_finalize(
      "bn_train_finalize", mean, var, weight, bias, eps, running_mean, running_var,
      num_batches_tracked, momentum, count, [&](auto update) {
        bn_train_finalize_kernel<<<1, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            mean_f.const_data_ptr<float>(), var_f.const_data_ptr<float>(), update);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_merge_train_finalize_cuda(
    const at::Tensor& partials, int64_t channels, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    int64_t count) {
  constexpr const char* op = "bn_merge_train_finalize";
  TORCH_CHECK(partials.is_cuda() && partials.scalar_type() == at::kFloat &&
                  partials.is_contiguous() && channels > 0 &&
                  partials.numel() % (channels * 3) == 0,
              op, ": partials must be contiguous float32 (count, mean, M2) states of ",
              channels, " channels on a GPU, got ", partials.sizes(), ", ",
              partials.scalar_type(), ", ", partials.device());
  const c10::cuda::CUDAGuard device_guard(partials.device());
  const auto options = partials.options();
  at::Tensor mean = at::empty({channels}, options), var = at::empty({channels}, options);
  // The cumulative average reads the new batch count in every channel: one block.
  const int blocks = momentum.has_value()
                         ? static_cast<int>((channels + kMergeChannels - 1) / kMergeChannels)
                         : 1;
  auto [scale, shift] = training_finalize(
      op, mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked,
      momentum, count, [&](auto update) {
        bn_merge_train_finalize_kernel<<<blocks, dim3(kMergeChannels, kMergeLanes), 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const Welford*>(partials.const_data_ptr<float>()),
            partials.numel() / (channels * 3), mean.mutable_data_ptr<float>(),
            var.mutable_data_ptr<float>(), update);
      });
  return {mean, var, scale, shift};
}

std::vector<at::Tensor> bn_scale_shift_backward_cuda(
    const at::Tensor& grad_scale, const at::Tensor& grad_shift, const at::Tensor& mean,
    const at::Tensor& var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "bn_scale_shift_backward";
  const FinalizeTypes types = finalize_types(op, mean, var, weight, bias);
  check_vector(op, "grad_scale", grad_scale, mean);
  check_vector(op, "grad_shift", grad_shift, mean);
  const c10::cuda::CUDAGuard device_guard(mean.device());
  // Computed in the types the forward reads, each gradient converted back to its input's
  // dtype (a conversion only for mixed dtypes).
  const auto stat_type = types.stats, weight_type = types.params;
  const at::Tensor mean_d = read_as(mean, stat_type), var_d = read_as(var, stat_type);
  const at::Tensor weight_d = read_as(weight, weight_type);
  const auto vector = [&](at::ScalarType type) {
    return at::empty({mean.numel()}, mean.options().dtype(type));
  };
  at::Tensor grad_mean = vector(stat_type), grad_var = vector(stat_type);
  // An absent parameter's gradient: an empty fp32 vector, as the op's fake gives it.
  const auto absent = [&] { return at::empty({0}, mean.options().dtype(at::kFloat)); };
  at::Tensor grad_weight = weight.has_value() ? vector(weight_type) : absent();
  at::Tensor grad_bias = bias.has_value() ? vector(weight_type) : absent();
  if (mean.numel() > 0) {
    const at::Tensor gs = as_float(grad_scale), gb = as_float(grad_shift);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, stat_type, op, [&] {
      using stat_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight_type, op, [&] {
        bn_scale_shift_backward_kernel<stat_t, scalar_t>
            <<<blocks_for(mean.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                gs.const_data_ptr<float>(), gb.const_data_ptr<float>(),
                mean_d.const_data_ptr<stat_t>(), var_d.const_data_ptr<stat_t>(),
                weight_d.defined() ? weight_d.const_data_ptr<scalar_t>() : nullptr,
                static_cast<float>(eps), static_cast<int>(mean.numel()),
                grad_mean.mutable_data_ptr<stat_t>(), grad_var.mutable_data_ptr<stat_t>(),
                weight.has_value() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
                bias.has_value() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_mean.to(mean.scalar_type()), grad_var.to(var.scalar_type()),
          weight.has_value() ? grad_weight.to(weight->scalar_type()) : grad_weight,
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

void bn_update_running_stats_cuda(const at::Tensor& mean, const at::Tensor& var,
                                  const at::Tensor& running_mean, const at::Tensor& running_var,
                                  double factor, int64_t count) {
  constexpr const char* op = "bn_update_running_stats";
  TORCH_CHECK(mean.dim() == 1 && mean.is_cuda(), op, ": mean must be a CUDA vector, got ",
              mean.sizes(), " on ", mean.device());
  check_vector(op, "var", var, mean);
  check_running_stats(op, mean, running_mean, running_var, count);
  const c10::cuda::CUDAGuard device_guard(mean.device());
  if (mean.numel() == 0) return;
  const at::Tensor mean_f = as_float(mean), var_f = as_float(var);
  const double unbias = static_cast<double>(count) / (count - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), op, [&] {
    bn_update_running_stats_kernel<scalar_t><<<blocks_for(mean.numel()), kThreads, 0,
                                               at::cuda::getCurrentCUDAStream()>>>(
        mean_f.const_data_ptr<float>(), var_f.const_data_ptr<float>(),
        running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
        factor, unbias, static_cast<int>(mean.numel()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fused_resnet

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_scale_shift", &fused_resnet::bn_scale_shift_cuda);
  m.impl("bn_update_running_stats", &fused_resnet::bn_update_running_stats_cuda);
  m.impl("bn_scale_shift_backward", &fused_resnet::bn_scale_shift_backward_cuda);
  m.impl("bn_train_finalize", &fused_resnet::bn_train_finalize_cuda);
}
