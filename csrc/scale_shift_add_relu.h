// fused_resnet::scale_shift_add_relu:
//   y = [relu](x * scale[c] + shift[c] [+ residual [* residual_scale[c] + residual_shift[c]]]).
//
// The BN-apply + residual add + ReLU pass of a post-activation block (the residual's affine
// map is a projection shortcut's BN) in one read of x (and of the residual) and one write of
// y, instead of up to five elementwise kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

namespace fused_resnet {

// Where the channel of flat element i lives: c = (i / channel_stride) % channels.
// channels_last (NHWC) tensors have channel_stride 1, contiguous NCHW tensors H * W.
struct ChannelIndexing {
  int64_t channels;
  int64_t channel_stride;
};

// The residual's per-channel affine map (a projection shortcut's BN); null: identity.
template <typename acc_t>
struct ResidualAffine {
  const acc_t* scale;
  const acc_t* shift;
};

// One output element, shared by the CPU loop and the CUDA kernels. `v < 0` rather than
// max(v, 0): NaN stays NaN, as torch.relu.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t scale_shift_add_relu_value(acc_t x, acc_t scale, acc_t shift,
                                                        bool has_residual, acc_t residual,
                                                        ResidualAffine<acc_t> affine, int64_t c,
                                                        bool relu) {
  acc_t v = x * scale + shift;
  if (has_residual) {
    v += affine.scale != nullptr ? residual * affine.scale[c] + affine.shift[c] : residual;
  }
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

// The per-channel vectors of one call, converted to acc_t and kept alive for the kernel.
template <typename acc_t>
class ChannelVectors {
 public:
  ChannelVectors(const at::Tensor& scale, const at::Tensor& shift,
                 const c10::optional<at::Tensor>& residual_scale,
                 const c10::optional<at::Tensor>& residual_shift)
      : scale_(converted(scale)),
        shift_(converted(shift)),
        residual_scale_(residual_scale.has_value() ? converted(*residual_scale) : at::Tensor()),
        residual_shift_(residual_shift.has_value() ? converted(*residual_shift) : at::Tensor()) {}

  const acc_t* scale() const { return scale_.const_data_ptr<acc_t>(); }
  const acc_t* shift() const { return shift_.const_data_ptr<acc_t>(); }
  ResidualAffine<acc_t> residual_affine() const {
    if (!residual_scale_.defined()) return {nullptr, nullptr};
    return {residual_scale_.const_data_ptr<acc_t>(), residual_shift_.const_data_ptr<acc_t>()};
  }

 private:
  static at::Tensor converted(const at::Tensor& v) {
    return v.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  }

  at::Tensor scale_, shift_, residual_scale_, residual_shift_;
};

// Checks the arguments (TORCH_CHECK naming the argument) and returns how channels are laid
// out in memory. Shared by the CPU and CUDA implementations.
ChannelIndexing check_scale_shift_add_relu_args(const at::Tensor& x, const at::Tensor& scale,
                                                const at::Tensor& shift,
                                                const c10::optional<at::Tensor>& residual,
                                                const c10::optional<at::Tensor>& residual_scale,
                                                const c10::optional<at::Tensor>& residual_shift);

at::Tensor scale_shift_add_relu_cpu(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& shift,
                                    const c10::optional<at::Tensor>& residual,
                                    const c10::optional<at::Tensor>& residual_scale,
                                    const c10::optional<at::Tensor>& residual_shift,
                                    bool relu);

at::Tensor scale_shift_add_relu_cuda(const at::Tensor& x, const at::Tensor& scale,
                                     const at::Tensor& shift,
                                     const c10::optional<at::Tensor>& residual,
                                     const c10::optional<at::Tensor>& residual_scale,
                                     const c10::optional<at::Tensor>& residual_shift,
                                     bool relu);

}  // namespace fused_resnet
