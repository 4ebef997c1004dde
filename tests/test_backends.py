"""Backend selection: explicit backends, 'auto' with its one warning, the default."""

import warnings

import pytest
import torch

import fused_resnet
from fused_resnet import backends, extension


@pytest.fixture
def block():
    return fused_resnet.BasicBlock(4, 4).eval()


@pytest.fixture(autouse=True)
def _restore_default_backend():
    previous = fused_resnet.get_backend()
    backends._warned.clear()
    yield
    fused_resnet.set_backend(previous)


@pytest.mark.parametrize("dtype, reason", [(torch.float64, "the input dtype is torch.float64"),
                                           (torch.bfloat16, "bfloat16 tl.dot gives wrong")])
def test_explicit_triton_refuses_what_it_cannot_compute(block, dtype, reason):
    if dtype == torch.bfloat16 and torch.cuda.is_available():
        pytest.skip("bfloat16 is refused only under the Triton interpreter")
    block.backend = "triton"
    block.to(dtype)
    with pytest.raises(fused_resnet.BackendUnavailableError,
                       match=f"backend='triton' cannot run BasicBlock: {reason}"):
        block(torch.randn(2, 4, 3, 3, dtype=dtype))


def test_explicit_triton_refuses_mismatched_weights(block):
    block.backend = "triton"
    with pytest.raises(fused_resnet.BackendUnavailableError,
                       match="input is torch.float16 but conv weights are torch.float32"):
        block(torch.randn(2, 4, 3, 3, dtype=torch.float16))


def test_explicit_cuda_says_why_it_cannot_run_a_cpu_tensor(block):
    block.backend = "cuda"
    # An fp32 CPU model: the device first, and the dtype in the same message, so that
    # fixing one does not just reveal the other.
    reason = ("the input is on cpu, the cuda backend needs CUDA tensors; the input dtype "
              "is torch.float32" if extension.load_error() is None
              else "fused_resnet._C is not available")
    with pytest.raises(fused_resnet.BackendUnavailableError,
                       match=f"backend='cuda' cannot run BasicBlock: .*{reason}"):
        block(torch.randn(2, 4, 3, 3))


def test_auto_falls_back_to_reference_with_one_warning_naming_the_reasons(block):
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = block(x)
        block(x)
    messages = [str(w.message) for w in caught if "fused_resnet" in str(w.message)]
    assert len(messages) == 1, messages
    # On the CPU the warning says why the reference runs and suggests only what helps.
    assert "runs BasicBlock on 'reference': the input is on the CPU" in messages[0]
    assert "GPU" in messages[0]
    assert not any(hint in messages[0] for hint in (".half()", "autocast", "TRITON_INTERPRET"))
    block.backend = "reference"
    torch.testing.assert_close(out, block(x))


def test_module_follows_the_default_and_its_own_choice_wins(block):
    x = torch.randn(2, 4, 3, 3)
    with fused_resnet.use_backend("cuda"):
        assert fused_resnet.get_backend() == "cuda"
        with pytest.raises(fused_resnet.BackendUnavailableError):
            block(x)
        block.backend = "reference"
        block(x)
    assert fused_resnet.get_backend() == "auto"


def test_use_backend_restores_the_default_after_an_error():
    with pytest.raises(KeyError):
        with fused_resnet.use_backend("reference"):
            raise KeyError
    assert fused_resnet.get_backend() == "auto"


@pytest.mark.parametrize("name", ["cudnn", None, ""])
def test_unknown_backend_names_are_rejected(name):
    with pytest.raises(ValueError, match="expected one of 'auto', 'reference'"):
        fused_resnet.set_backend(name)
