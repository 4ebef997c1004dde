// The backward of a BatchNorm's finalize for one channel, the formula two kernels share
// (bn_scale_shift_backward_kernel in batch_norm_finalize.cu, bn_statistics_backward in
// channel_kernels.cu): from the gradients of scale = weight * rstd and shift = bias - mean *
// scale (rstd = (var + eps)^(-1/2)), those of mean, var, weight and bias, in fp32.
#pragma once

namespace fused_resnet {

struct ScaleShiftGradients {
  float mean, var, weight, bias;
};

// `weight`: the BN's weight, 1 without one.
__device__ __forceinline__ ScaleShiftGradients scale_shift_gradients(float grad_scale,
                                                                     float grad_shift,
                                                                     float mean, float var,
                                                                     float weight, float eps) {
  const float rstd = rsqrtf(var + eps);
  // d(loss)/d(scale) with the part that reaches scale through shift = bias - mean * scale.
  const float through_scale = grad_scale - grad_shift * mean;
  return {-grad_shift * weight * rstd, through_scale * weight * -0.5f * rstd * rstd * rstd,
          through_scale * rstd, grad_shift};
}

}  // namespace fused_resnet
