// CUDA implementation of fused_resnet::scale_shift_add_relu.
//
// Layout: x, residual and y share one memory format, NCHW-contiguous or channels_last.
// channels_last tensors whose channel count is a multiple of the vector width take the
// vectorized kernel: every thread moves 16 bytes of x, of the residual and of y (8 halfs or
// 4 floats, consecutive channels of one pixel), which is what makes an elementwise pass run
// at copy bandwidth. Every other case takes the scalar grid-stride kernel.
#include "scale_shift_add_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fused_resnet {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

template <typename scalar_t, int kWidth>
struct alignas(sizeof(scalar_t) * kWidth) Vector {
  scalar_t value[kWidth];
};

template <typename scalar_t>
__global__ void scale_shift_add_relu_scalar_kernel(
    const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ scale,
    const at::opmath_type<scalar_t>* __restrict__ shift, const scalar_t* __restrict__ residual,
    ResidualAffine<at::opmath_type<scalar_t>> affine, scalar_t* __restrict__ y, int64_t numel,
    ChannelIndexing layout, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / layout.channel_stride) % layout.channels;
    const acc_t r = residual != nullptr ? static_cast<acc_t>(residual[i]) : acc_t(0);
    y[i] = static_cast<scalar_t>(scale_shift_add_relu_value(
        static_cast<acc_t>(x[i]), scale[c], shift[c], residual != nullptr, r, affine, c, relu));
  }
}

// One thread per kWidth consecutive channels of one pixel (channels % kWidth == 0).
template <typename scalar_t, int kWidth>
__global__ void scale_shift_add_relu_vector_kernel(
    const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ scale,
    const at::opmath_type<scalar_t>* __restrict__ shift, const scalar_t* __restrict__ residual,
    ResidualAffine<at::opmath_type<scalar_t>> affine, scalar_t* __restrict__ y,
    int64_t num_vectors, int64_t channels, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vector<scalar_t, kWidth>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_vectors;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c0 = (i * kWidth) % channels;
    const Vec xv = reinterpret_cast<const Vec*>(x)[i];
    Vec rv;
    if (residual != nullptr) rv = reinterpret_cast<const Vec*>(residual)[i];
    Vec yv;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      const acc_t r = residual != nullptr ? static_cast<acc_t>(rv.value[k]) : acc_t(0);
      yv.value[k] = static_cast<scalar_t>(
          scale_shift_add_relu_value(static_cast<acc_t>(xv.value[k]), scale[c0 + k],
                                     shift[c0 + k], residual != nullptr, r, affine, c0 + k, relu));
    }
    reinterpret_cast<Vec*>(y)[i] = yv;
  }
}

bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

int64_t grid_size(int64_t work_items) {
  // Enough blocks to fill the GPU several times over; the grid-stride loop does the rest.
  const int64_t max_blocks =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(max_blocks, (work_items + kThreads - 1) / kThreads));
}

}  // namespace

at::Tensor scale_shift_add_relu_cuda(const at::Tensor& x, const at::Tensor& scale,
                                     const at::Tensor& shift,
                                     const c10::optional<at::Tensor>& residual,
                                     const c10::optional<at::Tensor>& residual_scale,
                                     const c10::optional<at::Tensor>& residual_shift, bool relu) {
  const ChannelIndexing layout =
      check_scale_shift_add_relu_args(x, scale, shift, residual, residual_scale, residual_shift);
  TORCH_CHECK(x.is_cuda(), "scale_shift_add_relu: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "scale_shift_add_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kWidth = kVectorBytes / sizeof(scalar_t);
    const ChannelVectors<acc_t> vectors(scale, shift, residual_scale, residual_shift);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    const bool vectorizable = layout.channel_stride == 1 && layout.channels % kWidth == 0 &&
                              is_aligned(x_ptr) && is_aligned(y_ptr) &&
                              (r_ptr == nullptr || is_aligned(r_ptr));
    if (vectorizable) {
      const int64_t num_vectors = x.numel() / kWidth;
      scale_shift_add_relu_vector_kernel<scalar_t, kWidth>
          <<<grid_size(num_vectors), kThreads, 0, stream>>>(
              x_ptr, vectors.scale(), vectors.shift(), r_ptr, vectors.residual_affine(), y_ptr,
              num_vectors, layout.channels, relu);
    } else {
      scale_shift_add_relu_scalar_kernel<scalar_t><<<grid_size(x.numel()), kThreads, 0, stream>>>(
          x_ptr, vectors.scale(), vectors.shift(), r_ptr, vectors.residual_affine(), y_ptr,
          x.numel(), layout, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace fused_resnet

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("scale_shift_add_relu", &fused_resnet::scale_shift_add_relu_cuda);
}
