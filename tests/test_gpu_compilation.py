"""What runs on GPUs is compiled for them here too, without a GPU: the Triton kernels
(by tests/compile_for_gpus.py) and the extension's CUDA code (its embedded cubins)."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_resnet
from fused_resnet import extension

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_compile_for_sm80_and_sm90():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_for_gpus.py")],
                            env=environment, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled ") == 36


def _cuobjdump():
    import triton
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                               "cuobjdump"),
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")]
    return next((c for c in candidates if os.path.exists(c)), None)


def _cuobjdump_of_extension(option: str) -> str:
    """What ``cuobjdump <option>`` prints for fused_resnet._C (skips without the tool)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundle) to read the cubins")
    library = glob.glob(os.path.join(os.path.dirname(fused_resnet.__file__), "_C*.so"))[0]
    return subprocess.run([tool, option, library], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(extension.load_error() is not None, reason="fused_resnet._C is not built")
@pytest.mark.skipif("TORCH_CUDA_ARCH_LIST" in os.environ,
                    reason="TORCH_CUDA_ARCH_LIST overrides the default architectures")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU visible the extension is "
                    "built for that GPU's architecture only")
def test_extension_embeds_sm80_and_sm90_code():
    listing = _cuobjdump_of_extension("--list-elf")
    assert ".sm_80.cubin" in listing and ".sm_90.cubin" in listing, listing


def _functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass output split into {mangled function name: its instructions}."""
    sections = sass.split("Function : ")[1:]
    return {section.split("\n", 1)[0].strip(): section for section in sections}


@pytest.mark.skipif(extension.load_error() is not None, reason="fused_resnet._C is not built")
def test_mainloop_fusions_apply_bn_relu_in_the_kernels_dtype():
    """CUTLASS's BN-ReLU operand transforms are fp16-only; the bf16 kernels must use ours
    (a bf16x2 FMA with ReLU), never the fp16 instruction on bf16 data."""
    sass = _cuobjdump_of_extension("-sass")
    fusions = {name: body for name, body in _functions(sass).items()
               if "ImplicitGemmConvolutionFusion" in name}
    bf16 = [body for name, body in fusions.items() if "bfloat16_t" in name]
    fp16 = [body for name, body in fusions.items() if "half_t" in name]
    # fprop and wgrad, for each architecture built.
    assert len(bf16) >= 2 and len(fp16) >= 2, sorted(fusions)
    assert all("HFMA2.BF16_V2.RELU" in body and "HFMA2.RELU" not in body for body in bf16)
    assert all("HFMA2.RELU" in body for body in fp16)
