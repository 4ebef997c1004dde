// CUDA implementations of the fused convolution ops (schemas in registration.cpp):
//
//   cuda_conv        y = epilogue(conv(prologue(x), W)) [+ batch statistics of y, gathered in
//                    the conv's epilogue]
//   cuda_conv_bn_train  the conv with statistics, then the finalize of the training BatchNorm
//                    it feeds (scale/shift, running statistics), which merges the epilogue's
//                    partials itself: two launches
//   cuda_conv_dgrad  grad of the conv input [+ another gradient of it, in the epilogue],
//                    through the prologue's ReLU mask and scale, with its BN-backward
//                    reductions (grad_x, grad_in_scale, grad_in_shift): in the epilogue at
//                    stride 1, in a pass after the conv at stride 2
//   cuda_conv_wgrad  grad of W, with the prologue recomputed in the mainloop
//
// Same signatures and meaning as the Triton backend's triton_conv* ops; the plain-PyTorch
// meaning of each is in fused_resnet/reference.py (fused_conv, conv_dgrad, conv_wgrad).
// Here the tensors are checked and laid out (NHWC, every tensor and vector the kernels read
// 16-byte aligned: CUTLASS loads them in 16- and 32-byte vectors, and a misaligned one would
// fault and end the CUDA context); the CUTLASS kernels are in conv_fprop.cuh and
// conv_backward.cuh, the per-channel passes in channel_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "batch_norm_finalize.h"
#include "channel_kernels.h"
#include "conv_kernels.h"

namespace fused_resnet {
namespace {

constexpr int kVectorElements = 8;  // 16-byte accesses of fp16/bf16 in every CUTLASS kernel
constexpr uintptr_t kAlignmentBytes = 16;

// The CUTLASS kernels are sm_80 code (cp.async, bf16 mma.sync): older GPUs cannot run them.
void check_compute_capability(const char* op, const at::Tensor& x) {
  const cudaDeviceProp* device = at::cuda::getDeviceProperties(x.get_device());
  TORCH_CHECK(device->major >= 8, op, ": the CUTLASS kernels need a GPU of compute "
              "capability 8.0 (Ampere) or newer; ", x.device(), " (", device->name,
              ") has ", device->major, ".", device->minor);
}

void check_cuda_half(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float16 or bfloat16 (CUTLASS tensor-core kernels), got ",
              t.scalar_type());
}

// The conv problem of x (N, C, H, W) and weight (K, C, R, S), "same" padding.
ConvProblem conv_problem(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         int64_t stride) {
  check_cuda_half(op, "x", x);
  check_cuda_half(op, "weight", weight);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op,
              ": weight must have x's dtype and device (", x.scalar_type(), ", ", x.device(),
              "), got ", weight.scalar_type(), ", ", weight.device());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight has ", weight.size(1),
              " input channels, x has ", x.size(1), " (groups are not supported)");
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, op,
              ": the filter must have odd extents (same padding), got ", weight.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  check_compute_capability(op, x);
  for (const auto& [name, channels] : {std::pair<const char*, int64_t>{"x", x.size(1)},
                                       {"weight", weight.size(0)}}) {
    TORCH_CHECK(channels > 0 && channels % kVectorElements == 0, op, ": ", name, " has ",
                channels, " channels, the CUTLASS kernels need a positive multiple of ",
                kVectorElements);
  }
  ConvProblem p;
  p.n = x.size(0), p.h = x.size(2), p.w = x.size(3), p.c = x.size(1);
  p.k = weight.size(0), p.r = weight.size(2), p.s = weight.size(3);
  p.p = (p.h + 2 * (p.r / 2) - p.r) / stride + 1;
  p.q = (p.w + 2 * (p.s / 2) - p.s) / stride + 1;
  p.stride = static_cast<int>(stride);
  return p;
}

// `dense` itself when its data is 16-byte aligned, else an aligned copy (a fresh allocation
// from the caching allocator is aligned): a slice of a larger tensor may start anywhere.
at::Tensor aligned(const at::Tensor& dense, at::MemoryFormat format) {
  if (reinterpret_cast<uintptr_t>(dense.const_data_ptr()) % kAlignmentBytes == 0) return dense;
  return dense.clone(format);
}

// t in channels_last, dense and 16-byte aligned, as the kernels read it.
at::Tensor nhwc(const at::Tensor& t) {
  return aligned(t.contiguous(at::MemoryFormat::ChannelsLast), at::MemoryFormat::ChannelsLast);
}

// A per-channel vector as the kernels read it: `dtype`, dense, 16-byte aligned.
at::Tensor channel_vector(const at::Tensor& v, at::ScalarType dtype) {
  return aligned(v.to(dtype).contiguous(), at::MemoryFormat::Contiguous);
}

// conv_launch_plan for this op's launch on x's GPU.
LaunchPlan launch_plan(ConvKernel kernel, const ConvProblem& p, const at::Tensor& x) {
  return conv_launch_plan(kernel, p,
                          at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount);
}

at::Tensor output_nhwc(const at::Tensor& x, int n, int c, int h, int w) {
  return at::empty({n, c, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// Checks a prologue's in_scale and in_shift: both or neither, vectors of x's channels on its
// device. Returns whether there is a prologue.
bool check_prologue(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& shift) {
  TORCH_CHECK(scale.has_value() == shift.has_value(), op,
              ": in_scale and in_shift go together");
  if (!scale.has_value()) return false;
  for (const auto& [name, v] : {std::pair<const char*, const at::Tensor&>{"in_scale", *scale},
                                {"in_shift", *shift}}) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1) && v.device() == x.device(), op, ": ",
                name, " must be a vector of x.size(1) = ", x.size(1), " elements on ",
                x.device(), ", got shape ", v.sizes(), " on ", v.device());
  }
  return true;
}

// A prologue's (scale, shift) as the mainloop fusion reads them: dense, aligned vectors in
// x's dtype; converted together, in one launch, when they are not.
std::pair<at::Tensor, at::Tensor> prologue_vectors(const char* op, const at::Tensor& x,
                                                   const c10::optional<at::Tensor>& scale,
                                                   const c10::optional<at::Tensor>& shift) {
  if (!check_prologue(op, x, scale, shift)) return {};
  const auto read_as_is = [&](const at::Tensor& v) {
    return v.scalar_type() == x.scalar_type() && v.is_contiguous() &&
           reinterpret_cast<uintptr_t>(v.const_data_ptr()) % kAlignmentBytes == 0;
  };
  if (read_as_is(*scale) && read_as_is(*shift)) return {*scale, *shift};
  const at::Tensor both = stacked_vectors_cuda(*scale, *shift, x.scalar_type());
  return {both[0], both[1]};
}

void check_output_gradient(const char* op, const at::Tensor& grad, const ConvProblem& p,
                           const at::Tensor& x) {
  check_cuda_half(op, "grad", grad);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({p.n, p.k, p.p, p.q}) &&
                  grad.scalar_type() == x.scalar_type(),
              op, ": grad must be the conv output's gradient, shape (", p.n, ", ", p.k, ", ",
              p.p, ", ", p.q, ") in ", x.scalar_type(), ", got ", grad.sizes(), ", ",
              grad.scalar_type());
}

at::Tensor float_vector(const at::Tensor& v) { return channel_vector(v, at::kFloat); }

c10::optional<at::Tensor> optional_nhwc(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return nhwc(*t);
}

c10::optional<at::Tensor> optional_float(const c10::optional<at::Tensor>& v) {
  if (!v.has_value()) return c10::nullopt;
  return float_vector(*v);
}

at::Tensor empty_statistics(const at::Tensor& x) {
  return at::empty({0}, x.options().dtype(at::kFloat));
}

bool is_half(const at::Tensor& x) { return x.scalar_type() == at::kHalf; }

// The forward conv of cuda_conv and cuda_conv_bn_train: (y, the epilogue's statistics
// partials, fp32 [grid_m, K] Welford states, undefined unless `statistics`). An empty output
// launches nothing and has empty partials.
std::pair<at::Tensor, at::Tensor> conv_forward(
    const char* op, const at::Tensor& x_in, const at::Tensor& weight_in, int64_t stride,
    const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift,
    const c10::optional<at::Tensor>& out_scale, const c10::optional<at::Tensor>& out_shift,
    const c10::optional<at::Tensor>& residual_in, bool out_relu, bool statistics) {
  const ConvProblem p = conv_problem(op, x_in, weight_in, stride);
  const bool epilogue = out_scale.has_value() || out_shift.has_value() ||
                        residual_in.has_value() || out_relu;
  TORCH_CHECK(!(statistics && epilogue), op,
              ": statistics are of the raw conv output; they cannot be combined with an "
              "epilogue (out_scale, out_shift, residual, out_relu)");
  TORCH_CHECK(!(in_scale.has_value() &&
                (out_scale.has_value() || out_shift.has_value() || out_relu)),
              op, ": with a prologue (in_scale) the epilogue takes only a residual");
  const auto [scale_vec, shift_vec] = prologue_vectors(op, x_in, in_scale, in_shift);
  const at::Tensor x = nhwc(x_in);
  // An epilogue scale is folded into the weight (per output channel), so the kernel's
  // epilogue needs only a bias vector: W' = W * out_scale[k].
  at::Tensor weight = nhwc(weight_in);
  if (out_scale.has_value()) {
    TORCH_CHECK(out_scale->dim() == 1 && out_scale->size(0) == p.k, op,
                ": out_scale must be a vector of weight.size(0) = ", p.k, " elements");
    weight = scaled_filters_cuda(weight, *out_scale);
  }
  at::Tensor bias;
  if (out_shift.has_value()) {
    TORCH_CHECK(out_shift->dim() == 1 && out_shift->size(0) == p.k, op,
                ": out_shift must be a vector of weight.size(0) = ", p.k, " elements");
    bias = float_vector(*out_shift);
  }
  at::Tensor y = output_nhwc(x, p.n, p.k, p.p, p.q);
  at::Tensor residual;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->sizes() == y.sizes() &&
                    residual_in->scalar_type() == x.scalar_type() &&
                    residual_in->device() == x.device(),
                op, ": residual must have the output's shape ", y.sizes(), ", dtype ",
                x.scalar_type(), " and device; got ", residual_in->sizes(), ", ",
                residual_in->scalar_type(), ", ", residual_in->device());
    residual = nhwc(*residual_in);
  }
  if (y.numel() == 0) return {y, empty_statistics(x)};
  const ConvKernel kernel = scale_vec.defined() ? ConvKernel::kFpropPrologue
                            : statistics        ? ConvKernel::kFpropStatistics
                                                : ConvKernel::kFprop;
  const LaunchPlan plan = launch_plan(kernel, p, x);
  FpropLaunch launch{p, plan, x.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr()};
  if (scale_vec.defined()) {
    launch.in_scale = scale_vec.const_data_ptr();
    launch.in_shift = shift_vec.const_data_ptr();
  }
  launch.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  launch.residual = residual.defined() ? residual.const_data_ptr() : nullptr;
  launch.relu = out_relu;
  at::Tensor partials;
  if (statistics) {
    partials = at::empty({int64_t(plan.grid_m) * p.k * 3}, x.options().dtype(at::kFloat));
    launch.statistics = partials.mutable_data_ptr<float>();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  is_half(x) ? conv_fprop_f16(launch, stream) : conv_fprop_bf16(launch, stream);
  return {y, partials};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_conv(
    const at::Tensor& x, const at::Tensor& weight, int64_t stride,
    const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift,
    const c10::optional<at::Tensor>& out_scale, const c10::optional<at::Tensor>& out_shift,
    const c10::optional<at::Tensor>& residual, bool out_relu, bool statistics) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto [y, partials] = conv_forward("cuda_conv", x, weight, stride, in_scale, in_shift,
                                    out_scale, out_shift, residual, out_relu, statistics);
  if (!statistics) return {y, empty_statistics(x), empty_statistics(x)};
  // An empty output's statistics are NaN (0 / 0), which channel_statistics_cuda gives.
  auto [mean, var] = y.numel() == 0 ? channel_statistics_cuda(y)
                                    : merged_statistics_cuda(partials, y.size(1));
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_conv_bn_train(
    const at::Tensor& x, const at::Tensor& weight, int64_t stride,
    const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    double eps, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum) {
  constexpr const char* op = "cuda_conv_bn_train";
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto [y, partials] = conv_forward(op, x, weight, stride, in_scale, in_shift, c10::nullopt,
                                    c10::nullopt, c10::nullopt, false, true);
  const int64_t count = y.numel() / std::max<int64_t>(y.size(1), 1);
  TORCH_CHECK(count > 1, op, ": a training BatchNorm needs more than one value per channel, "
              "got ", count, " (output shape ", y.sizes(), ")");
  auto [mean, var, scale, shift] = bn_merge_train_finalize_cuda(
      partials, y.size(1), bn_weight, bn_bias, eps, running_mean, running_var,
      num_batches_tracked, momentum, count);
  return {y, mean, var, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_conv_dgrad(
    const at::Tensor& grad_in, const at::Tensor& weight_in, const at::Tensor& x_in,
    int64_t stride, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& other_in) {
  constexpr const char* op = "cuda_conv_dgrad";
  const ConvProblem p = conv_problem(op, x_in, weight_in, stride);
  check_output_gradient(op, grad_in, p, x_in);
  const bool prologue = check_prologue(op, x_in, in_scale, in_shift);
  if (other_in.has_value()) {
    TORCH_CHECK(other_in->sizes() == x_in.sizes() &&
                    other_in->scalar_type() == x_in.scalar_type() &&
                    other_in->device() == x_in.device(),
                op, ": other must be a gradient of x: shape ", x_in.sizes(), ", ",
                x_in.scalar_type(), " on ", x_in.device(), "; got ", other_in->sizes(), ", ",
                other_in->scalar_type(), " on ", other_in->device());
  }
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor grad = nhwc(grad_in);
  const at::Tensor weight = nhwc(weight_in);
  const at::Tensor x = nhwc(x_in);
  at::Tensor grad_input = output_nhwc(x, p.n, p.c, p.h, p.w);
  if (grad_input.numel() == 0) {
    if (!prologue) return {grad_input, empty_statistics(x), empty_statistics(x)};
    return affine_relu_backward_cuda(grad_input, x, float_vector(*in_scale),
                                     float_vector(*in_shift), c10::nullopt);  // zero sums
  }
  // Through a prologue relu(x * scale + shift) (the ReLU mask recomputed from x): at stride 1
  // in the dgrad's epilogue, which writes per-row-tile sums of the scale and shift gradients;
  // at stride 2 in a pass after it. `other` is added in the epilogue without a prologue, and
  // to the prologue's backward, x's gradient, after it (a use the blocks never make).
  const bool prologue_in_epilogue = prologue && p.stride == 1;
  const at::Tensor other = other_in.has_value() && !prologue ? nhwc(*other_in) : at::Tensor();
  const at::Tensor scale = prologue ? float_vector(*in_scale) : at::Tensor();
  const at::Tensor shift = prologue ? float_vector(*in_shift) : at::Tensor();
  const LaunchPlan plan = launch_plan(
      prologue_in_epilogue ? ConvKernel::kDgradPrologue : ConvKernel::kDgrad, p, x);
  DgradLaunch launch{p, plan, grad.const_data_ptr(), weight.const_data_ptr(),
                     grad_input.mutable_data_ptr()};
  launch.other = other.defined() ? other.const_data_ptr() : nullptr;
  at::Tensor sums;  // the epilogue's Sums (sum, dot, unused) per row tile and channel
  if (prologue_in_epilogue) {
    sums = at::empty({int64_t(plan.grid_m) * p.c * 3}, x.options().dtype(at::kFloat));
    launch.prologue_x = x.const_data_ptr();
    launch.in_scale = scale.const_data_ptr<float>();
    launch.in_shift = shift.const_data_ptr<float>();
    launch.sums = sums.mutable_data_ptr<float>();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  is_half(x) ? conv_dgrad_f16(launch, stream) : conv_dgrad_bf16(launch, stream);
  if (!prologue) return {grad_input, empty_statistics(x), empty_statistics(x)};
  at::Tensor grad_x, grad_scale, grad_shift;
  if (prologue_in_epilogue) {
    grad_x = grad_input;
    std::tie(grad_scale, grad_shift) = merged_sums_cuda(sums, p.c);
  } else {
    std::tie(grad_x, grad_scale, grad_shift) =
        affine_relu_backward_cuda(grad_input, x, scale, shift, c10::nullopt);
  }
  if (other_in.has_value()) grad_x.add_(*other_in);
  return {grad_x, grad_scale, grad_shift};
}

at::Tensor cuda_conv_wgrad(const at::Tensor& grad_in, const at::Tensor& x_in,
                           const at::Tensor& weight, int64_t stride,
                           const c10::optional<at::Tensor>& in_scale,
                           const c10::optional<at::Tensor>& in_shift) {
  constexpr const char* op = "cuda_conv_wgrad";
  const ConvProblem p = conv_problem(op, x_in, weight, stride);
  check_output_gradient(op, grad_in, p, x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const auto [scale_vec, shift_vec] = prologue_vectors(op, x_in, in_scale, in_shift);
  const at::Tensor grad = nhwc(grad_in);
  const at::Tensor x = nhwc(x_in);
  // An empty batch contributes nothing: the kernels, which write every element, never run.
  if (grad.numel() == 0) return at::zeros_like(weight);
  // In the weight's layout (as the op's fake says); the kernels write KRSC (channels_last).
  at::Tensor grad_weight = at::empty_like(weight);
  const at::Tensor krsc = grad_weight.is_contiguous(at::MemoryFormat::ChannelsLast)
                              ? grad_weight
                              : at::empty(weight.sizes(), x.options().memory_format(
                                                              at::MemoryFormat::ChannelsLast));
  const LaunchPlan plan = launch_plan(
      scale_vec.defined() ? ConvKernel::kWgradPrologue : ConvKernel::kWgrad, p, x);
  // The slices' fp32 partial sums, [split_k, K, R, S, C].
  const at::Tensor partials =
      at::empty({plan.split_k, p.k, p.r, p.s, p.c}, x.options().dtype(at::kFloat));
  WgradLaunch launch{p, plan, grad.const_data_ptr(), x.const_data_ptr(), krsc.mutable_data_ptr(),
                     partials.mutable_data_ptr<float>()};
  if (scale_vec.defined()) {
    launch.in_scale = scale_vec.const_data_ptr();
    launch.in_shift = shift_vec.const_data_ptr();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  is_half(x) ? conv_wgrad_f16(launch, stream) : conv_wgrad_bf16(launch, stream);
  if (!krsc.is_same(grad_weight)) grad_weight.copy_(krsc);
  return grad_weight;
}

std::tuple<at::Tensor, at::Tensor> cuda_channel_stats(const at::Tensor& x) {
  return channel_statistics_cuda(nhwc(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_backward(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& output) {
  return affine_relu_backward_cuda(nhwc(grad), nhwc(x), optional_float(scale),
                                   optional_float(shift), optional_nhwc(output));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_relu_backward(
    const at::Tensor& grad, const at::Tensor& output, const at::Tensor& x,
    const c10::optional<at::Tensor>& scale, const at::Tensor& residual,
    const c10::optional<at::Tensor>& residual_scale) {
  return add_relu_backward_cuda(nhwc(grad), nhwc(output), nhwc(x), optional_float(scale),
                                nhwc(residual), optional_float(residual_scale));
}

at::Tensor statistics_backward(const at::Tensor& grad, const at::Tensor& y,
                               const at::Tensor& mean, const at::Tensor& grad_mean,
                               const at::Tensor& grad_var,
                               const c10::optional<at::Tensor>& grad_scale) {
  return statistics_backward_cuda(nhwc(grad), nhwc(y), float_vector(mean),
                                  float_vector(grad_mean), float_vector(grad_var),
                                  optional_float(grad_scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_statistics_backward(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& grad_scale,
    const at::Tensor& grad_shift, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps) {
  // The parameters are read and their gradients written in their own dtype when they share
  // one (a .half() module's, no conversion launch), else in fp32 and converted back.
  const bool one_type = !(weight.has_value() && bias.has_value()) ||
                        weight->scalar_type() == bias->scalar_type();
  const auto parameter = [&](const c10::optional<at::Tensor>& p) -> c10::optional<at::Tensor> {
    if (!p.has_value()) return c10::nullopt;
    return one_type ? p->contiguous() : float_vector(*p);
  };
  auto [grad_y, grad_weight, grad_bias] = bn_statistics_backward_cuda(
      nhwc(grad), nhwc(y), float_vector(grad_scale), float_vector(grad_shift),
      float_vector(mean), float_vector(var), parameter(weight), parameter(bias), eps);
  if (!one_type) {
    grad_weight = grad_weight.to(weight->scalar_type());
    grad_bias = grad_bias.to(bias->scalar_type());
  }
  return {grad_y, grad_weight, grad_bias};
}

}  // namespace fused_resnet

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("cuda_conv", &fused_resnet::cuda_conv);
  m.impl("cuda_conv_bn_train", &fused_resnet::cuda_conv_bn_train);
  m.impl("cuda_conv_dgrad", &fused_resnet::cuda_conv_dgrad);
  m.impl("cuda_conv_wgrad", &fused_resnet::cuda_conv_wgrad);
  m.impl("cuda_channel_stats", &fused_resnet::cuda_channel_stats);
  m.impl("affine_relu_backward", &fused_resnet::affine_relu_backward);
  m.impl("statistics_backward", &fused_resnet::statistics_backward);
  m.impl("bn_statistics_backward", &fused_resnet::bn_statistics_backward);
  m.impl("add_relu_backward", &fused_resnet::add_relu_backward);
}
