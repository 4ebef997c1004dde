// conv_fprop for half_t tensors (see conv_fprop.cuh).
#include "conv_fprop.cuh"

namespace fused_resnet {

void conv_fprop_f16(const FpropLaunch& launch, cudaStream_t stream) {
  cutlass_conv::conv_fprop<cutlass::half_t>(launch, stream);
}

}  // namespace fused_resnet
