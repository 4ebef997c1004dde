"""Tile configurations shared by the kernels.

On GPUs the autotuner picks among the listed configurations once per distinct key and
caches the choice. Under ``TRITON_INTERPRET=1`` (CPU, CI) each kernel runs one of them
shrunk to CPU size, where benchmarking would mean nothing; the tests run every one.
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


# The tile shapes the autotuner chooses among on a GPU: (rows, columns, depth, num_warps,
# num_stages) of the GEMM-shaped kernels, (rows, channels, num_warps, num_stages) of the
# tiled elementwise ones.
GEMM_SHAPES = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
               (64, 64, 32, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
ELEMENTWISE_SHAPES = [(64, 64, 4, 3), (128, 32, 4, 3), (32, 128, 4, 3), (128, 64, 8, 3)]
# Under the interpreter every GPU shape shrinks by this factor in each dimension, so that
# each can run at CPU sizes (tests run them all: see every_gemm_config). The one
# run by default is non-square and differs in every dimension (32 x 16 x 8 and 32 x 8),
# so that a mix-up of two tile sizes changes the result instead of running the same code.
_SHRINK = 4
_INTERPRETER_GEMM_DEFAULT = 1
_INTERPRETER_ELEMENTWISE_DEFAULT = 1


def _configs(names: tuple[str, ...], shapes: list[tuple[int, ...]],
             shrink: int = 1) -> list[triton.Config]:
    configs = []
    for shape in shapes:
        *tile, num_warps, num_stages = shape
        configs.append(triton.Config({name: size // shrink for name, size in zip(names, tile)},
                                     num_warps=num_warps, num_stages=num_stages))
    return configs


def every_gemm_config(names: tuple[str, str, str]) -> list[triton.Config]:
    """Every configuration the autotuner may pick for a GEMM-shaped kernel whose tile sizes
    are called ``names``; under the interpreter each shrunk to CPU size."""
    return _configs(names, GEMM_SHAPES, _SHRINK if INTERPRETED else 1)


def every_elementwise_config(names: tuple[str, str]) -> list[triton.Config]:
    """Every configuration the autotuner may pick for a (rows, channels) tiled kernel;
    under the interpreter each shrunk to CPU size."""
    return _configs(names, ELEMENTWISE_SHAPES, _SHRINK if INTERPRETED else 1)


def gemm_configs(names: tuple[str, str, str]) -> list[triton.Config]:
    """The configurations a GEMM-shaped kernel is autotuned over (one under the
    interpreter, where benchmarking means nothing)."""
    configs = every_gemm_config(names)
    return [configs[_INTERPRETER_GEMM_DEFAULT]] if INTERPRETED else configs


def elementwise_configs(names: tuple[str, str]) -> list[triton.Config]:
    """The configurations a (rows, channels) tiled elementwise or reduction kernel is
    autotuned over (one under the interpreter)."""
    configs = every_elementwise_config(names)
    return [configs[_INTERPRETER_ELEMENTWISE_DEFAULT]] if INTERPRETED else configs


def pruned_by(keeps: Callable[[triton.Config, dict], bool]) -> dict:
    """``prune_configs_by`` for ``triton.autotune``: of the configurations, those that
    ``keeps(config, launch_keywords)`` (the launch's constexpr flags) for the launch. On
    GPUs only: the interpreter runs its one configuration, shrunk to CPU size."""
    def prune(configs, named_args, **launch_keywords):
        if INTERPRETED:
            return configs
        kept = [config for config in configs if keeps(config, launch_keywords)]
        if not kept:
            raise RuntimeError(f"no tile configuration for a launch with {launch_keywords}")
        return kept
    return {"early_config_prune": prune}


def tile(config: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of a GEMM-shaped kernel's configuration."""
    return (*(config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            config.num_warps)


def max_tiles(kernel, rows: int, name: str = "BLOCK_M") -> int:
    """The most programs ``kernel`` can launch along ``rows`` with any configuration it
    may run (its smallest ``name`` tile): the size of per-tile partial buffers, read from
    the kernel's configurations at call time so that they follow any that tests set."""
    return triton.cdiv(rows, min(config.kwargs[name] for config in kernel.configs))
