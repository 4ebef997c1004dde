// The BatchNorm finalize's consumers that are not CUTLASS kernels (batch_norm_finalize.cu).
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_resnet {

// An inference BatchNorm's scale folded into the filters of the conv before it, in one pass:
// out[k, r, s, c] = weight[k, r, s, c] * scale[k] in fp32, rounded once to the weight's dtype.
// weight: 4-D (K, C, R, S) dense in channels_last (KRSC), fp16/bf16; scale: K elements, any
// float dtype. Returns a new channels_last tensor.
at::Tensor scaled_filters_cuda(const at::Tensor& weight, const at::Tensor& scale);

}  // namespace fused_resnet
