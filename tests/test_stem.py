"""The fused end of an ImageNet stem (fused_resnet.stem.BatchNormReLUMaxPool): BN + ReLU +
3x3 stride-2 max-pool on the triton backend against PyTorch's own modules in fp64, and
how convert and unfuse swap it."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models, reference, stem
from fused_resnet.reference import BatchNormParams
from fused_resnet.testing import errors_beyond_eager


def _plain_stem(bn: nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(bn, nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))


def _randomized(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def _step_results(module: nn.Module, x: torch.Tensor, training: bool) -> dict:
    """The output, and in training the gradients of x and the BN's parameters and the
    running statistics, of one forward (and backward) of ``module``."""
    module.train(training)
    x = x.detach().requires_grad_(training)
    y = module(x)
    results = {"y": y.detach()}
    if training:
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y).to(y.device)).sum().backward()
        bn = module[0] if isinstance(module, nn.Sequential) else module
        results.update({"grad x": x.grad, "grad weight": bn.weight.grad,
                        "grad bias": bn.bias.grad, "running mean": bn.running_mean.clone(),
                        "running var": bn.running_var.clone(),
                        "num_batches_tracked": bn.num_batches_tracked.clone()})
    return results


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 9, 7), (1, 37, 6, 5), (2, 8, 2, 3)], ids=str)
def test_triton_stem_matches_pytorchs_modules(shape, training, device, poisoned_allocations):
    """Odd and even H and W (windows cut by the padding at every edge), channels that
    are not a multiple of 8, a batch of one; in training every gradient and running
    statistic, within eager's error of an fp64 run, in fp32 and fp16."""
    check_stem(shape, training, device)


def check_stem(shape, training, device):
    """The triton stem on ``shape`` against PyTorch's modules (see the test above)."""
    channels = shape[1]
    plain_bn = _randomized(nn.BatchNorm2d(channels))
    x = torch.randn(shape) * 2 + 0.3
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        truth = _step_results(_plain_stem(copy.deepcopy(plain_bn)).double(), x.double(),
                              training)
        eager = _step_results(_plain_stem(copy.deepcopy(plain_bn)).to(device),
                              x.to(device, dtype), training)
        fused_module = stem.fused_from(copy.deepcopy(plain_bn), "triton").to(device)
        fused = _step_results(fused_module, x.to(device, dtype), training)
        assert fused["y"].dtype == dtype
        assert errors_beyond_eager(fused, eager, truth) == [], dtype


def test_gradient_goes_to_the_first_of_tied_maxima(device):
    """Repeated input values tie after the BN: PyTorch's max-pool routes each window's
    gradient to its first maximum in scan order, and so must the fused backward (a wrong
    choice moves whole gradient values, far beyond rounding)."""
    x = torch.randint(0, 3, (2, 4, 7, 7)).float()
    plain_bn = _randomized(nn.BatchNorm2d(4))
    eager = _step_results(_plain_stem(copy.deepcopy(plain_bn)), x, True)
    fused = _step_results(stem.fused_from(copy.deepcopy(plain_bn), "triton").to(device),
                          x.to(device), True)
    torch.testing.assert_close(fused["y"].cpu(), eager["y"])
    torch.testing.assert_close(fused["grad x"].cpu(), eager["grad x"], rtol=1e-4, atol=1e-5)


def test_nan_propagates_as_pytorchs_max_pool(device):
    plain_bn = _randomized(nn.BatchNorm2d(3)).eval()
    x = torch.randn(1, 3, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        expected = _plain_stem(copy.deepcopy(plain_bn))(x)
        actual = stem.fused_from(copy.deepcopy(plain_bn), "triton").to(device)(x.to(device))
    torch.testing.assert_close(actual.cpu(), expected, equal_nan=True)


def test_reference_function_is_the_plain_stem():
    bn = _randomized(nn.BatchNorm2d(6))
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    expected = _plain_stem(copy.deepcopy(bn).double())(x)
    params = BatchNormParams.from_module(copy.deepcopy(bn).double())
    torch.testing.assert_close(reference.bn_relu_maxpool(x, params), expected)


def test_convert_and_unfuse_swap_the_stem_keeping_the_state_dict():
    model = models.resnet18(num_classes=5, backend="reference")
    assert isinstance(model.bn1, stem.BatchNormReLUMaxPool)
    plain = fused_resnet.unfuse(model)
    assert type(plain.bn1) is nn.BatchNorm2d
    assert plain.state_dict().keys() == model.state_dict().keys()
    converted = fused_resnet.convert(plain, backend="triton")
    assert isinstance(converted.bn1, stem.BatchNormReLUMaxPool)
    assert converted.bn1.backend == "triton"
    for name, value in plain.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value), name
    # The stem computes with the converted model's parameters (what it computes is
    # tested above).
    x = torch.randn(2, 64, 9, 9)
    converted.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted.bn1(x),
                                   plain.maxpool(torch.relu(plain.bn1(x))))


def test_stem_with_a_hook_or_another_pool_is_left_plain():
    hooked = fused_resnet.unfuse(models.resnet18(num_classes=5, backend="reference"))
    hooked.bn1.register_forward_hook(lambda *args: None)
    assert type(fused_resnet.convert(hooked).bn1) is nn.BatchNorm2d
    other_pool = fused_resnet.unfuse(models.resnet18(num_classes=5, backend="reference"))
    other_pool.maxpool = nn.MaxPool2d(2)
    assert type(fused_resnet.convert(other_pool).bn1) is nn.BatchNorm2d


def test_a_sync_batch_norm_conversion_keeps_relu_and_pool():
    # convert_sync_batchnorm turns the fused stem's BN into a plain SyncBatchNorm: the
    # model then applies the ReLU and max-pool itself (as after unfuse).
    model = nn.SyncBatchNorm.convert_sync_batchnorm(models.resnet18(num_classes=5,
                                                                    backend="reference"))
    assert type(model.bn1) is nn.SyncBatchNorm
    reference_model = fused_resnet.unfuse(models.resnet18(num_classes=5, backend="reference"))
    reference_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), reference_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_model(x))


@pytest.mark.parametrize("training", [True, False])
def test_stem_compiles_fullgraph(training, device):
    """torch.compile traces the fused stem (its autograd Function and mutating finalize
    included) without graph breaks, and computes what it computes uncompiled."""
    torch._dynamo.reset()
    plain_bn = _randomized(nn.BatchNorm2d(6))
    x = torch.randn(2, 6, 7, 9)
    uncompiled = _step_results(stem.fused_from(copy.deepcopy(plain_bn), "triton").to(device),
                               x.to(device), training)
    compiled_module = torch.compile(stem.fused_from(copy.deepcopy(plain_bn), "triton")
                                    .to(device), fullgraph=True)
    module = compiled_module._orig_mod
    compiled_module.train(training)
    x_compiled = x.to(device).requires_grad_(training)
    y = compiled_module(x_compiled)
    torch.testing.assert_close(y, uncompiled["y"])
    if training:
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y).to(y.device)).sum().backward()
        torch.testing.assert_close(x_compiled.grad, uncompiled["grad x"])
        torch.testing.assert_close(module.weight.grad, uncompiled["grad weight"])
        torch.testing.assert_close(module.running_var, uncompiled["running var"])
