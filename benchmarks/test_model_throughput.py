"""Whole-model training steps and inference, ResNet-50 and ResNet-18 at batch 256, bf16,
channels_last, 224x224: every contender."""

import pytest
import torch

from throughput import DTYPE, time_contender
from fused_resnet.bench import workloads


@pytest.mark.parametrize("contender", workloads.CONTENDERS)
@pytest.mark.parametrize("mode", workloads.MODES)
@pytest.mark.parametrize("model", ["resnet50", "resnet18"])
def test_model(benchmark, model, mode, contender):
    workload = workloads.model_workload(model, mode, 256, 224, "cuda", DTYPE,
                                        torch.channels_last)
    time_contender(benchmark, contender, workload)
