// conv_dgrad and conv_wgrad for half_t tensors (see conv_backward.cuh).
#include "conv_backward.cuh"

namespace fused_resnet {

void conv_dgrad_f16(const DgradLaunch& launch, cudaStream_t stream) {
  cutlass_conv::conv_dgrad<cutlass::half_t>(launch, stream);
}

void conv_wgrad_f16(const WgradLaunch& launch, cudaStream_t stream) {
  cutlass_conv::conv_wgrad<cutlass::half_t>(launch, stream);
}

}  // namespace fused_resnet
