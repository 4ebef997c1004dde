"""Checking and timing one contender on one workload for the pytest-benchmark suites."""

import pytest
import torch

from fused_resnet.backends import BackendUnavailableError
from fused_resnet.bench import workloads

DTYPE = torch.bfloat16
ROUNDS, WARMUP_ROUNDS = 20, 5


def time_contender(benchmark, contender: str, workload: workloads.Workload) -> None:
    """Check ``contender`` on ``workload`` against fp64 (within a multiple of eager's
    error), then time its step."""
    expected = workloads.expected_output(workload)
    module = workloads.contender_module(contender, workload.module)
    try:
        workloads.check(module, workload, expected)
    except BackendUnavailableError as error:
        pytest.skip(f"{contender}: {error}")
    step = workloads.step_function(module, workload)

    def synchronized_step():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(images=workload.input.shape[0], flops=workload.flops,
                                min_bytes=workload.min_bytes,
                                description=workload.description)
    benchmark.pedantic(synchronized_step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
