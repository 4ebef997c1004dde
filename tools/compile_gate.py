"""The compile gate: every Triton convolution kernel compiled for sm_90 and sm_80 the way
the real ResNet-18 and ResNet-50 steps launch it, with every configuration its autotuner
can pick, and judged from what the compiler emits. No GPU needed.

    python tools/compile_gate.py [--full] [--table] [--write-cache] [--jobs N] [--json F]

What is compiled. The specializations are not written down here: they are recorded from
a meta-device run of each plan (:data:`PLANS`: ResNet-18 and ResNet-50, train and eval,
batch 256, 224x224, channels_last, in bf16 and in fp16, the ``triton`` backend) with
every launch through ``kernels.tuning.launcher`` captured, arguments and constexpr
keywords, instead of run. Each launch of a judged kernel (:data:`KERNELS`; a kernel
added elsewhere, such as a Triton stem, is judged once it is listed there) is
specialized by Triton's own launcher code (``create_function_from_signature`` and
``JITFunction._pack_args``, as ``JITFunction.run`` does) with each of the kernel's
autotune configurations: pointers and integers divisible by 16 get ``tt.divisibility =
16``, integers equal to 1 become constants, the fusion flags, KH, STRIDE and the tile
sizes are constexprs, num_warps and num_stages come from the configuration. Each
distinct specialization x configuration x {sm_90, sm_80} is a variant: 960 at the time
of writing (40 specializations in each of the 2 dtypes, 6 configurations, 2
architectures).

What is measured, per variant: registers and spill bytes (stores + loads) from the ptxas
-v that Triton runs (``TRITON_DUMP_PTXAS_LOG``), ptxas's performance warnings (C7515
"wgmma.mma_async instructions are serialized ..."), shared memory (``metadata.shared``),
the MMA instruction (wgmma or mma.sync, from the PTX), and the main-loop structure from
the TTGIR: how many ``scf.for`` loops hold a dot, whether they are software-pipelined
(``ttg.async_copy_global_to_local`` and ``ttg.async_wait`` in the loop body) and, with
wgmma, whether the loop waits for all its MMAs (``warp_group_dot_wait {pendings = 0}``:
then no MMA overlaps the next iteration).

What fails (:func:`failures`): a register spill, a ptxas serialization warning, shared
memory over the architecture's per-block limit, a dot that is not in exactly one loop, a
main loop without asynchronous copies, a wgmma main loop that waits for all its MMAs.
Known failures are listed in :data:`KNOWN_FAILURES` (variant -> failing rules); the
gate exits 1 on any other failure, on a known one that fails by other rules, and on an
entry that names no variant. tests/test_gpu_compilation.py makes each known failure a
strict xfail, so that fixing a kernel flips it.

Why a cache. One compile takes 0.4-2.5 s here (1.0 s on average; sm_90 with wgmma the
slowest): all 960 take 16 minutes on one core, about 8 on CI's two, the whole budget the
gate may add to a CI leg. So every variant's measurement is kept in
tests/compile_gate_cache.json, keyed by a hash of what determines the compiled code: the
kernel's Triton cache key (its source and line, and those of every @triton.jit function
it calls), the triton version (which fixes the bundled ptxas), the architecture,
signature, constexprs, divisibility attributes and options (num_warps, num_stages). A run
compiles only the variants whose entry is absent or stale: with the cache up to date the
gate takes about 10 s; a change to one kernel recompiles its variants (the forward's 336
about 3 minutes on two cores), one to a helper all three use, all of them. After
changing a kernel, run with ``--write-cache`` and commit the file with the change, so
that CI stays fast and the cache is the table of that commit. ``--full`` ignores the
cache. The cache holds one triton version's results (the newest CI leg's, 3.8); with
another (the oldest leg and the GPU machines have 3.6) every variant would compile,
which is why the test skips there; run the gate by hand there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "tests" / "compile_gate_cache.json"
# Bump when what is measured, or how, changes: every cached measurement goes stale.
MEASUREMENT_VERSION = 1

# The kernels judged, by name, with their module in fused_resnet.kernels and a short name.
KERNELS = {"fused_conv_forward_kernel": ("conv_forward", "fwd"),
           "conv_dgrad_kernel": ("conv_backward", "dgrad"),
           "conv_wgrad_kernel": ("conv_backward", "wgrad")}
# (model, mode) of the recorded plans, at batch 256 and 224x224.
PLANS = [("resnet18", "train"), ("resnet18", "eval"), ("resnet50", "train"),
         ("resnet50", "eval")]
BATCH, IMAGE_SIZE = 256, 224
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# The most shared memory one block may use (the device's opt-in maximum, which Triton's
# launcher compares metadata.shared with): 227 KB on 9.0 (H100, H200), 163 KB on 8.0
# (A100), CUDA C Programming Guide, "Technical Specifications per Compute Capability".
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

# KNOWN_FAILURES, the variants that fail today, is at the end of this file.


class Variant(NamedTuple):
    """One compiled kernel: what the launcher would compile for one launch, config, arch."""

    name: str            # the variant's id, e.g. "dgrad 3x3/s2 prologue+statistics ..."
    kernel: str
    specialization: str  # KHxKW/sSTRIDE, the fusion flags set, and hints that tell apart
    config: str          # BLOCK_MxBLOCK_NxBLOCK_K wWARPS sSTAGES
    arch: int
    dtype: str
    key: str             # hash of everything that determines the compiled code
    job: tuple           # what compile_and_measure needs, picklable


# --- recording the plans' launches ------------------------------------------------------

@contextlib.contextmanager
def _launches_captured(captured: list) -> Iterator[None]:
    """Inside the block every kernel launch through ``tuning.launcher`` appends (kernel,
    args, kwargs) to ``captured`` and runs nothing (the counter's recording keeps the
    positional arguments only; the constexpr keywords are needed here)."""
    from fused_resnet.kernels import tuning

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: captured.append((self.kernel, args, kwargs))

    real, tuning.launcher = tuning.launcher, Capture
    try:
        yield
    finally:
        tuning.launcher = real


class Launch(NamedTuple):
    autotuned: object    # the @triton.autotune'd kernel
    args: tuple
    kwargs: dict


def record_launches(dtype: str) -> list[Launch]:
    """Every launch of a judged kernel in the plans' steps, on meta tensors of ``dtype``."""
    import torch
    from fused_resnet.bench import traffic, workloads
    captured: list = []
    for model, mode in PLANS:
        workload = workloads.model_workload(model, mode, BATCH, IMAGE_SIZE, "meta",
                                            getattr(torch, DTYPES[dtype]),
                                            torch.channels_last)
        with _launches_captured(captured):
            traffic.count_workload(workloads.contender_module("triton", workload.module),
                                   workload)
    launches = [Launch(*launch) for launch in captured if launch[0].fn.__name__ in KERNELS]
    missing = set(KERNELS) - {launch.autotuned.fn.__name__ for launch in launches}
    if missing:
        raise RuntimeError(f"the plans launched no {', '.join(sorted(missing))}: do the ops "
                           "still launch through kernels.tuning.launcher?")
    return launches


# --- specializing a launch as Triton's launcher does -------------------------------------

TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def specialize(launch: Launch, config, arch: int):
    """(signature, constexprs by name, attrs, options) that ``launch`` with ``config``
    compiles on ``arch``: Triton's own binder and packing, as in ``JITFunction.run``, on
    the recorded (meta) arguments, whose data pointer 0 counts as 16-byte aligned, as
    every CUDA allocation is."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.autotuned.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    constexprs = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    return signature, constexprs, attrs, options


def distinct_launches(dtype: str) -> list[tuple[tuple, Launch]]:
    """One launch of each distinct specialization in the plans, tile sizes aside, as
    ((kernel, signature, constexprs, attrs), launch), in kernel order. Specialization
    does not depend on the architecture or the configuration's tile."""
    distinct: dict[str, tuple] = {}
    for launch in record_launches(dtype):
        signature, constexprs, attrs, _ = specialize(launch, launch.autotuned.configs[0], 90)
        constexprs = {name: v for name, v in constexprs.items() if name not in TILE}
        spec = (launch.autotuned.fn.__name__, signature, constexprs, attrs)
        distinct.setdefault(repr([sorted(part.items()) if isinstance(part, dict) else part
                                  for part in spec]), (spec, launch))
    return sorted(distinct.values(),
                  key=lambda entry: (list(KERNELS).index(entry[0][0]),
                                     _base_label(entry[0][2])))


def _hint(name: str, signature: dict, constexprs: dict, attrs: dict, index: int) -> str:
    """How one argument is specialized, as the variant names show it."""
    if name in constexprs:
        return f"{name}={constexprs[name]}"
    divisible = ["tt.divisibility", 16] in attrs.get((index,), [])
    kind = "" if signature[name] == "i32" else f":{signature[name]}"
    return f"{name}{kind}%16{'=0' if divisible else '>0'}"


def _base_label(constexprs: dict) -> str:
    """KHxKW/sSTRIDE and the fusion flags that are on."""
    flags = [name.lower() for name, value in constexprs.items() if value is True]
    return (f"{constexprs['KH']}x{constexprs['KW']}/s{constexprs['STRIDE']} "
            f"{'+'.join(flags) or 'plain'}")


def _labels(specs: list[tuple]) -> list[str]:
    """A readable, unique label for each (kernel, signature, constexprs, attrs): the base
    label, plus the argument hints that differ between the kernel's specs of the same
    base label (e.g. an int divisible by 16 in some launches only)."""
    hints = [[_hint(name, signature, constexprs, attrs, index)
              for index, name in enumerate(signature) if name not in TILE]
             for _, signature, constexprs, attrs in specs]
    base = [(kernel, _base_label(constexprs)) for kernel, _, constexprs, _ in specs]
    labels = []
    for i, label in enumerate(base):
        siblings = [j for j, other in enumerate(base) if other == label]
        differing = [hint for hint in hints[i] if any(hint not in hints[j] for j in siblings)]
        labels.append(" ".join([label[1]] + differing))
    return labels


def _config_label(config) -> str:
    tile = "x".join(str(config.kwargs[name]) for name in TILE)
    return f"{tile} w{config.num_warps} s{config.num_stages}"


def _key(fn, arch: int, signature: dict, constexprs: dict, attrs: dict, options) -> str:
    import triton
    relevant = {k: v for k, v in options.__dict__.items() if k != "extern_libs"}  # paths
    text = json.dumps([MEASUREMENT_VERSION, triton.__version__, fn.cache_key, arch,
                       signature, sorted(constexprs.items()),
                       sorted((list(k), v) for k, v in attrs.items()), relevant],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _variant(label: str, launch: Launch, config, arch: int, dtype: str) -> Variant:
    signature, constexprs, attrs, options = specialize(launch, config, arch)
    kernel = launch.autotuned.fn.__name__
    config_label = _config_label(config)
    return Variant(f"{KERNELS[kernel][1]} {label} {config_label} sm_{arch} {dtype}", kernel,
                   label, config_label, arch, dtype,
                   _key(launch.autotuned.fn, arch, signature, constexprs, attrs, options),
                   (kernel, signature, constexprs, attrs, arch, options.__dict__))


def launch_configs(launch: Launch) -> list:
    """The configurations the autotuner may pick for ``launch``: its kernel's, pruned for
    the launch as the autotuner prunes them (``early_config_prune``)."""
    autotuned = launch.autotuned
    if autotuned.early_config_prune is None:
        return autotuned.configs
    named_args = dict(zip(autotuned.fn.arg_names, launch.args))
    return autotuned.early_config_prune(autotuned.configs, named_args, **launch.kwargs)


def plan_variants() -> list[Variant]:
    """Every variant of the recorded plans: each distinct specialization with each
    configuration the autotuner may pick for it, on each architecture, in each dtype."""
    variants = []
    for dtype in DTYPES:
        entries = distinct_launches(dtype)
        for label, (_, launch) in zip(_labels([spec for spec, _ in entries]), entries):
            variants += [_variant(label, launch, config, arch, dtype)
                         for config in launch_configs(launch) for arch in SHARED_LIMIT]
    return sorted(variants, key=lambda v: (list(KERNELS).index(v.kernel), v.specialization,
                                           v.config, -v.arch, v.dtype))


# --- compiling and reading what the compiler made ----------------------------------------

def _compile_environment(triton_cache: str) -> None:
    """Compile for GPUs (not the interpreter), with ptxas's log printed, into an empty
    Triton cache: every variant then runs ptxas (a cached kernel has no log), and the
    user's cache does not grow by the gate's ~0.5 MB per variant."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def compile_and_measure(job: tuple) -> dict:
    """Compile one variant and measure it (:func:`measure`); a compile error is a result."""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel, signature, constexprs, attrs, arch, options = job
    module = importlib.import_module(f"fused_resnet.kernels.{KERNELS[kernel][0]}")
    fn = getattr(module, kernel).fn
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # the gate reports it as the variant's failure
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return measure(compiled.asm["ttgir"], compiled.asm["ptx"], log.getvalue(),
                   compiled.metadata.shared)


def measure(ttgir: str, ptx: str, ptxas_log: str, shared: int) -> dict:
    """What the gate judges, from the compiler's outputs."""
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas -v report in Triton's output: {ptxas_log[:500]!r}")
    warnings = [re.sub(r"^ptxas \w+\s*: ", "", line.strip()).split(" in the function")[0]
                for line in ptxas_log.splitlines()
                if "warning" in line.lower() or "Performance Loss" in line]
    return {"registers": int(registers[1]), "spill_stores": int(spills[1]),
            "spill_loads": int(spills[2]), "shared": shared,
            "mma": "wgmma" if "wgmma.mma_async" in ptx else
                   "mma.sync" if "mma.sync" in ptx else "none",
            "warnings": warnings, **main_loops(ttgir)}


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) ")


def _loop_bodies(ttgir: str) -> list[str]:
    """The text of each ``scf.for`` body, nested loops' bodies left out."""
    bodies: list[list[str]] = []
    open_loops: list[tuple[int, int]] = []   # (index in bodies, brace depth it opened at)
    depth = 0
    for line in ttgir.splitlines():
        if open_loops and " scf.for " not in line:
            bodies[open_loops[-1][0]].append(line)
        if " scf.for " in line:
            open_loops.append((len(bodies), depth))
            bodies.append([])
        depth += line.count("{") - line.count("}")
        while open_loops and depth <= open_loops[-1][1]:
            open_loops.pop()
    return ["\n".join(body) for body in bodies]


def main_loops(ttgir: str) -> dict:
    """The loops that hold a dot (the GEMM's K loop: one is expected), and whether they are
    software-pipelined: asynchronous copies to shared memory waited for in the loop, and,
    with wgmma, MMAs left in flight across iterations (no wait for pendings = 0)."""
    loops = [body for body in _loop_bodies(ttgir) if _DOT.search(body)]
    return {"main_loops": len(loops),
            "dots_outside_loops": len(_DOT.findall(ttgir)) - sum(len(_DOT.findall(b))
                                                                  for b in loops),
            "async_copies": all("ttg.async_copy_global_to_local" in body
                                and "ttg.async_wait" in body for body in loops),
            "mma_wait_0": any(re.search(r"warp_group_dot_wait .*\{pendings = 0 : i32\}", body)
                              for body in loops)}


# --- judging --------------------------------------------------------------------------------

def failures(result: dict, arch: int) -> list[str]:
    """The gate's rules a measured variant breaks, by name."""
    if "error" in result:
        return ["compile error"]
    broken = []
    if result["spill_stores"] + result["spill_loads"]:
        broken.append("spills")
    if any("serialized" in warning for warning in result["warnings"]):
        broken.append("serialized")
    if result["shared"] > SHARED_LIMIT[arch]:
        broken.append("shared memory")
    if result["main_loops"] != 1 or result["dots_outside_loops"]:
        broken.append("loops")
    if not result["async_copies"]:
        broken.append("not pipelined")
    if result["mma_wait_0"]:
        broken.append("mma wait 0")
    return broken


def judge(variants: list[Variant], results: dict[str, dict]) -> dict:
    """Each variant's failing rules and whether they are the known ones; unexpected
    failures; known failures that name no variant."""
    verdicts, unexpected = {}, []
    for variant in variants:
        broken = ", ".join(failures(results[variant.name], variant.arch))
        known = KNOWN_FAILURES.get(variant.name)
        verdicts[variant.name] = {"failures": broken, "known": known}
        if broken and broken != known:
            unexpected.append(variant.name)
    names = {variant.name for variant in variants}
    return {"verdicts": verdicts, "unexpected": unexpected,
            "unknown_entries": sorted(set(KNOWN_FAILURES) - names)}


# --- the cache --------------------------------------------------------------------------------

def load_cache() -> dict[str, dict]:
    if not CACHE.exists():
        return {}
    return json.loads(CACHE.read_text())["variants"]


def write_cache(variants: list[Variant], results: dict[str, dict]) -> None:
    """One line per variant, in gate order, so that a diff shows which variants changed."""
    import triton
    lines = [f"  {json.dumps(v.name)}: {json.dumps({'key': v.key, **results[v.name]})}"
             for v in variants]
    CACHE.write_text(f'{{"triton": {json.dumps(triton.__version__)}, "variants": {{\n'
                     + ",\n".join(lines) + "\n}}\n")


def measure_all(variants: list[Variant], cached: dict[str, dict], jobs: int) -> dict:
    """Each variant's measurement: the cached one where its key is current, else compiled
    (in ``jobs`` processes)."""
    results = {v.name: {k: x for k, x in cached[v.name].items() if k != "key"}
               for v in variants if cached.get(v.name, {}).get("key") == v.key}
    todo = [v for v in variants if v.name not in results]
    print(f"{len(variants)} variants: {len(results)} from {CACHE.name}, compiling "
          f"{len(todo)} in {jobs} process(es)", file=sys.stderr)
    start = time.monotonic()
    for i, (variant, result) in enumerate(zip(todo, _compiled(todo, jobs)), 1):
        results[variant.name] = result
        if i % 50 == 0 or i == len(todo):
            print(f"  {i}/{len(todo)} compiled, {time.monotonic() - start:.0f} s",
                  file=sys.stderr)
    return results


def _compiled(todo: list[Variant], jobs: int) -> Iterator[dict]:
    if jobs == 1 or len(todo) < 2:
        yield from map(compile_and_measure, (v.job for v in todo))
        return
    # spawn: the workers import fused_resnet afresh instead of inheriting torch's state.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        yield from pool.map(compile_and_measure, (v.job for v in todo))


# --- the table ---------------------------------------------------------------------------

COLUMNS = ["kernel", "specialization", "config", "arch", "dtype", "regs", "spills",
           "shared", "mma", "loops", "warnings", "verdict"]


def _row(variant: Variant, result: dict, verdict: dict) -> list[str]:
    state = ("ok" if not verdict["failures"] else
             f"xfail: {verdict['failures']}" if verdict["failures"] == verdict["known"]
             else f"FAIL: {verdict['failures']}")
    if "error" in result:
        return [KERNELS[variant.kernel][1], variant.specialization, variant.config,
                f"sm_{variant.arch}", variant.dtype] + ["-"] * 6 + [f"{state} "
                                                                    f"({result['error']})"]
    loops = (f"{result['main_loops']} " +
             ("async" if result["async_copies"] else "sync") +
             (", wait0" if result["mma_wait_0"] else ""))
    codes = sorted({code for w in result["warnings"]
                    for code in re.findall(r"\((C\d+)\)", w) or ["warning"]})
    return [KERNELS[variant.kernel][1], variant.specialization, variant.config,
            f"sm_{variant.arch}", variant.dtype, str(result["registers"]),
            str(result["spill_stores"] + result["spill_loads"]),
            f"{result['shared']}/{SHARED_LIMIT[variant.arch]}", result["mma"], loops,
            ",".join(codes) or "-", state]


def table(variants: list[Variant], results: dict, verdicts: dict) -> str:
    rows = [COLUMNS] + [_row(v, results[v.name], verdicts[v.name]) for v in variants]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def summary(variants: list[Variant], judged: dict) -> str:
    verdicts = judged["verdicts"]
    failing = [v for v in variants if verdicts[v.name]["failures"]]
    lines = [f"{len(variants)} variants, {len(variants) - len(failing)} pass, "
             f"{len(failing)} fail ({len(failing) - len(judged['unexpected'])} known)"]
    lines += [f"UNEXPECTED {name}: {verdicts[name]['failures']} (known: "
              f"{verdicts[name]['known'] or 'none'})" for name in judged["unexpected"]]
    lines += [f"KNOWN_FAILURES entry without a variant: {name}"
              for name in judged["unknown_entries"]]
    lines += [f"passes now, remove it from KNOWN_FAILURES: {v.name}" for v in variants
              if verdicts[v.name]["known"] and not verdicts[v.name]["failures"]]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="recompile every variant, ignoring the cache")
    parser.add_argument("--table", action="store_true", help="print every variant's row")
    parser.add_argument("--write-cache", action="store_true",
                        help=f"write the measurements to {CACHE.relative_to(ROOT)}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="compile processes (default: one per CPU)")
    parser.add_argument("--json", help="write each variant's result and verdict here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="compile_gate_") as triton_cache:
        _compile_environment(triton_cache)
        variants = plan_variants()
        results = measure_all(variants, {} if args.full else load_cache(), args.jobs)
    judged = judge(variants, results)
    if args.write_cache:
        write_cache(variants, results)
    if args.table:
        print(table(variants, results, judged["verdicts"]))
    print(summary(variants, judged))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"variants": {v.name: {**results[v.name], **judged["verdicts"][v.name]}
                          for v in variants},
             "unexpected": judged["unexpected"], "unknown_entries": judged["unknown_entries"]},
            indent=1))
    return 1 if judged["unexpected"] or judged["unknown_entries"] else 0



# Variants that fail today, with the rules they fail (failures()), measured with triton
# 3.8. Each is a strict xfail in tests/test_gpu_compilation.py: when a change to a kernel
# or the configurations makes one pass, remove it here.
KNOWN_FAILURES: dict[str, str] = {
    **dict.fromkeys([
        "dgrad 1x1/s1 prologue+statistics+scaled_grad 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 1x1/s1 prologue+statistics+scaled_grad 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 1x1/s1 prologue+statistics+scaled_grad 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 1x1/s1 prologue+statistics+scaled_grad 64x64x64 w4 s3 sm_90 fp16",
        "dgrad 1x1/s1 statistics+add_other 128x128x32 w8 s3 sm_90 bf16",
        "dgrad 1x1/s1 statistics+add_other 128x128x32 w8 s3 sm_90 fp16",
        "dgrad 1x1/s1 statistics+add_other 128x128x64 w8 s3 sm_90 bf16",
        "dgrad 1x1/s1 statistics+add_other 128x128x64 w8 s3 sm_90 fp16",
        "dgrad 1x1/s1 statistics+add_other 128x64x32 w4 s4 sm_90 bf16",
        "dgrad 1x1/s1 statistics+add_other 128x64x32 w4 s4 sm_90 fp16",
        "dgrad 1x1/s1 statistics+add_other 64x128x32 w4 s4 sm_90 bf16",
        "dgrad 1x1/s1 statistics+add_other 64x128x32 w4 s4 sm_90 fp16",
        "dgrad 1x1/s1 statistics+add_other 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 1x1/s1 statistics+add_other 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 1x1/s1 statistics+add_other 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 1x1/s1 statistics+add_other 64x64x64 w4 s3 sm_90 fp16",
        "dgrad 3x3/s1 prologue+statistics 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s1 prologue+statistics 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s1 prologue+statistics 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 3x3/s1 prologue+statistics 64x64x64 w4 s3 sm_90 fp16",
        "dgrad 3x3/s1 prologue+statistics+scaled_grad 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s1 prologue+statistics+scaled_grad 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s1 prologue+statistics+scaled_grad 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 3x3/s1 prologue+statistics+scaled_grad 64x64x64 w4 s3 sm_90 fp16",
        "dgrad 3x3/s1 statistics+add_other 128x128x32 w8 s3 sm_90 bf16",
        "dgrad 3x3/s1 statistics+add_other 128x128x32 w8 s3 sm_90 fp16",
        "dgrad 3x3/s1 statistics+add_other 128x128x64 w8 s3 sm_90 bf16",
        "dgrad 3x3/s1 statistics+add_other 128x128x64 w8 s3 sm_90 fp16",
        "dgrad 3x3/s1 statistics+add_other 128x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s1 statistics+add_other 128x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s1 statistics+add_other 64x128x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s1 statistics+add_other 64x128x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s1 statistics+add_other 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s1 statistics+add_other 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s1 statistics+add_other 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 3x3/s1 statistics+add_other 64x64x64 w4 s3 sm_90 fp16",
        "dgrad 3x3/s2 prologue+statistics 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s2 prologue+statistics 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s2 prologue+statistics 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 3x3/s2 prologue+statistics 64x64x64 w4 s3 sm_90 fp16",
        "dgrad 3x3/s2 statistics+add_other 128x128x32 w8 s3 sm_90 bf16",
        "dgrad 3x3/s2 statistics+add_other 128x128x32 w8 s3 sm_90 fp16",
        "dgrad 3x3/s2 statistics+add_other 128x128x64 w8 s3 sm_90 bf16",
        "dgrad 3x3/s2 statistics+add_other 128x128x64 w8 s3 sm_90 fp16",
        "dgrad 3x3/s2 statistics+add_other 128x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s2 statistics+add_other 128x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s2 statistics+add_other 64x128x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s2 statistics+add_other 64x128x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s2 statistics+add_other 64x64x32 w4 s4 sm_90 bf16",
        "dgrad 3x3/s2 statistics+add_other 64x64x32 w4 s4 sm_90 fp16",
        "dgrad 3x3/s2 statistics+add_other 64x64x64 w4 s3 sm_90 bf16",
        "dgrad 3x3/s2 statistics+add_other 64x64x64 w4 s3 sm_90 fp16",
    ], "serialized"),
    **dict.fromkeys([
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 1x1/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16=0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16=0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16=0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16=0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16>0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16>0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16>0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics pixels_per_split%16>0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16=0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 3x3/s1 prologue+statistics+scaled_grad pixels_per_split%16>0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16=0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16=0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16=0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16=0 128x128x64 w8 s3 sm_90 fp16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16>0 128x128x32 w8 s3 sm_90 bf16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16>0 128x128x32 w8 s3 sm_90 fp16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16>0 128x128x64 w8 s3 sm_90 bf16",
        "wgrad 3x3/s2 prologue+statistics pixels_per_split%16>0 128x128x64 w8 s3 sm_90 fp16",
    ], "mma wait 0"),
}


if __name__ == "__main__":
    sys.exit(main())
