// Argument checks and the CPU implementation of fused_resnet::scale_shift_add_relu.
#include "scale_shift_add_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace fused_resnet {

ChannelIndexing check_scale_shift_add_relu_args(const at::Tensor& x, const at::Tensor& scale,
                                                const at::Tensor& shift,
                                                const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "scale_shift_add_relu: x must be 4-D (N, C, H, W), got ", x.dim(),
              "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "scale_shift_add_relu: x must be a floating tensor, got ", x.scalar_type());
  const int64_t channels = x.size(1);
  for (const auto& [name, v] : {std::pair<const char*, const at::Tensor&>{"scale", scale},
                                {"shift", shift}}) {
    TORCH_CHECK(v.dim() == 1 && v.numel() == channels, "scale_shift_add_relu: ", name,
                " must be 1-D with x.size(1) = ", channels, " elements, got shape ", v.sizes());
    TORCH_CHECK(v.device() == x.device(), "scale_shift_add_relu: ", name, " is on ", v.device(),
                ", expected x's device ", x.device());
    TORCH_CHECK(at::isFloatingType(v.scalar_type()), "scale_shift_add_relu: ", name,
                " must be floating, got ", v.scalar_type());
  }
  const bool nchw = x.is_contiguous();
  TORCH_CHECK(nchw || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "scale_shift_add_relu: x must be contiguous in NCHW or channels_last memory "
              "format, got strides ",
              x.strides());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == x.sizes(), "scale_shift_add_relu: residual has shape ", r.sizes(),
                ", expected x's shape ", x.sizes());
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), "scale_shift_add_relu: residual has dtype ",
                r.scalar_type(), ", expected x's dtype ", x.scalar_type());
    TORCH_CHECK(r.device() == x.device(), "scale_shift_add_relu: residual is on ", r.device(),
                ", expected x's device ", x.device());
    TORCH_CHECK(r.strides() == x.strides(), "scale_shift_add_relu: residual has strides ",
                r.strides(), ", expected the same memory format as x (strides ", x.strides(),
                ")");
  }
  return {channels, nchw ? x.size(2) * x.size(3) : 1};
}

namespace {

template <typename scalar_t>
void scale_shift_add_relu_loop(const scalar_t* x, const at::opmath_type<scalar_t>* scale,
                               const at::opmath_type<scalar_t>* shift, const scalar_t* residual,
                               scalar_t* y, int64_t numel, ChannelIndexing layout, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = (i / layout.channel_stride) % layout.channels;
      acc_t v = static_cast<acc_t>(x[i]) * scale[c] + shift[c];
      if (residual != nullptr) v += static_cast<acc_t>(residual[i]);
      // `v < 0` rather than max(v, 0): NaN stays NaN, as torch.relu.
      if (relu && v < acc_t(0)) v = acc_t(0);
      y[i] = static_cast<scalar_t>(v);
    }
  });
}

}  // namespace

at::Tensor scale_shift_add_relu_cpu(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& shift,
                                    const c10::optional<at::Tensor>& residual, bool relu) {
  const ChannelIndexing layout = check_scale_shift_add_relu_args(x, scale, shift, residual);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "scale_shift_add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor scale_acc = scale.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor shift_acc = shift.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    scale_shift_add_relu_loop<scalar_t>(
        x.const_data_ptr<scalar_t>(), scale_acc.const_data_ptr<acc_t>(),
        shift_acc.const_data_ptr<acc_t>(),
        residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), x.numel(), layout, relu);
  });
  return y;
}

}  // namespace fused_resnet
