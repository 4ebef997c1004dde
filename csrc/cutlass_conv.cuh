// What the CUTLASS convolution kernels of fused_resnet share: tile shapes, tensor refs built
// from ConvProblem, the launch with its error checks, and the bf16 versions of CUTLASS's
// scale+bias+ReLU operand transforms.
//
// Every kernel is an Ampere-style (sm_80) implicit GEMM on 16x8x16 tensor-core MMAs with
// fp32 accumulation; compiled for sm_80 and sm_90 (the sm_80 kernels run on Hopper too).
// Tensors are NHWC (channels_last), filters KRSC (a [K, C, R, S] weight in channels_last).
#pragma once

#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/device/implicit_gemm_convolution_fusion.h>
#include <cutlass/device_kernel.h>
#include <cutlass/conv/warp/scale_bias_relu_transform.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/layout/matrix.h>
#include <cutlass/layout/tensor.h>
#include <cutlass/numeric_types.h>
#include <cutlass/tensor_ref.h>

#include <c10/util/Exception.h>

#include "conv_kernels.h"

namespace fused_resnet::cutlass_conv {

using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;

// The two tile configurations of every kernel (implicit GEMM M x N x K per threadblock).
// Large: 128x128, four 64x64 warps, the throughput tile. Small: 64x64, four 32x32 warps, a
// quarter of the area, for problems whose large-tile grid has fewer threadblocks than the GPU
// has multiprocessors (late-stage layers at small batch) and for wgrad's 64-channel layers,
// where half of a 128-row tile would be padding. conv_launch_plan picks one per launch.
// PrologueWarp: the warps of the kernels that hold a BN-ReLU prologue's per-channel vectors
// besides the accumulators (the BN-ReLU wgrad's operand transform, the dgrad epilogue's
// prologue backward). With four 64x64 warps the wgrad spilled 52 (bf16) and 80 (fp16) bytes
// on sm_90 at the 255-register cap; eight 64x32 warps hold half the accumulators each
// (registers and spills: tools/cuda_gate.py's table).
struct LargeTile {
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;
  using PrologueWarp = cutlass::gemm::GemmShape<64, 32, 32>;
  static constexpr int kStages = 4;
};
struct SmallTile {
  using Threadblock = cutlass::gemm::GemmShape<64, 64, 32>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 32>;
  using PrologueWarp = Warp;
  static constexpr int kStages = 5;
};
using Nhwc = cutlass::layout::TensorNHWC;

inline cutlass::conv::Conv2dProblemSize problem_size(const ConvProblem& p, int split_k = 1) {
  return {p.n, p.h, p.w, p.c, p.k, p.r, p.s, p.p, p.q, p.r / 2, p.s / 2, p.stride, p.stride,
          1, 1, cutlass::conv::Mode::kCrossCorrelation, split_k};
}

// The tiles, grid and slices of `Operator` (a CUTLASS device-level convolution) on `p`, from
// the kernel's own tile shape and threadblock swizzle: what its launch will be.
template <typename Operator>
LaunchPlan plan_of(const ConvProblem& p, int split_k) {
  using Tile = typename Operator::ThreadblockShape;
  const cutlass::gemm::GemmCoord tiles =
      typename Operator::ThreadblockSwizzle().get_tiled_shape(
          Operator::kConvolutionalOperator, problem_size(p, split_k),
          {Tile::kM, Tile::kN, Tile::kK}, split_k);
  return {Tile::kM, Tile::kN, Tile::kK, tiles.m(), tiles.n(), tiles.k()};
}

template <typename Element>
cutlass::TensorRef<Element, Nhwc> nhwc(const void* data, int n, int h, int w, int c) {
  return {static_cast<Element*>(const_cast<void*>(data)),
          Nhwc::packed(cutlass::Tensor4DCoord(n, h, w, c))};
}

template <typename Element>
cutlass::TensorRef<Element, Nhwc> activation(const ConvProblem& p, const void* data) {
  return nhwc<Element>(data, p.n, p.h, p.w, p.c);
}

template <typename Element>
cutlass::TensorRef<Element, Nhwc> filter(const ConvProblem& p, const void* data) {
  return nhwc<Element>(data, p.k, p.r, p.s, p.c);
}

template <typename Element>
cutlass::TensorRef<Element, Nhwc> output(const ConvProblem& p, const void* data) {
  return nhwc<Element>(data, p.n, p.p, p.q, p.k);
}

// A per-channel vector of the mainloop fusion (one row of `channels` elements).
template <typename Element>
cutlass::TensorRef<Element, cutlass::layout::RowMajor> channel_vector(const void* data,
                                                                      int channels) {
  return {static_cast<Element*>(const_cast<void*>(data)), cutlass::layout::RowMajor(channels)};
}

// Calls run(Tile{}) with the tile configuration of `plan` (LargeTile or SmallTile).
template <typename Run>
void with_tile_of(const LaunchPlan& plan, Run&& run) {
  if (plan.tile_m == SmallTile::Threadblock::kM) {
    run(SmallTile{});
  } else {
    run(LargeTile{});
  }
}

// Whether `plan` (conv_launch_plan's, which the op launched by) is what `Operator` makes of
// `p`: a launcher that picked another kernel than the plan says would fail here, not launch a
// grid that the CPU gate never saw.
template <typename Operator>
void check_plan(const ConvProblem& p, const LaunchPlan& plan, const char* what) {
  const LaunchPlan own = plan_of<Operator>(p, plan.split_k);
  TORCH_CHECK(own.tile_m == plan.tile_m && own.tile_n == plan.tile_n &&
                  own.tile_k == plan.tile_k && own.grid_m == plan.grid_m &&
                  own.grid_n == plan.grid_n,
              "fused_resnet ", what, ": the kernel's tiles differ from the launch plan's");
}

// Checks that CUTLASS takes the problem with `workspace_bytes` of workspace; throws naming
// `what` otherwise.
template <typename Operator>
void check_arguments(const Operator& op, const typename Operator::Arguments& arguments,
                     const char* what, size_t workspace_bytes) {
  const cutlass::Status status = op.can_implement(arguments);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet ", what,
              ": CUTLASS cannot run this problem (", cutlassGetStatusString(status), ")");
  TORCH_CHECK(op.get_workspace_size(arguments) <= workspace_bytes, "fused_resnet ", what,
              ": CUTLASS asks for a workspace of ", op.get_workspace_size(arguments),
              " bytes, the launch provides ", workspace_bytes);
}

// Checks that CUTLASS takes the problem, then runs it on `stream` (unless `check_only`: the
// CPU gate's dry run, whose pointers are placeholders). `what` names the kernel in the error.
template <typename Operator>
void launch_operator(const typename Operator::Arguments& arguments, cudaStream_t stream,
                     bool check_only, const char* what) {
  Operator op;
  check_arguments(op, arguments, what, 0);
  if (check_only) return;
  cutlass::Status status = op.initialize(arguments, nullptr, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet ", what,
              ": CUTLASS initialization failed (", cutlassGetStatusString(status), ")");
  status = op.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet ", what,
              ": CUTLASS launch failed (", cutlassGetStatusString(status), ")");
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "fused_resnet ", what, ": ", cudaGetErrorString(error));
}

// The kernel-level type of a CUTLASS device-level convolution.
template <typename Operator>
struct KernelOf {
  using Type = typename Operator::UnderlyingKernel;
};
template <typename Kernel>
struct KernelOf<cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>> {
  using Type = Kernel;
};

// launch_operator for a parallel split-K convolution (`Operator`, a CUTLASS device-level
// conv) whose workspace, `workspace_bytes` at `workspace`, is the slices' partials: launched
// as its initialize() and run() do, less initialize()'s zeroing of the workspace. Every
// slice's threadblocks overwrite their partials whole (each writes its entire output tile,
// zeros where its pixels contribute nothing), so zeroing them first would be a full extra
// write for nothing.
template <typename Operator>
void launch_split_k_operator(const typename Operator::Arguments& arguments, cudaStream_t stream,
                             bool check_only, const char* what, void* workspace,
                             size_t workspace_bytes) {
  check_arguments(Operator(), arguments, what, workspace_bytes);
  if (check_only) return;
  using Kernel = typename KernelOf<Operator>::Type;
  const typename Kernel::Params params(arguments, static_cast<int*>(workspace));
  const dim3 grid = typename Kernel::ThreadblockSwizzle().get_grid_shape(params.grid_tiled_shape);
  const int shared_bytes = int(sizeof(typename Kernel::SharedStorage));
  cudaError_t error = cudaSuccess;
  if (shared_bytes >= (48 << 10)) {
    error = cudaFuncSetAttribute(cutlass::Kernel<Kernel>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  }
  if (error == cudaSuccess) {
    cutlass::Kernel<Kernel><<<grid, dim3(32 * Operator::kWarpCount), shared_bytes, stream>>>(
        params);
    error = cudaGetLastError();
  }
  TORCH_CHECK(error == cudaSuccess, "fused_resnet ", what, ": ", cudaGetErrorString(error));
}

}  // namespace fused_resnet::cutlass_conv

// CUTLASS's mainloop fusions (examples 25 and 26) apply relu(x * scale + bias) to the
// activation operand with f16x2 instructions only. These specializations are the bf16x2
// versions, selected by the element type of the warp fragment. As in CUTLASS, elements that
// the loader filled as out of bounds (zero padding) carry the bit pattern OOB_NAN_F16 and
// become 0, so padding applies after the BN-ReLU; in bf16 that pattern is the finite value
// 0x7eff (about 1.7e38), the one input value this treats as padding.
namespace cutlass::conv::warp {

// Applies `Transform::transform(pair, scale, bias)` to each pair of bf16 activations, with
// the pair's (scale, bias) words at `2 * vector_of(i)` and `2 * vector_of(i) + 1` of the
// scale_bias fragment.
template <typename Transform, int kPairs, typename Activations, typename ScaleBias,
          typename VectorOf>
CUTLASS_DEVICE void transform_bf16_pairs(Activations& activations, ScaleBias const& scale_bias,
                                         VectorOf vector_of) {
  uint32_t* pairs = reinterpret_cast<uint32_t*>(&activations);
  uint32_t const* words = reinterpret_cast<uint32_t const*>(&scale_bias);
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < kPairs; ++i) {
    int const vector = vector_of(i);
    Transform::transform(pairs[i], words[2 * vector], words[2 * vector + 1]);
  }
}

template <int kActivations, typename FragmentScaleBias>
struct FpropScaleBiasReluTransform<Array<bfloat16_t, kActivations>, FragmentScaleBias> {
  // Pairs of activations of two consecutive channels; their (scale, bias) pairs interleave
  // as in the f16 version: scale[c], scale[c+1], bias[c], bias[c+1].
  static int const kPairs = kActivations / 2;
  static int const kMmaColumns = 2;

  CUTLASS_DEVICE
  static void transform(uint32_t& activations, uint32_t scale, uint32_t bias) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile(
        "{\n\t"
        " .reg .pred %%p;\n\t"
        " .reg .b32 t1;\n\t"
        " setp.eq.u32 %%p, %2, %4;\n\t"
        " fma.rn.relu.bf16x2 t1, %1, %2, %3;\n"
        " selp.u32 %0, 0, t1, %%p;\n\t"
        "}\n"
        : "=r"(activations)
        : "r"(scale), "r"(activations), "r"(bias), "n"(cutlass::arch::OOB_NAN_F16x2));
#endif
  }

  CUTLASS_DEVICE
  void operator()(Array<bfloat16_t, kActivations>& activations,
                  FragmentScaleBias const& scale_bias) {
    transform_bf16_pairs<FpropScaleBiasReluTransform, kPairs>(
        activations, scale_bias, [](int i) { return (i / 2) % kMmaColumns; });
  }
};

template <int kActivations, typename FragmentScaleBias>
struct WgradScaleBiasReluTransform<Array<bfloat16_t, kActivations>, FragmentScaleBias> {
  // Here the two elements of a pair may belong to different filter taps (C * R * S can be
  // odd), so each half is checked for the out-of-bounds pattern on its own.
  static int const kPairs = kActivations / 2;
  static int const kMmaRows = 2;

  CUTLASS_DEVICE
  static void transform(uint32_t& activations, uint32_t scale, uint32_t bias) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    uint32_t const low_out = (activations & 0xffffu) == cutlass::arch::OOB_NAN_F16;
    uint32_t const high_out = (activations >> 16) == cutlass::arch::OOB_NAN_F16;
    uint32_t result;
    asm volatile("{\n\t fma.rn.relu.bf16x2 %0, %1, %2, %3;\n}\n"
                 : "=r"(result)
                 : "r"(scale), "r"(activations), "r"(bias));
    if (low_out) result &= 0xffff0000u;
    if (high_out) result &= 0x0000ffffu;
    activations = result;
#endif
  }

  CUTLASS_DEVICE
  void operator()(Array<bfloat16_t, kActivations>& activations,
                  FragmentScaleBias const& scale_bias) {
    transform_bf16_pairs<WgradScaleBiasReluTransform, kPairs>(
        activations, scale_bias, [](int i) { return i / kMmaRows; });
  }
};

}  // namespace cutlass::conv::warp
