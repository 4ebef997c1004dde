// Op schemas of the fused_resnet namespace and the Python module fused_resnet._C.
//
// The CUDA kernels register in their own files; the CPU kernels of the cuda_* ops, of
// affine_relu_backward and of the bn_* ops are their plain-PyTorch references, registered
// from Python (fused_resnet/cuda_ops.py) so the ops can be checked without a GPU.
//
// Importing fused_resnet._C runs the static TORCH_LIBRARY registrations below; the module
// itself exports nothing, everything is reached through torch.ops.fused_resnet.
#include <Python.h>
#include <torch/library.h>

#include "scale_shift_add_relu.h"

TORCH_LIBRARY(fused_resnet, m) {
  m.def("scale_shift_add_relu(Tensor x, Tensor scale, Tensor shift, Tensor? residual, "
        "Tensor? residual_scale, Tensor? residual_shift, bool relu) -> Tensor");
  m.def("affine_relu_backward(Tensor grad, Tensor x, Tensor? scale, Tensor? shift, "
        "Tensor? output) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_conv(Tensor x, Tensor weight, int stride, Tensor? in_scale, Tensor? in_shift, "
        "Tensor? out_scale, Tensor? out_shift, Tensor? residual, bool out_relu, "
        "bool statistics) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_conv_dgrad(Tensor grad, Tensor weight, Tensor x, int stride, Tensor? in_scale, "
        "Tensor? in_shift) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_conv_wgrad(Tensor grad, Tensor x, Tensor weight, int stride, Tensor? in_scale, "
        "Tensor? in_shift) -> Tensor");
  m.def("cuda_channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_scale_shift(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor)");
  m.def("bn_update_running_stats(Tensor mean, Tensor var, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float factor, int count) -> ()");
}

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("scale_shift_add_relu", &fused_resnet::scale_shift_add_relu_cpu);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
