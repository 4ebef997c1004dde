"""The four residual blocks on a backend's fused ops: the ``triton`` and ``cuda`` backends.

:class:`FusedBlocks` composes the blocks from three ops of one backend (:class:`Kernels`:
the fused conv, BN-apply + shortcut + ReLU, channel statistics; same schemas in both
backends, see :mod:`fused_resnet.op_support`). Its four block functions have the
signatures and semantics of :mod:`fused_resnet.reference`. The plan:

* BatchNorm with batch statistics (training): the conv that produces the BN's input
  computes its per-channel statistics in its epilogue and stores the raw output; the BN
  (scale/shift from :func:`reference.normalization`, which also updates the running
  statistics once per forward) is applied, with the ReLU, in the prologue of the conv
  that consumes it. The normalized activation never reaches memory, in forward or in
  backward (dgrad and wgrad recompute it from the raw tensor).
* Post-activation blocks end in BN + shortcut + ReLU: one elementwise pass (which also
  applies the projection shortcut's BN).
* Where the kernels have them (triton): a conv feeding a training BN hands its per-tile
  statistics to the BN's finalize, which merges them (``Kernels.conv_bn_train``); a
  post-activation block's tail (last conv + BN, projection + BN, BN + shortcut + ReLU)
  has a backward of its own that writes the masked output gradient once for every
  consumer (``Kernels.residual_tail``); and the ImageNet stem's BN + ReLU + max-pool is
  one pass (``Kernels.bn_relu_maxpool``, for :class:`fused_resnet.stem.BatchNormReLUMaxPool`).
* Inference (every BN on running statistics, no gradient needed): post-activation
  blocks fold each BN into its conv's epilogue, and the last conv adds the shortcut and
  applies the ReLU there, so no standalone BN or add kernel runs. Pre-activation blocks
  apply BN-ReLU in the prologues in every mode, and add the shortcut in the last conv's
  epilogue.
* The input of a pre-activation block in training needs its batch statistics before the
  first conv: one reduction pass.

Outputs are channels_last; an NCHW input gets an NCHW output, as PyTorch would give.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fused_resnet.op_support import batch_norm_input, output_size
from fused_resnet.reference import BatchNormParams, Finalize, Projection, normalization

ScaleShift = tuple[Tensor, Tensor]


class Kernels(NamedTuple):
    """One backend's ops, with the schemas of the ``triton_*`` ops."""

    # (x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual, out_relu,
    #  statistics) -> (y, mean, var)
    conv: Callable
    # (a, a_scale, a_shift, residual, r_scale, r_shift, relu) -> y
    bn_add_relu: Callable
    # (x) -> (mean, biased var)
    channel_stats: Callable
    # batch statistics -> scale/shift and running statistics
    finalize: Finalize = Finalize()
    # conv's arguments -> (y, mean, var, x for its other consumer), the gradient of which
    # dgrad adds to its own (op_support.conv_sharing_input); None: autograd adds them
    conv_sharing_input: Optional[Callable] = None
    # A conv feeding a training BN (not synchronized, more than one value per channel):
    # (x, weight, stride, in_scale, in_shift, bn, share_input) -> (y, (scale, shift), x
    # for its other consumer as above), the BN's finalize done with the conv's statistics
    # merge; None: conv (or conv_sharing_input), then finalize.
    conv_bn_train: Optional[Callable] = None
    # The end of a post-activation block whose last BN and shortcut BN qualify as above:
    # (h, weight, stride, prologue (scale, shift), bn, x, shortcut: Projection or None,
    # shortcut stride) -> relu(bn(conv(h)) + shortcut(x)), in a backward of its own;
    # None: conv_bn_train and bn_add_relu.
    residual_tail: Optional[Callable] = None
    # An ImageNet stem's BN + ReLU + 3x3 stride-2 max-pool: (x, bn) -> y for a training BN
    # (as conv_bn_train takes) or, without a gradient, one on running statistics; None (or
    # any other BN): PyTorch's own ops run it (stem.BatchNormReLUMaxPool).
    bn_relu_maxpool: Optional[Callable] = None


def _count(t: Tensor) -> int:
    return t.numel() // t.shape[1]


def _output_count(x: Tensor, weight: Tensor, stride: int) -> int:
    """Values per channel of conv(x, weight, stride)."""
    n, _, h, w = x.shape
    kernel = weight.shape[-1]
    return n * output_size(h, kernel, stride) * output_size(w, kernel, stride)


def _merges_in_finalize(bn: BatchNormParams, count: int) -> bool:
    """Whether ``bn``, over ``count`` values per channel, is one the fused training paths
    (``Kernels.conv_bn_train`` and those after it) take: training, not synchronized, more
    than one value per channel (a batch of one value takes the reference's path, which
    raises PyTorch's error)."""
    return bn.training and bn.process_group is None and count > 1


def _in_input_format(out: Tensor, x: Tensor) -> Tensor:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out if channels_last else out.contiguous()


def _needs_grad(x: Tensor, weights: Sequence[Tensor], bns: Sequence[BatchNormParams]) -> bool:
    tensors = [x, *weights] + [t for bn in bns for t in (bn.weight, bn.bias) if t is not None]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class FusedBlocks:
    """The four block functions of :mod:`fused_resnet.reference` on ``kernels``, and its
    stem function where the kernels have one."""

    def __init__(self, kernels: Kernels):
        self.kernels = kernels

    def _normalization(self, bn: BatchNormParams, count: int,
                       batch_stats: Optional[tuple[Tensor, Tensor]]) -> ScaleShift:
        return normalization(bn, count, batch_stats, self.kernels.finalize)

    def _conv(self, x: Tensor, weight: Tensor, stride: int = 1,
              prologue: Optional[ScaleShift] = None, epilogue: Optional[ScaleShift] = None,
              residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
        in_scale, in_shift = prologue or (None, None)
        out_scale, out_shift = epilogue or (None, None)
        return self.kernels.conv(x, weight, stride, in_scale, in_shift, out_scale, out_shift,
                                 residual, relu, False)[0]

    def _conv_feeding_bn(self, x: Tensor, weight: Tensor, bn: BatchNormParams, stride: int = 1,
                         prologue: Optional[ScaleShift] = None,
                         share_input: bool = False) -> tuple[Tensor, ScaleShift, Tensor]:
        """The raw conv output, the (scale, shift) of the BN it feeds, and x for another
        consumer: with ``share_input``, where the kernels can, a view of x whose gradient
        this conv's dgrad adds to its own (``Kernels.conv_sharing_input``)."""
        in_scale, in_shift = prologue or (None, None)
        if self.kernels.conv_bn_train is not None and _merges_in_finalize(
                bn, _output_count(x, weight, stride)):
            return self.kernels.conv_bn_train(x, weight, stride, in_scale, in_shift, bn,
                                              share_input)
        arguments = (x, weight, stride, in_scale, in_shift, None, None, None, False,
                     bn.uses_batch_stats)
        if share_input and self.kernels.conv_sharing_input is not None:
            z, mean, var, x = self.kernels.conv_sharing_input(*arguments)
        else:
            z, mean, var = self.kernels.conv(*arguments)
        batch_stats = (mean, var) if bn.uses_batch_stats else None
        return z, self._normalization(bn, _count(z), batch_stats), x

    def _post_act(self, x: Tensor, layers: list[tuple[Tensor, BatchNormParams, int]],
                  shortcut: Optional[Projection]) -> Tensor:
        """``relu(bn_k(conv_k(...relu(bn_1(conv_1(x)))...)) + shortcut(x))``."""
        stride = max(s for _, _, s in layers)
        bns = [bn for _, bn, _ in layers] + ([shortcut.bn] if shortcut else [])
        weights = [w for w, _, _ in layers] + ([shortcut.weight] if shortcut else [])
        if not any(bn.uses_batch_stats for bn in bns) and not _needs_grad(x, weights, bns):
            identity = x
            if shortcut is not None:
                folded_bn = self._normalization(shortcut.bn, _count(x), None)
                identity = self._conv(x, shortcut.weight, stride, epilogue=folded_bn)
            h = x
            for index, (weight, bn, layer_stride) in enumerate(layers):
                last = index == len(layers) - 1
                h = self._conv(h, weight, layer_stride,
                               epilogue=self._normalization(bn, _count(h), None),
                               residual=identity if last else None, relu=True)
            return _in_input_format(h, x)

        # x feeds conv1 and the shortcut: conv1's dgrad adds the shortcut's gradient.
        (weight, bn, layer_stride), *rest = layers
        h, scale_shift, x_shortcut = self._conv_feeding_bn(x, weight, bn, layer_stride,
                                                           share_input=True)
        *middle, (last_weight, last_bn, last_stride) = rest
        for weight, bn, layer_stride in middle:
            h, scale_shift, _ = self._conv_feeding_bn(h, weight, bn, layer_stride, scale_shift)
        if self.kernels.residual_tail is not None and _merges_in_finalize(
                last_bn, _output_count(h, last_weight, last_stride)) and (
                    shortcut is None or _merges_in_finalize(
                        shortcut.bn, _output_count(x, shortcut.weight, stride))):
            out = self.kernels.residual_tail(h, last_weight, last_stride, scale_shift, last_bn,
                                             x_shortcut, shortcut, stride)
            return _in_input_format(out, x)
        h, scale_shift, _ = self._conv_feeding_bn(h, last_weight, last_bn, last_stride,
                                                  scale_shift)
        if shortcut is None:
            residual, residual_scale_shift = x_shortcut, (None, None)
        else:
            residual, residual_scale_shift, _ = self._conv_feeding_bn(
                x_shortcut, shortcut.weight, shortcut.bn, stride)
        out = self.kernels.bn_add_relu(h, *scale_shift, residual, *residual_scale_shift, True)
        return _in_input_format(out, x)

    def _pre_act(self, x: Tensor, norms: list[BatchNormParams], convs: list[tuple[Tensor, int]],
                 shortcut: Optional[Projection]) -> Tensor:
        """``conv_k(relu(bn_k(...conv_1(relu(bn_1(x)))...))) + shortcut``."""
        first = norms[0]
        # x_bn: x as the first BN's consumers (the convs applying it in their prologue)
        # read it, so that its gradient through the BN is one node (batch_norm_input); the
        # identity shortcut adds x itself.
        x_bn, batch_stats = x, None
        if first.uses_batch_stats and first.process_group is None:
            x_bn, mean, var = batch_norm_input(x, self.kernels.channel_stats, first.eps)
            batch_stats = (mean, var)
        elif first.uses_batch_stats:
            batch_stats = self.kernels.channel_stats(x)
        scale_shift = self._normalization(first, _count(x), batch_stats)
        stride = max(s for _, s in convs)
        identity = (x if shortcut is None
                    else self._conv(x_bn, shortcut.weight, stride, scale_shift))
        h = x_bn
        for (weight, conv_stride), next_norm in zip(convs[:-1], norms[1:]):
            h, scale_shift, _ = self._conv_feeding_bn(h, weight, next_norm, conv_stride,
                                                      scale_shift)
        weight, conv_stride = convs[-1]
        out = self._conv(h, weight, conv_stride, scale_shift, residual=identity)
        return _in_input_format(out, x)

    def fuses_bn_relu_maxpool(self, x: Tensor, bn: BatchNormParams) -> bool:
        """Whether :meth:`bn_relu_maxpool` runs on these kernels: a training BN as
        ``Kernels.conv_bn_train`` takes, or running statistics without a gradient."""
        return self.kernels.bn_relu_maxpool is not None and (
            _merges_in_finalize(bn, _count(x))
            or (not bn.uses_batch_stats and not _needs_grad(x, [], [bn])))

    def bn_relu_maxpool(self, x: Tensor, bn: BatchNormParams) -> Tensor:
        """:func:`reference.bn_relu_maxpool` (an ImageNet stem after its conv), where
        :meth:`fuses_bn_relu_maxpool`."""
        return _in_input_format(self.kernels.bn_relu_maxpool(x, bn), x)

    def basic_block(self, x: Tensor, conv1: Tensor, bn1: BatchNormParams, conv2: Tensor,
                    bn2: BatchNormParams, stride: int = 1,
                    shortcut: Optional[Projection] = None) -> Tensor:
        return self._post_act(x, [(conv1, bn1, stride), (conv2, bn2, 1)], shortcut)

    def bottleneck(self, x: Tensor, conv1: Tensor, bn1: BatchNormParams, conv2: Tensor,
                   bn2: BatchNormParams, conv3: Tensor, bn3: BatchNormParams, stride: int = 1,
                   shortcut: Optional[Projection] = None) -> Tensor:
        return self._post_act(x, [(conv1, bn1, 1), (conv2, bn2, stride), (conv3, bn3, 1)],
                              shortcut)

    def preact_basic_block(self, x: Tensor, norm1: BatchNormParams, conv1: Tensor,
                           norm2: BatchNormParams, conv2: Tensor, stride: int = 1,
                           shortcut: Optional[Projection] = None) -> Tensor:
        return self._pre_act(x, [norm1, norm2], [(conv1, stride), (conv2, 1)], shortcut)

    def preact_bottleneck(self, x: Tensor, norm1: BatchNormParams, conv1: Tensor,
                          norm2: BatchNormParams, conv2: Tensor, norm3: BatchNormParams,
                          conv3: Tensor, stride: int = 1,
                          shortcut: Optional[Projection] = None) -> Tensor:
        return self._pre_act(x, [norm1, norm2, norm3],
                             [(conv1, 1), (conv2, stride), (conv3, 1)], shortcut)
