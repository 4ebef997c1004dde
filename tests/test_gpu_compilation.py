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


@pytest.mark.skipif(extension.load_error() is not None, reason="fused_resnet._C is not built")
@pytest.mark.skipif("TORCH_CUDA_ARCH_LIST" in os.environ,
                    reason="TORCH_CUDA_ARCH_LIST overrides the default architectures")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU visible the extension is "
                    "built for that GPU's architecture only")
def test_extension_embeds_sm80_and_sm90_code():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundle) to read the cubins")
    library = glob.glob(os.path.join(os.path.dirname(fused_resnet.__file__), "_C*.so"))[0]
    listing = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True,
                             check=True).stdout
    assert ".sm_80.cubin" in listing and ".sm_90.cubin" in listing, listing
