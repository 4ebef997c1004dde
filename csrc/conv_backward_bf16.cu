// conv_dgrad and conv_wgrad for bfloat16_t tensors (see conv_backward.cuh).
#include "conv_backward.cuh"

namespace fused_resnet {

void conv_dgrad_bf16(const DgradLaunch& launch, cudaStream_t stream) {
  cutlass_conv::conv_dgrad<cutlass::bfloat16_t>(launch, stream);
}

void conv_wgrad_bf16(const WgradLaunch& launch, cudaStream_t stream) {
  cutlass_conv::conv_wgrad<cutlass::bfloat16_t>(launch, stream);
}

}  // namespace fused_resnet
