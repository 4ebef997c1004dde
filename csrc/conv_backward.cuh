// The convolution's backward kernels (DgradLaunch and WgradLaunch in conv_kernels.h),
// instantiated per element type by conv_backward_{f16,bf16}.cu.
//
//  * dgrad: DefaultConv2dDgrad, the unit-stride kernel for stride 1 and CUTLASS's strided
//    dgrad (one pass per filter phase, zeros where no tap lands) for stride 2; output in the
//    element type, as cuDNN's. The ReLU mask and the BN-backward reductions of a prologue
//    follow in one pass (channel_kernels.cu).
//  * wgrad: fp32 output. With a prologue, DefaultConv2dWgradFusion (CUTLASS example 26)
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

#include "cutlass_conv.cuh"

namespace fused_resnet::cutlass_conv {

template <typename Element>
struct BackwardKernels {
  static int const kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using DgradEpilogue =
      cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>;
  using WgradEpilogue = cutlass::epilogue::thread::LinearCombination<float, 4, float, float>;

  template <cutlass::conv::StrideSupport kStrideSupport, typename Swizzle>
  using Dgrad = cutlass::conv::device::ImplicitGemmConvolution<
      typename cutlass::conv::kernel::DefaultConv2dDgrad<
          Element, Nhwc, Element, Nhwc, Element, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, DgradEpilogue,
          Swizzle, kStages, cutlass::arch::OpMultiplyAdd,
          cutlass::conv::IteratorAlgorithm::kOptimized, kStrideSupport>::Kernel>;
  using UnitStrideDgrad = Dgrad<cutlass::conv::StrideSupport::kUnity,
                                cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>>;
  using StridedDgrad = Dgrad<cutlass::conv::StrideSupport::kStrided,
                             cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>>;

  using Wgrad = cutlass::conv::device::ImplicitGemmConvolution<
      typename cutlass::conv::kernel::DefaultConv2dWgrad<
          Element, Nhwc, Element, Nhwc, float, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, WgradEpilogue,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages,
          cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;

  using PrologueWgrad = cutlass::conv::device::ImplicitGemmConvolutionFusion<
      typename cutlass::conv::kernel::DefaultConv2dWgradFusion<
          Element, Nhwc, Element, Nhwc, Element, cutlass::layout::RowMajor, float, Nhwc, float,
          cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
          InstructionShape, WgradEpilogue,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages,
          cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;
};

template <typename Operator, typename Element>
void run_dgrad(const DgradLaunch& launch, cudaStream_t stream, const char* what) {
  const ConvProblem& p = launch.problem;
  const auto grad_input = activation<Element>(p, launch.grad_input);
  typename Operator::Arguments arguments{problem_size(p),
                                         output<Element>(p, launch.grad_output),
                                         filter<Element>(p, launch.weight),
                                         grad_input,
                                         grad_input,
                                         {1.f, 0.f}};
  launch_operator<Operator>(arguments, stream, what);
}

template <typename Element>
void conv_dgrad(const DgradLaunch& launch, cudaStream_t stream) {
  using Kernels = BackwardKernels<Element>;
  if (launch.problem.stride == 1) {
    run_dgrad<typename Kernels::UnitStrideDgrad, Element>(launch, stream, "conv_dgrad");
  } else {
    run_dgrad<typename Kernels::StridedDgrad, Element>(launch, stream, "conv_dgrad (strided)");
  }
}

template <typename Element>
void conv_wgrad(const WgradLaunch& launch, cudaStream_t stream) {
  using Kernels = BackwardKernels<Element>;
  const ConvProblem& p = launch.problem;
  const auto size = problem_size(p);
  const auto grad_output = output<Element>(p, launch.grad_output);
  const auto x = activation<Element>(p, launch.x);
  const auto grad_weight = filter<float>(p, launch.grad_weight);
  if (launch.in_scale != nullptr) {
    typename Kernels::PrologueWgrad::Arguments arguments{
        size,
        grad_output,
        x,
        channel_vector<Element>(launch.in_scale, p.c),
        channel_vector<Element>(launch.in_shift, p.c),
        grad_weight,
        grad_weight,
        {1.f, 0.f}};
    launch_operator<typename Kernels::PrologueWgrad>(arguments, stream,
                                                     "conv_wgrad (BN-ReLU prologue)");
  } else {
    typename Kernels::Wgrad::Arguments arguments{size, grad_output, x, grad_weight, grad_weight,
                                                 {1.f, 0.f}};
    launch_operator<typename Kernels::Wgrad>(arguments, stream, "conv_wgrad");
  }
}

}  // namespace fused_resnet::cutlass_conv
