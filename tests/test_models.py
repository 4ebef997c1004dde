"""fused_resnet.models: shapes, stems, initialization, torchvision checkpoint compatibility."""

import pytest
import torch

import fused_resnet
from fused_resnet import models

ALL_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
              "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
              "preact_resnet152"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_models_build_and_run_with_both_stems(name):
    imagenet = getattr(models, name)(num_classes=7, backend="reference").eval()
    with torch.no_grad():
        assert imagenet(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    cifar = getattr(models, name)(num_classes=10, stem="cifar", backend="reference")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.maxpool is None
    blocks = [m for m in cifar.modules() if isinstance(m, fused_resnet.blocks.FusedBlockMixin)]
    assert all(b.backend == "reference" for b in blocks)
    assert all(b.spec.pre_act == name.startswith("preact") for b in blocks)


def test_cifar_preact_resnet_trains_a_step():
    model = models.preact_resnet18(num_classes=10, stem="cifar", backend="reference")
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet18", "preact_resnet50"])
def test_zero_init_residual_makes_every_block_start_as_its_shortcut(name):
    model = getattr(models, name)(zero_init_residual=True, backend="reference")
    for block in model.modules():
        if isinstance(block, fused_resnet.blocks.FusedBlockMixin):
            if block.downsample is not None:
                continue
            x = torch.randn(2, block.in_channels, 4, 4)
            block.eval()
            expected = x if block.spec.pre_act else torch.relu(x)
            torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_checkpoints_load_both_ways(name):
    torchvision = pytest.importorskip("torchvision")
    theirs = getattr(torchvision.models, name)().eval()
    ours = getattr(models, name)(backend="reference").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # fp32 through 18-50 layers: the reference folds BN into one scale/shift, ATen
        # normalizes in another order, so the two agree to rounding, not bitwise.
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_unknown_stem_is_rejected():
    with pytest.raises(ValueError, match="stem='tiny'"):
        models.resnet18(stem="tiny")
