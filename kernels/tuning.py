"""Tile configurations shared by the kernels.

Under ``TRITON_INTERPRET=1`` (CPU, CI) every kernel runs one small fixed configuration:
the interpreter is slow and benchmarking there means nothing. On GPUs the autotuner picks
among the listed configurations once per distinct key and caches the choice.
"""

import contextlib
import os
from typing import Callable, Iterator, Optional

import triton
from torch.library import wrap_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Set while fused_resnet.bench.traffic counts an op's implementation on meta tensors:
# each kernel launch is reported to it (kernel, arguments) instead of run.
_record_launch: Optional[Callable] = None


@contextlib.contextmanager
def launches_recorded(record: Callable) -> Iterator[None]:
    """Inside the block, kernels are not launched: ``record(kernel, args)`` is called for
    each launch instead (counting on meta tensors, which have no data)."""
    global _record_launch
    previous, _record_launch = _record_launch, record
    try:
        yield
    finally:
        _record_launch = previous


def launcher(kernel):
    """``kernel`` as the ops launch it: through ``wrap_triton`` on GPUs, so that
    ``torch.compile`` traces into the ``triton_op``s; the kernel itself under the
    interpreter, where the ops are opaque ``custom_op``s and ``wrap_triton`` has nothing
    to trace (and torch 2.11's cannot unwrap an autotuned interpreted kernel:
    ``'function' object has no attribute 'fn'``; 2.14's can)."""
    if _record_launch is not None:
        return _RecordingLauncher(kernel, _record_launch)
    return kernel if INTERPRETED else wrap_triton(kernel)


class _RecordingLauncher:
    """``launcher(kernel)[grid](*args)`` that reports the launch instead of running it."""

    def __init__(self, kernel, record: Callable) -> None:
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record(self.kernel, args)


def gemm_configs(names: tuple[str, str, str]) -> list[triton.Config]:
    """Configurations for a GEMM-shaped kernel whose tile sizes are called ``names``."""
    m, n, k = names
    if INTERPRETED:
        return [triton.Config({m: 16, n: 16, k: 16}, num_warps=1)]
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
              (64, 64, 32, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
    return [triton.Config({m: bm, n: bn, k: bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def elementwise_configs(names: tuple[str, str]) -> list[triton.Config]:
    """Configurations for a (rows, channels) tiled elementwise or reduction kernel."""
    rows, channels = names
    if INTERPRETED:
        return [triton.Config({rows: 16, channels: 16}, num_warps=1)]
    return [triton.Config({rows: r, channels: c}, num_warps=w)
            for r, c, w in [(64, 64, 4), (128, 32, 4), (32, 128, 4), (128, 64, 8)]]
