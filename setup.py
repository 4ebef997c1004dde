"""Build of fused_resnet, including the C++/CUDA extension ``fused_resnet._C``.

Install after torch with ``pip install --no-build-isolation -e .`` (see the README).

Environment:
    FUSED_RESNET_BUILD_CUDA  auto (default): build the extension when nvcc is found and
                             matches torch's CUDA major version, otherwise install without
                             it and say why; 1: build it or fail with the reason; 0: skip.
    TORCH_CUDA_ARCH_LIST     defaults to "8.0;9.0+PTX" when no GPU is visible (CI, dev
                             boxes): sm_80 and sm_90 code, and compute_90 PTX that a newer
                             GPU's driver compiles when it loads the library.
    MAX_JOBS                 defaults to what the cores and the memory allow.
    CUDA_HOME                defaults to /usr/local/cuda when that exists.

The extension builds on a machine without a GPU: only running its CUDA kernels needs one.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# nvcc compiling the torch headers peaks around 2 GB per job.
MEMORY_PER_JOB_BYTES = 2 * 1024**3


def log(message: str) -> None:
    print(f"fused_resnet setup: {message}", file=sys.stderr)


def build_mode() -> str:
    mode = os.environ.get("FUSED_RESNET_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"fused_resnet setup: FUSED_RESNET_BUILD_CUDA={mode!r}, expected auto, 0 or 1")
    return mode


def nvcc_version(cuda_home: str) -> str:
    output = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                            capture_output=True, text=True, check=True).stdout
    return re.search(r"release (\d+\.\d+)", output).group(1)


def why_cuda_cannot_build() -> str | None:
    """None when the toolchain can build the extension, else the reason it cannot."""
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    try:
        found = nvcc_version(cpp_extension.CUDA_HOME)
    except (OSError, subprocess.CalledProcessError, AttributeError) as error:
        return f"{cpp_extension.CUDA_HOME}/bin/nvcc --version failed: {error}"
    if found.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc {found} at {cpp_extension.CUDA_HOME} does not match the CUDA "
                f"{torch.version.cuda} that torch {torch.__version__} was built with; "
                "point CUDA_HOME at a matching toolkit")
    return None


def configure_parallelism() -> None:
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    os.environ["MAX_JOBS"] = str(max(1, min(cores, memory // MEMORY_PER_JOB_BYTES)))


def configure_arch_list() -> None:
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPU)')}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}")


def package_include_dir(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *parts)
        if os.path.isdir(path):
            return path
    return None


def extra_include_dirs(cuda_home: str) -> list[str]:
    dirs = []
    cutlass = package_include_dir("cutlass_library", "source", "include")
    if cutlass is None:
        log("nvidia-cutlass is not installed; CUTLASS kernels will not find their headers "
            "(pip install nvidia-cutlass==4.2.0.0)")
    else:
        dirs.append(cutlass)
    # torch's CUDA headers include cuBLAS and cuSPARSE, which a bare nvcc install lacks;
    # the CUDA wheels that came with torch carry them.
    if not os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        dirs += [d for d in glob.glob(os.path.join(package_include_dir("nvidia") or "", "*",
                                                   "include"))
                 if os.path.exists(os.path.join(d, "cublas_v2.h"))]
    return dirs


def extensions_and_commands() -> tuple[list, dict]:
    mode = build_mode()
    if mode == "0":
        log("FUSED_RESNET_BUILD_CUDA=0: installing without the C++/CUDA extension")
        return [], {}
    reason = why_cuda_cannot_build()
    if reason is not None:
        if mode == "1":
            sys.exit(f"fused_resnet setup: FUSED_RESNET_BUILD_CUDA=1 but {reason}")
        log(f"installing without the C++/CUDA extension: {reason}")
        return [], {}
    from torch.utils import cpp_extension

    configure_parallelism()
    configure_arch_list()
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir()
                     if p.suffix in (".cpp", ".cu"))
    extension = cpp_extension.CUDAExtension(
        name="fused_resnet._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")] + extra_include_dirs(cpp_extension.CUDA_HOME),
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                     "-lineinfo"]},
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions_and_commands()
setup(
    packages=["fused_resnet", "fused_resnet.bench", "fused_resnet.kernels"],
    package_dir={"fused_resnet.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
