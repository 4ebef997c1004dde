"""The Triton ops against the reference: forward, every gradient, statistics, opcheck.

On a machine without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py), with tiny shapes; bf16 only on GPUs (the interpreter's bf16 tl.dot is wrong).
Every low-precision comparison is against fp64: the kernel's error must stay within
ERROR_FACTOR of what plain PyTorch makes in the same dtype.
"""

import pytest
import torch

from fused_resnet import op_reference, reference, triton_ops
from fused_resnet.kernels import batch_norm_finalize
from fused_resnet.reference import BatchNormParams, Finalize, normalization
from fused_resnet.testing import errors_beyond_eager
from fused_resnet.triton_ops import (triton_bn_add_relu, triton_channel_stats, triton_conv,
                                     triton_conv_dgrad, triton_conv_wgrad)
from opcases import (CONV_CASES, FUSIONS, STEM_CASE, check_backward_with_statistics,
                     check_bn_add_relu, check_channel_statistics, check_triton_conv,
                     conv_inputs, conv_results, cross_reduction_thresholds, grads,
                     reference_conv, triton_conv_outputs, with_grad)

CONV_PARAMS = [(case, fusion) for case in CONV_CASES for fusion in FUSIONS] + [
    (STEM_CASE, "plain")]


@pytest.mark.parametrize("case, fusion", CONV_PARAMS, ids=str)
def test_triton_conv_forward_and_backward(case, fusion, device, poisoned_allocations):
    check_triton_conv(case, fusion, device)


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
    check_bn_add_relu((3, 5, 7, 3), residual_kind, memory_format, device)


@pytest.mark.parametrize("offset_of_mean", [0.0, 1e3])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1]], ids=str)
def test_backward_ops_add_the_statistics_gradient(case, offset_of_mean, device,
                                                  poisoned_allocations):
    # 3x3 stride 1 and 2, channels not multiples of the interpreter tiles; a large mean
    # (|mean| / std = 1000) checks that the term is centred before the product.
    check_backward_with_statistics(case, offset_of_mean, device)


@pytest.mark.parametrize("kernel, h, w", [(3, 7, 6), (3, 6, 7), (1, 6, 7), (1, 7, 7)])
def test_stride_2_dgrad_every_parity_class(kernel, h, w, device, poisoned_allocations):
    """dgrad runs each (h % 2, w % 2) class of input pixels with only the taps that reach
    it (a 1x1 stride-2 tap reaches one class: the others must come out zero, not
    unwritten); each class's gradient against fp64 within eager's error, odd and even H
    and W, with the prologue's scale/shift gradients summed over the classes."""
    case = (2, 5, h, w, 6, kernel, 2)
    for dtype in [torch.float32, torch.float16]:
        _, inputs = conv_inputs(case, torch.float64, device, "prologue_statistics")
        ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        grad = torch.randn(2, 6, ho, wo, device=device, dtype=torch.float64)
        results = {}
        for name, dgrad, cast in [("truth", op_reference.conv_dgrad, torch.float64),
                                  ("eager", op_reference.conv_dgrad, dtype),
                                  ("fused", triton_conv_dgrad, dtype)]:
            vectors = [inputs[k].to(torch.promote_types(cast, torch.float32))
                       for k in ("in_scale", "in_shift")]
            grad_x, grad_scale, grad_shift = dgrad(grad.to(cast), inputs["weight"].to(cast),
                                                   inputs["x"].to(cast), 2, *vectors)
            results[name] = {"grad_scale": grad_scale, "grad_shift": grad_shift, **{
                f"grad_x[{ph}::2, {pw}::2]": grad_x[..., ph::2, pw::2]
                for ph in range(2) for pw in range(2)}}
        failures = errors_beyond_eager(results["fused"], results["eager"], results["truth"])
        assert failures == [], f"{dtype}: {failures}"


def test_dgrad_adds_the_other_gradient_of_its_input(device, poisoned_allocations):
    # What a post-activation block's conv1 does with its shortcut's gradient.
    check_backward_with_statistics(CONV_CASES[1], 0.0, device, add_other=True)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2]], ids=str)
def test_backward_ops_scale_the_gradient_per_channel(case, device, poisoned_allocations):
    # What a post-activation block's last conv and projection do with the masked output
    # gradient of the BN-add-ReLU (fused_resnet.triton_ops._ResidualTail).
    check_backward_with_statistics(case, 0.0, device, scaled=True)


def test_channel_stats_and_their_gradient(device):
    check_channel_statistics((3, 6, 5, 7), device)


def test_kernels_are_deterministic_and_right(device, monkeypatch):
    """Two runs of a conv's forward and backward are bitwise equal (every reduction in a
    fixed order, the split wgrad and the multi-block statistics merge included) and
    within eager's error of fp64 (two equally wrong runs would be deterministic too)."""
    cross_reduction_thresholds(monkeypatch)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(conv_results(CONV_CASES[1], "prologue_statistics", torch.float32, device))
    first, second = (run["fused"] for run in runs)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert errors_beyond_eager(first, runs[0]["eager"], runs[0]["truth"]) == []


def _opcheck_samples(device):
    stride, fused = conv_inputs(CONV_CASES[1], torch.float32, device, "prologue_statistics")
    _, epilogue = conv_inputs(CONV_CASES[2], torch.float32, device, "epilogue")
    grad = torch.randn(3, 7, 4, 5, device=device)
    a = torch.randn(2, 5, 3, 3, device=device)
    s = torch.randn(5, device=device)
    three_channels = [torch.randn(7, device=device) for _ in range(3)]  # mean, grad_mean/var
    return [
        (triton_conv, (fused["x"], fused["weight"], stride, fused["in_scale"],
                       fused["in_shift"], None, None, None, False, True)),
        (triton_conv, (epilogue["x"], epilogue["weight"], 2, None, None, epilogue["out_scale"],
                       epilogue["out_shift"], epilogue["residual"], True, False)),
        (triton_conv_dgrad, (grad, fused["weight"], fused["x"], stride, fused["in_scale"],
                             fused["in_shift"])),
        (triton_conv_dgrad, (grad, fused["weight"], fused["x"], stride, None, None,
                             torch.randn_like(grad), *three_channels,
                             torch.randn_like(fused["x"]))),
        (triton_conv_wgrad, (grad, fused["x"], fused["weight"], stride, None, None)),
        (triton_conv_wgrad, (grad, fused["x"], fused["weight"], stride, fused["in_scale"],
                             fused["in_shift"], torch.randn_like(grad), *three_channels)),
        (triton_bn_add_relu, (a, s, s, torch.randn_like(a), s, s, True)),
        (triton_channel_stats, (a,)),
        *_training_plan_samples(fused, stride, device),
    ]


def _training_plan_samples(fused, stride, device):
    """The ops only the triton plan's own Functions call (conv + BN finalize, the
    residual tail's backward pieces, the stem's BN-ReLU-max-pool)."""
    channels = [torch.rand(7, device=device) + 0.5 for _ in range(4)]  # weight, bias, var..
    running = (torch.zeros(7, device=device), torch.ones(7, device=device),
               torch.tensor(0, device=device))
    x = torch.randn(3, 7, 5, 6, device=device)
    g, sums, tiles = triton_ops.triton_masked_gradient(torch.randn_like(x), x.relu(), x,
                                                       None, True)
    pooled, taps = triton_ops.triton_bn_relu_maxpool(x, *channels[:2], 3, 2, 1, True)
    return [
        (triton_ops.triton_conv_bn_train, (fused["x"], fused["weight"], stride,
                                           fused["in_scale"], fused["in_shift"],
                                           *channels[:2], 1e-5, *running, 0.1)),
        (triton_ops.triton_masked_gradient, (torch.randn_like(x), x.relu(), x,
                                             torch.randn_like(x), True)),
        (triton_ops.triton_bn_scale_shift_backward_from_tiles,
         (sums, tiles, 1, channels[0], channels[2], *channels[:2], 1e-5)),
        (triton_ops.triton_bn_relu_maxpool, (x, *channels[:2], 3, 2, 1, True)),
        (triton_ops.triton_maxpool_relu_backward, (torch.randn_like(pooled), taps, x,
                                                   *channels[:2], 3, 2, 1)),
        (triton_ops.triton_statistics_backward, (g, x, *channels[:3], channels[3])),
    ]


@pytest.mark.parametrize("index", range(14))
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
    _, inputs = conv_inputs(CONV_CASES[2], torch.float32, device, "epilogue")
    inputs["out_scale"].requires_grad_()
    y = triton_conv_outputs(2, **inputs)[0]
    with pytest.raises(RuntimeError, match="gradients of out_scale/out_shift"):
        y.sum().backward()


def test_statistics_with_an_epilogue_are_refused(device):
    _, inputs = conv_inputs(CONV_CASES[2], torch.float32, device, "epilogue")
    with pytest.raises(ValueError, match="statistics are of the raw conv output"):
        triton_conv(inputs["x"], inputs["weight"], 2, None, None, inputs["out_scale"],
                    inputs["out_shift"], None, False, True)


@pytest.mark.parametrize("projection", [False, True])
def test_masked_gradient_and_the_finalize_backward_from_its_tiles(projection, device,
                                                                   monkeypatch,
                                                                   poisoned_allocations):
    """The residual tail's backward pieces: triton_masked_gradient's g' = grad * (y > 0)
    exactly, and the BN finalize's backward summing g' and g' * a (or g' * projection)
    from its per-tile sums, against the reference finalize's autograd in fp64 (sums over
    several blocks of tiles and of channels)."""
    cross_reduction_thresholds(monkeypatch)
    shape, channels = (3, 37, 5, 7), 37
    a, grad, r = (torch.randn(shape, device=device) for _ in range(3))
    y = torch.randn(shape, device=device).relu()  # some outputs exactly 0
    g, sums, tiles = triton_ops.triton_masked_gradient(grad, y, a, r if projection else None,
                                                       True)
    torch.testing.assert_close(g, grad.where(y > 0, 0.0), rtol=0, atol=0)
    mean, var, weight, bias = (torch.randn(channels, device=device) for _ in range(4))
    var = var.abs() + 0.1
    scaled = r if projection else a
    results = {}
    for name, dtype in [("truth", torch.float64), ("eager", torch.float32)]:
        tensors = [t.to(dtype, copy=True).requires_grad_() for t in (mean, var, weight, bias)]
        scale, shift = reference.scale_shift_from_statistics(*tensors, 1e-5)
        masked = grad.to(dtype).where(y > 0, 0.0)
        ((scale * (masked * scaled.to(dtype)).sum((0, 2, 3))).sum()
         + (shift * masked.sum((0, 2, 3))).sum()).backward()
        results[name] = {f"grad {i}": t.grad for i, t in enumerate(tensors)}
    fused = triton_ops.triton_bn_scale_shift_backward_from_tiles(
        sums, tiles, 2 if projection else 1, mean, var, weight, bias, 1e-5)
    results["fused"] = {f"grad {i}": t for i, t in enumerate(fused)}
    assert errors_beyond_eager(results["fused"], results["eager"], results["truth"]) == []


def _conv_then_normalization(x, weight, stride, in_scale, in_shift, bn, share_input):
    """What Kernels.conv_bn_train computes, from the reference's conv, statistics and
    finalize."""
    y = reference_conv(stride, x, weight, in_scale, in_shift)
    count = y.numel() // y.shape[1]
    return y, normalization(bn, count, reference.batch_statistics(y)), x


@pytest.mark.parametrize("momentum, running, share_input", [
    (0.1, True, False), (None, True, True), (0.1, False, True)])
@pytest.mark.parametrize("prologue", [True, False])
def test_conv_bn_train_matches_conv_then_finalize(momentum, running, share_input, prologue,
                                                  device, monkeypatch,
                                                  poisoned_allocations):
    """The triton conv feeding a training BN, whose finalize merges the conv's per-tile
    statistics (triton_conv_bn_train): y, scale, shift, the running statistics and
    num_batches_tracked, and the gradient of every input (through scale and shift, and
    through the shared view of x), against the reference's conv, statistics and
    normalization in fp64. Output channels span several merge programs (and the
    cumulative average's single program loops over them)."""
    cross_reduction_thresholds(monkeypatch)
    case = (3, 5, 7, 6, 37, 3, 2)
    fusion = "prologue_statistics" if prologue else "plain"
    stride, inputs = conv_inputs(case, torch.float32, device, fusion)
    generator = torch.Generator().manual_seed(2)
    c_out = case[4]
    bn_tensors = {"bn weight": torch.randn(c_out, generator=generator),
                  "bn bias": torch.randn(c_out, generator=generator)}
    running_stats = [torch.rand(c_out, generator=generator) for _ in range(2)]
    results = {}
    for name, conv_bn, dtype in [("truth", _conv_then_normalization, torch.float64),
                                 ("eager", _conv_then_normalization, torch.float32),
                                 ("fused", triton_ops.KERNELS.conv_bn_train, torch.float32)]:
        tensors = with_grad(inputs, dtype)
        bn_params = {k: v.to(device, dtype).requires_grad_() for k, v in bn_tensors.items()}
        buffers = ((*(r.to(device, dtype) for r in running_stats),
                    torch.tensor(3, device=device)) if running else (None, None, None))
        bn = BatchNormParams(*bn_params.values(), *buffers, momentum, 1e-5, True)
        y, (scale, shift), x_shared = conv_bn(tensors["x"], tensors["weight"], stride,
                                             tensors.get("in_scale"), tensors.get("in_shift"),
                                             bn, share_input)
        loss = ((y * torch.linspace(-1, 1, y.numel(), device=device, dtype=dtype).view_as(y))
                .sum() + (scale * scale).sum() + (shift * scale).sum()
                + (x_shared * x_shared).sum())
        loss.backward()
        results[name] = {"y": y.detach(), "scale": scale.detach(), "shift": shift.detach(),
                         **grads(tensors), **{f"grad {k}": v.grad for k, v in bn_params.items()}}
        if running:
            results[name].update({"running mean": buffers[0], "running var": buffers[1],
                                  "num_batches_tracked": buffers[2]})
    assert set(results["fused"]) == set(results["truth"])
    assert errors_beyond_eager(results["fused"], results["eager"], results["truth"]) == []


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16, None])
def test_bn_finalize_matches_the_reference(affine, momentum, running_dtype, device,
                                           monkeypatch):
    """The triton finalize (scale/shift, running statistics, num_batches_tracked, and the
    gradients of mean, var, weight, bias) against reference.normalization in fp64.
    running_dtype None: track_running_stats=False; float16: a .half() module's buffers."""
    # More channels than one program's block (1024 on GPUs, lowered here): the scale/shift
    # kernels' grid and the one-program training finalize's loop over channel blocks.
    monkeypatch.setattr(batch_norm_finalize, "_BLOCK", 16)
    channels, count = 37, 37
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
