// Op schemas of the fused_resnet namespace and the Python module fused_resnet._C.
//
// Importing fused_resnet._C runs the static TORCH_LIBRARY registrations below; the module
// itself exports nothing, everything is reached through torch.ops.fused_resnet.
#include <Python.h>
#include <torch/library.h>

#include "scale_shift_add_relu.h"

TORCH_LIBRARY(fused_resnet, m) {
  m.def("scale_shift_add_relu(Tensor x, Tensor scale, Tensor shift, Tensor? residual, "
        "bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("scale_shift_add_relu", &fused_resnet::scale_shift_add_relu_cpu);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
