"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one: ``python
tests/compile_for_gpus.py``. The interpreter that runs the CPU tests is lenient about
types and layouts that the GPU compiler rejects; this catches those on any machine and
any supported triton (public API only: it runs on both CI legs).

A smoke test: each kernel is compiled with every fusion flag on, in each storage dtype
(fp32 included), at one tile configuration, with every scalar an i32 and no divisibility
hints. What the compiler makes of the convolutions at the real launches' specializations
and every autotune configuration is judged by the compile gate, tools/compile_gate.py.
Prints one line per compiled kernel, exits 1 on the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_resnet.kernels import conv_backward, conv_forward, elementwise  # noqa: E402

TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
GEMM_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)
ELEMENTWISE_TILE = dict(BLOCK_M=128, BLOCK_C=64)
CONV = dict(KH=3, KW=3, STRIDE=2, PAD=1)
# (kernel, pointers holding activations in the storage dtype, non-flag constexprs); every
# other constexpr parameter is a fusion flag and is set, so that a new one is compiled on.
KERNELS = [
    (conv_forward.fused_conv_forward_kernel, {"x_ptr", "w_ptr", "y_ptr", "residual_ptr"},
     dict(CONV, **GEMM_TILE)),
    (conv_backward.conv_dgrad_kernel,
     {"g_ptr", "w_ptr", "x_ptr", "grad_x_ptr", "y_ptr", "other_ptr"}, dict(CONV, **GEMM_TILE)),
    (conv_backward.conv_wgrad_kernel, {"g_ptr", "x_ptr", "y_ptr"}, dict(CONV, **GEMM_TILE)),
    (elementwise.bn_add_relu_kernel, {"a_ptr", "r_ptr", "y_ptr"}, ELEMENTWISE_TILE),
    (elementwise.bn_add_relu_backward_kernel,
     {"g_ptr", "y_ptr", "a_ptr", "r_ptr", "grad_a_ptr", "grad_r_ptr"}, ELEMENTWISE_TILE),
    (elementwise.channel_statistics_kernel, {"x_ptr"}, ELEMENTWISE_TILE),
]


def constexprs_of(fn, sizes: dict, dtype: str) -> dict:
    """The kernel's constexpr arguments: ``sizes`` where the kernel has them, the dot
    precision the launchers pass for ``dtype``, and every other one (a flag) on."""
    names = [fn.arg_names[i] for i in fn.constexprs]
    values = {name: True for name in names}
    values.update({name: size for name, size in sizes.items() if name in names})
    if "DOT_PRECISION" in names:
        values["DOT_PRECISION"] = "ieee" if dtype == "float32" else "tf32"
    return values


def compile_kernel(autotuned, activation_pointers, sizes, dtype, capability):
    fn = autotuned.fn
    constexprs = constexprs_of(fn, sizes, dtype)
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
    for kernel, pointers, sizes in KERNELS:
        for dtype in TYPES:
            for capability in (80, 90):
                name = f"{kernel.fn.__name__} {dtype} sm_{capability}"
                try:
                    compiled = compile_kernel(kernel, pointers, sizes, dtype, capability)
                except Exception as error:  # report which kernel, then fail
                    print(f"FAILED {name}: {error}")
                    return 1
                print(f"compiled {name}: {len(compiled.asm['cubin'])} bytes of cubin, "
                      f"{compiled.metadata.shared} bytes of shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
