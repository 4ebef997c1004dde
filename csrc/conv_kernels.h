// Launchers of the CUTLASS convolution kernels, callable from host C++ without the CUTLASS
// headers. One translation unit per kernel family and element type (conv_*_{f16,bf16}.cu),
// so ninja compiles the heavy template instantiations in parallel.
//
// All tensors are NHWC (channels_last) and dense; filters KRSC. "Same" zero padding
// (R / 2, S / 2), dilation 1, one group: what every ResNet convolution uses.
#pragma once

#include <cuda_runtime_api.h>

namespace fused_resnet {

struct ConvProblem {
  int n, h, w, c;  // input (activation) extents
  int k, r, s;     // output channels and filter extents
  int p, q;        // output extents
  int stride;
};

// y = act(conv(prologue(x), W) [+ bias[k]] [+ residual])
//   prologue(x) = relu(x * in_scale[c] + in_shift[c]) when in_scale is given (element-typed
//                 vectors, CUTLASS example 25), zero padding after it;
//   bias: fp32 vector of K entries or null; residual: like y, or null; act: ReLU or none.
// With a prologue the epilogue takes only the residual (no bias, no ReLU).
struct FpropLaunch {
  ConvProblem problem;
  const void* x;
  const void* weight;
  void* y;
  const void* in_scale = nullptr;
  const void* in_shift = nullptr;
  const float* bias = nullptr;
  const void* residual = nullptr;
  bool relu = false;
};

// grad_input = conv_transpose(grad_output, W): the gradient of the conv's input (before any
// prologue backward, which channel_kernels.h does).
struct DgradLaunch {
  ConvProblem problem;
  const void* grad_output;
  const void* weight;
  void* grad_input;
};

// grad_weight (fp32, KRSC) = sum over pixels of grad_output x prologue(x); with in_scale the
// prologue is recomputed in the mainloop (CUTLASS example 26) instead of being stored.
struct WgradLaunch {
  ConvProblem problem;
  const void* grad_output;
  const void* x;
  float* grad_weight;
  const void* in_scale = nullptr;
  const void* in_shift = nullptr;
};

void conv_fprop_f16(const FpropLaunch& launch, cudaStream_t stream);
void conv_fprop_bf16(const FpropLaunch& launch, cudaStream_t stream);
void conv_dgrad_f16(const DgradLaunch& launch, cudaStream_t stream);
void conv_dgrad_bf16(const DgradLaunch& launch, cudaStream_t stream);
void conv_wgrad_f16(const WgradLaunch& launch, cudaStream_t stream);
void conv_wgrad_bf16(const WgradLaunch& launch, cudaStream_t stream);

}  // namespace fused_resnet
