"""``python -m fused_resnet.bench``: throughput and memory of fused ResNets against eager
PyTorch and ``torch.compile``, measured in the same run.

Contenders: ``eager`` (the same model with plain modules: cuDNN on GPUs), ``compile``
and ``compile-max-autotune`` (``torch.compile`` of the eager model), and each fused
backend (``reference``, ``triton``, ``cuda``) that can run the model. Before timing, each
contender's output is checked once against eager's; a contender that fails gets its error
instead of a number. Prints a table, optionally writes JSON.

On a machine without a GPU it runs a tiny CPU workload: CPU figures say nothing about GPU
speed, and the output says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

import fused_resnet
from fused_resnet import models
from fused_resnet.testing import rms

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "preact_resnet18",
          "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152"]
CONTENDERS = ["eager", "compile", "compile-max-autotune", "reference", "triton", "cuda"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative RMS difference to eager's output above which a contender is called wrong:
# a few times the rounding of the storage dtype accumulated over a deep network.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="fused-resnet-bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="resnet50" if gpu else "resnet18")
    parser.add_argument("--mode", choices=["train", "eval"], default="train",
                        help="train: forward + backward + SGD step; eval: forward")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if gpu else "fp32",
                        help="storage dtype (the model and input are cast)")
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 2)
    parser.add_argument("--image-size", type=int, default=224 if gpu else 32)
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--warmup", type=int, default=10 if gpu else 1)
    parser.add_argument("--iterations", type=int, default=50 if gpu else 3)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS,
                        default=CONTENDERS if gpu else ["eager", "reference"])
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    for name in ("batch_size", "image_size", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _build(args, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    memory_format = torch.contiguous_format if args.nchw else torch.channels_last
    model = getattr(models, args.model)(backend="reference").to(device, DTYPES[args.dtype])
    model = model.to(memory_format=memory_format)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device,
                         dtype=DTYPES[args.dtype]).contiguous(memory_format=memory_format)
    return model, images


def _contender(name: str, fused: torch.nn.Module) -> torch.nn.Module:
    if name in ("eager", "compile", "compile-max-autotune"):
        eager = fused_resnet.unfuse(fused)
        if name == "eager":
            return eager
        mode = "max-autotune" if name == "compile-max-autotune" else None
        return torch.compile(eager, mode=mode)
    model = copy.deepcopy(fused)
    for block in model.modules():
        if isinstance(block, fused_resnet.blocks.FusedBlockMixin):
            block.backend = name
    return model


def _step(model: torch.nn.Module, images: torch.Tensor, train: bool,
          optimizer: Optional[torch.optim.Optimizer]) -> torch.Tensor:
    if not train:
        with torch.no_grad():
            return model(images)
    output = model(images)
    output.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return output


def _relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return rms(a.double() - b.double()) / max(rms(b), 1e-30)


def _timer(device: str) -> Callable[[Callable[[], None]], float]:
    def cuda_time(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def cpu_time(fn):
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    return cuda_time if device == "cuda" else cpu_time


def measure(name: str, fused: torch.nn.Module, images: torch.Tensor, args,
            expected: torch.Tensor, device: str) -> dict:
    """One contender: its check against eager, then its timings, or the error."""
    train = args.mode == "train"
    result = {"contender": name}
    try:
        model = _contender(name, fused)
        model.train(train)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3) if train else None
        # The check runs on a copy so that the timed model starts from the same weights.
        check_model = copy.deepcopy(model) if name not in ("compile",
                                                            "compile-max-autotune") else model
        error = _relative_rms(_step(check_model, images, False, None), expected)
        result["relative_rms_vs_eager"] = error
        if error > CHECK_TOLERANCE[images.dtype]:
            raise AssertionError(f"output differs from eager: relative RMS {error:.2e} > "
                                 f"{CHECK_TOLERANCE[images.dtype]:.0e}")
        for _ in range(args.warmup):
            _step(model, images, train, optimizer)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = _timer(device)
        seconds = [timer(lambda: _step(model, images, train, optimizer))
                   for _ in range(args.iterations)]
    except Exception as error:  # a contender that cannot run gets its reason, not a number
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return result
    median = statistics.median(seconds)
    quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [median] * 3
    result.update({
        "median_s": median, "q1_s": quartiles[0], "q3_s": quartiles[2],
        "images_per_s": images.shape[0] / median,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    })
    return result


def _add_ratios(results: list[dict]) -> None:
    baseline = {r["contender"]: r.get("images_per_s") for r in results}
    for r in results:
        if "images_per_s" not in r:
            continue
        for reference in ("eager", "compile"):
            if baseline.get(reference):
                r[f"speedup_vs_{reference}"] = r["images_per_s"] / baseline[reference]


def environment(device: str) -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit,
    }


def _cell(value: Optional[float], width: int, spec: str, suffix: str = "") -> str:
    return (f"{value:{spec}}{suffix}" if value is not None else "-").rjust(width)


def format_table(results: list[dict]) -> str:
    header = f"{'contender':<22}{'images/s':>12}{'median ms':>12}{'vs eager':>10}" \
             f"{'vs compile':>12}{'peak GiB':>10}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['contender']:<22}  {r['error']}")
            continue
        memory = r["peak_memory_bytes"]
        lines.append(
            f"{r['contender']:<22}{_cell(r['images_per_s'], 12, '.1f')}"
            f"{_cell(r['median_s'] * 1e3, 12, '.2f')}"
            f"{_cell(r.get('speedup_vs_eager'), 10, '.2f', 'x')}"
            f"{_cell(r.get('speedup_vs_compile'), 12, '.2f', 'x')}"
            f"{_cell(memory / 2**30 if memory is not None else None, 10, '.2f')}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No GPU: a tiny CPU workload. CPU figures say nothing about GPU speed.\n")
    fused, images = _build(args, device)
    expected = _step(_contender("eager", fused).train(args.mode == "train"), images, False,
                     None)
    results = [measure(name, fused, images, args, expected, device) for name in args.contenders]
    _add_ratios(results)
    print(f"{args.model} {args.mode} {args.dtype} batch {args.batch_size} "
          f"{args.image_size}x{args.image_size} {'NCHW' if args.nchw else 'channels_last'} "
          f"on {device}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "workload": vars(args),
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
