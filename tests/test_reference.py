"""The reference path against PyTorch's own modules: nn.BatchNorm2d, torchvision, timm."""

import copy

import pytest
import torch
from torch import nn

from blockcases import randomize_batch_norms
from fused_resnet import reference, structure
from fused_resnet.reference import BatchNormParams

BN_CONFIGS = {
    "momentum": dict(momentum=0.1),
    "cumulative": dict(momentum=None),
    "no_affine": dict(affine=False),
    "no_running_stats": dict(track_running_stats=False),
    "eps": dict(eps=1e-2, momentum=0.3),
}


@pytest.mark.parametrize("config", BN_CONFIGS.values(), ids=BN_CONFIGS.keys())
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_matches_nn_batchnorm2d(config, relu):
    bn = randomize_batch_norms(nn.BatchNorm2d(5, **config)).double()
    ours = copy.deepcopy(bn)
    for step, training in enumerate([True, True, True, False]):
        bn.train(training)
        ours.train(training)
        x = torch.randn(3, 5, 7, 5, dtype=torch.double, requires_grad=True)
        x_ours = x.detach().clone().requires_grad_()
        expected = bn(x)
        expected = torch.relu(expected) if relu else expected
        actual = reference.batch_norm(x_ours, BatchNormParams.from_module(ours), relu=relu)
        torch.testing.assert_close(actual, expected)
        grad = torch.randn_like(expected)
        expected.backward(grad)
        actual.backward(grad)
        torch.testing.assert_close(x_ours.grad, x.grad)
        for (name, a), (_, b) in zip(ours.named_parameters(), bn.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=f"step {step}: grad of {name}")
        for (name, a), (_, b) in zip(ours.named_buffers(), bn.named_buffers()):
            torch.testing.assert_close(a, b, msg=f"step {step}: buffer {name}")


def test_frozen_batch_norm_uses_running_statistics_inside_a_training_block():
    bn = randomize_batch_norms(nn.BatchNorm2d(4)).eval()
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(reference.batch_norm(x, BatchNormParams.from_module(bn)), bn(x))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batch_of_one_value_per_channel_raises_pytorchs_error_in_training_only():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        reference.batch_norm(x, BatchNormParams.from_module(bn))
    bn.eval()
    torch.testing.assert_close(reference.batch_norm(x, BatchNormParams.from_module(bn)), bn(x))


def test_statistics_are_exact_for_a_large_mean():
    # |mean| >> std is where a naive sum / sum-of-squares in fp32 loses the variance.
    x = 1e3 + torch.randn(4, 3, 8, 8, dtype=torch.double)
    mean, var = reference.batch_statistics(x.float())
    torch.testing.assert_close(var.double(), x.var(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x.mean(dim=(0, 2, 3)))


def _torchvision_blocks():
    tv = pytest.importorskip("torchvision.models.resnet")
    ds = nn.Sequential(nn.Conv2d(6, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
    return [
        ("tv-basic", tv.BasicBlock(6, 6), structure.BASIC),
        ("tv-basic-proj", tv.BasicBlock(6, 12, 2, copy.deepcopy(ds)), structure.BASIC),
        ("tv-bottleneck", tv.Bottleneck(12, 3), structure.BOTTLENECK),
        ("tv-bottleneck-proj", tv.Bottleneck(6, 3, 2, copy.deepcopy(ds)), structure.BOTTLENECK),
    ]


def _timm_blocks():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models import resnet, resnetv2

    def preact(cls, cin, cout, stride):
        return cls(cin, cout, stride=stride, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                   proj_layer=resnetv2.DownsampleConv, bottle_ratio=0.25
                   if cls is resnetv2.PreActBottleneck else 1.0)

    ds = nn.Sequential(nn.Conv2d(6, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
    return [
        ("timm-basic-proj", resnet.BasicBlock(6, 12, 2, downsample=ds), structure.BASIC),
        ("timm-preact-basic", preact(resnetv2.PreActBasic, 8, 8, 1), structure.PRE_ACT_BASIC),
        ("timm-preact-basic-proj", preact(resnetv2.PreActBasic, 6, 8, 2),
         structure.PRE_ACT_BASIC),
        ("timm-preact-bottleneck", preact(resnetv2.PreActBottleneck, 16, 16, 1),
         structure.PRE_ACT_BOTTLENECK),
        ("timm-preact-bottleneck-proj", preact(resnetv2.PreActBottleneck, 8, 16, 2),
         structure.PRE_ACT_BOTTLENECK),
    ]


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_reference_blocks_match_torchvision_and_timm(source):
    blocks = _torchvision_blocks() if source == "torchvision" else _timm_blocks()
    for name, block, spec in blocks:
        block = randomize_batch_norms(block).double()
        ours = copy.deepcopy(block)
        function = getattr(reference, spec.function)
        for step, training in enumerate([True, True, True, False]):
            block.train(training)
            ours.train(training)
            x = torch.randn(3, block.conv1.in_channels, 9, 7, dtype=torch.double)
            x_ours = x.clone().requires_grad_()
            x.requires_grad_()
            expected = block(x)
            actual = function(x_ours, **structure.block_arguments(ours, spec))
            torch.testing.assert_close(actual, expected, msg=f"{name} step {step}: output")
            grad = torch.randn_like(expected)
            expected.backward(grad)
            actual.backward(grad)
            torch.testing.assert_close(x_ours.grad, x.grad, msg=f"{name}: input grad")
            for (pname, a), (_, b) in zip(ours.named_parameters(), block.named_parameters()):
                torch.testing.assert_close(a.grad, b.grad, msg=f"{name} step {step}: {pname}")
            for (bname, a), (_, b) in zip(ours.named_buffers(), block.named_buffers()):
                torch.testing.assert_close(a, b, msg=f"{name} step {step}: buffer {bname}")
