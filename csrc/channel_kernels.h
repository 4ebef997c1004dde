// Hand-written CUDA kernels that reduce per channel over every pixel of an NHWC tensor:
// BatchNorm batch statistics, and the backward of a per-channel affine map with its ReLU;
// and the elementwise pass adding the gradient through the batch statistics.
//
// Layout: 4-D channels_last tensors, fp16/bf16/fp32, channels a multiple of 16 bytes' worth
// of elements (8 halfs, 4 floats): every thread moves one 16-byte vector per pixel.
// Reductions are deterministic: each block merges its rows in a fixed order into one
// partial per channel, and a second kernel merges the partials in block order (no atomics).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fused_resnet {

// (mean, biased variance) per channel, fp32, merged with Chan's formula from per-thread
// Welford states, so it stays exact when |mean| >> std (no sum of squares).
std::tuple<at::Tensor, at::Tensor> channel_statistics_cuda(const at::Tensor& x);

// (mean, biased variance) per channel from per-block Welford states (channel_states.cuh):
// `partials` is contiguous fp32, [blocks, channels] states of (count, mean, M2) as a
// convolution's statistics epilogue writes them (epilogue_reductions.cuh), merged in a fixed
// order.
std::tuple<at::Tensor, at::Tensor> merged_statistics_cuda(const at::Tensor& partials,
                                                          int64_t channels);

// (dot, sum) per channel, fp32, from per-block Sums states (channel_states.cuh): `partials` is
// contiguous fp32, [blocks, channels] states of (sum, dot, unused) as a dgrad's prologue
// backward writes them (epilogue_reductions.cuh), merged in a fixed order.
std::tuple<at::Tensor, at::Tensor> merged_sums_cuda(const at::Tensor& partials,
                                                    int64_t channels);

// Backward of y = relu?(x * scale[c] + shift[c] + ...) for one affine input x:
//   g' = grad where the ReLU passed (mask), else 0
//   returns (g' * scale[c]  in x's dtype, sum of g' * x per channel, sum of g' per channel)
// The mask is y > 0 when `output` is given (the output of a fused BN-add-ReLU), else
// x * scale + shift > 0 when `shift` is given (a BN-ReLU prologue, recomputed), else none.
// Without `scale` the first result is g' itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& output);

// Backward of y = relu(x * scale[c] + residual * residual_scale[c] + ...) (a block's
// BN-add-ReLU, scales null for an identity) in one pass, masked by output > 0:
//   returns (g' * scale, sum of g' * x, sum of g', g' * residual_scale,
//            sum of g' * residual), the tensors in x's dtype, the sums fp32 per channel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_relu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& output, const at::Tensor& x,
    const c10::optional<at::Tensor>& scale, const at::Tensor& residual,
    const c10::optional<at::Tensor>& residual_scale);

// The gradient of y (conv output) when its per-channel batch statistics (mean, biased
// variance over count = N*H*W values) also reach the loss:
//   grad [* grad_scale[c]] + (grad_mean[c] + 2 grad_var[c] (y - mean[c])) / count
// in y's dtype, fp32 math; the vectors fp32. One elementwise pass (no reduction).
at::Tensor statistics_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                    const at::Tensor& mean, const at::Tensor& grad_mean,
                                    const at::Tensor& grad_var,
                                    const c10::optional<at::Tensor>& grad_scale);

// statistics_backward_cuda with (grad_mean, grad_var) derived from the gradients of the scale
// and shift of the training BN y feeds (bn_scale_shift_backward's formula), in the same pass:
// returns (grad_y, the BN weight's gradient, the BN bias's gradient), the last two in the
// parameters' dtype (one for both), empty fp32 vectors for absent ones. The statistics and
// the scale/shift gradients fp32; no weight: 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_statistics_backward_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& grad_bn_scale,
    const at::Tensor& grad_bn_shift, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps);

}  // namespace fused_resnet
