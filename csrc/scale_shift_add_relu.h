// fused_resnet::scale_shift_add_relu: y = [relu](x * scale[c] + shift[c] [+ residual]).
//
// The BN-apply + residual add + ReLU pass of a post-activation block in one read of x
// (and of the residual) and one write of y, instead of three elementwise kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fused_resnet {

// Where the channel of flat element i lives: c = (i / channel_stride) % channels.
// channels_last (NHWC) tensors have channel_stride 1, contiguous NCHW tensors H * W.
struct ChannelIndexing {
  int64_t channels;
  int64_t channel_stride;
};

// Checks the arguments (TORCH_CHECK naming the argument) and returns how channels are laid
// out in memory. Shared by the CPU and CUDA implementations.
ChannelIndexing check_scale_shift_add_relu_args(const at::Tensor& x, const at::Tensor& scale,
                                                const at::Tensor& shift,
                                                const c10::optional<at::Tensor>& residual);

at::Tensor scale_shift_add_relu_cpu(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& shift,
                                    const c10::optional<at::Tensor>& residual, bool relu);

at::Tensor scale_shift_add_relu_cuda(const at::Tensor& x, const at::Tensor& scale,
                                     const at::Tensor& shift,
                                     const c10::optional<at::Tensor>& residual, bool relu);

}  // namespace fused_resnet
