"""The four blocks on backend='triton' against the reference, in training and eval.

Truth is the reference backend in fp64; the triton block's error in fp32 / fp16 must stay
within ERROR_FACTOR of the reference backend's error in the same dtype, for the output,
the input gradient, every parameter gradient and every running statistic.
"""

import copy

import pytest
import torch

import fused_resnet
from blockcases import BLOCK_CASES, LAYOUTS, build_plain, case_id, compare_with_reference
from fused_resnet.testing import errors_beyond_eager

@pytest.mark.parametrize("case, layout", [(case, LAYOUTS[i % 3])
                                          for i, case in enumerate(BLOCK_CASES)],
                         ids=lambda v: case_id(v) if isinstance(v, tuple) else v)
def test_triton_block_fp32(case, layout, device, poisoned_allocations):
    compare_with_reference(case, torch.float32, device, layout, "triton")


@pytest.mark.parametrize("case", [BLOCK_CASES[1], BLOCK_CASES[7]], ids=case_id)
def test_triton_block_half_module_updates_running_statistics(case, device):
    # A .half() module: fp16 weights, BN parameters and running statistics.
    compare_with_reference(case, torch.float16, device, "channels_last", "triton")


def test_triton_path_calls_no_aten_convolution_or_batch_norm(device):
    block = fused_resnet.convert(build_plain(BLOCK_CASES[3]).to(device), backend="triton")
    x = torch.randn(3, 6, 5, 5, device=device, requires_grad=True)
    with torch.profiler.profile() as profile:
        block.train()
        block(x).sum().backward()
        block.eval()
        with torch.no_grad():
            block(x)
    names = {event.name for event in profile.events()}
    forbidden = [n for n in names if "conv" in n.lower() and n.startswith("aten::")
                 or "batch_norm" in n or "cudnn" in n]
    assert forbidden == []
    assert any("triton_conv" in n for n in names)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "preact_resnet50"])
@pytest.mark.parametrize("backend, dtype", [("triton", torch.float32), ("triton", torch.float16),
                                            ("triton", torch.bfloat16), ("cuda", torch.float16),
                                            ("cuda", torch.bfloat16)], ids=str)
def test_resnet50_training_step_within_eager_error(name, backend, dtype):
    # ResNet-50 sized shapes: too slow for the interpreter, so GPU only; every block kind
    # is checked on CPU above (triton) and in tests/test_cuda_backend.py (cuda).
    from fused_resnet.testing import float64_copy, train_and_eval_step
    torch.manual_seed(0)
    model = getattr(fused_resnet.models, name)(num_classes=10, backend="reference").cuda()
    images = torch.randn(8, 3, 64, 64, device="cuda").contiguous(
        memory_format=torch.channels_last)
    truth = train_and_eval_step(float64_copy(model), images.double())
    eager = train_and_eval_step(copy.deepcopy(model).to(dtype), images.to(dtype))
    fused_model = fused_resnet.convert(model.to(dtype), backend=backend)
    fused = train_and_eval_step(fused_model, images.to(dtype))
    assert errors_beyond_eager(fused, eager, truth) == []
