// The convolution's backward kernels (DgradLaunch and WgradLaunch in conv_kernels.h),
// instantiated per element type by conv_backward_{f16,bf16}.cu.
//
//  * dgrad: DefaultConv2dDgrad, the unit-stride kernel for stride 1 and CUTLASS's strided
//    dgrad (one pass per filter phase, zeros where no tap lands) for stride 2; output in the
//    element type, as cuDNN's, with another gradient of the input added in the epilogue
//    (LinearCombination, beta 1) when given. Through a BN-ReLU prologue at stride 1, the
//    prologue's backward (ReLU mask, scale, the scale/shift gradients' per-channel sums) is
//    applied in the epilogue (PrologueDgrad); at stride 2 it follows in one pass
//    (channel_kernels.cu).
//  * wgrad: parallel split-K. The pixel sum is cut into the slices conv_launch_plan chooses
//    (so that a first-stage layer's few output tiles still fill the GPU); each slice writes
//    fp32 partials, and ReduceSplitK adds them in slice order (deterministic) and rounds once
//    to the weight's type. With a prologue, DefaultConv2dWgradFusion (CUTLASS example 26)
//    recomputes relu(x * scale + shift) on the activation operand in the mainloop, so the
//    normalized activation is never stored.
#pragma once

// The kernel headers define what the device-level wrappers use: they come first.
#include <cutlass/conv/kernel/default_conv2d_dgrad.h>
#include <cutlass/conv/kernel/default_conv2d_wgrad.h>
#include <cutlass/conv/kernel/default_conv2d_wgrad_fusion.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/device/implicit_gemm_convolution_fusion.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/reduction/device/reduce_split_k.h>
#include <cutlass/reduction/kernel/reduce_split_k.h>
#include <cutlass/reduction/thread/reduction_operators.h>

#include "cutlass_conv.cuh"
#include "epilogue_reductions.cuh"

namespace fused_resnet::cutlass_conv {

template <typename Element, typename Tile>
struct BackwardKernels {
  static int const kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using DgradEpilogue =
      cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>;
  using WgradEpilogue = cutlass::epilogue::thread::LinearCombination<float, 4, float, float>;

  template <cutlass::conv::StrideSupport kStrideSupport, typename Swizzle>
  using Dgrad = cutlass::conv::device::ImplicitGemmConvolution<
      typename cutlass::conv::kernel::DefaultConv2dDgrad<
          Element, Nhwc, Element, Nhwc, Element, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, typename Tile::Threadblock, typename Tile::Warp,
          InstructionShape, DgradEpilogue, Swizzle, Tile::kStages, cutlass::arch::OpMultiplyAdd,
          cutlass::conv::IteratorAlgorithm::kOptimized, kStrideSupport>::Kernel>;
  using UnitStrideDgrad = Dgrad<cutlass::conv::StrideSupport::kUnity,
                                cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>>;

  // The unit-stride dgrad of a conv with a BN-ReLU prologue: its epilogue applies the
  // prologue's backward to what it stores and sums the shift and scale gradients per channel
  // (epilogue_reductions.cuh, PrologueBackward).
  using PrologueDgradOp =
      LinearCombinationGathering<Element, kAlignment, PrologueBackward<Element>>;
  using PrologueDgrad = cutlass::conv::device::ImplicitGemmConvolution<
      typename WithGatheringEpilogue<typename cutlass::conv::kernel::DefaultConv2dDgrad<
          Element, Nhwc, Element, Nhwc, Element, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, typename Tile::Threadblock, typename Tile::PrologueWarp,
          InstructionShape, PrologueDgradOp,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
          cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
          cutlass::conv::StrideSupport::kUnity>::Kernel>::Kernel>;
  using StridedDgrad = Dgrad<cutlass::conv::StrideSupport::kStrided,
                             cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>>;

  using Wgrad = cutlass::conv::device::ImplicitGemmConvolution<
      typename cutlass::conv::kernel::DefaultConv2dWgrad<
          Element, Nhwc, Element, Nhwc, float, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, typename Tile::Threadblock, typename Tile::Warp,
          InstructionShape, WgradEpilogue,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
          cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;

  using PrologueWgrad = cutlass::conv::device::ImplicitGemmConvolutionFusion<
      typename cutlass::conv::kernel::DefaultConv2dWgradFusion<
          Element, Nhwc, Element, Nhwc, Element, cutlass::layout::RowMajor, float, Nhwc, float,
          cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Tile::Threadblock,
          typename Tile::PrologueWarp, InstructionShape, WgradEpilogue,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
          cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;

  // Sums wgrad's fp32 slices (rows of R*S*C, one per output channel) into the weight type.
  using SplitKReduction = cutlass::reduction::device::ReduceSplitK<
      cutlass::reduction::kernel::ReduceSplitK<
          cutlass::MatrixShape<4, 32 * kAlignment>,
          cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>,
          cutlass::reduction::thread::ReduceAdd<float, float, kAlignment>>>;
};

template <typename Operator, typename Element>
void run_dgrad(const DgradLaunch& launch, cudaStream_t stream, const char* what) {
  const ConvProblem& p = launch.problem;
  check_plan<Operator>(p, launch.plan, what);
  const auto grad_input = activation<Element>(p, launch.grad_input);
  // `other` is the epilogue's source: grad_input = dgrad + 1 * other.
  const auto other = activation<Element>(p, launch.other ? launch.other : launch.grad_input);
  typename Operator::Arguments arguments{problem_size(p),
                                         output<Element>(p, launch.grad_output),
                                         filter<Element>(p, launch.weight),
                                         other,
                                         grad_input,
                                         {1.f, launch.other ? 1.f : 0.f}};
  launch_operator<Operator>(arguments, stream, launch.check_only, what);
}

template <typename Element, typename Tile>
void conv_dgrad_tiled(const DgradLaunch& launch, cudaStream_t stream) {
  using Kernels = BackwardKernels<Element, Tile>;
  if (launch.in_scale != nullptr) {
    using Operator = typename Kernels::PrologueDgrad;
    const ConvProblem& p = launch.problem;
    TORCH_CHECK(p.stride == 1 && launch.other == nullptr && launch.sums != nullptr,
                "fused_resnet conv_dgrad (BN-ReLU prologue): stride 1, no other gradient and "
                "a sums buffer expected");
    check_plan<Operator>(p, launch.plan, "conv_dgrad (BN-ReLU prologue)");
    const auto grad_input = activation<Element>(p, launch.grad_input);
    typename Operator::Arguments arguments{
        problem_size(p),
        output<Element>(p, launch.grad_output),
        filter<Element>(p, launch.weight),
        grad_input,
        grad_input,
        {1.f, 0.f,
         {static_cast<const Element*>(launch.prologue_x), launch.in_scale, launch.in_shift,
          static_cast<Sums*>(launch.sums)}}};
    launch_operator<Operator>(arguments, stream, launch.check_only,
                              "conv_dgrad (BN-ReLU prologue)");
  } else if (launch.problem.stride == 1) {
    run_dgrad<typename Kernels::UnitStrideDgrad, Element>(launch, stream, "conv_dgrad");
  } else {
    run_dgrad<typename Kernels::StridedDgrad, Element>(launch, stream, "conv_dgrad (strided)");
  }
}

template <typename Element, typename Tile>
void conv_wgrad_tiled(const WgradLaunch& launch, cudaStream_t stream) {
  using Kernels = BackwardKernels<Element, Tile>;
  const ConvProblem& p = launch.problem;
  const int split_k = launch.plan.split_k;
  const auto size = problem_size(p, split_k);
  const auto grad_output = output<Element>(p, launch.grad_output);
  const auto x = activation<Element>(p, launch.x);
  // Slice k of the partial sums starts at workspace + k * K*R*S*C (CUTLASS's parallel mode).
  const auto partials = filter<float>(p, launch.workspace);
  const size_t partials_bytes = sizeof(float) * split_k * size_t(p.k) * p.r * p.s * p.c;
  constexpr auto kParallel = cutlass::conv::SplitKMode::kParallel;
  // In parallel mode CUTLASS asks for a workspace of the partials' size, also for one slice;
  // the partials buffer is it, and the kernel overwrites it whole (launch_split_k_operator).
  if (launch.in_scale != nullptr) {
    check_plan<typename Kernels::PrologueWgrad>(p, launch.plan, "conv_wgrad (BN-ReLU prologue)");
    typename Kernels::PrologueWgrad::Arguments arguments{
        size,
        grad_output,
        x,
        channel_vector<Element>(launch.in_scale, p.c),
        channel_vector<Element>(launch.in_shift, p.c),
        partials,
        partials,
        {1.f, 0.f},
        kParallel};
    launch_split_k_operator<typename Kernels::PrologueWgrad>(
        arguments, stream, launch.check_only, "conv_wgrad (BN-ReLU prologue)",
        launch.workspace, partials_bytes);
  } else {
    check_plan<typename Kernels::Wgrad>(p, launch.plan, "conv_wgrad");
    typename Kernels::Wgrad::Arguments arguments{size,     grad_output, x,        partials,
                                                 partials, {1.f, 0.f},  kParallel};
    launch_split_k_operator<typename Kernels::Wgrad>(arguments, stream, launch.check_only,
                                                     "conv_wgrad", launch.workspace,
                                                     partials_bytes);
  }
  using Reduction = typename Kernels::SplitKReduction;
  const int row = p.r * p.s * p.c;
  typename Reduction::Arguments reduction{
      {p.k, row},
      split_k,
      static_cast<size_t>(p.k) * row,
      {launch.workspace, row},
      {static_cast<Element*>(launch.grad_weight), row},
      {static_cast<Element*>(launch.grad_weight), row},
      {1.f, 0.f}};
  launch_operator<Reduction>(reduction, stream, launch.check_only,
                            "conv_wgrad (split-K reduction)");
}

template <typename Element>
void conv_dgrad(const DgradLaunch& launch, cudaStream_t stream) {
  with_tile_of(launch.plan, [&](auto tile) {
    conv_dgrad_tiled<Element, decltype(tile)>(launch, stream);
  });
}

template <typename Element>
void conv_wgrad(const WgradLaunch& launch, cudaStream_t stream) {
  with_tile_of(launch.plan, [&](auto tile) {
    conv_wgrad_tiled<Element, decltype(tile)>(launch, stream);
  });
}

}  // namespace fused_resnet::cutlass_conv
