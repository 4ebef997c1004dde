"""The fused block modules: equivalence with the plain blocks, layouts, odd shapes, errors."""

import pytest
import torch
from torch import nn

import fused_resnet
from blockcases import BLOCK_CASES, build_plain, case_id, post_act_downsample
from fused_resnet import plain
from fused_resnet.testing import errors_beyond_eager, float64_copy


def _step(block, x, training):
    block.train(training)
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    return out.detach(), x.grad, grads, {k: v.clone() for k, v in block.named_buffers()}


def _assert_same_steps(fused, expected_block, inputs, trainings):
    for step, (x, training) in enumerate(zip(inputs, trainings)):
        expected = _step(expected_block, x, training)
        actual = _step(fused, x, training)
        torch.testing.assert_close(actual[0], expected[0], msg=f"step {step}: output")
        assert actual[0].is_contiguous(memory_format=torch.channels_last) == \
            expected[0].is_contiguous(memory_format=torch.channels_last), "memory format"
        torch.testing.assert_close(actual[1], expected[1], msg=f"step {step}: input grad")
        for name in expected[2]:
            torch.testing.assert_close(actual[2][name], expected[2][name],
                                       msg=f"step {step}: grad {name}")
        for name in expected[3]:
            torch.testing.assert_close(actual[3][name], expected[3][name],
                                       msg=f"step {step}: buffer {name}")


@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_fused_block_matches_plain_block_in_fp64(case, layout):
    block = build_plain(case).double()
    fused = fused_resnet.convert(block, backend="reference")
    assert isinstance(fused, fused_resnet.blocks.FusedBlockMixin)
    shapes = [(3, 9, 7), (2, 5, 5), (3, 6, 11), (1, 7, 5)]  # batch 1 in eval only
    inputs = []
    for n, h, w in shapes:
        x = torch.randn(n, case[1], h, w * 2, dtype=torch.double)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = x[..., ::2] if layout == "non_contiguous" else x[..., :w]
        inputs.append(x)
    _assert_same_steps(fused, block, inputs, [True, True, True, False])


@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
def test_fused_block_fp32_error_is_within_eager_error(case):
    block = build_plain(case)
    fused = fused_resnet.convert(block, backend="reference")
    x = torch.randn(3, case[1], 9, 7)
    truth = _step(float64_copy(block), x.double(), True)
    eager = _step(block, x, True)
    result = _step(fused, x, True)

    def flat(step):
        out, grad_x, grads, buffers = step
        return {"output": out, "grad input": grad_x, **grads, **buffers}

    assert errors_beyond_eager(flat(result), flat(eager), flat(truth)) == []


@pytest.mark.parametrize("fused_cls, plain_cls, args", [
    (fused_resnet.BasicBlock, plain.BasicBlock, (8, 8)),
    (fused_resnet.Bottleneck, plain.Bottleneck, (8, 4, 2, post_act_downsample(8, 16, 2))),
    (fused_resnet.PreActBasicBlock, plain.PreActBasicBlock, (8, 16, 1.0, 2)),
    (fused_resnet.PreActBottleneck, plain.PreActBottleneck, (8, 16, 0.25, 2)),
])
def test_direct_construction_has_the_plain_structure_and_keys(fused_cls, plain_cls, args):
    torch.manual_seed(1)
    reference_block = plain_cls(*args)
    torch.manual_seed(1)
    fused = fused_cls(*args, backend="reference")
    assert list(fused.state_dict()) == list(reference_block.state_dict())
    fused.load_state_dict(reference_block.state_dict(), strict=True)
    reference_block.eval()
    fused.eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fused(x), reference_block(x))
    assert "backend='reference'" in repr(fused)


def test_torchvision_state_dict_loads_into_fused_blocks():
    tv = pytest.importorskip("torchvision.models.resnet")
    source = tv.Bottleneck(16, 4)
    fused = fused_resnet.Bottleneck(16, 4)
    fused.load_state_dict(source.state_dict(), strict=True)
    source.load_state_dict(fused.state_dict(), strict=True)


@pytest.mark.parametrize("make, message", [
    (lambda: fused_resnet.BasicBlock(8, 8, groups=2), "groups=2"),
    (lambda: fused_resnet.Bottleneck(8, 2, dilation=2), "dilation=2"),
    (lambda: fused_resnet.BasicBlock(8, 8, base_width=32), "base_width=32"),
    (lambda: fused_resnet.BasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(1, c)),
     "bn1 is GroupNorm"),
    (lambda: fused_resnet.BasicBlock(8, 16, 2, nn.Conv2d(8, 16, 1, 2, bias=False)),
     "downsample is Conv2d"),
    (lambda: fused_resnet.BasicBlock(8, 16, 2), "no downsample"),
    (lambda: fused_resnet.PreActBottleneck(8, 16, groups=4), "groups=4"),
    (lambda: fused_resnet.BasicBlock(8, 8, backend="tensorrt"), "backend='tensorrt'"),
])
def test_unsupported_configurations_raise_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("x, message", [
    (torch.randn(2, 8, 4), r"expected input of shape \(N, 8, H, W\), got \(2, 8, 4\)"),
    (torch.randn(2, 6, 4, 4), r"expected input of shape \(N, 8, H, W\), got \(2, 6, 4, 4\)"),
])
def test_bad_input_shape_raises(x, message):
    with pytest.raises(ValueError, match=message):
        fused_resnet.BasicBlock(8, 8, backend="reference")(x)
