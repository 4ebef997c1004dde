// Host functions of batch_norm_finalize.cu that other C++ code calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fused_resnet {

// An inference BatchNorm's scale folded into the filters of the conv before it, in one pass:
// out[k, r, s, c] = weight[k, r, s, c] * scale[k] in fp32, rounded once to the weight's dtype.
// weight: 4-D (K, C, R, S) dense in channels_last (KRSC), fp16/bf16; scale: K elements, any
// float dtype. Returns a new channels_last tensor.
at::Tensor scaled_filters_cuda(const at::Tensor& weight, const at::Tensor& scale);

// `a` and `b` (vectors of one size, any float dtype) converted to `dtype` (fp16/bf16) in one
// launch: the rows of a new [2, size] tensor. A conv's BN-ReLU prologue vectors as its CUTLASS
// mainloop reads them; the second row starts 2 * size bytes in, 16-byte aligned when size is
// a multiple of 8, as the convs' channel counts are.
at::Tensor stacked_vectors_cuda(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype);

// A training BN's finalize (bn_train_finalize: scale/shift, running statistics, batch count)
// from the per-row-tile Welford states a conv's statistics epilogue wrote (`partials`,
// contiguous fp32 [tiles, channels] of (count, mean, M2)), merged in the same launch.
// Returns (mean, biased var, scale, shift), fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_merge_train_finalize_cuda(
    const at::Tensor& partials, int64_t channels, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    int64_t count);

}  // namespace fused_resnet
