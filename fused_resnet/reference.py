"""The reference path: the math of the four residual blocks in plain PyTorch.

Every backend is tested against these functions. They take tensors and the
per-BatchNorm mode explicitly, so they are usable on any device, under autograd, and
as the oracle in tests. BatchNorm follows ``nn.BatchNorm2d`` exactly: batch statistics
with the biased variance when a layer is training (or has no running statistics), the
running mean and the *unbiased* running variance updated with ``momentum`` (the
cumulative average when ``momentum is None``), ``num_batches_tracked`` incremented once
per call, running statistics in eval.

Statistics and the normalization are computed in at least fp32 and the result is cast
back to the input dtype, which is also what the fused kernels do (fp32 accumulation).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class BatchNormParams(NamedTuple):
    """Parameters, buffers and mode of one BatchNorm layer, as ``nn.BatchNorm2d`` holds them."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float
    training: bool
    # The process group whose batch statistics are merged (SyncBatchNorm), or None.
    process_group: Optional[object] = None

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormParams":
        # The layer's own ``training`` flag, not its parent's: a frozen BN (bn.eval() inside a
        # training model, as detection models do) must keep using running statistics.
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   bn.num_batches_tracked, bn.momentum, bn.eps, bn.training,
                   _sync_group(bn))

    @property
    def uses_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)


class Projection(NamedTuple):
    """A 1x1 projection shortcut: the conv weight and, for post-activation blocks, its BN."""

    weight: Tensor
    bn: Optional[BatchNormParams]


def _sync_group(bn: torch.nn.Module) -> Optional[object]:
    """The group ``bn`` synchronizes over, with ``nn.SyncBatchNorm``'s rule: a training
    SyncBatchNorm in an initialized process group of more than one process."""
    if not (isinstance(bn, torch.nn.SyncBatchNorm) and bn.training
            and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def scale_shift_add_relu(x: Tensor, scale: Tensor, shift: Tensor,
                         residual: Optional[Tensor] = None, relu: bool = True,
                         residual_scale: Optional[Tensor] = None,
                         residual_shift: Optional[Tensor] = None) -> Tensor:
    """``[relu](x * scale[c] + shift[c] [+ residual [* residual_scale[c] + residual_shift[c]]])``
    for NCHW-shaped ``x``, fp32 math.

    The reference of the extension op ``fused_resnet::scale_shift_add_relu`` and the
    BN-apply step of every block.
    """
    acc = _accumulation_dtype(x.dtype)
    y = x.to(acc) * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))
    if residual is not None:
        r = residual.to(acc)
        if residual_scale is not None:
            r = r * _per_channel(residual_scale.to(acc)) + _per_channel(residual_shift.to(acc))
        y = y + r
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over (N, H, W), in at least fp32."""
    xf = x.to(_accumulation_dtype(x.dtype))
    mean = xf.mean(dim=(0, 2, 3))
    var = (xf - _per_channel(mean)).square().mean(dim=(0, 2, 3))
    return mean, var


class _SumOverGroup(torch.autograd.Function):
    """The sum of ``t`` over the processes of ``group``, differentiable: the gradient of
    each process's ``t`` is the sum of every process's output gradient. (What
    ``torch.distributed.nn.functional.all_reduce`` does; torch 2.14 deprecates it with a
    warning on every call.)"""

    @staticmethod
    def forward(ctx, t: Tensor, group: object) -> Tensor:
        ctx.group = group
        total = t.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def synchronized_statistics(mean: Tensor, var: Tensor, count: int,
                            group: object) -> tuple[Tensor, Tensor, int]:
    """Merge per-process batch statistics over ``group``: the mean, biased variance and
    count of the union of every process's batch, as ``nn.SyncBatchNorm`` computes them.

    Two differentiable all-reduces (so gradients flow to every process's statistics, as
    SyncBatchNorm's backward does): the counts and count-weighted means give the global
    mean; then each process's squared deviations, measured from that mean (robust when
    |mean| >> std), give the global variance.
    """
    if count == 0:  # an empty local batch contributes nothing (its own mean is NaN)
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    local = torch.cat([mean.new_full((1,), float(count)), mean * count])
    totals = _SumOverGroup.apply(local, group)
    total_count = int(totals[0].item())
    global_mean = totals[1:] / total_count
    squares = _SumOverGroup.apply(count * (var + (mean - global_mean).square()), group)
    return global_mean, squares / total_count, total_count


def blend_running_stats(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                        factor: float, count: int) -> None:
    """``running = (1 - factor) * running + factor * batch`` in place, with the unbiased
    variance ``var * count / (count - 1)``; the reference of the op
    ``fused_resnet::bn_update_running_stats``."""
    with torch.no_grad():
        unbiased_var = var.detach() * (count / (count - 1))
        running_mean.copy_(running_mean * (1 - factor) + mean.detach() * factor)
        running_var.copy_(running_var * (1 - factor) + unbiased_var * factor)


def scale_shift_from_statistics(mean: Tensor, var: Tensor, weight: Optional[Tensor],
                                bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Normalization and the affine transform folded into one per-channel scale and shift:
    ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``, in at least fp32
    (running statistics of a ``.half()`` module are upcast); the reference of the op
    ``fused_resnet::bn_scale_shift``."""
    acc = _accumulation_dtype(var.dtype)
    mean, var = mean.to(acc), var.to(acc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


class Finalize(NamedTuple):
    """How a backend turns batch statistics into a BN's scale/shift and running statistics:
    the two functions above, or ops with their signatures."""

    scale_shift: Callable = scale_shift_from_statistics
    blend_running_stats: Callable = blend_running_stats
    # Optional, for a training BN with a non-empty batch: (mean, var, weight, bias, eps,
    # running_mean, running_var, num_batches_tracked, momentum, count) -> (scale, shift),
    # also counting the batch and updating the running statistics (each may be None), in
    # one call; None runs the steps above one by one.
    training: Optional[Callable] = None


def normalization(bn: BatchNormParams, count: int,
                  batch_stats: Optional[tuple[Tensor, Tensor]],
                  finalize: Finalize = Finalize()) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) that apply ``bn`` to a tensor of ``count`` values per
    channel, updating the running statistics (mean, unbiased variance with ``momentum`` or
    the cumulative average, ``num_batches_tracked``) when ``bn`` is training.

    ``batch_stats`` (mean, biased variance) is required when ``bn.uses_batch_stats``;
    every backend computes them its own way and shares this step.
    """
    scale_shift = functools.partial(finalize.scale_shift, weight=bn.weight, bias=bn.bias,
                                    eps=bn.eps)
    if bn.uses_batch_stats:
        mean, var = batch_stats
        if bn.process_group is not None:
            mean, var, count = synchronized_statistics(mean, var, count, bn.process_group)
        if bn.training and count == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got {count} value per channel")
        if bn.training and count > 0 and finalize.training is not None:
            return finalize.training(mean, var, bn.weight, bn.bias, bn.eps, bn.running_mean,
                                     bn.running_var, bn.num_batches_tracked, bn.momentum,
                                     count)
        if bn.training and bn.num_batches_tracked is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
        if count == 0:
            # nn.BatchNorm2d on an empty batch: an empty output, the running statistics
            # left alone, num_batches_tracked still counted; the scale and shift only need
            # to exist (and depend on the affine parameters, whose gradient is then zero).
            return scale_shift(torch.zeros_like(mean), torch.ones_like(var))
        if bn.training and bn.running_mean is not None:
            factor = (1.0 / float(bn.num_batches_tracked.item()) if bn.momentum is None
                      else bn.momentum)
            # Detached: the running statistics are not part of the graph.
            finalize.blend_running_stats(mean.detach(), var.detach(), bn.running_mean,
                                         bn.running_var, factor, count)
    else:
        mean, var = bn.running_mean, bn.running_var
    return scale_shift(mean, var)


def batch_norm(x: Tensor, bn: BatchNormParams, relu: bool = False,
               residual: Optional[Tensor] = None) -> Tensor:
    """``[relu](batch_norm(x) [+ residual])`` with ``nn.BatchNorm2d`` semantics."""
    # One upcast feeds both the statistics and the normalization, so that in backward the
    # two gradients (which largely cancel) are summed in fp32 and rounded to x's dtype
    # once, as PyTorch's batch_norm backward does; rounding each to fp16 first doubles
    # the error of the input gradient.
    xf = x.to(_accumulation_dtype(x.dtype))
    batch_stats = batch_statistics(xf) if bn.uses_batch_stats else None
    scale, shift = normalization(bn, x.numel() // x.shape[1], batch_stats)
    return scale_shift_add_relu(xf, scale, shift, residual, relu).to(x.dtype)


# The max-pool that ends an ImageNet ResNet stem: (kernel, stride, padding).
STEM_POOL = (3, 2, 1)


def bn_relu_maxpool(x: Tensor, bn: BatchNormParams) -> Tensor:
    """``max_pool2d(relu(bn(x)), 3, stride 2, padding 1)``: an ImageNet ResNet stem after
    its conv."""
    return F.max_pool2d(batch_norm(x, bn, relu=True), *STEM_POOL)


def conv(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """Bias-free convolution with "same" zero padding (kernel // 2), as every ResNet conv."""
    return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)


def _post_act_shortcut(x: Tensor, shortcut: Optional[Projection], stride: int) -> Tensor:
    if shortcut is None:
        return x
    return batch_norm(conv(x, shortcut.weight, stride), shortcut.bn)


def basic_block(x: Tensor, conv1: Tensor, bn1: BatchNormParams, conv2: Tensor,
                bn2: BatchNormParams, stride: int = 1,
                shortcut: Optional[Projection] = None) -> Tensor:
    """Post-activation BasicBlock: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
    out = batch_norm(conv(x, conv1, stride), bn1, relu=True)
    identity = _post_act_shortcut(x, shortcut, stride)
    return batch_norm(conv(out, conv2), bn2, relu=True, residual=identity)


def bottleneck(x: Tensor, conv1: Tensor, bn1: BatchNormParams, conv2: Tensor,
               bn2: BatchNormParams, conv3: Tensor, bn3: BatchNormParams, stride: int = 1,
               shortcut: Optional[Projection] = None) -> Tensor:
    """Post-activation Bottleneck, torchvision v1.5 (the stride is on the 3x3 ``conv2``)."""
    out = batch_norm(conv(x, conv1), bn1, relu=True)
    out = batch_norm(conv(out, conv2, stride), bn2, relu=True)
    identity = _post_act_shortcut(x, shortcut, stride)
    return batch_norm(conv(out, conv3), bn3, relu=True, residual=identity)


def _pre_act_shortcut(x: Tensor, x_preact: Tensor, shortcut: Optional[Projection],
                      stride: int) -> Tensor:
    # He et al. 2016: the projection takes the pre-activated input, identity takes x itself.
    return x if shortcut is None else conv(x_preact, shortcut.weight, stride)


def preact_basic_block(x: Tensor, norm1: BatchNormParams, conv1: Tensor,
                       norm2: BatchNormParams, conv2: Tensor, stride: int = 1,
                       shortcut: Optional[Projection] = None) -> Tensor:
    """Pre-activation BasicBlock: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``."""
    x_preact = batch_norm(x, norm1, relu=True)
    out = conv(x_preact, conv1, stride)
    out = conv(batch_norm(out, norm2, relu=True), conv2)
    return out + _pre_act_shortcut(x, x_preact, shortcut, stride)


def preact_bottleneck(x: Tensor, norm1: BatchNormParams, conv1: Tensor,
                      norm2: BatchNormParams, conv2: Tensor, norm3: BatchNormParams,
                      conv3: Tensor, stride: int = 1,
                      shortcut: Optional[Projection] = None) -> Tensor:
    """Pre-activation Bottleneck (stride on the 3x3 ``conv2``); the sum is not activated."""
    x_preact = batch_norm(x, norm1, relu=True)
    out = conv(x_preact, conv1)
    out = conv(batch_norm(out, norm2, relu=True), conv2, stride)
    out = conv(batch_norm(out, norm3, relu=True), conv3)
    return out + _pre_act_shortcut(x, x_preact, shortcut, stride)
