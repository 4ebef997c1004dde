"""fused_resnet.convert and unfuse on torchvision and timm models."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from blockcases import randomize_batch_norms
from fused_resnet.blocks import FusedBlockMixin

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

MODELS = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv-resnet34": lambda: torchvision.models.resnet34(num_classes=10),
    "tv-resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "tv-resnet101": lambda: torchvision.models.resnet101(num_classes=10),
    "tv-resnet152": lambda: torchvision.models.resnet152(num_classes=10),
    "tv-wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
    "timm-resnet50": lambda: timm.create_model("resnet50", num_classes=10),
    "timm-resnetv2_50": lambda: timm.create_model("resnetv2_50", num_classes=10),
}


def _count_unfused_blocks(model):
    return sum(type(m).__name__ in ("BasicBlock", "Bottleneck", "PreActBasic", "PreActBottleneck")
               and not isinstance(m, FusedBlockMixin) for m in model.modules())


def _train_then_eval(model, x, steps=2):
    outputs = []
    model.train()
    for _ in range(steps):
        out = model(x)
        out.square().mean().backward()
        outputs.append(out.detach())
    model.eval()
    with torch.no_grad():
        outputs.append(model(x))
    grads = {n: p.grad for n, p in model.named_parameters()}
    return outputs, grads, dict(model.named_buffers())


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_computes_the_same_function(name):
    original = randomize_batch_norms(MODELS[name]())
    blocks = _count_unfused_blocks(original)
    converted = fused_resnet.convert(original, backend="reference")
    report = converted.fusion_report
    assert report.left == [], str(report)
    assert len(report.swapped) == blocks > 0
    assert _count_unfused_blocks(converted) == 0
    assert list(converted.state_dict()) == list(original.state_dict())

    # The fp32 eval output, then a whole training run in fp64 where any difference in the
    # math would stand out above rounding.
    # 64x64 leaves 2x2 pixels in the last stage: 8 values per channel for its batch
    # statistics (at 32x32 there are 2, and BN's backward turns fp64 rounding into 1e-7).
    x = torch.randn(2, 3, 64, 64)
    original.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)
    expected = _train_then_eval(original.double(), x.double())
    actual = _train_then_eval(converted.double(), x.double())
    for step, (a, e) in enumerate(zip(actual[0], expected[0])):
        torch.testing.assert_close(a, e, msg=f"output {step}")
    for key in expected[1]:
        torch.testing.assert_close(actual[1][key], expected[1][key], msg=f"grad {key}")
    for key in expected[2]:
        torch.testing.assert_close(actual[2][key], expected[2][key], msg=f"buffer {key}")


def test_state_dict_round_trips_and_tensors_are_shared_not_copied():
    original = torchvision.models.resnet18()
    converted = fused_resnet.convert(original, inplace=True)
    assert converted is original
    reloaded = torchvision.models.resnet18()
    reloaded.load_state_dict(converted.state_dict(), strict=True)
    converted.load_state_dict(reloaded.state_dict(), strict=True)
    for (key, a), (_, b) in zip(converted.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), key


def test_convert_copies_by_default_and_leaves_the_original_alone():
    original = torchvision.models.resnet18()
    converted = fused_resnet.convert(original)
    assert converted is not original
    assert isinstance(original.layer1[0], torchvision.models.resnet.BasicBlock)
    assert converted.layer1[0].conv1.weight is not original.layer1[0].conv1.weight


def test_a_single_block_converts_to_its_fused_block():
    block = torchvision.models.resnet.Bottleneck(64, 16)
    fused = fused_resnet.convert(block, backend="reference")
    assert isinstance(fused, fused_resnet.Bottleneck) and fused.backend == "reference"
    assert [b.name for b in fused.fusion_report.swapped] == [""]


def _left_reason(model, name):
    report = fused_resnet.convert(model).fusion_report
    left = {b.name: b.reason for b in report.left}
    assert name in left, str(report)
    return left[name]


def test_grouped_convolutions_are_left_with_the_reason():
    model = torchvision.models.resnext50_32x4d()
    assert "groups=32" in _left_reason(model, "layer1.0")


def test_squeeze_excitation_blocks_are_left():
    model = timm.create_model("seresnet18")
    assert "se (" in _left_reason(model, "layer1.0")


def test_active_drop_path_is_left_and_inactive_drop_path_is_fused():
    assert "drop_path (DropPath)" in _left_reason(
        timm.create_model("resnet18", drop_path_rate=0.1), "layer1.1")
    assert fused_resnet.convert(timm.create_model("resnet18")).fusion_report.left == []


def test_frozen_batch_norm_is_left():
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    assert "bn1 is FrozenBatchNorm2d" in _left_reason(model, "layer1.0")


def test_resnet_v1_stride_placement_is_left():
    model = torchvision.models.resnet50()
    block = model.layer2[0]
    block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
    assert "conv1.stride=(2, 2)" in _left_reason(model, "layer2.0")


def test_hooked_and_shared_modules_are_left():
    model = torchvision.models.resnet18()
    model.layer1[0].bn1.register_forward_hook(lambda *args: None)
    model.layer3[1].bn2 = model.layer3[0].bn2
    report = fused_resnet.convert(model).fusion_report
    left = {b.name: b.reason for b in report.left}
    assert "hook" in left["layer1.0"] and "bn1" in left["layer1.0"]
    assert "shared" in left["layer3.0"] and "shared" in left["layer3.1"]
    assert len(report.swapped) == 5


def test_unknown_classes_with_the_same_structure_are_left():
    class MyBlock(torchvision.models.resnet.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyBlock(8, 8))
    assert "is not a block whose forward fused_resnet knows" in _left_reason(model, "0")


def test_report_prints_what_was_swapped_and_what_was_left():
    model = torchvision.models.resnet18()
    model.layer4[1].conv1 = nn.Conv2d(512, 512, 3, padding=1, bias=True)
    text = str(fused_resnet.convert(model).fusion_report)
    assert "7 blocks swapped, 1 left" in text
    assert "layer4.1: torchvision.models.resnet.BasicBlock: conv1 has a bias" in text


@pytest.mark.parametrize("name", ["tv-resnet50", "timm-resnetv2_50"])
def test_unfuse_gives_back_the_original_classes(name):
    original = MODELS[name]()
    restored = fused_resnet.unfuse(fused_resnet.convert(original))
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    torch.testing.assert_close(restored.state_dict(), original.state_dict())


def test_unfuse_of_built_models_gives_scriptable_plain_modules():
    model = fused_resnet.models.resnet18(num_classes=5).eval()
    plain_model = fused_resnet.unfuse(model)
    assert not any(isinstance(m, FusedBlockMixin) for m in plain_model.modules())
    assert any(isinstance(m, fused_resnet.plain.BasicBlock) for m in plain_model.modules())
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(plain_model)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


BLOCKS = {
    "tv-basic": lambda: torchvision.models.resnet18().layer2[0],
    "tv-bottleneck": lambda: torchvision.models.resnet50().layer2[0],
    "timm-basic": lambda: timm.create_model("resnet18").layer2[0],
    "timm-bottleneck": lambda: timm.create_model("resnet50").layer2[0],
    "timm-preact-bottleneck": lambda: timm.create_model("resnetv2_50").stages[1].blocks[0],
}
REPLACEMENTS = {"Identity": nn.Identity, "ReLU": nn.ReLU, "SiLU": nn.SiLU}


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_a_changed_child_is_left_or_computes_the_same(name, replacement):
    """For every child slot of every known block class: with that child replaced, the
    block is either left (with the reason in the report) or its fused version computes
    exactly what the changed original computes (fp64, training step and eval)."""
    template = randomize_batch_norms(BLOCKS[name]()).double()
    for slot, _ in template.named_children():
        original = copy.deepcopy(template)
        x = torch.randn(2, original.conv1.in_channels, 8, 8, dtype=torch.float64)
        setattr(original, slot, REPLACEMENTS[replacement]())
        try:
            expected = _train_then_eval(copy.deepcopy(original), x, steps=1)
        except RuntimeError:  # the changed block no longer runs at all: nothing to match
            continue
        converted = fused_resnet.convert(nn.Sequential(original), backend="reference")
        report = converted.fusion_report
        if report.left:
            assert report.left[0].reason, (slot, report)
            continue
        outputs, grads, buffers = _train_then_eval(converted, x, steps=1)
        for got, want in zip(outputs, expected[0]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12,
                                       msg=f"{name}.{slot} = {replacement}")


def test_identity_activation_is_not_taken_for_a_relu():
    model = torchvision.models.resnet18(num_classes=10)
    model.layer1[0].relu = nn.Identity()
    report = fused_resnet.convert(model, backend="reference").fusion_report
    assert [b.name for b in report.left] == ["layer1.0"]
    assert "relu is Identity, expected nn.ReLU" in report.left[0].reason
    timm_model = timm.create_model("resnet18", act_layer=nn.Identity, num_classes=10)
    timm_report = fused_resnet.convert(timm_model, backend="reference").fusion_report
    assert timm_report.swapped == [] and len(timm_report.left) == 8
