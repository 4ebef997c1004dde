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
from pathlib import Path
from typing import Callable, Optional

import torch

import fused_resnet
from fused_resnet.bench import report, timing, traffic, workloads
from fused_resnet.bench.workloads import CONTENDERS, MODELS, MODES, Workload

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_NOTICE = ("No GPU: a tiny CPU workload, timed in a few calls on a CPU shared with "
              "everything else. These timings are not measurements (the same run swings "
              "by 10x and more) and say nothing about GPU speed; what a CPU run shows is "
              "that each contender runs and is within eager's error of fp64.")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="fused-resnet-bench", description=sys.modules["fused_resnet.bench"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traffic", action="store_true",
                        help="count kernel launches, bytes moved, bytes saved for backward "
                        "and peak bytes of one step on the meta device instead of timing "
                        "it (exact on any machine; defaults as on a GPU)")
    parser.add_argument("--model", nargs="+", choices=MODELS)
    parser.add_argument("--blocks", action="store_true",
                        help="time each distinct block shape of the model instead of the model")
    parser.add_argument("--block", nargs="+", metavar="NAME",
                        help="time only these blocks, by module name (e.g. layer2.0); "
                        "implies --blocks")
    parser.add_argument("--mode", nargs="+", choices=MODES,
                        help="train: forward + backward (+ an SGD step for models); "
                        "eval: inference forward (default: train; with --traffic, both)")
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--autocast", action="store_true",
                        help="keep fp32 parameters and input and run the forward under "
                        "torch.autocast in --dtype, instead of casting the model")
    parser.add_argument("--batch-size", nargs="+", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--warmup", type=int, default=10 if gpu else 1)
    parser.add_argument("--iterations", type=int, default=50 if gpu else 3)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each contender's step from a CUDA graph")
    parser.add_argument("--json", help="write the environment and results to this file")
    parser.add_argument("--plot", help="draw the speed-ups into this PNG file")
    args = parser.parse_args(argv)
    full_size = gpu or args.traffic  # counts are exact anywhere: the GPU workload
    defaults = {"model": ["resnet50" if full_size else "resnet18"],
                "mode": ["train", "eval"] if args.traffic else ["train"],
                "dtype": "bf16" if full_size else "fp32",
                "batch_size": [256 if full_size else 2],
                # 64 on CPU: the last stage's BatchNorms see 8 values per channel. At 32
                # they see 2, where every output is within rounding of +-1 and errors
                # against fp64 reach 1e-3 (eager's included): a degenerate check.
                "image_size": 224 if full_size else 64,
                "contenders": (traffic.CONTENDERS if args.traffic else
                               CONTENDERS if gpu else ["eager", "reference"])}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.traffic:
        untimed = [c for c in args.contenders if c not in traffic.CONTENDERS]
        if untimed:
            parser.error(f"--traffic counts {', '.join(traffic.CONTENDERS)}; "
                         f"{', '.join(untimed)} run generated code it does not see")
        if args.cuda_graphs:
            parser.error("--traffic counts ops; --cuda-graphs does not change them")
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


def _result_header(name: str, workload: Workload) -> dict:
    return {"workload": workload.name, "model": workload.model, "block": workload.block,
            "description": workload.description, "occurrences": workload.occurrences,
            "mode": workload.mode, "batch_size": workload.input.shape[0],
            "contender": name}


def count_traffic(name: str, workload: Workload) -> dict:
    """One contender's counted traffic on one meta-device workload, or the error that
    stopped it."""
    result = _result_header(name, workload)
    try:
        module = workloads.contender_module(name, workload.module)
        result.update(traffic.count_workload(module, workload))
    except Exception as error:  # a contender that cannot run gets its reason, not a number
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    if workload.min_bytes is not None:
        result["ideal_bytes"] = workload.min_bytes
    return result


def run_traffic(args) -> list[dict]:
    results = [count_traffic(name, workload)
               for workload in build_workloads(args, "meta") for name in args.contenders]
    report.add_traffic_ratios(results)
    print(f"Counted on the meta device (fused_resnet.bench.traffic): {args.dtype}, "
          f"{'NCHW' if args.nchw else 'channels_last'}, {args.image_size}x{args.image_size} "
          "images\n")
    print(report.format_traffic_table(results))
    return results


def measure(name: str, workload: Workload, args, expected: workloads.Expected, device: str,
            limits: Optional[dict], progress: Optional[Callable[[], None]]) -> dict:
    """One contender on one workload: its output checked against fp64 (within a multiple
    of eager's error), then its timings, or the error that stopped it."""
    result = _result_header(name, workload)
    autocast = _autocast_context(args, device)
    try:
        module = workloads.contender_module(name, workload.module)
        result["relative_rms_vs_fp64"] = workloads.check(module, workload, expected, autocast)
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


def _command_output(command: list[str]) -> Optional[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def source_revision() -> dict:
    """The git commit of the fused_resnet source that runs and whether its files differ
    from it (``dirty``); commit "unknown" where the package is not a git checkout's own
    (an installed wheel, or a copy inside another repository)."""
    package = Path(fused_resnet.__file__).resolve().parent
    top = _command_output(["git", "-C", str(package), "rev-parse", "--show-toplevel"])
    if top is None or Path(top).resolve() / "fused_resnet" != package:
        return {"commit": "unknown", "dirty": None}
    changed = _command_output(["git", "-C", top, "status", "--porcelain", "--",
                               "fused_resnet", "kernels", "csrc", "setup.py"])
    return {"commit": _command_output(["git", "-C", top, "rev-parse", "HEAD"]),
            "dirty": changed is not None}


def environment(device: str) -> dict:
    import triton

    gpu = device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if gpu
        else platform.processor() or platform.machine(),
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version",
                                   "--format=csv,noheader"]) if gpu else None,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "python": platform.python_version(),
        "timings_are_measurements": gpu,
        **source_revision(),
    }


def _write_json(args, device: str, limits: Optional[dict], results: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "arguments": vars(args),
                       "device_limits": limits, "results": results}, f, indent=2)


def progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience of the `bench` extra
        return None
    return tqdm(total=total, unit="step", leave=False, disable=None)  # None: off without a TTY


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.traffic:
            _write_json(args, "meta", None, run_traffic(args))
            return 0
        to_run = build_workloads(args, device)
    except ValueError as error:  # an unknown --block name: the message lists the known ones
        print(f"fused-resnet-bench: error: {error}", file=sys.stderr)
        return 2
    if device == "cpu":
        print(CPU_NOTICE + "\n")
    limits = None
    if args.blocks:
        limits = {"matmul_flops_per_s": timing.matmul_flops_per_second(DTYPES[args.dtype],
                                                                       device),
                  "copy_bytes_per_s": timing.copy_bytes_per_second(device)}
        print(f"roofline on this {device}: {limits['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s "
              f"({args.dtype} matrix product), {limits['copy_bytes_per_s'] / 1e9:.0f} GB/s "
              "(copy)\n")
    bar = progress_bar(len(to_run) * len(args.contenders) * (args.warmup + args.iterations))
    results = []
    for workload in to_run:
        expected = workloads.expected_output(workload, _autocast_context(args, device))
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
    _write_json(args, device, limits, results)
    if args.plot:
        report.plot(results, args.plot)
    return 0
