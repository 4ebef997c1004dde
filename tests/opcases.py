"""Cases and checks of the Triton ops shared by the op tests: inputs of each fusion, what
each op computes in plain PyTorch, and the comparison of a fused run with eager against
fp64 (forward and every gradient)."""

import torch

from fused_resnet import op_reference, reference
from fused_resnet.kernels import conv_backward, conv_forward, statistics
from fused_resnet.testing import errors_beyond_eager
from fused_resnet.triton_ops import (triton_bn_add_relu, triton_channel_stats, triton_conv,
                                     triton_conv_dgrad, triton_conv_wgrad)

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


def cross_reduction_thresholds(monkeypatch):
    """Lower the thresholds so that the case's few pixels and channels take the paths of
    ResNet-50's: wgrad in several pixel splits summed by several programs, statistics and
    per-tile sums merged over several blocks of tiles and of channels, programs in
    several groups of row tiles (a full group and a partial one where there are 4 or
    more row tiles)."""
    monkeypatch.setattr(conv_forward, "_GROUP_M", 3)
    monkeypatch.setattr(conv_backward, "_WGRAD_PIXELS_PER_SPLIT", 20)
    monkeypatch.setattr(conv_backward, "_SUM_SPLITS_BLOCK", 64)
    monkeypatch.setattr(statistics, "MERGE_TILES", 2)
    monkeypatch.setattr(statistics, "MERGE_CHANNELS", 16)


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def conv_inputs(case, dtype, device, fusion):
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


def reference_conv(stride, x, weight, in_scale=None, in_shift=None, out_scale=None,
                    out_shift=None, residual=None):
    """What triton_conv computes, in plain PyTorch, in the dtype of ``x``."""
    if in_scale is not None:
        x = reference.scale_shift_add_relu(x, in_scale, in_shift)
    y = reference.conv(x, weight, stride)
    if out_scale is not None:
        y = reference.scale_shift_add_relu(y, out_scale, out_shift, residual, relu=True)
    return y


def triton_conv_outputs(stride, x, weight, in_scale=None, in_shift=None, out_scale=None,
                        out_shift=None, residual=None):
    """triton_conv with the fusions ``reference_conv`` applies, statistics with a prologue:
    (y, mean, var)."""
    statistics = in_scale is not None
    return triton_conv(x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual,
                       out_scale is not None, statistics)


def with_grad(inputs, dtype=None):
    # The epilogue's scale and shift are folded BatchNorms of inference: no gradient.
    return {k: v.detach().to(dtype or v.dtype).requires_grad_(not k.startswith("out_"))
            for k, v in inputs.items()}


def grads(inputs):
    return {f"grad {k}": v.grad for k, v in inputs.items() if v.requires_grad}


def conv_results(case, fusion, dtype, device, weight_format=torch.contiguous_format):
    """{truth (fp64), eager, fused: {output name: tensor}} of one triton_conv forward and
    backward on fresh random inputs, the statistics and every gradient included."""
    stride, inputs = conv_inputs(case, dtype, device, fusion)
    inputs["weight"] = inputs["weight"].contiguous(memory_format=weight_format)
    results = {}
    for name, fn, cast in [("truth", reference_conv, torch.float64),
                           ("eager", reference_conv, None),
                           ("fused", triton_conv_outputs, None)]:
        tensors = with_grad(inputs, cast)
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
                         **grads(tensors)}
    assert results["fused"]["y"].dtype == dtype
    return results


def check_triton_conv(case, fusion, device, weight_format=torch.contiguous_format,
                      in_dtypes=None):
    """triton_conv forward and backward within eager's error of fp64, in ``in_dtypes``
    (default: every dtype the device tests)."""
    for dtype in in_dtypes or dtypes(device):
        results = conv_results(case, fusion, dtype, device, weight_format)
        failures = errors_beyond_eager(results["fused"], results["eager"], results["truth"])
        assert failures == [], f"{dtype}: {failures}"


def check_bn_add_relu(shape, residual_kind, memory_format, device):
    """triton_bn_add_relu and its backward against eager and fp64, ``residual_kind`` one of
    none, identity, projection (the shortcut's BN applied in the same pass)."""
    channels = shape[1]
    for dtype in dtypes(device):
        a = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
        inputs = {"a": a, "a_scale": torch.randn(channels, device=device),
                  "a_shift": torch.randn(channels, device=device)}
        if residual_kind != "none":
            inputs["residual"] = torch.randn_like(a)
        if residual_kind == "projection":
            inputs["r_scale"] = torch.randn(channels, device=device)
            inputs["r_shift"] = torch.randn(channels, device=device)

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
            tensors = with_grad(inputs, cast)
            y = fn(**tensors)
            (y.float() * torch.arange(y.numel(), device=device).view_as(y).sin()).sum().backward()
            results[name] = {"y": y.detach(), **grads(tensors)}
        failures = errors_beyond_eager(results["fused"], results["eager"], results["truth"])
        assert failures == [], f"{dtype}: {failures}"


def check_backward_with_statistics(case, offset_of_mean, device, add_other=False,
                                   scaled=False):
    """triton_conv_dgrad and triton_conv_wgrad adding the gradient through the batch
    statistics of the conv output y (as the blocks' training convs use them), with a
    prologue, against eager and fp64; ``offset_of_mean`` added to y (a large one checks
    that the term is centred on the mean before the product); with ``add_other`` dgrad
    also adds another gradient of x (a block's shortcut's) to its result; with ``scaled``
    the output gradient is given before a per-channel scale (grad_scale), as a block's
    residual tail gives it."""
    n, c_in, h, w, c_out, k, stride = case
    for dtype in dtypes(device):
        _, inputs = conv_inputs(case, torch.float64, device, "prologue_statistics")
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        y = torch.randn(n, c_out, ho, wo, device=device, dtype=torch.float64) + offset_of_mean
        per_channel = [y.mean((0, 2, 3))] + [torch.randn(c_out, device=device,
                                                         dtype=torch.float64)
                                             for _ in range(3 if scaled else 2)]
        tensors = {"grad": torch.randn_like(y), "x": inputs["x"], "weight": inputs["weight"],
                   "y": y, "other": torch.randn_like(inputs["x"])}
        results = {}
        for name, dgrad, wgrad, cast in [
                ("truth", op_reference.conv_dgrad, op_reference.conv_wgrad, torch.float64),
                ("eager", op_reference.conv_dgrad, op_reference.conv_wgrad, dtype),
                ("fused", triton_conv_dgrad, triton_conv_wgrad, dtype)]:
            grad, x, weight, y_, other = (t.to(cast) for t in tensors.values())
            vector_dtype = torch.promote_types(cast, torch.float32)
            scale_shift = [inputs[key].to(vector_dtype) for key in ("in_scale", "in_shift")]
            statistics = [y_] + [v.to(vector_dtype) for v in per_channel]
            grad_x, grad_scale, grad_shift = dgrad(grad, weight, x, stride, *scale_shift,
                                                   *statistics,
                                                   other=other if add_other else None)
            results[name] = {"grad_x": grad_x, "grad_scale": grad_scale,
                             "grad_shift": grad_shift,
                             "grad_weight": wgrad(grad, x, weight, stride, *scale_shift,
                                                  *statistics)}
        assert results["fused"]["grad_x"].dtype == dtype
        failures = errors_beyond_eager(results["fused"], results["eager"], results["truth"])
        assert failures == [], f"{dtype}: {failures}"


def check_channel_statistics(shape, device):
    """triton_channel_stats and its gradient against fp64, fp32 tolerances."""
    x = torch.randn(shape, device=device, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    x64 = x.clone().requires_grad_()
    mean, var = triton_channel_stats(x32)
    expected_mean, expected_var = reference.batch_statistics(x64)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-5, atol=1e-6)
    (mean * 3 + var.square()).sum().backward()
    (expected_mean * 3 + expected_var.square()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
