"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one: ``python
tests/compile_for_gpus.py``. The interpreter that runs the CPU tests is lenient about
types and layouts that the GPU compiler rejects; this catches those on any machine.

Each kernel is compiled with every fusion flag on, in each storage dtype, at the largest
tile configuration of its autotune list. Prints one line per compiled kernel, exits 1 on
the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_resnet.kernels import conv_backward, conv_forward, elementwise  # noqa: E402

TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
GEMM_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)
ELEMENTWISE_TILE = dict(BLOCK_M=128, BLOCK_C=64)
CONV = dict(KH=3, KW=3, STRIDE=2, PAD=1)
# (kernel, pointers holding activations in the storage dtype, constexprs)
KERNELS = [
    (conv_forward.fused_conv_forward_kernel, {"x_ptr", "w_ptr", "y_ptr", "residual_ptr"},
     dict(CONV, PROLOGUE=True, OUT_AFFINE=True, RESIDUAL=True, OUT_RELU=True,
          STATISTICS=True, **GEMM_TILE)),
    (conv_backward.conv_dgrad_kernel, {"g_ptr", "w_ptr", "x_ptr", "grad_x_ptr", "y_ptr"},
     dict(CONV, PROLOGUE=True, STATISTICS=True, **GEMM_TILE)),
    (conv_backward.conv_wgrad_kernel, {"g_ptr", "x_ptr", "y_ptr"},
     dict(CONV, PROLOGUE=True, STATISTICS=True, **GEMM_TILE)),
    (elementwise.bn_add_relu_kernel, {"a_ptr", "r_ptr", "y_ptr"},
     dict(RESIDUAL=True, RESIDUAL_AFFINE=True, RELU=True, **ELEMENTWISE_TILE)),
    (elementwise.bn_add_relu_backward_kernel,
     {"g_ptr", "y_ptr", "a_ptr", "r_ptr", "grad_a_ptr", "grad_r_ptr"},
     dict(RESIDUAL=True, RESIDUAL_AFFINE=True, RELU=True, **ELEMENTWISE_TILE)),
    (elementwise.channel_statistics_kernel, {"x_ptr"}, ELEMENTWISE_TILE),
]


def compile_kernel(autotuned, activation_pointers, constexprs, dtype, capability):
    fn = autotuned.fn
    constexprs = dict(constexprs)
    if "DOT_PRECISION" in fn.arg_names:
        constexprs["DOT_PRECISION"] = "ieee" if dtype == "float32" else "tf32"
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (TYPES[dtype] if name in activation_pointers else "fp32")
        else:
            signature[name] = "i32"
    source = ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": 8, "num_stages": 3})


def main() -> int:
    for kernel, pointers, constexprs in KERNELS:
        for dtype in TYPES:
            for capability in (80, 90):
                name = f"{kernel.fn.__name__} {dtype} sm_{capability}"
                try:
                    compiled = compile_kernel(kernel, pointers, constexprs, dtype, capability)
                except Exception as error:  # report which kernel, then fail
                    print(f"FAILED {name}: {error}")
                    return 1
                print(f"compiled {name}: {len(compiled.asm['cubin'])} bytes of cubin, "
                      f"{compiled.metadata.shared} bytes of shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
