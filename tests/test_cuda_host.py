"""The host-and-device bookkeeping of the CUDA kernels, checked on the CPU: C++ programs
under tests/cuda_host/ built with nvcc against the extension's own headers (the kernels'
real CUTLASS types) and run here, no GPU needed."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent


def _nvcc() -> str:
    home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip(f"nvcc not found (looked in {home}; set CUDA_HOME)")
    return nvcc


def _cutlass_include() -> str:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None:
        pytest.skip("nvidia-cutlass is not installed (pip install nvidia-cutlass==4.2.0.0)")
    return os.path.join(spec.submodule_search_locations[0], "source", "include")


def _run_host_program(source: str, tmp_path: Path) -> str:
    """Builds tests/cuda_host/``source`` (host code only) and runs it; returns its output,
    failing the test with it when the program exits non-zero."""
    binary = tmp_path / Path(source).stem
    includes = [ROOT / "csrc", _cutlass_include(), *cpp_extension.include_paths()]
    build = subprocess.run(
        [_nvcc(), "-std=c++17", "--expt-relaxed-constexpr", "-O1",
         *(f"-I{path}" for path in includes), "-o", str(binary),
         str(ROOT / "tests" / "cuda_host" / source)],
        capture_output=True, text=True)
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout


def test_epilogue_reductions_gather_every_stored_element_once(tmp_path):
    """epilogue_reductions.cuh with the thread maps of the kernels that run it (fprop with
    statistics, the BN-ReLU dgrad; both tiles, fp16 and bf16): each output element of a
    tile is stored and gathered once, edge tiles included; the statistics merge to fp64's
    (count, mean, M2), also at |mean| / std = 1000; the prologue backward stores what
    affine_relu_backward's pass stores, and its sums merge to fp64's."""
    output = _run_host_program("epilogue_reductions.cu", tmp_path)
    assert "every tile element stored and gathered once" in output
