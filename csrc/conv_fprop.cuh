// The fused forward convolution (FpropLaunch in conv_kernels.h), instantiated per element
// type by conv_fprop_{f16,bf16}.cu.
//
// Three CUTLASS kernels:
//  * with a prologue: DefaultConv2dFpropFusion (CUTLASS example 25), BN-ReLU applied to the
//    activation tile in registers between the shared-memory load and the MMA; epilogue
//    y = acc [+ residual] (beta 0 or 1), with the batch statistics of y when asked
//    (epilogue_reductions.cuh, OutputStatistics);
//  * without a prologue, with statistics: DefaultConv2dFprop, y = acc and its statistics;
//  * without either: DefaultConv2dFpropWithBroadcast, whose epilogue gets a per-output-channel
//    vector: y = act(acc + bias[k] [+ residual]) (BiasResidualRelu below), which is what an
//    inference-mode conv + BN (scale folded into the weight) + shortcut + ReLU needs.
#pragma once

// The kernel headers define what the device-level wrappers use: they come first.
#include <cutlass/conv/kernel/default_conv2d_fprop.h>
#include <cutlass/conv/kernel/default_conv2d_fprop_fusion.h>
#include <cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/device/implicit_gemm_convolution_fusion.h>

#include "epilogue_reductions.cuh"
#include "cutlass_conv.cuh"

namespace fused_resnet::cutlass_conv {

// Epilogue operator of EpilogueWithBroadcast: z = [relu](acc + bias [+ residual]), in fp32,
// rounded once to the output type. The source operand (C) is the residual.
template <typename Element, int kCount_>
class BiasResidualRelu {
 public:
  static bool const kIsSingleSource = true;
  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;  // no second output tensor
  static int const kCount = kCount_;
  static int const kElementsPerAccess = kCount;

  using ElementOutput = Element;
  using ElementC = Element;
  using ElementZ = Element;
  using ElementT = Element;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementVector = float;
  using FragmentAccumulator = cutlass::Array<float, kCount>;
  using FragmentCompute = cutlass::Array<float, kCount>;
  using FragmentC = cutlass::Array<Element, kCount>;
  using FragmentOutput = cutlass::Array<Element, kCount>;
  using FragmentZ = FragmentOutput;
  using FragmentT = FragmentOutput;

  struct Params {
    bool residual = false;
    bool relu = false;
  };

  CUTLASS_HOST_DEVICE explicit BiasResidualRelu(Params const& params) : params_(params) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return params_.residual; }

  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}  // split-K is never used

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT&, FragmentAccumulator const& acc,
                                      FragmentC const& residual,
                                      FragmentCompute const& bias) const {
    FragmentCompute value;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) value[i] = acc[i] + bias[i] + float(residual[i]);
    store(z, value);
  }

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT&, FragmentAccumulator const& acc,
                                      FragmentCompute const& bias) const {
    FragmentCompute value;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) value[i] = acc[i] + bias[i];
    store(z, value);
  }

 private:
  CUTLASS_HOST_DEVICE void store(FragmentZ& z, FragmentCompute const& value) const {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      // `v < 0` rather than fmaxf: NaN stays NaN, as torch.relu.
      float const v = (params_.relu && value[i] < 0.f) ? 0.f : value[i];
      z[i] = Element(v);
    }
  }

  Params params_;
};

template <typename Element, typename Tile>
struct FpropKernels {
  static int const kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using OutputOp = LinearCombinationGathering<Element, kAlignment, OutputStatistics>;

  using Prologue = cutlass::conv::device::ImplicitGemmConvolutionFusion<
      typename WithGatheringEpilogue<typename cutlass::conv::kernel::DefaultConv2dFpropFusion<
          Element, Nhwc, Element, Nhwc, Element, cutlass::layout::RowMajor, Element, Nhwc,
          float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
          typename Tile::Threadblock, typename Tile::Warp, InstructionShape, OutputOp,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
          cutlass::arch::OpMultiplyAdd,
          cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>::Kernel>;

  using Statistics = cutlass::conv::device::ImplicitGemmConvolution<
      typename WithGatheringEpilogue<typename cutlass::conv::kernel::DefaultConv2dFprop<
          Element, Nhwc, Element, Nhwc, Element, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, typename Tile::Threadblock, typename Tile::Warp,
          InstructionShape, OutputOp,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
          cutlass::arch::OpMultiplyAdd,
          cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>::Kernel>;

  using Broadcast = cutlass::conv::device::ImplicitGemmConvolution<
      typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
          Element, Nhwc, Element, Nhwc, Element, Nhwc, float, cutlass::arch::OpClassTensorOp,
          cutlass::arch::Sm80, typename Tile::Threadblock, typename Tile::Warp,
          InstructionShape, BiasResidualRelu<Element, kAlignment>,
          cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
          cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;
};

template <typename Element, typename Tile>
void conv_fprop_tiled(const FpropLaunch& launch, cudaStream_t stream) {
  using Kernels = FpropKernels<Element, Tile>;
  const ConvProblem& p = launch.problem;
  const auto size = problem_size(p);
  const auto y = output<Element>(p, launch.y);
  // Without a residual the source operand is never read; it still needs a valid ref.
  const auto residual = output<Element>(p, launch.residual ? launch.residual : launch.y);
  const typename Kernels::OutputOp::Params output_op{
      1.f, launch.residual ? 1.f : 0.f, {static_cast<Welford*>(launch.statistics)}};
  TORCH_CHECK(!(launch.statistics && launch.residual),
              "fused_resnet conv_fprop: statistics are of the conv output, without a residual");
  if (launch.in_scale != nullptr) {
    TORCH_CHECK(launch.bias == nullptr && !launch.relu,
                "fused_resnet conv_fprop: a conv with a prologue takes no bias or ReLU");
    check_plan<typename Kernels::Prologue>(p, launch.plan, "conv_fprop (BN-ReLU prologue)");
    typename Kernels::Prologue::Arguments arguments{
        size,
        activation<Element>(p, launch.x),
        filter<Element>(p, launch.weight),
        channel_vector<Element>(launch.in_scale, p.c),
        channel_vector<Element>(launch.in_shift, p.c),
        residual,
        y,
        output_op};
    launch_operator<typename Kernels::Prologue>(arguments, stream, launch.check_only,
                                                "conv_fprop (BN-ReLU prologue)");
  } else if (launch.statistics != nullptr) {
    TORCH_CHECK(launch.bias == nullptr && !launch.relu,
                "fused_resnet conv_fprop: statistics are of the conv output, without an "
                "epilogue");
    check_plan<typename Kernels::Statistics>(p, launch.plan, "conv_fprop (statistics)");
    typename Kernels::Statistics::Arguments arguments{
        size, activation<Element>(p, launch.x), filter<Element>(p, launch.weight), y, y,
        output_op};
    launch_operator<typename Kernels::Statistics>(arguments, stream, launch.check_only,
                                                  "conv_fprop (statistics)");
  } else {
    check_plan<typename Kernels::Broadcast>(p, launch.plan, "conv_fprop");
    typename Kernels::Broadcast::Arguments arguments{
        size,
        activation<Element>(p, launch.x),
        filter<Element>(p, launch.weight),
        residual,
        y,
        {launch.residual != nullptr, launch.relu},
        cutlass::conv::SplitKMode::kSerial,
        const_cast<float*>(launch.bias),
        nullptr};
    launch_operator<typename Kernels::Broadcast>(arguments, stream, launch.check_only,
                                                 "conv_fprop");
  }
}

template <typename Element>
void conv_fprop(const FpropLaunch& launch, cudaStream_t stream) {
  with_tile_of(launch.plan, [&](auto tile) {
    conv_fprop_tiled<Element, decltype(tile)>(launch, stream);
  });
}

}  // namespace fused_resnet::cutlass_conv
