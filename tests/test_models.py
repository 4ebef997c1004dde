"""fused_resnet.models: shapes, stems, initialization, torchvision checkpoint compatibility."""

import pytest
import torch

import fused_resnet
from fused_resnet import models
from fused_resnet.demo import FUNCTION_TOLERANCE
from fused_resnet.testing import float64_copy, relative_differences_beyond, train_and_eval_step

ALL_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
              "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
              "preact_resnet152"]
STAGE_DEPTHS = {"18": [2, 2, 2, 2], "34": [3, 4, 6, 3], "50": [3, 4, 6, 3],
                "101": [3, 4, 23, 3], "152": [3, 8, 36, 3]}


def _same_function_as_plain_pytorch(model: torch.nn.Module, images: torch.Tensor) -> list[str]:
    """The tensors of an fp64 training step and eval forward (outputs, every gradient and
    running statistic) where ``model`` differs from its plain-PyTorch (unfused) copy by
    more than rounding (the demo's tolerance: 3e-12 measured, 1e-3 for a wrong formula)."""
    plain_model = float64_copy(fused_resnet.unfuse(model))
    assert not any(isinstance(m, fused_resnet.blocks.FusedBlockMixin)
                   for m in plain_model.modules())
    return relative_differences_beyond(train_and_eval_step(float64_copy(model), images),
                                       train_and_eval_step(plain_model, images),
                                       FUNCTION_TOLERANCE)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_models_build_with_both_stems(name):
    """The stems, the blocks per stage (He et al., table 1) and the output shape. That the
    blocks compute what their plain modules do is checked below on the shallower models:
    101 and 152 only repeat the 50's blocks."""
    imagenet = getattr(models, name)(num_classes=7, backend="reference").eval()
    stages = [len(imagenet.get_submodule(f"layer{i}")) for i in range(1, 5)]
    assert stages == STAGE_DEPTHS[name.split("resnet")[1]]
    with torch.no_grad():
        assert imagenet(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    cifar = getattr(models, name)(num_classes=10, stem="cifar", backend="reference")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.maxpool is None
    blocks = [m for m in cifar.modules() if isinstance(m, fused_resnet.blocks.FusedBlockMixin)]
    assert all(b.backend == "reference" for b in blocks)
    assert all(b.spec.pre_act == name.startswith("preact") for b in blocks)


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n.endswith(("18", "34", "50"))])
def test_models_compute_what_their_plain_modules_compute(name):
    # Sizes where the last stage's BatchNorms see 8 (ImageNet stem) and 32 (CIFAR stem)
    # values per channel: with 2, fp64 rounding alone moves the gradients by 1e-8.
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    imagenet = getattr(models, name)(num_classes=7, backend="reference")
    assert _same_function_as_plain_pytorch(imagenet, images) == []
    cifar = getattr(models, name)(num_classes=10, stem="cifar", backend="reference")
    assert _same_function_as_plain_pytorch(cifar, images[:, :, :32, :32]) == []


def test_cifar_preact_resnet_trains_a_step_as_plain_pytorch_does():
    """Cross-entropy, SGD with momentum, two steps in fp64: the fused model's weight
    updates and second loss are the plain model's to rounding. (In fp32 the two differ
    by about 2e-3 of the step: ReLUs within rounding of zero flip either way.)"""
    model = float64_copy(models.preact_resnet18(num_classes=10, stem="cifar",
                                                 backend="reference"))
    plain_model = fused_resnet.unfuse(model)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 3])
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = []
    for module in (model, plain_model):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(images), labels)
            loss.backward()
            optimizer.step()
        results.append({"second loss": loss.detach(),
                        **{f"update {name}": p.detach() - start[name]
                           for name, p in module.named_parameters()}})
    assert relative_differences_beyond(*results, FUNCTION_TOLERANCE) == []


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
