// Op schemas of the fused_resnet namespace and the Python module fused_resnet._C.
//
// The CUDA kernels register in their own files; the CPU kernels of the cuda_* ops, of
// affine_relu_backward, add_relu_backward, (bn_)statistics_backward and of the bn_* ops are
// their plain-PyTorch references, registered from Python (fused_resnet/cuda_ops.py) so the
// ops can be checked without a GPU.
//
// Importing fused_resnet._C runs the static TORCH_LIBRARY registrations below; the module
// itself exports nothing, everything is reached through torch.ops.fused_resnet.
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "scale_shift_add_relu.h"

// FUSED_RESNET_CPU_ONLY: the schemas and the CPU kernel alone, without the CUDA code's host
// ops (the mutation check's CPU-only rebuild, tools/mutate.py).
#ifndef FUSED_RESNET_CPU_ONLY
#include "conv_kernels.h"

namespace fused_resnet {
namespace {

// A kernel named as Python names it and a problem [n, h, w, c, k, r, s, stride] ("same"
// padding), as conv_launch_plan and conv_launch_check take them.
std::pair<ConvKernel, ConvProblem> parse_launch(const char* op, const std::string& kernel,
                                                at::IntArrayRef problem) {
  static const std::pair<std::string_view, ConvKernel> kKernels[] = {
      {"fprop", ConvKernel::kFprop},
      {"fprop_statistics", ConvKernel::kFpropStatistics},
      {"fprop_prologue", ConvKernel::kFpropPrologue},
      {"dgrad", ConvKernel::kDgrad},
      {"dgrad_prologue", ConvKernel::kDgradPrologue},
      {"wgrad", ConvKernel::kWgrad},
      {"wgrad_prologue", ConvKernel::kWgradPrologue}};
  const auto* found = std::find_if(std::begin(kKernels), std::end(kKernels),
                                   [&](const auto& entry) { return entry.first == kernel; });
  TORCH_CHECK(found != std::end(kKernels), op, ": kernel must be one of fprop, "
              "fprop_statistics, fprop_prologue, dgrad, dgrad_prologue, wgrad, wgrad_prologue; "
              "got '", kernel, "'");
  TORCH_CHECK(problem.size() == 8, op, ": problem must be [n, h, w, c, k, r, s, stride], got ",
              problem);
  ConvProblem p;
  p.n = problem[0], p.h = problem[1], p.w = problem[2], p.c = problem[3];
  p.k = problem[4], p.r = problem[5], p.s = problem[6], p.stride = problem[7];
  TORCH_CHECK(p.stride >= 1 && p.r % 2 == 1 && p.s % 2 == 1, op, ": odd filter extents and a "
              "stride >= 1 expected, got ", problem);
  TORCH_CHECK(p.n > 0 && p.h > 0 && p.w > 0 && p.c > 0 && p.k > 0, op, ": the extents n, h, "
              "w, c, k must be positive (no launch for an empty problem), got ", problem);
  p.p = (p.h + 2 * (p.r / 2) - p.r) / p.stride + 1;
  p.q = (p.w + 2 * (p.s / 2) - p.s) / p.stride + 1;
  return {found->second, p};
}

// fused_resnet::conv_launch_plan: [tile_m, tile_n, tile_k, grid_m, grid_n, split_k].
std::vector<int64_t> conv_launch_plan_op(const std::string& kernel, at::IntArrayRef problem,
                                         int64_t sm_count) {
  const auto [which, p] = parse_launch("conv_launch_plan", kernel, problem);
  const LaunchPlan plan = conv_launch_plan(which, p, static_cast<int>(sm_count));
  return {plan.tile_m, plan.tile_n, plan.tile_k, plan.grid_m, plan.grid_n, plan.split_k};
}

// fused_resnet::conv_launch_check: throws what the launch would throw before the GPU.
void conv_launch_check_op(const std::string& kernel, at::IntArrayRef problem,
                          int64_t sm_count) {
  const auto [which, p] = parse_launch("conv_launch_check", kernel, problem);
  conv_launch_check(which, p, static_cast<int>(sm_count));
}

}  // namespace
}  // namespace fused_resnet
#endif

TORCH_LIBRARY(fused_resnet, m) {
  m.def("scale_shift_add_relu(Tensor x, Tensor scale, Tensor shift, Tensor? residual, "
        "Tensor? residual_scale, Tensor? residual_shift, bool relu) -> Tensor");
  m.def("affine_relu_backward(Tensor grad, Tensor x, Tensor? scale, Tensor? shift, "
        "Tensor? output) -> (Tensor, Tensor, Tensor)");
  m.def("add_relu_backward(Tensor grad, Tensor output, Tensor x, Tensor? scale, "
        "Tensor residual, Tensor? residual_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_conv(Tensor x, Tensor weight, int stride, Tensor? in_scale, Tensor? in_shift, "
        "Tensor? out_scale, Tensor? out_shift, Tensor? residual, bool out_relu, "
        "bool statistics) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_conv_bn_train(Tensor x, Tensor weight, int stride, Tensor? in_scale, "
        "Tensor? in_shift, Tensor? bn_weight, Tensor? bn_bias, float eps, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "float? momentum) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_conv_dgrad(Tensor grad, Tensor weight, Tensor x, int stride, Tensor? in_scale, "
        "Tensor? in_shift, Tensor? other=None) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_conv_wgrad(Tensor grad, Tensor x, Tensor weight, int stride, Tensor? in_scale, "
        "Tensor? in_shift) -> Tensor");
  m.def("cuda_channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_scale_shift(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor)");
  m.def("bn_update_running_stats(Tensor mean, Tensor var, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float factor, int count) -> ()");
  m.def("bn_train_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "float? momentum, int count) -> (Tensor, Tensor)");
  m.def("bn_scale_shift_backward(Tensor grad_scale, Tensor grad_shift, Tensor mean, "
        "Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor[]");
  m.def("statistics_backward(Tensor grad, Tensor y, Tensor mean, Tensor grad_mean, "
        "Tensor grad_var, Tensor? grad_scale) -> Tensor");
  m.def("bn_statistics_backward(Tensor grad, Tensor y, Tensor grad_scale, Tensor grad_shift, "
        "Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
#ifndef FUSED_RESNET_CPU_ONLY
  // Host arithmetic, no tensors: runs anywhere, a machine without a GPU included.
  m.def("conv_launch_plan(str kernel, int[] problem, int sm_count) -> int[]",
        &fused_resnet::conv_launch_plan_op);
  m.def("conv_launch_check(str kernel, int[] problem, int sm_count) -> ()",
        &fused_resnet::conv_launch_check_op);
#endif
}

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("scale_shift_add_relu", &fused_resnet::scale_shift_add_relu_cpu);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
