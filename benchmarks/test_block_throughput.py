"""Every distinct block shape of ResNet-50 and ResNet-18 (224x224 images), batch 128 and
256, bf16, channels_last, forward+backward and inference: every contender. The roofline
inputs (FLOPs, minimal bytes) are in each benchmark's ``extra_info``."""

import pytest
import torch

from throughput import DTYPE, time_contender
from fused_resnet.bench import workloads

BLOCKS = [(model, block) for model in ("resnet50", "resnet18")
          for block in workloads.distinct_blocks(model, 224)]


@pytest.mark.parametrize("contender", workloads.CONTENDERS)
@pytest.mark.parametrize("mode", workloads.MODES)
@pytest.mark.parametrize("batch_size", [128, 256])
@pytest.mark.parametrize("model, block", BLOCKS, ids=[f"{m}.{b}" for m, b in BLOCKS])
def test_block(benchmark, model, block, batch_size, mode, contender):
    [workload] = workloads.block_workloads(model, mode, batch_size, 224, "cuda", DTYPE,
                                           torch.channels_last, only=[block])
    time_contender(benchmark, contender, workload)
