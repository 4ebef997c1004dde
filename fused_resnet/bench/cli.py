"""The ``fused-resnet-bench`` command line: build the workloads, measure each contender,
print and record the results."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import subprocess
import sys
from typing import Callable, Optional

import torch

from fused_resnet.bench import report, timing, workloads
from fused_resnet.bench.workloads import CONTENDERS, MODELS, MODES, Workload

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_NOTICE = "No GPU: a tiny CPU workload. CPU figures say nothing about GPU speed."


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="fused-resnet-bench", description=sys.modules["fused_resnet.bench"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=MODELS,
                        default=["resnet50" if gpu else "resnet18"])
    parser.add_argument("--blocks", action="store_true",
                        help="time each distinct block shape of the model instead of the model")
    parser.add_argument("--block", nargs="+", metavar="NAME",
                        help="time only these blocks, by module name (e.g. layer2.0); "
                        "implies --blocks")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["train"],
                        help="train: forward + backward (+ an SGD step for models); "
                        "eval: inference forward")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if gpu else "fp32")
    parser.add_argument("--autocast", action="store_true",
                        help="keep fp32 parameters and input and run the forward under "
                        "torch.autocast in --dtype, instead of casting the model")
    parser.add_argument("--batch-size", nargs="+", type=int, default=[256 if gpu else 2])
    parser.add_argument("--image-size", type=int, default=224 if gpu else 32)
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--warmup", type=int, default=10 if gpu else 1)
    parser.add_argument("--iterations", type=int, default=50 if gpu else 3)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS,
                        default=CONTENDERS if gpu else ["eager", "reference"])
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each contender's step from a CUDA graph")
    parser.add_argument("--json", help="write the environment and results to this file")
    parser.add_argument("--plot", help="draw the speed-ups into this PNG file")
    args = parser.parse_args(argv)
    for name in ("image_size", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got "
                         f"{getattr(args, name)}")
    if min(args.batch_size) < 1:
        parser.error(f"--batch-size must be at least 1, got {min(args.batch_size)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.cuda_graphs and not gpu:
        parser.error("--cuda-graphs needs a CUDA GPU; none is available")
    if args.autocast and args.dtype == "fp32":
        parser.error("--autocast needs --dtype fp16 or bf16")
    args.blocks = args.blocks or args.block is not None
    return args


def build_workloads(args, device: str) -> list[Workload]:
    dtype = torch.float32 if args.autocast else DTYPES[args.dtype]
    memory_format = torch.contiguous_format if args.nchw else torch.channels_last
    built = []
    for model in args.model:
        for mode in args.mode:
            for batch_size in args.batch_size:
                if args.blocks:
                    built += workloads.block_workloads(model, mode, batch_size,
                                                       args.image_size, device, dtype,
                                                       memory_format, args.block)
                else:
                    built.append(workloads.model_workload(model, mode, batch_size,
                                                          args.image_size, device, dtype,
                                                          memory_format))
    return built


def measure(name: str, workload: Workload, args, expected: torch.Tensor, device: str,
            limits: Optional[dict], progress: Optional[Callable[[], None]]) -> dict:
    """One contender on one workload: its output check against eager, then its timings,
    or the error that stopped it."""
    result = {"workload": workload.name, "model": workload.model, "block": workload.block,
              "description": workload.description, "occurrences": workload.occurrences,
              "mode": workload.mode, "batch_size": workload.input.shape[0],
              "contender": name}
    autocast = _autocast_context(args, device)
    try:
        module = workloads.contender_module(name, workload.module)
        result["relative_rms_vs_eager"] = workloads.check(module, workload, expected,
                                                          DTYPES[args.dtype], autocast)
        plain_step = workloads.step_function(module, workload)

        def step():
            with autocast():
                return plain_step()
        if args.cuda_graphs:
            timing.time_steps(step, device, args.warmup, 0, progress)
            step = timing.cuda_graphed(step)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = timing.time_steps(step, device, 0 if args.cuda_graphs else args.warmup,
                                    args.iterations, progress)
    except Exception as error:  # a contender that cannot run gets its reason, not a number
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return result
    result.update(timing.summarize(seconds))
    result["images_per_s"] = workload.input.shape[0] / result["median_s"]
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" \
        else None
    if workload.flops is not None and limits is not None:
        bound = max(workload.flops / limits["matmul_flops_per_s"],
                    workload.min_bytes / limits["copy_bytes_per_s"])
        result.update(flops=workload.flops, min_bytes=workload.min_bytes, roofline_s=bound,
                      roofline_fraction=bound / result["median_s"])
    return result


def _autocast_context(args, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    if not args.autocast:
        return contextlib.nullcontext
    return lambda: torch.autocast(device, dtype=DTYPES[args.dtype])


def environment(device: str) -> dict:
    import triton

    def command_output(command: list[str]) -> Optional[str]:
        try:
            return subprocess.run(command, capture_output=True, text=True,
                                  check=True).stdout.strip() or None
        except (OSError, subprocess.CalledProcessError):
            return None

    gpu = device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if gpu
        else platform.processor() or platform.machine(),
        "driver": command_output(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"]) if gpu else None,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "python": platform.python_version(),
        "commit": command_output(["git", "rev-parse", "HEAD"]),
    }


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience of the `bench` extra
        return None
    return tqdm(total=total, unit="step", leave=False, disable=None)  # None: off without a TTY


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print(CPU_NOTICE + "\n")
    try:
        to_run = build_workloads(args, device)
    except ValueError as error:  # an unknown --block name: the message lists the known ones
        print(f"fused-resnet-bench: error: {error}", file=sys.stderr)
        return 2
    limits = None
    if args.blocks:
        limits = {"matmul_flops_per_s": timing.matmul_flops_per_second(DTYPES[args.dtype],
                                                                       device),
                  "copy_bytes_per_s": timing.copy_bytes_per_second(device)}
        print(f"roofline on this {device}: {limits['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s "
              f"({args.dtype} matrix product), {limits['copy_bytes_per_s'] / 1e9:.0f} GB/s "
              "(copy)\n")
    bar = _progress_bar(len(to_run) * len(args.contenders) * (args.warmup + args.iterations))
    results = []
    for workload in to_run:
        expected = workloads.checked_output(
            workloads.contender_module("eager", workload.module), workload,
            _autocast_context(args, device))
        for name in args.contenders:
            if bar is not None:
                bar.set_description(f"{workload.name} {workload.mode} {name}")
            results.append(measure(name, workload, args, expected, device, limits,
                                   bar.update if bar is not None else None))
            gc.collect()
        del workload.module
    if bar is not None:
        bar.close()
    report.add_ratios(results)
    precision = f"{args.dtype} autocast" if args.autocast else args.dtype
    print(f"{precision}, {'NCHW' if args.nchw else 'channels_last'}, "
          f"{args.image_size}x{args.image_size} images, on {device}"
          + (", CUDA graphs" if args.cuda_graphs else "") + "\n")
    print(report.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "arguments": vars(args),
                       "device_limits": limits, "results": results}, f, indent=2)
    if args.plot:
        report.plot(results, args.plot)
    return 0
