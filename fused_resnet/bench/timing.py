"""Timing a step function, and the device's own limits for the roofline.

GPU timings use CUDA events around each step, CPU timings ``time.perf_counter``. The
roofline's two rates are measured on the device the benchmark runs on, in the same run: a
large square matrix product in the workload's dtype (FLOP/s) and a large device-to-device
copy (bytes/s, counting the read and the write).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def _time_once(step: Callable[[], object], device: str) -> float:
    if device != "cuda":
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_steps(step: Callable[[], object], device: str, warmup: int, iterations: int,
               progress: Optional[Callable[[], None]] = None) -> list[float]:
    """Seconds of each of ``iterations`` calls of ``step`` after ``warmup`` untimed ones.

    ``progress`` is called after every call, warm-up included.
    """
    for _ in range(warmup):
        step()
        if progress:
            progress()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = []
    for _ in range(iterations):
        seconds.append(_time_once(step, device))
        if progress:
            progress()
    return seconds


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles (the quartiles equal the median for a single timing)."""
    median = statistics.median(seconds)
    q1, _, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [median] * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3}


def cuda_graphed(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``step`` captured once in a CUDA graph; the returned function replays it.

    The step must be warmed up first (autotuning, compilation, lazy allocations) and must
    only touch tensors that stay alive, as the training and eval steps do. The replayed
    graph returns the output tensor of the captured call, refreshed by every replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # PyTorch's recipe: warm up on a side stream before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()

    def replay():
        graph.replay()
        return output
    return replay


def matmul_flops_per_second(dtype: torch.dtype, device: str, repeats: int = 10) -> float:
    """FLOP/s of a square matrix product in ``dtype`` large enough to saturate the device."""
    n = 8192 if device == "cuda" else 512
    dtype = dtype if device == "cuda" else torch.float32  # CPU half products are emulated
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = time_steps(lambda: a @ b, device, warmup=2, iterations=repeats)
    return 2 * n**3 / statistics.median(seconds)


def copy_bytes_per_second(device: str, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and written."""
    size = 2**30 if device == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = time_steps(lambda: target.copy_(source), device, warmup=2, iterations=repeats)
    return 2 * size / statistics.median(seconds)
