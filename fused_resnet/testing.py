"""Helpers to check a fused model against PyTorch the way flash-attention does.

Comparing two low-precision results to each other says little: a deep network amplifies
rounding, so two correct fp32 implementations of ResNet-50 training can differ by 1e-2
in early-layer gradients. Instead both are compared to an upcast (fp64) run of the same
model, and the fused result must be within a small multiple of eager PyTorch's own error.
The error of a tensor is the root-mean-square of its difference to fp64: the maximum
difference of one element swings by several times between two correct implementations
(seen on ResNet-50 fp32 gradients: ratios up to 6.7 for the maximum, 1.6 for the RMS).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

# How much more error than eager PyTorch (same dtype) a fused result may have.
ERROR_FACTOR = 2.0


def train_and_eval_step(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training forward/backward and one eval forward; every tensor they produce.

    Returns the outputs of both passes, every parameter's gradient and every buffer
    (running statistics, ``num_batches_tracked``) afterwards, keyed by name.
    """
    model.train()
    output = model(images)
    output.float().square().mean().backward()
    results = {"train output": output.detach()}
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    results.update({f"buffer {name}": b for name, b in model.named_buffers()})
    model.eval()
    with torch.no_grad():
        results["eval output"] = model(images)
    return results


def float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def rms(t: torch.Tensor) -> float:
    """Root-mean-square of ``t`` in fp64 (0 for an empty tensor)."""
    return float(t.double().square().mean().sqrt()) if t.numel() else 0.0


def relative_differences_beyond(result: dict[str, torch.Tensor],
                                truth: dict[str, torch.Tensor], tolerance: float) -> list[str]:
    """The tensors of ``result`` whose RMS difference to ``truth`` exceeds ``tolerance``
    times the RMS of ``truth``, with the figures; integer tensors must be equal."""
    failures = []
    for name, reference in truth.items():
        if not reference.is_floating_point():
            if not torch.equal(result[name], reference):
                failures.append(f"{name}: {result[name].tolist()} != {reference.tolist()}")
            continue
        difference = rms(result[name].double() - reference)
        if not difference <= tolerance * rms(reference):  # NaN fails, as above
            failures.append(f"{name}: RMS difference {difference:.3e} > {tolerance:.0e} x "
                            f"the tensor's RMS {rms(reference):.3e}")
    return failures


def _errors_beyond_eager_by_name(fused: dict[str, torch.Tensor],
                                  eager: dict[str, torch.Tensor],
                                  truth: dict[str, torch.Tensor],
                                  factor: float) -> dict[str, str]:
    failures = {}
    for name, reference in truth.items():
        if not reference.is_floating_point():
            if not torch.equal(fused[name], reference):
                failures[name] = f"{name}: {fused[name].tolist()} != {reference.tolist()}"
            continue
        floor = 4 * torch.finfo(eager[name].dtype).eps * max(1.0, rms(reference))
        fused_error = rms(fused[name].double() - reference)
        eager_error = rms(eager[name].double() - reference)
        # "not <=": a NaN error (an element the kernel never wrote into a NaN-poisoned
        # buffer) fails, where "fused_error > bound" would be False and pass.
        if not fused_error <= factor * eager_error + floor:
            failures[name] = (f"{name}: fused RMS error {fused_error:.3e} > {factor} x eager's "
                              f"{eager_error:.3e} + {floor:.1e}")
    return failures


def errors_beyond_eager(fused: dict[str, torch.Tensor], eager: dict[str, torch.Tensor],
                        truth: dict[str, torch.Tensor],
                        factor: float = ERROR_FACTOR) -> list[str]:
    """The tensors whose fused error exceeds ``factor`` times eager's, with the figures.

    ``truth`` holds the fp64 results. Integer tensors (``num_batches_tracked``) must be
    equal. The floor of a few ulps of the tensor's RMS covers tensors that eager happens
    to get exactly right.
    """
    return list(_errors_beyond_eager_by_name(fused, eager, truth, factor).values())


def errors_beyond_eager_in_most_draws(draws: list[tuple[dict, dict, dict]],
                                      factor: float = ERROR_FACTOR) -> list[str]:
    """``errors_beyond_eager`` over several independent draws (each a (fused, eager,
    truth) triple): the tensors beyond the bound in more than half of them.

    For low-precision gradients one draw is not enough. A ReLU whose fp64 input is within
    rounding of zero goes the other way in one implementation and not in the other: a
    discrete event that moves a gradient sum by a whole gradient element, rare and
    independent between draws (fp16 bottleneck, 64 channels: 53x eager's error in 1 draw
    of 8, from one flipped ReLU whose fp64 output was 0 and fp16 output 1.5e-5). And the
    RMS error of a per-channel tensor with few channels is a noisy estimate, so the
    ratio of two has a wide spread (5 channels: the ratio's median is near 1, its maximum
    over 20 draws 2.6). A systematic loss of precision shows in every draw.
    """
    beyond = [_errors_beyond_eager_by_name(*draw, factor) for draw in draws]
    failing = []
    for name in sorted({name for failures in beyond for name in failures}):
        messages = [failures[name] for failures in beyond if name in failures]
        if 2 * len(messages) > len(draws):
            failing.extend(messages)
    return failing


def errors_beyond_eager_redrawing(draw: Callable[[int], tuple[dict, dict, dict]],
                                  draws: int = 3, factor: float = ERROR_FACTOR) -> list[str]:
    """``errors_beyond_eager`` of ``draw(0)``; only where a tensor is beyond the bound,
    ``draw(1) .. draw(draws - 1)`` too, judged by :func:`errors_beyond_eager_in_most_draws`.

    A tensor that is off in every draw (a wrong formula, an index mix-up, a systematic
    loss of precision) fails as with a majority of ``draws``; one that is off in a single
    draw, as the rare events described there make them, is re-drawn instead of failing.
    Most runs pass their first draw, so this costs one draw where a clean kernel is
    tested, not ``draws``.
    """
    results = [draw(0)]
    if not errors_beyond_eager(*results[0], factor):
        return []
    results += [draw(index) for index in range(1, draws)]
    return errors_beyond_eager_in_most_draws(results, factor)
