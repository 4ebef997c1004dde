"""Every path a GPU run takes, taken at CPU sizes, against fp64 within eager's error.

Each tile configuration the autotuner may pick (shrunk under the interpreter) runs on
channel counts wider than the tiles and multiples of none of them, and each size threshold
that changes which code runs (split-K wgrad, reductions over several blocks of tiles or
channels) is lowered so that tiny inputs cross it. ``test_every_threshold_is_crossed``
lists the kernels' thresholds: a new one fails it until a test that crosses it is named.
"""

import importlib
import inspect
import pkgutil

import pytest
import torch

from fused_resnet import kernels
from fused_resnet.kernels import conv_backward, conv_forward, elementwise, stem, tuning
from opcases import (CONV_CASES, check_bn_add_relu, check_channel_statistics,
                     check_triton_conv, cross_reduction_thresholds)
from test_stem import check_stem

GEMM_KERNELS = [conv_forward.fused_conv_forward_kernel, conv_backward.conv_dgrad_kernel,
                conv_backward.conv_wgrad_kernel]
ELEMENTWISE_KERNELS = [elementwise.bn_add_relu_kernel, elementwise.bn_add_relu_backward_kernel,
                       elementwise.channel_statistics_kernel,
                       elementwise.statistics_backward_kernel, stem.bn_relu_maxpool_kernel,
                       stem.maxpool_relu_backward_kernel]
# Channels wider than the widest interpreter tile (32) and multiples of no tile size;
# stride 2 and 3x3; 70 input and 24 output pixels.
WIDE_CONV_CASE = (2, 35, 5, 7, 37, 3, 2)
WIDE_SHAPE = (3, 37, 5, 7)


def _config_id(shape):
    return "x".join(map(str, shape[:-2]))


@pytest.mark.parametrize("index", range(len(tuning.GEMM_SHAPES)),
                         ids=[_config_id(shape) for shape in tuning.GEMM_SHAPES])
def test_every_gemm_config(index, device, poisoned_allocations, monkeypatch):
    config = tuning.every_gemm_config(("BLOCK_M", "BLOCK_N", "BLOCK_K"))[index]
    for kernel in GEMM_KERNELS:
        monkeypatch.setattr(kernel, "configs", [config])
    cross_reduction_thresholds(monkeypatch)
    # Under the interpreter the tiles' indexing does not depend on the dtype (fp16 runs
    # with the default configuration everywhere else); on a GPU each dtype is its own
    # MMA path.
    in_dtypes = None if device == "cuda" else [torch.float32]
    for fusion in ("prologue_statistics", "epilogue"):
        check_triton_conv(WIDE_CONV_CASE, fusion, device, torch.channels_last, in_dtypes)


@pytest.mark.parametrize("index", range(len(tuning.ELEMENTWISE_SHAPES)),
                         ids=[_config_id(shape) for shape in tuning.ELEMENTWISE_SHAPES])
def test_every_elementwise_config(index, device, poisoned_allocations, monkeypatch):
    config = tuning.every_elementwise_config(("BLOCK_M", "BLOCK_C"))[index]
    for kernel in ELEMENTWISE_KERNELS:
        monkeypatch.setattr(kernel, "configs", [config])
    cross_reduction_thresholds(monkeypatch)
    check_bn_add_relu(WIDE_SHAPE, "projection", torch.channels_last, device)
    check_channel_statistics(WIDE_SHAPE, device)
    check_stem(WIDE_SHAPE, True, device)


@pytest.mark.parametrize("fusion", ["plain", "prologue_statistics"])
def test_reduction_paths_at_tiny_sizes(fusion, device, poisoned_allocations, monkeypatch):
    """The default configuration with every reduction threshold crossed, with and without
    the BN-ReLU prologue, the weight gradient written channels_last."""
    cross_reduction_thresholds(monkeypatch)
    check_triton_conv(CONV_CASES[0], fusion, device, torch.channels_last)


# Many row and column tiles at the interpreter's default 32x16 tiles: 297 pixels (10 row
# tiles), 37 output channels (3 column tiles) in the forward, 37 input channels in dgrad.
GROUPED_ORDER_CASES = [(3, 9, 9, 11, 37, 1, 1), (3, 37, 9, 11, 9, 1, 1)]


@pytest.mark.parametrize("case", GROUPED_ORDER_CASES, ids=str)
def test_grouped_tile_order_covers_every_tile(case, device, poisoned_allocations,
                                              monkeypatch):
    """Groups of 3 row tiles (lowered from GROUP_M = 8) over 10 row tiles, 3 full groups
    and a partial one, with the per-tile statistics and sums indexed by row tile: an
    output tile computed twice or never stays NaN or breaks the statistics."""
    cross_reduction_thresholds(monkeypatch)
    for fusion in ("plain", "prologue_statistics"):
        check_triton_conv(case, fusion, device, in_dtypes=[torch.float32])


# Each size threshold of the kernels package: the test that runs both sides of it, as
# (module, test name). The test's source must name the threshold.
CROSSED_BY = {
    "conv_forward._GROUP_M": ("opcases", "cross_reduction_thresholds"),
    "conv_backward._WGRAD_PIXELS_PER_SPLIT": ("opcases", "cross_reduction_thresholds"),
    "conv_backward._SUM_SPLITS_BLOCK": ("opcases", "cross_reduction_thresholds"),
    "statistics.MERGE_TILES": ("opcases", "cross_reduction_thresholds"),
    "statistics.MERGE_CHANNELS": ("opcases", "cross_reduction_thresholds"),
    "batch_norm_finalize._BLOCK": ("test_triton_ops", "test_bn_finalize_matches_the_reference"),
    "tuning.GEMM_SHAPES": ("test_gpu_size_paths", "test_every_gemm_config"),
    "tuning.ELEMENTWISE_SHAPES": ("test_gpu_size_paths", "test_every_elementwise_config"),
}
# How the interpreter shrinks and picks among those shapes: CPU-only choices.
INTERPRETER_CHOICES = {"tuning._SHRINK", "tuning._INTERPRETER_GEMM_DEFAULT",
                       "tuning._INTERPRETER_ELEMENTWISE_DEFAULT"}


def _thresholds():
    """Module-level integer (not bool) and shape-list constants of the kernels package."""
    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, value in vars(module).items():
            constant = name.lstrip("_").isupper()
            number = isinstance(value, int) and not isinstance(value, bool)
            shapes = isinstance(value, list) and all(isinstance(v, tuple) for v in value)
            if constant and (number or shapes):
                found.add(f"{info.name}.{name}")
    return found


def test_every_threshold_is_crossed():
    assert _thresholds() == set(CROSSED_BY) | INTERPRETER_CHOICES, (
        "a size threshold of the kernels was added or removed: add a test at tiny sizes "
        "that crosses it and name it in CROSSED_BY")
    for threshold, (module, function) in CROSSED_BY.items():
        source = inspect.getsource(getattr(importlib.import_module(module), function))
        assert threshold.split(".")[1] in source, f"{function} does not name {threshold}"
