// What the CUTLASS convolution kernels of fused_resnet share: tile shapes, tensor refs built
// from ConvProblem, the launch with its error checks, and the bf16 versions of CUTLASS's
// scale+bias+ReLU operand transforms.
//
// Every kernel is an Ampere-style (sm_80) implicit GEMM on 16x8x16 tensor-core MMAs with
// fp32 accumulation; compiled for sm_80 and sm_90 (the sm_80 kernels run on Hopper too).
// Tensors are NHWC (channels_last), filters KRSC (a [K, C, R, S] weight in channels_last).
#pragma once

#include <cutlass/conv/conv2d_problem_size.h>
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

using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = 4;
using Nhwc = cutlass::layout::TensorNHWC;

inline cutlass::conv::Conv2dProblemSize problem_size(const ConvProblem& p) {
  return {p.n, p.h, p.w, p.c, p.k, p.r, p.s, p.p, p.q, p.r / 2, p.s / 2, p.stride, p.stride,
          1, 1, cutlass::conv::Mode::kCrossCorrelation};
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

// Checks that CUTLASS takes the problem, then runs it on `stream`. `what` names the kernel in
// the error. No workspace: every kernel here runs without split-K.
template <typename Operator>
void launch_operator(const typename Operator::Arguments& arguments, cudaStream_t stream,
            const char* what) {
  Operator op;
  cutlass::Status status = op.can_implement(arguments);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet ", what,
              ": CUTLASS cannot run this problem (", cutlassGetStatusString(status), ")");
  TORCH_CHECK(op.get_workspace_size(arguments) == 0, "fused_resnet ", what,
              ": unexpected CUTLASS workspace request");
  status = op.initialize(arguments, nullptr, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet ", what,
              ": CUTLASS initialization failed (", cutlassGetStatusString(status), ")");
  status = op.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet ", what,
              ": CUTLASS launch failed (", cutlassGetStatusString(status), ")");
  const cudaError_t error = cudaGetLastError();
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
