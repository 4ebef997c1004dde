"""pytest-benchmark suites over the workloads of ``fused-resnet-bench`` (helpers in
``throughput.py``).

Run on a GPU machine: ``pytest benchmarks/ --benchmark-json=OUT.json`` (add ``-k`` to pick
workloads or contenders). Each contender's output is checked against eager PyTorch before
it is timed: a wrong contender fails, an unavailable backend is skipped with its reason.
Without a CUDA GPU every benchmark is skipped: CPU timings say nothing about GPU speed.
"""

import pytest
import torch


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="throughput suites time CUDA kernels; no CUDA GPU here")
    for item in items:
        item.add_marker(skip)
