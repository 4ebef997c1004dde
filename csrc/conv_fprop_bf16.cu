// conv_fprop for bfloat16_t tensors (see conv_fprop.cuh).
#include "conv_fprop.cuh"

namespace fused_resnet {

void conv_fprop_bf16(const FpropLaunch& launch, cudaStream_t stream) {
  cutlass_conv::conv_fprop<cutlass::bfloat16_t>(launch, stream);
}

}  // namespace fused_resnet
