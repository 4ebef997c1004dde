// Argument checks and the CPU implementation of fused_resnet::scale_shift_add_relu.
#include "scale_shift_add_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

namespace fused_resnet {

ChannelIndexing check_scale_shift_add_relu_args(const at::Tensor& x, const at::Tensor& scale,
                                                const at::Tensor& shift,
                                                const c10::optional<at::Tensor>& residual,
                                                const c10::optional<at::Tensor>& residual_scale,
                                                const c10::optional<at::Tensor>& residual_shift) {
  TORCH_CHECK(x.dim() == 4, "scale_shift_add_relu: x must be 4-D (N, C, H, W), got ", x.dim(),
              "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "scale_shift_add_relu: x must be a floating tensor, got ", x.scalar_type());
  const int64_t channels = x.size(1);
  TORCH_CHECK(residual_scale.has_value() == residual_shift.has_value(),
              "scale_shift_add_relu: residual_scale and residual_shift go together");
  TORCH_CHECK(!residual_scale.has_value() || residual.has_value(),
              "scale_shift_add_relu: residual_scale and residual_shift need a residual");
  std::vector<std::pair<const char*, const at::Tensor*>> vectors{{"scale", &scale},
                                                                 {"shift", &shift}};
  if (residual_scale.has_value()) {
    vectors.push_back({"residual_scale", &*residual_scale});
    vectors.push_back({"residual_shift", &*residual_shift});
  }
  for (const auto& [name, vector] : vectors) {
    const at::Tensor& v = *vector;
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
                               ResidualAffine<at::opmath_type<scalar_t>> affine, scalar_t* y,
                               int64_t numel, ChannelIndexing layout, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = (i / layout.channel_stride) % layout.channels;
      const acc_t r = residual != nullptr ? static_cast<acc_t>(residual[i]) : acc_t(0);
      y[i] = static_cast<scalar_t>(scale_shift_add_relu_value(
          static_cast<acc_t>(x[i]), scale[c], shift[c], residual != nullptr, r, affine, c, relu));
    }
  });
}

}  // namespace

at::Tensor scale_shift_add_relu_cpu(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& shift,
                                    const c10::optional<at::Tensor>& residual,
                                    const c10::optional<at::Tensor>& residual_scale,
                                    const c10::optional<at::Tensor>& residual_shift, bool relu) {
  const ChannelIndexing layout =
      check_scale_shift_add_relu_args(x, scale, shift, residual, residual_scale, residual_shift);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "scale_shift_add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelVectors<acc_t> vectors(scale, shift, residual_scale, residual_shift);
    scale_shift_add_relu_loop<scalar_t>(
        x.const_data_ptr<scalar_t>(), vectors.scale(), vectors.shift(),
        residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
        vectors.residual_affine(), y.mutable_data_ptr<scalar_t>(), x.numel(), layout, relu);
  });
  return y;
}

}  // namespace fused_resnet
