"""What a ResNet training loop relies on, for every backend: autocast, checkpointing,
export, whole-model compilation, empty batches, NaN propagation, deterministic mode,
frozen parameters, converted in-place torchvision blocks.

Each test runs on the reference and triton backends in CI (triton under the interpreter)
and on the cuda backend on a GPU; a backend that cannot run the configuration is skipped
with its reason.
"""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from blockcases import (BLOCK_CASES, build_plain, case_id, post_act_downsample,
                        randomize_batch_norms, run_steps)
from fused_resnet import backends, plain, structure
from fused_resnet.blocks import FusedBlockMixin
from fused_resnet.testing import errors_beyond_eager, errors_beyond_eager_redrawing

def _backend_param(name: str, *marks):
    return pytest.param(name, marks=[*marks, *([pytest.mark.gpu] if name == "cuda" else [])],
                        id=name)


BACKENDS = [_backend_param(name) for name in ("reference", "triton", "cuda")]
# One block of each kind, with and without a projection.
KIND_CASES = [BLOCK_CASES[i] for i in (1, 2, 4, 7)]


def fused_copy(module: nn.Module, backend: str, x: torch.Tensor) -> nn.Module:
    """``module`` converted to ``backend``; skips the test when the backend cannot run it."""
    fused = fused_resnet.convert(module, backend=backend)
    block = next(m for m in fused.modules() if isinstance(m, FusedBlockMixin))
    arguments = structure.block_arguments(block, block.spec)
    reason = backends.BACKENDS[backend].why_not(x.to(block.conv1.weight.dtype), arguments,
                                                False)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return fused


def train_step(model: nn.Module, x: torch.Tensor, autocast_dtype=None) -> dict:
    """One training step's outputs, gradients and buffers (keys "0 ...", see run_steps)."""
    return run_steps(model, [(x, "train")], autocast_dtype)


def stem_then(block: nn.Module) -> nn.Sequential:
    """A conv-BN-ReLU stem (in-place ReLU, as torchvision's) in front of ``block``."""
    cin = block.conv1.in_channels
    return nn.Sequential(nn.Conv2d(3, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True), block)


def autocast_draw(case, backend: str, device, seed: int, size=(6, 5)):
    """One fp16 autocast training step of ``case`` behind a stem, model and input drawn
    with ``seed``: the fused model and the (fused, eager, fp64) results of the step.
    fp16 runs under the Triton interpreter as on GPUs (bf16 tl.dot does not, DESIGN.md)."""
    torch.manual_seed(seed)
    model = stem_then(build_plain(case)).to(device)
    x = torch.randn(3, 3, *size, device=device)
    fused = fused_copy(model, backend, x)
    truth = train_step(copy.deepcopy(model).double(), x.double())
    eager = train_step(model, x, torch.float16)
    return fused, (train_step(fused, x, torch.float16), eager, truth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_autocast_with_fp32_parameters_is_within_eager_error(case, backend, device):
    # Up to three draws (model and input), re-drawn only where the first has a tensor
    # beyond the bound: see errors_beyond_eager_in_most_draws for why one fp16 draw
    # cannot fail a tensor.
    def draw(seed):
        fused, (result, eager, truth) = autocast_draw(case, backend, device, seed)
        assert result["0 output"].dtype == eager["0 output"].dtype
        assert all(p.dtype == torch.float32 for p in fused.parameters())
        return result, eager, truth

    assert errors_beyond_eager_redrawing(draw) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [BLOCK_CASES[0], BLOCK_CASES[1]], ids=case_id)
def test_autocast_output_dtype_is_eagers_for_an_fp32_input(case, backend, device):
    # Identity shortcut: the fp32 input is added to the fp16 branch, so eager gives fp32;
    # a projection shortcut is fp16 itself.
    block = build_plain(case).to(device)
    x = torch.randn(2, case[1], 5, 5, device=device)
    fused = fused_copy(block, backend, x)
    with torch.autocast(device, dtype=torch.float16):
        assert fused(x).dtype == block(x).dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [BLOCK_CASES[3], BLOCK_CASES[6]], ids=case_id)
def test_checkpointing_gives_eagers_gradients_and_running_statistics(case, backend, device):
    # Checkpointing reruns the forward in backward, so PyTorch updates the running
    # statistics (and num_batches_tracked) twice; the fused blocks must do the same.
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    block = build_plain(case).to(device)
    x = torch.randn(3, case[1], 5, 6, device=device)
    fused = Checkpointed(fused_copy(block, backend, x))
    truth = train_step(Checkpointed(copy.deepcopy(block).double()), x.double())
    eager = train_step(Checkpointed(block), x)
    result = train_step(fused, x)
    assert int(result["0 buffer block.bn1.num_batches_tracked" if case[0] == "bottleneck"
                      else "0 buffer block.norm1.num_batches_tracked"]) == 2
    assert errors_beyond_eager(result, eager, truth) == []


def _small_resnet(kind: str) -> nn.Module:
    """A whole network of fused blocks, narrow enough for the Triton interpreter: stem,
    an identity block and a strided projection block of ``kind`` (post, pre, or both: the
    post-activation pair then the pre-activation pair), pooling and a classifier."""
    torch.manual_seed(0)
    post = [plain.BasicBlock(8, 8),
            plain.Bottleneck(8, 4, stride=2, downsample=post_act_downsample(8, 16, 2))]
    pre = [plain.PreActBasicBlock(8, 8), plain.PreActBottleneck(8, 16, stride=2)]
    both = post + [plain.PreActBasicBlock(16, 16), plain.PreActBottleneck(16, 16, stride=2)]
    blocks = {"post": post, "pre": pre, "both": both}[kind]
    width = blocks[-1].conv3.out_channels
    return randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_model_compiles_fullgraph_in_train_and_eval(backend, device):
    """Both block kinds in one model compile without graph breaks, and the compiled
    training step and eval forward stay within eager's error of fp64 (the error bar is
    the plain model's, not the uncompiled fused one's, which runs the same kernels)."""
    torch._dynamo.reset()
    x = torch.randn(3, 3, 6, 6, device=device)
    model = _small_resnet("both").to(device)
    truth_model, eager_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    compiled = torch.compile(fused_copy(model, backend, x), fullgraph=True)
    truth, eager = train_step(truth_model, x.double()), train_step(eager_model, x)
    actual = {name.replace("_orig_mod.", ""): value
              for name, value in train_step(compiled, x).items()}
    assert errors_beyond_eager(actual, eager, truth) == []
    for module in (truth_model, eager_model, compiled):
        module.eval()
    with torch.no_grad():
        outputs = [{"eval": m(x.to(dtype))} for m, dtype in [
            (compiled, x.dtype), (eager_model, x.dtype), (truth_model, torch.float64)]]
    assert errors_beyond_eager(*outputs) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_model_exports(backend, device):
    x = torch.randn(2, 3, 6, 6, device=device)
    model = fused_copy(_small_resnet("post").to(device), backend, x).eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_unfused_model_scripts_for_torchscript_users():
    model = fused_resnet.convert(_small_resnet("pre"), backend="reference").eval()
    x = torch.randn(2, 3, 6, 6)
    scripted = torch.jit.script(fused_resnet.unfuse(model))
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_empty_batch_behaves_as_pytorch(case, backend, device):
    block = build_plain(case).to(device)
    x = torch.randn(0, case[1], 5, 5, device=device)
    fused = fused_copy(block, backend, torch.randn(2, case[1], 5, 5, device=device))
    eager, result = train_step(block, x), train_step(fused, x)
    assert result.keys() == eager.keys()
    for name in eager:   # empty outputs, zero gradients, buffers as PyTorch leaves them
        torch.testing.assert_close(result[name], eager[name], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", [BLOCK_CASES[1], BLOCK_CASES[6]], ids=case_id)
def test_nan_and_inf_propagate_as_in_pytorch(case, mode, backend, device):
    block = build_plain(case).to(device).train(mode == "train")
    x = torch.randn(3, case[1], 5, 5, device=device)
    x[1, 0, 2, 2] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    fused = fused_copy(block, backend, x)
    with torch.no_grad():
        expected, actual = block(x), fused(x)
    torch.testing.assert_close(actual.isnan(), expected.isnan())
    torch.testing.assert_close(actual.isinf(), expected.isinf())


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_gives_bitwise_equal_runs(backend, device):
    block = build_plain(BLOCK_CASES[3]).to(device)
    x = torch.randn(3, 6, 7, 5, device=device)
    fused = fused_copy(block, backend, x)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [train_step(copy.deepcopy(fused), x) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [BLOCK_CASES[1], BLOCK_CASES[7]], ids=case_id)
def test_frozen_parameters_get_no_gradient(case, backend, device):
    block = build_plain(case).to(device)
    for name, p in block.named_parameters():
        if name.startswith(("conv1", "bn2", "norm2", "downsample")):
            p.requires_grad_(False)
    x = torch.randn(3, case[1], 5, 5, device=device)
    fused = fused_copy(block, backend, x)
    truth = train_step(copy.deepcopy(block).double(), x.double())
    eager, result = train_step(block, x), train_step(fused, x)
    assert result.keys() == eager.keys()
    assert errors_beyond_eager(result, eager, truth) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_torchvision_stage_with_in_place_ops_trains(backend, device):
    torchvision = pytest.importorskip("torchvision")
    # torchvision blocks use ReLU(inplace=True) and `out += identity`; the stem's in-place
    # ReLU writes the tensor the first block reads.
    stage = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(inplace=True),
                          torchvision.models.resnet.BasicBlock(8, 8),
                          torchvision.models.resnet.BasicBlock(8, 8)).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    fused = fused_copy(stage, backend, x)
    assert len(fused.fusion_report.swapped) == 2
    truth = train_step(copy.deepcopy(stage).double(), x.double())
    eager, result = train_step(stage, x), train_step(fused, x)
    assert errors_beyond_eager(result, eager, truth) == []
