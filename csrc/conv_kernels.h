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

// The CUTLASS kernels the ops launch.
enum class ConvKernel {
  kFprop,
  kFpropStatistics,
  kFpropPrologue,
  kDgrad,
  kDgradPrologue,  // stride 1 only
  kWgrad,
  kWgradPrologue
};

// How one kernel covers a problem: its threadblock tile (implicit GEMM M x N x K), the grid
// of tiles and the split-K slices, grid_m * grid_n * split_k threadblocks in all.
struct LaunchPlan {
  int tile_m, tile_n, tile_k;
  int grid_m, grid_n, split_k;
};

// The plan the launchers follow for `kernel` on `problem` on a GPU with `sm_count`
// multiprocessors: the tile configuration (conv_launch_plan in conv_plan.cu says which and
// why) and, for wgrad, the split-K. Host code that needs no GPU, so a CPU machine can check
// every launch's grid.
LaunchPlan conv_launch_plan(ConvKernel kernel, const ConvProblem& problem, int sm_count);

// The dry run of `kernel`'s launch on `problem` as the ops make it (conv_launch_plan's plan for
// `sm_count`, the launcher's CUTLASS arguments, check_only), for both element types: throws
// what a launch would throw before reaching the GPU. Needs no GPU.
void conv_launch_check(ConvKernel kernel, const ConvProblem& problem, int sm_count);

// Each launch carries the plan conv_launch_plan made for it (conv_ops.cpp): the launcher runs
// the kernel of the plan's tile and checks that the kernel's grid is the plan's. With
// check_only it does everything but launch: CUTLASS's can_implement and workspace checks on
// the real arguments (placeholder pointers, never dereferenced), which runs without a GPU
// (conv_launch_check, the CPU gate).

// y = act(conv(prologue(x), W) [+ bias[k]] [+ residual])
//   prologue(x) = relu(x * in_scale[c] + in_shift[c]) when in_scale is given (element-typed
//                 vectors, CUTLASS example 25), zero padding after it;
//   bias: fp32 vector of K entries or null; residual: like y, or null; act: ReLU or none.
// With a prologue the epilogue takes only the residual (no bias, no ReLU).
// statistics (non-null only without bias, residual and ReLU): where the epilogue writes the
//   per-channel Welford states (count, mean, M2; channel_states.cuh) of y's rows in each row
//   tile:
//   plan.grid_m * K states, tile-major (epilogue_reductions.cuh).
struct FpropLaunch {
  ConvProblem problem;
  LaunchPlan plan;
  const void* x;
  const void* weight;
  void* y;
  const void* in_scale = nullptr;
  const void* in_shift = nullptr;
  const float* bias = nullptr;
  const void* residual = nullptr;
  bool relu = false;
  void* statistics = nullptr;
  bool check_only = false;
};

// grad_input = conv_transpose(grad_output, W) [+ other]: the gradient of the conv's input;
// `other`, like grad_input or null, another gradient of the same input (a block's shortcut),
// added in the epilogue. With in_scale (stride 1, no other): the conv's input was
// relu(prologue_x * in_scale + in_shift), fp32 vectors, and grad_input is the gradient of
// prologue_x through it, with the per-channel Sums (channel_states.cuh: sum of the masked
// gradient, and dot, of it times prologue_x) of each row tile in `sums`, plan.grid_m * C
// states, tile-major (epilogue_reductions.cuh).
struct DgradLaunch {
  ConvProblem problem;
  LaunchPlan plan;
  const void* grad_output;
  const void* weight;
  void* grad_input;
  const void* other = nullptr;
  const void* prologue_x = nullptr;
  const float* in_scale = nullptr;
  const float* in_shift = nullptr;
  void* sums = nullptr;
  bool check_only = false;
};

// grad_weight (KRSC, the element type) = sum over pixels of grad_output x prologue(x); with
// in_scale the prologue is recomputed in the mainloop (CUTLASS example 26) instead of being
// stored. The pixels are split into plan.split_k slices: each slice writes its fp32 partial
// sums to `workspace` (split_k * K*R*S*C floats), and a reduction adds the slices in order
// (deterministic) and rounds once to the element type.
struct WgradLaunch {
  ConvProblem problem;
  LaunchPlan plan;
  const void* grad_output;
  const void* x;
  void* grad_weight;
  float* workspace;
  const void* in_scale = nullptr;
  const void* in_shift = nullptr;
  bool check_only = false;
};

void conv_fprop_f16(const FpropLaunch& launch, cudaStream_t stream);
void conv_fprop_bf16(const FpropLaunch& launch, cudaStream_t stream);
void conv_dgrad_f16(const DgradLaunch& launch, cudaStream_t stream);
void conv_dgrad_bf16(const DgradLaunch& launch, cudaStream_t stream);
void conv_wgrad_f16(const WgradLaunch& launch, cudaStream_t stream);
void conv_wgrad_bf16(const WgradLaunch& launch, cudaStream_t stream);

}  // namespace fused_resnet
