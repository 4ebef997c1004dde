// conv_launch_plan (conv_kernels.h): the tiles, grid and split-K of each CUTLASS kernel, read
// from the kernels' own types, so the launchers and the CPU gate (tools/cuda_gate.py, through
// the op fused_resnet::conv_launch_plan) see the same grid; and conv_launch_check, the dry run
// of a launch by that plan. Host code only.
//
// The tile shapes do not depend on the element type; the half_t types stand for both.
#include <algorithm>
#include <cstdint>

#include "conv_backward.cuh"
#include "conv_fprop.cuh"

namespace fused_resnet {
namespace {

using cutlass_conv::LargeTile;
using cutlass_conv::plan_of;
using cutlass_conv::SmallTile;
template <typename Tile>
using Fprop = cutlass_conv::FpropKernels<cutlass::half_t, Tile>;
template <typename Tile>
using Backward = cutlass_conv::BackwardKernels<cutlass::half_t, Tile>;

// Fewest K iterations a wgrad slice keeps: below this its mainloop is mostly pipeline fill.
constexpr int64_t kMinSliceIterations = 2;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t threadblocks(const LaunchPlan& plan) {
  return int64_t(plan.grid_m) * plan.grid_n * plan.split_k;
}

// Large tiles where their grid fills the GPU once, else small ones: four times the tiles,
// which is what keeps every multiprocessor busy on ResNet's last stages at batch 32 (a 7x7
// layer has 13 large row tiles).
template <template <typename> class Operator>
LaunchPlan output_tiled_plan(const ConvProblem& p, int sm_count) {
  const LaunchPlan large = plan_of<Operator<LargeTile>>(p, 1);
  return threadblocks(large) >= sm_count ? large : plan_of<Operator<SmallTile>>(p, 1);
}

// wgrad's GEMM is (K) x (R*S*C) summed over N*P*Q pixels: a first-stage ResNet layer has 1-5
// large output tiles, 1-4% of an H100's multiprocessors. Small tiles for K <= 64 (half of a
// 128-row tile would be padding); then the pixel sum is cut into slices so that there is at
// least one threadblock per multiprocessor (one full wave) wherever the pixels allow it.
template <template <typename> class Operator>
LaunchPlan wgrad_plan(const ConvProblem& p, int sm_count) {
  const auto plan = [&](int slices) {
    return p.k <= SmallTile::Threadblock::kM ? plan_of<Operator<SmallTile>>(p, slices)
                                             : plan_of<Operator<LargeTile>>(p, slices);
  };
  const LaunchPlan whole = plan(1);
  const int64_t iterations = ceil_div(int64_t(p.n) * p.p * p.q, whole.tile_k);
  const int64_t slices = std::max<int64_t>(
      1, std::min(ceil_div(sm_count, threadblocks(whole)), iterations / kMinSliceIterations));
  return plan(static_cast<int>(slices));
}

template <typename Tile>
using FpropBroadcast = typename Fprop<Tile>::Broadcast;
template <typename Tile>
using FpropStatistics = typename Fprop<Tile>::Statistics;
template <typename Tile>
using FpropPrologue = typename Fprop<Tile>::Prologue;
template <typename Tile>
using UnitStrideDgrad = typename Backward<Tile>::UnitStrideDgrad;
template <typename Tile>
using StridedDgrad = typename Backward<Tile>::StridedDgrad;
template <typename Tile>
using PrologueDgrad = typename Backward<Tile>::PrologueDgrad;
template <typename Tile>
using Wgrad = typename Backward<Tile>::Wgrad;
template <typename Tile>
using PrologueWgrad = typename Backward<Tile>::PrologueWgrad;

// The launch checked, not run, for both element types.
template <typename Launch>
void check_both_types(Launch launch, void (*f16)(const Launch&, cudaStream_t),
                      void (*bf16)(const Launch&, cudaStream_t)) {
  launch.check_only = true;
  f16(launch, nullptr);
  bf16(launch, nullptr);
}

}  // namespace

LaunchPlan conv_launch_plan(ConvKernel kernel, const ConvProblem& p, int sm_count) {
  TORCH_CHECK(sm_count >= 1, "conv_launch_plan: sm_count must be >= 1, got ", sm_count);
  switch (kernel) {
    case ConvKernel::kFprop:
      return output_tiled_plan<FpropBroadcast>(p, sm_count);
    case ConvKernel::kFpropStatistics:
      return output_tiled_plan<FpropStatistics>(p, sm_count);
    case ConvKernel::kFpropPrologue:
      return output_tiled_plan<FpropPrologue>(p, sm_count);
    case ConvKernel::kDgrad:
      return p.stride == 1 ? output_tiled_plan<UnitStrideDgrad>(p, sm_count)
                           : output_tiled_plan<StridedDgrad>(p, sm_count);
    case ConvKernel::kDgradPrologue:
      TORCH_CHECK(p.stride == 1, "conv_launch_plan: dgrad_prologue is the unit-stride dgrad "
                  "(a strided one applies the prologue's backward after it); got stride ",
                  p.stride);
      return output_tiled_plan<PrologueDgrad>(p, sm_count);
    case ConvKernel::kWgrad:
      return wgrad_plan<Wgrad>(p, sm_count);
    case ConvKernel::kWgradPrologue:
      return wgrad_plan<PrologueWgrad>(p, sm_count);
  }
  TORCH_CHECK(false, "conv_launch_plan: unknown kernel ", static_cast<int>(kernel));
}

void conv_launch_check(ConvKernel kernel, const ConvProblem& p, int sm_count) {
  const LaunchPlan plan = conv_launch_plan(kernel, p, sm_count);
  // Placeholder data: 16-byte aligned, never dereferenced by a check_only launch.
  alignas(16) static char placeholder[16];
  void* data = placeholder;
  switch (kernel) {
    case ConvKernel::kFprop:
    case ConvKernel::kFpropStatistics:
    case ConvKernel::kFpropPrologue: {
      FpropLaunch launch{p, plan, data, data, data};
      if (kernel == ConvKernel::kFpropStatistics) launch.statistics = data;
      if (kernel == ConvKernel::kFpropPrologue) launch.in_scale = launch.in_shift = data;
      return check_both_types(launch, conv_fprop_f16, conv_fprop_bf16);
    }
    case ConvKernel::kDgrad:
    case ConvKernel::kDgradPrologue: {
      DgradLaunch launch{p, plan, data, data, data};
      if (kernel == ConvKernel::kDgradPrologue) {
        launch.prologue_x = launch.sums = data;
        launch.in_scale = launch.in_shift = static_cast<const float*>(data);
      }
      return check_both_types(launch, conv_dgrad_f16, conv_dgrad_bf16);
    }
    case ConvKernel::kWgrad:
    case ConvKernel::kWgradPrologue: {
      WgradLaunch launch{p, plan, data, data, data, static_cast<float*>(data)};
      if (kernel == ConvKernel::kWgradPrologue) launch.in_scale = launch.in_shift = data;
      return check_both_types(launch, conv_wgrad_f16, conv_wgrad_bf16);
    }
  }
}

}  // namespace fused_resnet
