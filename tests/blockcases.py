"""Block configurations and builders shared by the tests."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

import fused_resnet
from fused_resnet import plain
from fused_resnet.testing import errors_beyond_eager_redrawing

LAYOUTS = ["contiguous", "channels_last", "non_contiguous"]


def randomize_batch_norms(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that no BN is an identity."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if bn.weight is not None:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
                if bn.running_mean is not None:
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
    return module


def post_act_downsample(inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(outplanes))


# (kind, in channels, width, stride, projection): odd channel counts, stride 2, projections.
BLOCK_CASES = [
    ("basic", 8, 8, 1, False),
    ("basic", 5, 7, 2, True),
    ("bottleneck", 12, 3, 1, False),   # 12 = 3 * expansion 4: identity shortcut
    ("bottleneck", 6, 3, 2, True),
    ("preact_basic", 6, 6, 1, False),
    ("preact_basic", 5, 7, 2, True),
    ("preact_bottleneck", 12, 12, 1, False),
    ("preact_bottleneck", 5, 12, 2, True),
]


def case_id(case) -> str:
    kind, cin, width, stride, projection = case
    return f"{kind}-c{cin}-w{width}-s{stride}{'-proj' if projection else ''}"


def build_plain(case) -> nn.Module:
    """A plain block of ``case``; the fused tests convert a copy of it."""
    kind, cin, width, stride, projection = case
    if kind == "basic":
        ds = post_act_downsample(cin, width, stride) if projection else None
        block = plain.BasicBlock(cin, width, stride, ds)
    elif kind == "bottleneck":
        ds = post_act_downsample(cin, width * 4, stride) if projection else None
        block = plain.Bottleneck(cin, width, stride, ds)
    elif kind == "preact_basic":
        block = plain.PreActBasicBlock(cin, width, stride=stride)
    else:
        block = plain.PreActBottleneck(cin, width, stride=stride)
    assert (block.downsample is not None) == projection
    return randomize_batch_norms(block)


def run_steps(block: nn.Module, steps,
              autocast_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Run (input, mode) steps; collect outputs, gradients and buffers after each.

    With ``autocast_dtype`` the forwards run under ``torch.autocast`` in that dtype.
    Parameters that get no gradient (``requires_grad=False``) have no entry.
    """
    results = {}
    for index, (x, mode) in enumerate(steps):
        block.train(mode == "train")
        x = x.detach().clone().to(next(block.parameters()).dtype)
        autocast = torch.autocast(x.device.type, dtype=autocast_dtype or torch.float16,
                                  enabled=autocast_dtype is not None)
        if mode == "no_grad":
            with torch.no_grad(), autocast:
                results[f"{index} output"] = block(x)
            continue
        x.requires_grad_()
        with autocast:
            out = block(x)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device)
         .view_as(out)).sum().backward()
        results[f"{index} output"] = out.detach()
        results[f"{index} grad input"] = x.grad
        for name, p in block.named_parameters():
            if p.grad is not None:
                results[f"{index} grad {name}"] = p.grad.clone()
        block.zero_grad()
        for name, b in block.named_buffers():
            results[f"{index} buffer {name}"] = b.clone()
    return results


def block_input(case, batch: int, h: int, w: int, device, layout: str) -> torch.Tensor:
    """An fp32 input of ``case`` in ``layout``: contiguous, channels_last or a strided view."""
    x = torch.randn(batch, case[1], h, w * 2, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x[..., ::2] if layout == "non_contiguous" else x[..., :w]


def compare_with_reference(case, dtype: torch.dtype, device, layout: str, backend: str,
                           draws: int = 3) -> None:
    """A block of ``case`` cast to ``dtype`` on ``backend`` against the reference in fp64,
    within eager's error in ``dtype``: two training steps (batch 3 and 2, odd H and W), a
    frozen-BN step (eval with gradients, batch 1) and a no-grad inference step; outputs,
    input and parameter gradients, running statistics; the output in the input's layout.

    Judged as ``errors_beyond_eager_redrawing`` does, over up to ``draws`` blocks and
    inputs: the blocks have 3 to 12 channels, and the RMS error of a 3-element gradient
    is too noisy an estimate for one draw to fail a tensor (bottleneck, 3 channels, fp32,
    8 seeds: the worst tensor's error is 2-7x eager's with tiles of 16x16x16 as with
    32x16x8, the median 0.9-1.2x)."""
    def draw(_):
        block = build_plain(case).to(device)
        steps = [(block_input(case, 3, 7, 5, device, layout), "train"),
                 (block_input(case, 2, 5, 3, device, layout), "train"),
                 (block_input(case, 1, 5, 7, device, layout), "eval"),     # frozen BN
                 (block_input(case, 3, 7, 5, device, layout), "no_grad")]  # folded BN

        def run(copy_dtype, on):
            return run_steps(fused_resnet.convert(copy.deepcopy(block).to(copy_dtype),
                                                  backend=on), steps)
        truth, eager = run(torch.float64, "reference"), run(dtype, "reference")
        fused = run(dtype, backend)
        for index in range(len(steps)):
            out = fused[f"{index} output"]
            assert out.dtype == dtype
            assert out.is_contiguous(memory_format=torch.channels_last
                                     if layout == "channels_last" else torch.contiguous_format)
        return fused, eager, truth

    assert errors_beyond_eager_redrawing(draw, draws) == []
