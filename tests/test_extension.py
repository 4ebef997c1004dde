"""The compiled extension fused_resnet._C: build, registration, the CPU and CUDA kernels."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from fused_resnet import cuda_ops, extension, reference

CSRC = Path(__file__).parent.parent / "csrc"
# Where the installed package has it: a module built from csrc/, or nothing when it was
# installed without the extension (FUSED_RESNET_BUILD_CUDA=0, or no matching nvcc).
_INSTALLED = importlib.util.find_spec("fused_resnet._C")

requires_extension = pytest.mark.skipif(
    extension.load_error() is not None,
    reason=f"fused_resnet._C is not built: {extension.load_error()}")


def _registrations_in_sources() -> dict[str, set[str]]:
    """{dispatch key: op names} of every TORCH_LIBRARY(_IMPL) block in csrc/ ("schema"
    for the op definitions)."""
    found: dict[str, set[str]] = {}
    for source in CSRC.glob("*.c*"):
        text = source.read_text()
        for match in re.finditer(r"TORCH_LIBRARY(?:_IMPL)?\(fused_resnet(?:, (\w+))?, m\) \{"
                                 r"(.*?)\n\}", text, re.S):
            names = re.findall(r'm\.(?:def|impl)\("(\w+)', match.group(2))
            found.setdefault(match.group(1) or "schema", set()).update(names)
    return found


@pytest.mark.skipif(_INSTALLED is None,
                    reason="this install of fused_resnet has no _C (installed without it)")
def test_the_installed_extension_loads_with_every_op_its_sources_register():
    assert extension.load_error() is None
    registrations = _registrations_in_sources()
    assert registrations["schema"] >= registrations["CPU"] | registrations["CUDA"]
    undefined = [name for name in registrations["schema"]
                 if not hasattr(torch.ops.fused_resnet, name)]
    assert undefined == []
    for key in ("CPU", "CUDA"):
        missing = [name for name in registrations[key] if not
                   torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{name}", key)]
        assert missing == [], f"no {key} kernel for {missing}"


def test_a_missing_extension_is_explained_and_the_cuda_backend_refuses(monkeypatch):
    import fused_resnet

    # As if the build had been skipped: `from fused_resnet import _C` raises ImportError.
    monkeypatch.setitem(sys.modules, "fused_resnet._C", None)
    monkeypatch.delattr(fused_resnet, "_C", raising=False)
    monkeypatch.setattr(extension, "_load_error", extension._NOT_TRIED)
    assert "pip install --no-build-isolation -e ." in extension.load_error()
    with pytest.raises(RuntimeError, match="fused_resnet._C is not available"):
        cuda_ops.scale_shift_add_relu(torch.ones(1, 1, 1, 1), torch.ones(1), torch.ones(1))
    block = fused_resnet.BasicBlock(4, 4, backend="cuda")
    with pytest.raises(fused_resnet.BackendUnavailableError, match="not available"):
        block(torch.randn(2, 4, 3, 3))


def _inputs(shape, dtype, channels_last, residual, device="cpu"):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    scale = torch.randn(shape[1], device=device)
    shift = torch.randn(shape[1], device=device)
    r = torch.randn_like(x) if residual else None
    return x, scale, shift, r


SHAPES = [(3, 5, 7, 3), (1, 16, 4, 4), (2, 8, 1, 1), (0, 4, 2, 2)]


@requires_extension
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual, relu", [(False, False), (True, True), (False, True)])
def test_cpu_kernel_matches_reference(shape, dtype, channels_last, residual, relu):
    x, scale, shift, r = _inputs(shape, dtype, channels_last, residual)
    y = cuda_ops.scale_shift_add_relu(x, scale, shift, r, relu=relu)
    # Both compute in fp32 (fp64 for fp64) and round once, so they agree to the output ulp.
    torch.testing.assert_close(y, reference.scale_shift_add_relu(x, scale, shift, r, relu))
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


@requires_extension
def test_nan_and_inf_propagate_as_in_pytorch():
    x, scale, shift, _ = _inputs((2, 3, 2, 2), torch.float32, True, False)
    x[0, 0, 0, 0], x[1, 2, 1, 1], x[0, 1, 1, 0] = float("nan"), float("inf"), -float("inf")
    y = cuda_ops.scale_shift_add_relu(x, scale, shift, None, relu=True)
    torch.testing.assert_close(y, reference.scale_shift_add_relu(x, scale, shift, None, True),
                               equal_nan=True)
    assert torch.isnan(y[0, 0, 0, 0])


@requires_extension
def test_op_passes_opcheck_and_gradcheck():
    x, scale, shift, r = _inputs((2, 3, 3, 2), torch.float64, True, True)
    scale, shift = scale.double(), shift.double()
    args = [t.requires_grad_() for t in (x, scale, shift, r)]
    torch.library.opcheck(torch.ops.fused_resnet.scale_shift_add_relu.default,
                          (*args, None, None, True))
    # Shift everything away from the ReLU kink, where finite differences are meaningless.
    x.data.add_(torch.sign(x.data) * 0.1)
    assert torch.autograd.gradcheck(
        lambda *t: cuda_ops.scale_shift_add_relu(*t, relu=False), args)


@requires_extension
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("relu", [False, True])
def test_residual_affine_matches_reference_with_gradients(device, relu):
    """The projection shortcut's BN applied to the residual in the same pass."""
    x, scale, shift, r = _inputs((3, 16, 5, 3), torch.float32, True, True, device=device)
    r_scale, r_shift = torch.randn(16, device=device), torch.randn(16, device=device)
    args = [t.requires_grad_() for t in (x, scale, shift, r, r_scale, r_shift)]
    y = cuda_ops.scale_shift_add_relu(*args[:4], args[4], args[5], relu=relu)
    expected = reference.scale_shift_add_relu(*args[:4], relu=relu, residual_scale=args[4],
                                              residual_shift=args[5])
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    # Sums over 45 pixels per channel in a different order: fp32 rounding apart.
    for actual, wanted in zip(torch.autograd.grad(y, args, grad),
                              torch.autograd.grad(expected, args, grad)):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4)


@requires_extension
def test_residual_affine_passes_opcheck_and_gradcheck():
    x, scale, shift, r = _inputs((2, 3, 3, 2), torch.float64, True, True)
    vectors = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
    args = [t.requires_grad_() for t in (x, *vectors[:2], r, *vectors[2:])]
    torch.library.opcheck(torch.ops.fused_resnet.scale_shift_add_relu.default, (*args, True))
    assert torch.autograd.gradcheck(
        lambda *t: cuda_ops.scale_shift_add_relu(*t, relu=False), args)


@requires_extension
@pytest.mark.parametrize("make_args, message", [
    (lambda x, s, b, r: (x[0], s, b, r), "x must be 4-D"),
    (lambda x, s, b, r: (x, s[:2], b, r), "scale must be 1-D with x.size"),
    (lambda x, s, b, r: (x, s, b.view(1, -1), r), "shift must be 1-D"),
    (lambda x, s, b, r: (x, s, b, r.half()), "residual has dtype Half"),
    (lambda x, s, b, r: (x, s, b, r[:1]), "residual has shape"),
    (lambda x, s, b, r: (x, s, b, r.contiguous()), "residual has strides"),
    (lambda x, s, b, r: (x[:, :, ::2], s, b, None), "x must be contiguous in NCHW or channels_last"),
    (lambda x, s, b, r: (x.int(), s, b, None), "x must be a floating tensor"),
])
def test_bad_arguments_raise_naming_the_argument(make_args, message):
    args = make_args(*_inputs((2, 4, 4, 4), torch.float32, True, True))
    with pytest.raises(RuntimeError, match=message):
        cuda_ops.scale_shift_add_relu(*args, relu=True)


@pytest.mark.gpu
@requires_extension
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (2, 64, 9, 9), (1, 24, 1, 1), (0, 8, 2, 2)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_kernel_matches_reference(shape, dtype, channels_last, residual):
    x, scale, shift, r = _inputs(shape, dtype, channels_last, residual, device="cuda")
    y = cuda_ops.scale_shift_add_relu(x, scale, shift, r, relu=True)
    torch.testing.assert_close(y, reference.scale_shift_add_relu(x, scale, shift, r, True))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


@pytest.mark.gpu
@requires_extension
def test_cuda_kernel_takes_the_scalar_path_for_misaligned_storage():
    base = torch.randn(1 + 2 * 16 * 4 * 4, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 4, 4, 16).permute(0, 3, 1, 2)  # channels_last, 2-byte aligned
    scale, shift = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
    torch.testing.assert_close(cuda_ops.scale_shift_add_relu(x, scale, shift, None, relu=True),
                               reference.scale_shift_add_relu(x, scale, shift, None, True))
