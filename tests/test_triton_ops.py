"""The Triton ops against the reference: forward, every gradient, statistics, opcheck.

On a machine without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py), with tiny shapes; bf16 only on GPUs (the interpreter's bf16 tl.dot is wrong).
Every low-precision comparison is against fp64: the kernel's error must stay within
ERROR_FACTOR of what plain PyTorch makes in the same dtype.
"""

import pytest
import torch

from fused_resnet import op_reference, reference, triton_ops
from fused_resnet.kernels import conv_backward, statistics
from fused_resnet.reference import BatchNormParams, Finalize, normalization
from fused_resnet.testing import errors_beyond_eager
from fused_resnet.triton_ops import (triton_bn_add_relu, triton_channel_stats, triton_conv,
                                     triton_conv_dgrad, triton_conv_wgrad,
                                     triton_statistics_backward)

# (batch, C_in, H, W, C_out, kernel, stride): odd sizes, channels not multiples of the
# 16-wide interpreter tile, stride 2, 1x1, 3x3 and the 7x7 stem.
CONV_CASES = [
    (2, 5, 7, 9, 6, 3, 1),
    (3, 5, 7, 9, 7, 3, 2),
    (1, 4, 5, 5, 9, 1, 2),
    (2, 17, 6, 6, 4, 1, 1),
]
STEM_CASE = (1, 3, 7, 7, 4, 7, 2)  # slow under the interpreter: 49 taps; tested unfused
FUSIONS = ["plain", "prologue_statistics", "epilogue"]
CONV_PARAMS = [(case, fusion) for case in CONV_CASES for fusion in FUSIONS] + [
    (STEM_CASE, "plain")]


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _conv_inputs(case, dtype, device, fusion):
    n, c_in, h, w, c_out, k, stride = case
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    inputs = {"x": x, "weight": (torch.randn(c_out, c_in, k, k, device=device)
                                 / (c_in * k * k) ** 0.5).to(dtype)}
    if fusion == "prologue_statistics":
        inputs["in_scale"] = torch.rand(c_in, device=device) + 0.5
        inputs["in_shift"] = torch.randn(c_in, device=device) * 0.5
    if fusion == "epilogue":
        inputs["out_scale"] = torch.rand(c_out, device=device) + 0.5
        inputs["out_shift"] = torch.randn(c_out, device=device) * 0.5
        ho = (h - 1) // stride + 1
        wo = (w - 1) // stride + 1
        inputs["residual"] = torch.randn(n, c_out, ho, wo, device=device).to(dtype)
    return stride, inputs


def _reference_conv(stride, x, weight, in_scale=None, in_shift=None, out_scale=None,
                    out_shift=None, residual=None):
    """What triton_conv computes, in plain PyTorch, in the dtype of ``x``."""
    if in_scale is not None:
        x = reference.scale_shift_add_relu(x, in_scale, in_shift)
    y = reference.conv(x, weight, stride)
    if out_scale is not None:
        y = reference.scale_shift_add_relu(y, out_scale, out_shift, residual, relu=True)
    return y


def _triton_conv(stride, x, weight, in_scale=None, in_shift=None, out_scale=None,
                 out_shift=None, residual=None):
    statistics = in_scale is not None
    return triton_conv(x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual,
                       out_scale is not None, statistics)


def _with_grad(inputs, dtype=None):
    # The epilogue's scale and shift are folded BatchNorms of inference: no gradient.
    return {k: v.detach().to(dtype or v.dtype).requires_grad_(not k.startswith("out_"))
            for k, v in inputs.items()}


def _grads(inputs):
    return {f"grad {k}": v.grad for k, v in inputs.items() if v.requires_grad}


@pytest.mark.parametrize("case, fusion", CONV_PARAMS, ids=str)
def test_triton_conv_forward_and_backward(case, fusion, device, poisoned_allocations):
    _check_triton_conv(case, fusion, device)


@pytest.mark.parametrize("fusion", ["plain", "prologue_statistics"])
def test_gpu_size_paths_at_tiny_sizes(fusion, device, poisoned_allocations, monkeypatch):
    """The paths GPU sizes take, forced at interpreter sizes: wgrad split over several
    pixel ranges and summed into a channels_last weight gradient, and the statistics
    and per-tile sums reduced over several blocks of tiles (Chan's merge across blocks).
    M = 126 pixels: 8 interpreter tiles of 16, 4 merge blocks of 2, 7 wgrad splits."""
    monkeypatch.setattr(conv_backward, "_WGRAD_PIXELS_PER_SPLIT", 20)
    monkeypatch.setattr(statistics, "_MERGE_TILES", 2)
    _check_triton_conv(CONV_CASES[0], fusion, device, torch.channels_last)


def _check_triton_conv(case, fusion, device, weight_format=torch.contiguous_format):
    for dtype in _dtypes(device):
        stride, inputs = _conv_inputs(case, dtype, device, fusion)
        inputs["weight"] = inputs["weight"].contiguous(memory_format=weight_format)
        results = {}
        for name, fn, cast in [("truth", _reference_conv, torch.float64),
                               ("eager", _reference_conv, None),
                               ("fused", _triton_conv, None)]:
            tensors = _with_grad(inputs, cast)
            out = fn(stride, **tensors)
            y, mean, var = out if name == "fused" else (out, None, None)
            if fusion == "prologue_statistics":
                if name != "fused":  # what the epilogue statistics must equal
                    mean, var = reference.batch_statistics(y)
                statistics = {"mean": mean, "var": var}
            else:
                statistics = {}
            # A loss that reaches every output, the statistics included.
            loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=device)
                    .view_as(y)).sum() + sum((v.float() ** 2).sum() for v in statistics.values())
            loss.backward()
            results[name] = {"y": y.detach(), **{k: v.detach() for k, v in statistics.items()},
                             **_grads(tensors)}
        assert results["fused"]["y"].dtype == dtype
        failures = errors_beyond_eager(results["fused"], results["eager"], results["truth"])
        assert failures == [], f"{dtype}: {failures}"


def test_epilogue_statistics_are_exact_for_a_large_mean(device):
    # |mean| >> std: a plain fp32 sum / sum of squares would lose the variance entirely.
    x = torch.full((4, 1, 8, 8), 1e3, device=device) + torch.randn(4, 1, 8, 8, device=device)
    weight = torch.ones(3, 1, 1, 1, device=device)
    _, mean, var = triton_conv(x, weight, 1, None, None, None, None, None, False, True)
    expected = x.double().var(unbiased=False)
    torch.testing.assert_close(var.double(), expected.expand(3), rtol=1e-3, atol=0)
    stats_mean, stats_var = triton_channel_stats(x.expand(4, 3, 8, 8))
    torch.testing.assert_close(stats_var.double(), expected.expand(3), rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean().expand(3))


@pytest.mark.parametrize("residual_kind", ["none", "identity", "projection"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_add_relu_forward_and_backward(residual_kind, channels_last, device,
                                          poisoned_allocations):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for dtype in _dtypes(device):
        a = torch.randn(3, 5, 7, 3, device=device).to(dtype).contiguous(
            memory_format=memory_format)
        inputs = {"a": a, "a_scale": torch.randn(5, device=device),
                  "a_shift": torch.randn(5, device=device)}
        if residual_kind != "none":
            inputs["residual"] = torch.randn_like(a)
        if residual_kind == "projection":
            inputs["r_scale"] = torch.randn(5, device=device)
            inputs["r_shift"] = torch.randn(5, device=device)

        def eager(a, a_scale, a_shift, residual=None, r_scale=None, r_shift=None):
            if r_scale is not None:
                residual = reference.scale_shift_add_relu(residual, r_scale, r_shift,
                                                          relu=False)
            return reference.scale_shift_add_relu(a, a_scale, a_shift, residual, relu=True)

        def fused(a, a_scale, a_shift, residual=None, r_scale=None, r_shift=None):
            return triton_bn_add_relu(a, a_scale, a_shift, residual, r_scale, r_shift, True)

        results = {}
        for name, fn, cast in [("truth", eager, torch.float64), ("eager", eager, None),
                               ("fused", fused, None)]:
            tensors = _with_grad(inputs, cast)
            y = fn(**tensors)
            (y.float() * torch.arange(y.numel(), device=device).view_as(y).sin()).sum().backward()
            results[name] = {"y": y.detach(), **_grads(tensors)}
        assert errors_beyond_eager(results["fused"], results["eager"], results["truth"]) == []


@pytest.mark.parametrize("offset_of_mean", [0.0, 1e3])
def test_statistics_backward_against_fp64(offset_of_mean, device, poisoned_allocations):
    # 7 channels, 3x5x3 pixels: neither a multiple of the interpreter tile; a large mean
    # (|mean| / std = 1000) checks that the kernel centres before the product.
    for dtype in _dtypes(device):
        y64 = torch.randn(3, 7, 5, 3, device=device, dtype=torch.float64) + offset_of_mean
        grad64 = torch.randn_like(y64)
        mean64 = y64.mean((0, 2, 3))
        grad_mean64, grad_var64 = (torch.randn(7, device=device, dtype=torch.float64)
                                   for _ in range(2))
        truth = op_reference.statistics_backward(grad64, y64, mean64, grad_mean64, grad_var64)
        inputs = [t.to(dtype) for t in (grad64, y64)] + [t.float() for t in (
            mean64, grad_mean64, grad_var64)]
        fused = triton_statistics_backward(*inputs)
        eager = op_reference.statistics_backward(*inputs)
        assert fused.dtype == dtype and fused.is_contiguous(memory_format=torch.channels_last)
        assert errors_beyond_eager({"out": fused}, {"out": eager}, {"out": truth}) == []


def test_channel_stats_and_their_gradient(device):
    x = torch.randn(3, 6, 5, 7, device=device, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    x64 = x.clone().requires_grad_()
    mean, var = triton_channel_stats(x32)
    expected_mean, expected_var = reference.batch_statistics(x64)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-5, atol=1e-6)
    (mean * 3 + var.square()).sum().backward()
    (expected_mean * 3 + expected_var.square()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_kernels_are_deterministic(device):
    stride, inputs = _conv_inputs(CONV_CASES[1], torch.float32, device, "prologue_statistics")
    runs = []
    for _ in range(2):
        tensors = _with_grad(inputs)
        y, mean, var = _triton_conv(stride, **tensors)
        (y.sum() + var.sum()).backward()
        runs.append([y, mean, var] + list(_grads(tensors).values()))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _opcheck_samples(device):
    stride, fused = _conv_inputs(CONV_CASES[1], torch.float32, device, "prologue_statistics")
    _, epilogue = _conv_inputs(CONV_CASES[2], torch.float32, device, "epilogue")
    grad = torch.randn(3, 7, 4, 5, device=device)
    a = torch.randn(2, 5, 3, 3, device=device)
    s = torch.randn(5, device=device)
    return [
        (triton_conv, (fused["x"], fused["weight"], stride, fused["in_scale"],
                       fused["in_shift"], None, None, None, False, True)),
        (triton_conv, (epilogue["x"], epilogue["weight"], 2, None, None, epilogue["out_scale"],
                       epilogue["out_shift"], epilogue["residual"], True, False)),
        (triton_conv_dgrad, (grad, fused["weight"], fused["x"], stride, fused["in_scale"],
                             fused["in_shift"])),
        (triton_conv_wgrad, (grad, fused["x"], fused["weight"], stride, None, None)),
        (triton_bn_add_relu, (a, s, s, torch.randn_like(a), s, s, True)),
        (triton_channel_stats, (a,)),
        (triton_statistics_backward, (torch.randn_like(a), a, s, s, s)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_ops_pass_opcheck(index, device):
    op, args = _opcheck_samples(device)[index]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and op in (triton_conv, triton_bn_add_relu, triton_channel_stats) else a
                 for a in args)
    # Fold-in epilogue scales have no gradient by design (see triton_conv's backward).
    if op is triton_conv and args[5] is not None:
        args = args[:5] + (args[5].detach(), args[6].detach()) + args[7:]
    torch.library.opcheck(op, args)


def test_gradient_through_an_epilogue_scale_is_refused(device):
    _, inputs = _conv_inputs(CONV_CASES[2], torch.float32, device, "epilogue")
    inputs["out_scale"].requires_grad_()
    y = _triton_conv(2, **inputs)[0]
    with pytest.raises(RuntimeError, match="gradients of out_scale/out_shift"):
        y.sum().backward()


def test_statistics_with_an_epilogue_are_refused(device):
    _, inputs = _conv_inputs(CONV_CASES[2], torch.float32, device, "epilogue")
    with pytest.raises(ValueError, match="statistics are of the raw conv output"):
        triton_conv(inputs["x"], inputs["weight"], 2, None, None, inputs["out_scale"],
                    inputs["out_shift"], None, False, True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16, None])
def test_bn_finalize_matches_the_reference(affine, momentum, running_dtype, device):
    """The triton finalize (scale/shift, running statistics, num_batches_tracked, and the
    gradients of mean, var, weight, bias) against reference.normalization in fp64.
    running_dtype None: track_running_stats=False; float16: a .half() module's buffers."""
    channels, count = 1030, 37  # more channels than one program's block of 1024
    results = {}
    for name, finalize, dtype in [("truth", Finalize(), torch.float64),
                                  ("eager", Finalize(), torch.float32),
                                  ("fused", triton_ops.KERNELS.finalize, torch.float32)]:
        generator = torch.Generator().manual_seed(1)
        mean = torch.randn(channels, generator=generator, dtype=torch.float64)
        var = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.1
        weight = torch.randn(channels, generator=generator, dtype=torch.float64)
        bias = torch.randn(channels, generator=generator, dtype=torch.float64)
        grads = torch.randn(2, channels, generator=generator, dtype=torch.float64)
        running = [torch.randn(channels, generator=generator, dtype=torch.float64).abs()
                   for _ in range(2)]
        tensors = [t.to(device, dtype).requires_grad_() for t in (mean, var, weight, bias)]
        buffers = (None, None, None) if running_dtype is None else (
            *[r.to(device, running_dtype if name != "truth" else dtype) for r in running],
            torch.tensor(3, device=device))
        bn = BatchNormParams(*(tensors[2:] if affine else (None, None)), *buffers, momentum,
                             1e-5, True)
        scale, shift = normalization(bn, count, tuple(tensors[:2]), finalize)
        ((scale * grads[0].to(device, dtype)).sum()
         + (shift * grads[1].to(device, dtype)).sum()).backward()
        results[name] = {"scale": scale.detach(), "shift": shift.detach(),
                         **{f"grad {i}": t.grad for i, t in enumerate(tensors)
                            if t.grad is not None}}
        if running_dtype is not None:
            results[name].update({"running mean": buffers[0].double(),
                                  "running var": buffers[1].double(),
                                  "num_batches_tracked": buffers[2]})
    assert set(results["fused"]) == set(results["truth"])
    assert errors_beyond_eager(results["fused"], results["eager"], results["truth"]) == []
