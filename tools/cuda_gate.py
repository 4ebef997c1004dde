"""The CUDA backend's CPU gate: every CUTLASS launch the ``cuda`` plan makes, judged by
the grid it gets, and every CUTLASS kernel in the built extension, judged by what the
compiler made of it. No GPU needed.

    python tools/cuda_gate.py [--json F]

Launches. The ``cuda`` plan of ResNet-18 and ResNet-50 (train step and eval forward,
batch 32 and 256, 224x224, bf16, channels_last) runs on the meta device, and every call of
``cuda_conv``, ``cuda_conv_bn_train``, ``cuda_conv_dgrad`` and ``cuda_conv_wgrad`` is
recorded with its shapes and the kernel it picks.
Each distinct launch is planned by ``fused_resnet::conv_launch_plan``, the C++ function
the ops themselves launch by (tile shape and swizzle read from the instantiated CUTLASS
types, wgrad's split-K chosen for the GPU's multiprocessor count), for an H100/H200 (132
SMs) and an A100 (108 SMs). It fails when a launch has fewer threadblocks than the GPU
has SMs: less than one full wave leaves multiprocessors idle for the whole kernel. Each
launch is also dry-run (``fused_resnet::conv_launch_check``): the launcher's own code builds
the CUTLASS arguments, checks the plan's grid against the kernel's and runs CUTLASS's
``can_implement`` and workspace checks, for fp16 and bf16, stopping short of the GPU; it
fails on anything that launch would throw.

Kernels. ``cuobjdump`` (the CUDA toolkit's or the one bundled with triton) reads the
extension's cubins: per CUTLASS kernel and architecture the registers, the stack frame
and local memory (nonzero: ptxas spilled registers, as none of these kernels keeps a
local array) and the MMA instructions in its SASS (HGMMA: Hopper's warpgroup MMA; HMMA:
mma.sync). It fails on a spill. Every kernel is the sm_80 design today (HMMA on sm_90
too): the table says so, so that a Hopper path shows up in it when it lands.

Known failures are listed in :data:`KNOWN_FAILURES` (row -> reason); the gate exits 1 on
any other failing row and on an entry that names no row.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLANS = [(model, mode) for model in ("resnet18", "resnet50") for mode in ("train", "eval")]
BATCHES = (32, 256)
IMAGE_SIZE = 224
# Multiprocessors: H100 SXM and H200 132, A100 108 (NVIDIA's architecture whitepapers).
SM_COUNTS = {"H100": 132, "A100": 108}

# The CUTLASS kernel a recorded op call launches (conv_ops.cpp picks it the same way), from
# the op and its bound arguments.
def _kernel_of_op(op: str, arguments: dict) -> str:
    prologue = arguments["in_scale"] is not None
    if op == "cuda_conv_dgrad":
        return "dgrad_prologue" if prologue and arguments["stride"] == 1 else "dgrad"
    if op == "cuda_conv_wgrad":
        return "wgrad_prologue" if prologue else "wgrad"
    statistics = op == "cuda_conv_bn_train" or arguments["statistics"]
    return "fprop_prologue" if prologue else "fprop_statistics" if statistics else "fprop"


_CUTLASS_OPS = {"cuda_conv", "cuda_conv_bn_train", "cuda_conv_dgrad", "cuda_conv_wgrad"}


class Launch(NamedTuple):
    """One distinct CUTLASS launch: kernel and problem [n, h, w, c, k, r, s, stride]."""

    kernel: str
    problem: tuple[int, ...]

    @property
    def name(self) -> str:
        n, h, w, c, k, r, s, stride = self.problem
        return f"{self.kernel} {r}x{s}/s{stride} {n}x{h}x{w}x{c}->{k}"


# --- the plan's launches --------------------------------------------------------------

def record_launches() -> list[Launch]:
    """Every distinct CUTLASS launch of the ``cuda`` plans (see the module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_resnet.bench import traffic, workloads

    launches: dict[Launch, None] = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if func.namespace == "fused_resnet" and name in _CUTLASS_OPS:
                # The ops name their arguments alike: x, weight, stride, in_scale.
                bound = {**{a.name: v for a, v in zip(func._schema.arguments, args)},
                         **(kwargs or {})}
                n, c, h, w = bound["x"].shape
                k, _, r, s = bound["weight"].shape
                kernel = _kernel_of_op(name, bound)
                launches[Launch(kernel, (n, h, w, c, k, r, s, bound["stride"]))] = None
            return func(*args, **(kwargs or {}))

    for model, mode in PLANS:
        for batch in BATCHES:
            workload = workloads.model_workload(model, mode, batch, IMAGE_SIZE, "meta",
                                                torch.bfloat16, torch.channels_last)
            step, _ = traffic.workload_step(
                workloads.contender_module("cuda", workload.module), workload)
            with Recorder():
                step()
    if not launches:
        raise RuntimeError("the cuda plans made no CUTLASS launch: are the ops renamed?")
    return sorted(launches)


def plan(launch: Launch, sm_count: int) -> dict:
    """``conv_launch_plan`` of ``launch``: tile, grid, split-K, threadblocks, waves."""
    import torch
    tile_m, tile_n, tile_k, grid_m, grid_n, split_k = torch.ops.fused_resnet.conv_launch_plan(
        launch.kernel, list(launch.problem), sm_count)
    blocks = grid_m * grid_n * split_k
    return {"tile": (tile_m, tile_n, tile_k), "grid": (grid_m, grid_n, split_k),
            "blocks": blocks, "waves": blocks / sm_count}


def dry_run_failure(launch: Launch, sm_count: int) -> str | None:
    """What the launch would throw before reaching the GPU, or None."""
    import torch
    try:
        torch.ops.fused_resnet.conv_launch_check(launch.kernel, list(launch.problem), sm_count)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def launch_rows(launches: list[Launch]) -> list[dict]:
    rows = []
    for launch in launches:
        plans = {gpu: plan(launch, count) for gpu, count in SM_COUNTS.items()}
        failures = [f"{plans[gpu]['blocks']} threadblocks < {count} SMs of an {gpu}"
                    for gpu, count in SM_COUNTS.items() if plans[gpu]["waves"] < 1]
        failures += [f"dry run on an {gpu}: {failure}" for gpu, count in SM_COUNTS.items()
                     if (failure := dry_run_failure(launch, count)) is not None]
        rows.append({"name": launch.name, "kernel": launch.kernel,
                     "problem": list(launch.problem), "plans": plans, "failures": failures})
    return rows


# --- the compiled kernels ------------------------------------------------------------------

def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one bundled with triton, else None."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                               "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends",
                                       "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(c)), None)


def extension_library() -> str:
    import fused_resnet
    libraries = glob.glob(os.path.join(os.path.dirname(fused_resnet.__file__), "_C*.so"))
    if not libraries:
        raise RuntimeError("fused_resnet._C is not built")
    return libraries[0]


def cuobjdump_of_extension(option: str) -> str:
    """What ``cuobjdump <option>`` prints for fused_resnet._C."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump (CUDA toolkit or triton's bundle) to read the cubins")
    return subprocess.run([tool, option, extension_library()], capture_output=True, text=True,
                          check=True).stdout


def sass_functions(sass: str) -> dict[tuple[str, str], str]:
    """``cuobjdump -sass`` output as {(arch, mangled function name): its instructions}."""
    functions: dict[tuple[str, str], str] = {}
    arch = name = None
    for part in re.split(r"(code for sm_\d+|Function : \S+)", sass):
        if part.startswith("code for "):
            arch, name = part.split()[-1], None
        elif part.startswith("Function : "):
            name = part.split()[-1]
        elif arch is not None and name is not None:
            functions[arch, name] = functions.get((arch, name), "") + part
    return functions


def resource_usage(dump: str) -> dict[tuple[str, str], dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output as {(arch, mangled name): {REG: .., STACK:
    .., SHARED: .., LOCAL: ..}}."""
    usage = {}
    arch = name = None
    for line in dump.splitlines():
        if match := re.match(r"arch = (sm_\d+)", line):
            arch = match.group(1)
        elif match := re.match(r"\s*Function (\S+):", line):
            name = match.group(1)
        elif (match := re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) \
                and name is not None:
            usage[arch, name] = dict(zip(("REG", "STACK", "SHARED", "LOCAL"),
                                         map(int, match.groups())))
    return usage


# What each CUTLASS kernel is, from the class names in its mangled name (first match).
_KERNEL_KINDS = [("ImplicitGemmFpropFusionMultistage", "fprop_prologue"),
                 ("ImplicitGemmWgradFusionMultistage", "wgrad_prologue"),
                 ("ImplicitGemmConvolutionStridedDgrad", "dgrad (strided)"),
                 ("PrologueBackward", "dgrad_prologue"),
                 ("Conv2dDgradOutputGradient", "dgrad"),
                 ("OutputStatistics", "fprop_statistics"),
                 ("Conv2dFpropActivation", "fprop"),
                 ("Conv2dWgradOutputGradient", "wgrad"),
                 ("ReduceSplitK", "wgrad split-K reduction")]


def kernel_kind(mangled: str) -> str | None:
    if "cutlass" not in mangled:
        return None
    return next((kind for marker, kind in _KERNEL_KINDS if marker in mangled), "other")


def kernel_rows() -> list[dict]:
    """One row per CUTLASS kernel and architecture in fused_resnet._C."""
    usage = resource_usage(cuobjdump_of_extension("--dump-resource-usage"))
    sass = sass_functions(cuobjdump_of_extension("-sass"))
    rows = []
    for (arch, mangled), resources in sorted(usage.items()):
        kind = kernel_kind(mangled)
        if kind is None:
            continue
        code = sass.get((arch, mangled), "")
        mma = [kind for kind in ("HGMMA", "HMMA") if re.search(rf"\b{kind}\.", code)]
        shape = re.search(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E", mangled)
        tile = "x".join(shape.groups()) if shape else "-"
        dtype = "bf16" if "bfloat16_t" in mangled else "fp16" if "half_t" in mangled else "-"
        spilled = resources["STACK"] + resources["LOCAL"]
        rows.append({
            "name": f"{kind} {tile} {dtype} {arch}",
            "kernel": kind, "dtype": dtype, "arch": arch, "tile": tile,
            "registers": resources["REG"], "spill_bytes": spilled,
            "shared": resources["SHARED"], "mma": "+".join(mma) or "none",
            "failures": [f"spills ({resources['STACK']} bytes of stack, "
                         f"{resources['LOCAL']} of local memory)"] if spilled else []})
    if not rows:
        raise RuntimeError("no CUTLASS kernel in fused_resnet._C's cubins")
    return rows


# --- verdict ---------------------------------------------------------------------------

def judge(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(unexpected failing rows, KNOWN_FAILURES entries that name no row)."""
    names = {row["name"] for row in rows}
    unexpected = [row["name"] for row in rows
                  if row["failures"] and row["name"] not in KNOWN_FAILURES]
    return unexpected, sorted(set(KNOWN_FAILURES) - names)


def print_tables(launches: list[dict], kernels: list[dict]) -> None:
    gpus = list(SM_COUNTS)
    print(f"{'launch':44} {'tile':>10} " + " ".join(f"{'grid ' + gpu:>16} {'waves':>6}"
                                                  for gpu in gpus))
    for row in launches:
        cells = []
        for gpu in gpus:
            plan_ = row["plans"][gpu]
            cells.append(f"{'x'.join(map(str, plan_['grid'])):>16} {plan_['waves']:6.2f}")
        tile = "x".join(map(str, row["plans"][gpus[0]]["tile"]))
        print(f"{row['name']:44} {tile:>10} " + " ".join(cells)
              + ("  FAIL" if row["failures"] else ""))
    print()
    print(f"{'kernel':44} {'registers':>9} {'spill B':>7} {'static smem':>11} {'MMA':>6}")
    for row in kernels:
        print(f"{row['name']:44} {row['registers']:9} {row['spill_bytes']:7} "
              f"{row['shared']:11} {row['mma']:>6}" + ("  FAIL" if row["failures"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every row and the verdict to this file")
    args = parser.parse_args(argv)
    from fused_resnet import extension
    extension.require()
    launches = launch_rows(record_launches())
    kernels = kernel_rows()
    print_tables(launches, kernels)
    unexpected, unknown = judge(launches + kernels)
    for name in unexpected:
        failures = next(row["failures"] for row in launches + kernels if row["name"] == name)
        print(f"FAIL {name}: {'; '.join(failures)}")
    for name in unknown:
        print(f"FAIL KNOWN_FAILURES names no row: {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"launches": launches, "kernels": kernels, "unexpected": unexpected,
             "unknown_entries": unknown}, indent=1))
    return 1 if unexpected or unknown else 0


# Rows that fail today, with the reason they are not fixed yet.
KNOWN_FAILURES: dict[str, str] = {}


if __name__ == "__main__":
    sys.exit(main())
