"""fused_resnet.convert and unfuse on torchvision and timm models."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import fused_resnet
from blockcases import randomize_batch_norms
from fused_resnet.blocks import FusedBlockMixin
from fused_resnet.demo import FUNCTION_TOLERANCE
from fused_resnet.testing import relative_differences_beyond

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


def _conv_with_bias(block):
    block.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=True).double()


def _dilated_conv(block):
    block.conv2 = nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False).double()


def _group_norm(block):
    block.bn1 = nn.GroupNorm(8, 64).double()


def _pruned_conv(block):
    torch.nn.utils.prune.l1_unstructured(block.conv1, "weight", amount=0.5)


def _weight_normed_conv(block):
    torch.nn.utils.parametrizations.weight_norm(block.conv2)


# Changes made to a block after convert, each on both the plain and the converted model.
# The hooks record their calls in the list they are given.
CHANGES_AFTER_CONVERT = {
    "forward hook on conv1": lambda block, calls: block.conv1.register_forward_hook(
        lambda *args: calls.append("conv1")),
    "forward pre-hook on bn2": lambda block, calls: block.bn2.register_forward_pre_hook(
        lambda *args: calls.append("bn2")),
    "conv2 replaced by one with a bias": lambda block, calls: _conv_with_bias(block),
    "conv2 replaced by a dilated one": lambda block, calls: _dilated_conv(block),
    "bn1 replaced by a GroupNorm": lambda block, calls: _group_norm(block),
    "conv1 pruned": lambda block, calls: _pruned_conv(block),
    "conv2 weight-normed": lambda block, calls: _weight_normed_conv(block),
}


@pytest.mark.parametrize("change", CHANGES_AFTER_CONVERT)
def test_a_change_after_convert_runs_the_plain_computation_with_a_warning(change):
    """The changed fused block computes what the changed plain model computes (fp64: two
    training steps and eval; hooks called as often), and says once why it runs unfused."""
    original = randomize_batch_norms(torchvision.models.resnet18(num_classes=10)).double()
    # A deep copy: convert shares the parameters, and both models accumulate gradients.
    fused = fused_resnet.convert(copy.deepcopy(original), backend="reference")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calls = ([], [])
    for model, recorded in zip((original, fused), calls):
        torch.manual_seed(1)  # the same weights in a replacement module
        CHANGES_AFTER_CONVERT[change](model.layer1[0], recorded)
    expected = _train_then_eval(original, x)
    with pytest.warns(UserWarning, match="changed after it was fused") as warned:
        results = _train_then_eval(fused, x)
    assert len(warned) == 1, [str(w.message) for w in warned]
    changed_child = change.split(" ")[-1] if change.startswith("forward") else change.split()[0]
    assert changed_child in str(warned[0].message) and "fused_resnet.unfuse" in str(
        warned[0].message)
    assert calls[0] == calls[1]
    expected = _as_dict(expected)
    # A conv bias before a training BatchNorm has an exact gradient of 0: both runs give
    # rounding noise (about 1e-13), with no relative precision to compare.
    expected.pop("grad layer1.0.conv2.bias", None)
    assert relative_differences_beyond(_as_dict(results), expected, FUNCTION_TOLERANCE) == []


def _as_dict(results):
    outputs, grads, buffers = results
    return {**{f"output {i}": out for i, out in enumerate(outputs)},
            **{f"grad {name}": g for name, g in grads.items()},
            **{f"buffer {name}": b for name, b in buffers.items()}}


def test_an_unchanged_block_stays_fused_after_copies_and_pickling():
    fused = fused_resnet.convert(torchvision.models.resnet18(num_classes=10))
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        blocks = [m for m in copied.modules() if isinstance(m, FusedBlockMixin)]
        assert len(blocks) == 8
        assert all(fused_resnet.structure.snapshot(b) == b._built_from for b in blocks)


def test_torchscript_of_a_converted_model_names_the_fix():
    fused = fused_resnet.convert(torchvision.models.resnet18(num_classes=10)).eval()
    with pytest.raises(RuntimeError, match=r"script fused_resnet.unfuse\(model\) instead"):
        torch.jit.script(fused)
    assert sum(isinstance(m, FusedBlockMixin) for m in fused.modules()) == 8  # untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(fused_resnet.unfuse(fused))(x), fused(x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_leaves", [False, True])
def test_fx_feature_extraction_of_a_converted_model(fused_leaves):
    """torchvision's create_feature_extractor traces the plain computation of the blocks,
    or keeps them fused when they are declared leaf modules."""
    from torchvision.models.feature_extraction import create_feature_extractor

    fused = fused_resnet.convert(torchvision.models.resnet18(num_classes=10)).eval()
    leaves = list(fused_resnet.blocks.FUSED_BLOCKS.values()) if fused_leaves else []
    extractor = create_feature_extractor(fused, {"layer2": "features", "fc": "logits"},
                                         tracer_kwargs={"leaf_modules": leaves})
    called = [node.target for node in extractor.graph.nodes if node.op == "call_module"]
    assert ("layer1.0" in called) == fused_leaves
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = extractor(x)
        features = fused.layer2(fused.layer1(fused.maxpool(fused.relu(fused.bn1(
            fused.conv1(x))))))
        torch.testing.assert_close(got["features"], features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["logits"], fused(x), rtol=1e-5, atol=1e-5)


def test_dilated_backbones_keep_their_dilated_blocks():
    """torchvision's segmentation backbones (DeepLab, FCN) dilate layer3 and layer4
    instead of striding: those blocks are left, with the reason; the rest are fused."""
    model = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    report = fused_resnet.convert(model, backend="reference").fusion_report
    left = {b.name: b.reason for b in report.left}
    dilated = [f"layer{i}.{j}" for i, blocks in ((3, 6), (4, 3)) for j in range(blocks)
               if (i, j) != (3, 0)]  # layer3.0 strides without dilation in its conv2
    assert set(left) == set(dilated)
    assert all("dilation" in reason for reason in left.values())
    assert len(report.swapped) == 16 - len(dilated)


def test_resnet_d_shortcuts_are_left_naming_the_average_pool_and_stems_are_not_blocks():
    """ResNet-D's shortcut average-pools before its conv: those blocks are left, and the
    report says so; a stride-1 DownsampleAvg has no pooling and is fused; timm's deep stem
    (an nn.Sequential holding conv1..conv3 and norm1..norm2) is no block at all."""
    for name, left_blocks in [("resnet50d", ["layer2.0", "layer3.0", "layer4.0"]),
                              ("resnetv2_50d", ["stages.1.blocks.0", "stages.2.blocks.0",
                                                "stages.3.blocks.0"])]:
        model = randomize_batch_norms(timm.create_model(name, num_classes=10)).eval()
        converted = fused_resnet.convert(model, backend="reference")
        report = converted.fusion_report
        assert [b.name for b in report.left] == left_blocks, str(report)
        assert all("average-pools before its 1x1 conv" in b.reason for b in report.left)
        assert len(report.swapped) == 16 - len(left_blocks)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_change_the_fused_block_still_computes_keeps_it_fused():
    """nn.SyncBatchNorm.convert_sync_batchnorm after convert (the usual order in DDP
    scripts) replaces every BN; the blocks stay fused, without a warning."""
    fused = fused_resnet.convert(torchvision.models.resnet18(num_classes=10),
                                 backend="reference")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(fused).eval()
    block = synced.layer1[0]
    assert isinstance(block, FusedBlockMixin) and type(block.bn1) is nn.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            synced(torch.randn(2, 3, 32, 32))
    assert fused_resnet.structure.snapshot(block) == block._built_from  # re-recorded
