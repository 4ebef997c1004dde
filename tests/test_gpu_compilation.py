"""What runs on GPUs is compiled for them here too, without a GPU: the Triton kernels
(tests/compile_for_gpus.py: each compiles, in every storage dtype; tools/compile_gate.py:
the convolutions at the real launches' specializations with every autotune
configuration, judged on spills, ptxas warnings, shared memory and their main loop) and
the extension's CUDA code (its embedded cubins; tools/cuda_gate.py: every CUTLASS launch
of the cuda plan fills the GPU, no CUTLASS kernel spills)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_resnet
from fused_resnet import extension

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import cuda_gate  # noqa: E402
from compile_gate import CACHE, KNOWN_FAILURES  # noqa: E402

# Triton compiles for GPUs only without the interpreter the rest of the suite runs on.
COMPILER_ENVIRONMENT = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_triton_kernels_compile_for_sm80_and_sm90():
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_for_gpus.py")],
                            env=COMPILER_ENVIRONMENT, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled ") == 36


@pytest.fixture(scope="module")
def compile_gate(tmp_path_factory) -> dict:
    """The gate's verdict on every variant. It compiles those whose cached result is
    stale; the cache holds one triton version's results (the newest CI leg's), and on
    another every variant would be compiled, beyond the CI budget: skipped there."""
    import triton
    cached = json.loads(CACHE.read_text())["triton"]
    if triton.__version__ != cached:
        pytest.skip(f"{CACHE.name} holds triton {cached}'s results; with triton "
                    f"{triton.__version__} every variant would compile (run "
                    "tools/compile_gate.py by hand)")
    output = tmp_path_factory.mktemp("compile_gate") / "verdicts.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_gate.py"),
                             "--json", str(output)], env=COMPILER_ENVIRONMENT,
                            capture_output=True, text=True, timeout=1800)
    assert output.exists(), result.stdout + result.stderr
    return json.loads(output.read_text())


def test_compile_gate_has_no_unexpected_failure(compile_gate):
    verdicts = compile_gate["variants"]
    assert compile_gate["unexpected"] == [], [
        f"{name}: {verdicts[name]['failures']} (known: {verdicts[name]['known']})"
        for name in compile_gate["unexpected"]]
    assert compile_gate["unknown_entries"] == [], "KNOWN_FAILURES names no such variant"


# A known failure that passes fails the suite (strict): remove it from KNOWN_FAILURES. A
# variant that no longer exists raises KeyError, not AssertionError: a real failure too.
@pytest.mark.parametrize("variant", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                               reason=reason))
    for name, reason in KNOWN_FAILURES.items()])
def test_known_compile_gate_failure(compile_gate, variant):
    assert not compile_gate["variants"][variant]["failures"]


def _cuobjdump_of_extension(option: str) -> str:
    """What ``cuobjdump <option>`` prints for fused_resnet._C (skips without the tool)."""
    if cuda_gate.cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundle) to read the cubins")
    return cuda_gate.cuobjdump_of_extension(option)


@pytest.mark.skipif(extension.load_error() is not None, reason="fused_resnet._C is not built")
@pytest.mark.skipif("TORCH_CUDA_ARCH_LIST" in os.environ,
                    reason="TORCH_CUDA_ARCH_LIST overrides the default architectures")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU visible the extension is "
                    "built for that GPU's architecture only")
def test_extension_embeds_sm80_and_sm90_code_and_ptx_for_newer_gpus():
    listing = _cuobjdump_of_extension("--list-elf")
    assert ".sm_80.cubin" in listing and ".sm_90.cubin" in listing, listing
    # PTX of the newest architecture, which a newer GPU's driver compiles at load, where
    # cubins alone would fail with "no kernel image is available".
    ptx = _cuobjdump_of_extension("--list-ptx")
    assert ".sm_90.ptx" in ptx and ".sm_80.ptx" not in ptx, ptx


@pytest.mark.skipif(extension.load_error() is not None, reason="fused_resnet._C is not built")
def test_mainloop_fusions_apply_bn_relu_in_the_kernels_dtype():
    """CUTLASS's BN-ReLU operand transforms are fp16-only; the bf16 kernels must use ours
    (a bf16x2 FMA with ReLU), never the fp16 instruction on bf16 data."""
    sass = _cuobjdump_of_extension("-sass")
    fusions = {name: body for (_, name), body in cuda_gate.sass_functions(sass).items()
               if "ImplicitGemmConvolutionFusion" in name}
    bf16 = [body for name, body in fusions.items() if "bfloat16_t" in name]
    fp16 = [body for name, body in fusions.items() if "half_t" in name]
    # fprop and wgrad, for each architecture built.
    assert len(bf16) >= 2 and len(fp16) >= 2, sorted(fusions)
    assert all("HFMA2.BF16_V2.RELU" in body and "HFMA2.RELU" not in body for body in bf16)
    assert all("HFMA2.RELU" in body for body in fp16)


@pytest.fixture(scope="module")
def cuda_gate_verdict(tmp_path_factory) -> dict:
    if extension.load_error() is not None:
        pytest.skip("fused_resnet._C is not built")
    if cuda_gate.cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundle) to read the cubins")
    output = tmp_path_factory.mktemp("cuda_gate") / "verdict.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_gate.py"),
                             "--json", str(output)], capture_output=True, text=True,
                            timeout=600)
    assert output.exists(), result.stdout + result.stderr
    return json.loads(output.read_text())


def test_cuda_gate_has_no_unexpected_failure(cuda_gate_verdict):
    rows = {row["name"]: row for row in cuda_gate_verdict["launches"]
            + cuda_gate_verdict["kernels"]}
    assert cuda_gate_verdict["unexpected"] == [], [
        f"{name}: {rows[name]['failures']}" for name in cuda_gate_verdict["unexpected"]]
    assert cuda_gate_verdict["unknown_entries"] == [], "KNOWN_FAILURES names no such row"


def test_cuda_gate_sees_every_kernel_of_the_plan(cuda_gate_verdict):
    """Every kind of CUTLASS kernel is launched by the plans and found in the cubins of both
    architectures, so a renamed op or kernel cannot empty the gate's tables."""
    kinds = {"fprop", "fprop_statistics", "fprop_prologue", "dgrad", "dgrad_prologue", "wgrad",
             "wgrad_prologue"}
    assert {row["kernel"] for row in cuda_gate_verdict["launches"]} == kinds
    compiled = {(row["kernel"], row["arch"]) for row in cuda_gate_verdict["kernels"]}
    for arch in ("sm_80", "sm_90"):
        assert {kind for kind, built in compiled if built == arch} >= kinds | {
            "dgrad (strided)", "wgrad split-K reduction"}, arch


def test_plan_tiles_are_compiled_kernels_tiles(cuda_gate_verdict):
    """Every tile conv_launch_plan plans with is the ThreadblockShape of a compiled kernel
    of that kind (read from its mangled name), and both tile configurations are used."""
    compiled = {(row["kernel"].replace(" (strided)", ""), row["tile"])
                for row in cuda_gate_verdict["kernels"]}
    planned = {(row["kernel"], "x".join(map(str, plan["tile"])))
               for row in cuda_gate_verdict["launches"] for plan in row["plans"].values()}
    assert planned <= compiled, planned - compiled
    assert {tile for _, tile in planned} == {"128x128x32", "64x64x32"}
