"""What the Triton and CUDA backends' fused ops share: their fake (shape-only)
implementations and their autograd formulas.

Both backends have the same three forward ops with the same schemas:

  <backend>_conv           y = epilogue(conv(prologue(x), W)) [+ batch statistics of y]
  <backend>_channel_stats  per-channel mean and biased variance
  a BN-apply + shortcut + ReLU op (triton_bn_add_relu, scale_shift_add_relu)

and the conv's backward ops ``<backend>_conv_dgrad`` (the input gradient through the
prologue, with the prologue's scale/shift gradients) and ``<backend>_conv_wgrad``. The
plain-PyTorch meaning of each is in :mod:`fused_resnet.reference` (``fused_conv``,
``conv_dgrad``, ``conv_wgrad``, ``batch_statistics``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_CHANNELS_LAST = torch.channels_last


def channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=_CHANNELS_LAST)


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def statistics_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def output_size(size: int, kernel: int, stride: int) -> int:
    """Output extent of a "same"-padded (kernel // 2) convolution."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


# --- fakes -------------------------------------------------------------------------------

def conv_fake(x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual, out_relu,
              statistics):
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    y = torch.empty((n, c_out, output_size(h, kh, stride), output_size(w, kw, stride)),
                    dtype=x.dtype, device=x.device, memory_format=_CHANNELS_LAST)
    stats_size = c_out if statistics else 0
    return (y, x.new_empty(stats_size, dtype=statistics_dtype(x)),
            x.new_empty(stats_size, dtype=statistics_dtype(x)))


def conv_dgrad_fake(grad, weight, x, stride, in_scale, in_shift, *fusion_inputs):
    size = 0 if in_scale is None else x.shape[1]
    return (torch.empty_like(x, memory_format=_CHANNELS_LAST),
            x.new_empty(size, dtype=statistics_dtype(x)),
            x.new_empty(size, dtype=statistics_dtype(x)))


def conv_wgrad_fake(grad, x, weight, stride, in_scale, in_shift, *fusion_inputs):
    return torch.empty_like(weight)


def bn_scale_shift_fake(mean, var, weight, bias, eps):
    dtype = statistics_dtype(mean)
    return torch.empty_like(mean, dtype=dtype), torch.empty_like(mean, dtype=dtype)


def bn_scale_shift_backward_fake(grad_scale, grad_shift, mean, var, weight, bias, eps):
    def absent():
        return mean.new_empty(0, dtype=torch.float32)
    return [torch.empty_like(mean), torch.empty_like(var),
            absent() if weight is None else torch.empty_like(weight),
            absent() if bias is None else torch.empty_like(bias)]


def statistics_backward_fake(grad, y, mean, grad_mean, grad_var, grad_scale):
    return torch.empty_like(y, memory_format=_CHANNELS_LAST)


def bn_statistics_backward_fake(grad, y, grad_scale, grad_shift, mean, var, weight, bias, eps):
    parameters = bn_scale_shift_backward_fake(grad_scale, grad_shift, mean, var, weight, bias,
                                              eps)[2:]
    return [statistics_backward_fake(grad, y, mean, None, None, None), *parameters]


def channel_stats_fake(x):
    return (x.new_empty(x.shape[1], dtype=statistics_dtype(x)),
            x.new_empty(x.shape[1], dtype=statistics_dtype(x)))


# --- autograd ------------------------------------------------------------------------------

def _statistics_gradient(x: Tensor, mean: Tensor, grad_mean, grad_var) -> Tensor:
    """d(loss)/dx through (mean, biased var) of x per channel, in at least fp32."""
    count = x.numel() // x.shape[1]
    acc = statistics_dtype(x)
    grad = torch.zeros((), dtype=acc, device=x.device)
    if grad_mean is not None:
        grad = grad + _per_channel(grad_mean) / count
    if grad_var is not None:
        grad = grad + _per_channel(grad_var) * 2 / count * (x.to(acc) - _per_channel(mean))
    return grad


def conv_setup_context(ctx, inputs, output, *more_saved: Optional[Tensor]):
    """What the backward of a fused conv op needs; ``more_saved`` are saved after it (for
    a Function that runs the conv with more, ``ctx.saved_tensors[CONV_SAVED:]``)."""
    x, weight, stride, in_scale, in_shift, out_scale, out_shift, residual, out_relu, stats = \
        inputs
    y, mean, _ = output
    ctx.stride, ctx.out_relu, ctx.statistics = stride, out_relu, stats
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, in_scale, in_shift, out_scale, y, mean, *more_saved)


CONV_SAVED = 7  # tensors conv_setup_context saves for the conv itself


def _epilogue_gradient(ctx, grad_y: Tensor, y: Tensor, mean: Tensor, out_scale,
                       grad_mean, grad_var, backward_ops_take_statistics: bool,
                       statistics_backward: Optional[Callable],
                       statistics: bool) -> tuple[Tensor, tuple, Tensor]:
    """(the gradient dgrad and wgrad read, channels_last in x's dtype; the statistics
    arguments they add to it, (y, mean, grad_mean, grad_var) or (); dL/d residual).
    ``statistics``: whether the term through y's batch statistics is still to be added.

    The blocks' training convs have either statistics or a residual, no other epilogue:
    with backward ops that add the statistics term themselves neither costs a pass; else
    the statistics term is one pass of the backend's ``statistics_backward`` op. Other
    epilogues (ReLU, scale), or no such op, take the fp32 formula."""
    if not ctx.out_relu and out_scale is None:
        if statistics and (backward_ops_take_statistics or statistics_backward):
            grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
            grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
            if backward_ops_take_statistics:
                return grad_y, (y, mean, grad_mean, grad_var), None
            return statistics_backward(grad_y, y, mean, grad_mean, grad_var, None), (), None
        if not statistics:
            grad = channels_last(grad_y.to(y.dtype))
            return grad, (), (grad if ctx.has_residual else None)
    grad = grad_y.to(statistics_dtype(grad_y))
    if statistics:
        grad = grad + _statistics_gradient(y, mean, grad_mean, grad_var)
    if ctx.out_relu:
        grad = grad.where(y > 0, 0.0)
    grad_residual = grad.to(y.dtype) if ctx.has_residual else None
    if out_scale is not None:
        grad = grad * _per_channel(out_scale)
    return channels_last(grad.to(y.dtype)), (), grad_residual


def conv_backward(dgrad: Callable, wgrad: Callable,
                  backward_ops_take_statistics: bool = False,
                  statistics_backward: Optional[Callable] = None) -> Callable:
    """The backward of a fused conv op from its backend's dgrad and wgrad ops:
    ``backward(ctx, grad_y, grad_mean, grad_var, other=None)``, ``ctx`` as
    :func:`conv_setup_context` sets it. With ``backward_ops_take_statistics`` they take (y,
    mean, grad_mean, grad_var) after their usual arguments and add the gradient through
    the batch statistics of the conv output y themselves; else it is added here, by the
    backend's ``statistics_backward`` op (the signature of
    :func:`fused_resnet.op_reference.statistics_backward`) in one pass where there is one. ``other``: a gradient of x from another consumer, which dgrad adds
    to its result (its ``other`` argument). For a Function running the op with inputs
    and saved tensors of its own: ``needs_input_grad``, which of the op's inputs need a
    gradient, and ``saved``, its ``ctx.saved_tensors`` (which may be unpacked only once);
    ``statistics_added``: grad_y already holds the term through the batch statistics."""
    def backward(ctx, grad_y, grad_mean, grad_var, other=None, needs_input_grad=None,
                 saved=None, statistics_added=False):
        needs = needs_input_grad or ctx.needs_input_grad
        saved = ctx.saved_tensors if saved is None else saved
        x, weight, in_scale, in_shift, out_scale, y, mean = saved[:CONV_SAVED]
        if needs[5] or needs[6]:
            raise RuntimeError("fused conv: gradients of out_scale/out_shift are not "
                               "implemented; fold BatchNorm into the epilogue only when no "
                               "gradient is needed (fused_resnet's blocks do)")
        grad, statistics, grad_residual = _epilogue_gradient(
            ctx, grad_y, y, mean, out_scale, grad_mean, grad_var, backward_ops_take_statistics,
            statistics_backward, ctx.statistics and not statistics_added)
        grad_x = grad_weight = grad_in_scale = grad_in_shift = None
        if needs[0] or needs[3] or needs[4]:
            grad_x, grad_in_scale, grad_in_shift = dgrad(
                grad, weight, x, ctx.stride, in_scale, in_shift, *statistics,
                **({} if other is None else {"other": other}))
            if in_scale is None:
                grad_in_scale = grad_in_shift = None
        if needs[1]:
            grad_weight = wgrad(grad, x, weight, ctx.stride, in_scale, in_shift, *statistics)
        return (grad_x, grad_weight, None, grad_in_scale, grad_in_shift, None, None,
                grad_residual, None, None)

    return backward


def register_conv_autograd(conv: object, backward: Callable) -> None:
    """Autograd of a fused conv op: ``backward`` from :func:`conv_backward`."""
    torch.library.register_autograd(conv, backward, setup_context=conv_setup_context)


def conv_sharing_input(conv: Callable, backward: Callable) -> Callable:
    """``conv``'s op call for an input x that also feeds another consumer (a block's
    shortcut): returns the op's (y, mean, var) and x, as a view, for that consumer. The
    gradient the view receives is handed to the conv's dgrad, which adds it to its own in
    its epilogue, where autograd would add the two in a full pass of its own. ``backward``
    from :func:`conv_backward` with dgrad ops that take ``other``."""
    class ConvSharingInput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            outputs = conv(*inputs)
            conv_setup_context(ctx, inputs, outputs)
            return (*outputs, inputs[0].view_as(inputs[0]))

        @staticmethod
        def backward(ctx, grad_y, grad_mean, grad_var, grad_shared):
            return backward(ctx, grad_y, grad_mean, grad_var, grad_shared)

    return ConvSharingInput.apply


def bn_scale_shift_setup_context(ctx, inputs, output):
    """What the backward of a ``bn_scale_shift`` op (mean, var, weight, bias, eps, ...) ->
    (scale, shift) needs: its first five inputs (weight and bias may be None)."""
    mean, var, weight, bias, eps = inputs[:5]
    ctx.eps = eps
    ctx.save_for_backward(mean, var, weight, bias)


def scale_shift_gradients(backward_op: Callable, grad_scale, grad_shift, mean, var, weight,
                          bias, eps) -> tuple:
    """(grad_mean, grad_var, grad_weight, grad_bias) of a BN's (scale, shift) through a
    backend's ``bn_scale_shift_backward`` op, given the gradients autograd delivers for
    them (None: zero); None for an absent weight or bias."""
    return parameter_gradients(backward_op(*_given(mean, grad_scale, grad_shift), mean, var,
                                           weight, bias, eps), weight, bias)


def _given(mean: Tensor, *grads: Optional[Tensor]) -> list[Tensor]:
    """The gradients autograd delivers for a BN's scale and shift, zeros for None."""
    return [torch.zeros_like(mean, dtype=statistics_dtype(mean)) if grad is None else grad
            for grad in grads]


def _present(grad: Tensor, parameter: Optional[Tensor]) -> Optional[Tensor]:
    """A BN parameter's gradient as autograd takes it: None for an absent parameter (the
    ops give an empty vector)."""
    return None if parameter is None else grad


def parameter_gradients(grads, weight, bias) -> tuple:
    """A ``bn_scale_shift_backward`` op's [grad_mean, grad_var, grad_weight, grad_bias] as
    autograd takes them (:func:`_present`)."""
    grad_mean, grad_var, grad_weight, grad_bias = grads
    return grad_mean, grad_var, _present(grad_weight, weight), _present(grad_bias, bias)


def bn_scale_shift_backward(backward_op: Callable) -> Callable:
    """The autograd backward of a ``bn_scale_shift`` op (:func:`bn_scale_shift_setup_context`)
    from its backend's ``bn_scale_shift_backward`` op."""
    def backward(ctx, grad_scale, grad_shift):
        return (*scale_shift_gradients(backward_op, grad_scale, grad_shift, *ctx.saved_tensors,
                                       ctx.eps), None)
    return backward


def train_finalize(finalize_op: Callable, backward_op: Callable) -> Callable:
    """A backend's training finalize op (the signature of ``reference.Finalize.training``,
    mutating the running statistics and the batch count) with the gradient of its (scale,
    shift) through the backend's ``bn_scale_shift_backward`` op: an autograd Function's
    ``apply``, as a custom op that mutates its inputs cannot carry an autograd formula
    itself."""
    backward = bn_scale_shift_backward(backward_op)

    class TrainFinalize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, mean, var, weight, bias, eps, running_mean, running_var,
                    num_batches_tracked, momentum, count):
            bn_scale_shift_setup_context(ctx, (mean, var, weight, bias, eps), None)
            return finalize_op(mean, var, weight, bias, eps, running_mean, running_var,
                               num_batches_tracked, momentum, count)

        @staticmethod
        def backward(ctx, grad_scale, grad_shift):
            return backward(ctx, grad_scale, grad_shift) + (None,) * 5

    return TrainFinalize.apply


def bn_arguments(bn) -> tuple:
    """A training BN's (``reference.BatchNormParams``) arguments of a ``conv_bn_train`` op,
    after the conv's."""
    return (bn.weight, bn.bias, bn.eps, bn.running_mean, bn.running_var,
            bn.num_batches_tracked, bn.momentum)


BN_ARGUMENTS = 7  # len(bn_arguments(bn))


def conv_bn_train_fake(x, weight, stride, in_scale, in_shift, bn_weight, bn_bias,
                       *finalize_arguments):
    y, mean, var = conv_fake(x, weight, stride, in_scale, in_shift, None, None, None, False,
                             True)
    return y, mean, var, torch.empty_like(mean), torch.empty_like(mean)


def conv_bn_train(conv_bn_train_op: Callable, scale_shift_backward_op: Callable,
                  conv_backward: Callable,
                  bn_statistics_backward_op: Optional[Callable] = None) -> Callable:
    """``Kernels.conv_bn_train`` from a backend's ``<backend>_conv_bn_train`` op (the conv
    with statistics, then the finalize of the training BN it feeds, which merges the conv's
    partial statistics itself: (x, weight, stride, in_scale, in_shift, *bn_arguments) ->
    (y, mean, var, scale, shift), mutating the running statistics), its
    ``bn_scale_shift_backward`` op and its conv's backward (:func:`conv_backward`, with a
    dgrad that takes ``other``). With ``bn_statistics_backward_op`` (the signature of
    :func:`fused_resnet.op_reference.bn_statistics_backward`) the BN's backward and the
    gradient through the conv output's statistics are that one op, before the conv's dgrad
    and wgrad read the gradient.

    Returns ``(x, weight, stride, in_scale, in_shift, bn, share_input) -> (y, (scale,
    shift), x for its other consumer)``: with ``share_input`` a view of x whose gradient the
    conv's dgrad adds to its own (as :func:`conv_sharing_input`), else x itself."""

    class ConvBatchNormTraining(torch.autograd.Function):
        # An op that mutates its inputs cannot carry an autograd formula itself.
        @staticmethod
        def forward(ctx, x, weight, stride, in_scale, in_shift, bn_weight, bn_bias, eps,
                    running_mean, running_var, num_batches_tracked, momentum, share_input):
            y, mean, var, scale, shift = conv_bn_train_op(
                x, weight, stride, in_scale, in_shift, bn_weight, bn_bias, eps, running_mean,
                running_var, num_batches_tracked, momentum)
            conv_setup_context(
                ctx, (x, weight, stride, in_scale, in_shift, None, None, None, False, True),
                (y, mean, var), var, bn_weight, bn_bias)
            ctx.eps = eps
            outputs = (y, scale, shift)
            return (*outputs, x.view_as(x)) if share_input else outputs

        @staticmethod
        def backward(ctx, grad_y, grad_scale, grad_shift, grad_shared=None):
            saved = ctx.saved_tensors
            y, mean, var, bn_weight, bn_bias = saved[CONV_SAVED - 2:]
            needs = ctx.needs_input_grad[:5] + (False,) * 5
            if bn_statistics_backward_op is None:
                grad_mean, grad_var, grad_bn_weight, grad_bn_bias = scale_shift_gradients(
                    scale_shift_backward_op, grad_scale, grad_shift, mean, var, bn_weight,
                    bn_bias, ctx.eps)
                conv_grads = conv_backward(ctx, grad_y, grad_mean, grad_var, grad_shared,
                                           needs_input_grad=needs, saved=saved)
            else:
                grad_y, grad_bn_weight, grad_bn_bias = bn_statistics_backward_op(
                    grad_y, y, *_given(mean, grad_scale, grad_shift), mean, var, bn_weight,
                    bn_bias, ctx.eps)
                grad_bn_weight = _present(grad_bn_weight, bn_weight)
                grad_bn_bias = _present(grad_bn_bias, bn_bias)
                conv_grads = conv_backward(ctx, grad_y, None, None, grad_shared,
                                           needs_input_grad=needs, saved=saved,
                                           statistics_added=True)
            return (*conv_grads[:5], grad_bn_weight, grad_bn_bias) + (None,) * 6

    def conv_feeding_bn(x, weight, stride, in_scale, in_shift, bn, share_input):
        y, scale, shift, *shared = ConvBatchNormTraining.apply(
            x, weight, stride, in_scale, in_shift, *bn_arguments(bn), share_input)
        return y, (scale, shift), (shared[0] if shared else x)

    return conv_feeding_bn


def _stats_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    grad = torch.zeros_like(x, dtype=statistics_dtype(x))
    return (grad + _statistics_gradient(x, mean, grad_mean, grad_var)).to(x.dtype)


def register_channel_stats_autograd(channel_stats: object) -> None:
    torch.library.register_autograd(channel_stats, _stats_backward,
                                    setup_context=_stats_setup_context)


class _BatchNormInput(torch.autograd.Function):
    """``x`` (as a view) and its per-channel batch statistics, for a BatchNorm that only the
    convs reading that view apply (in their prologues); x's gradient through the BN is
    computed here the way batch_norm's backward computes it.

    Those convs' dgrad ops return ``D = dL/da * relu_mask * scale`` rounded to x's dtype
    and sum the unrounded values into the scale/shift gradients, from which autograd gets
    the statistics' gradients. Adding the statistics term derived from those sums to the
    rounded D leaves the rounding error of D in the input gradient with a nonzero mean and
    correlation with x per channel, which batch_norm's backward projects out (it derives
    both terms from the one stored gradient); sums of the input gradient upstream (the
    previous BN's weight gradient) then reached 1.3x eager's fp16 error at the median
    and over 2x at worst. Here both terms come from the summed D in fp32, rounded once:

        dL/dx = D - mean(D) - (x - mean) * mean(D * (x - mean)) / (var + eps)

    per channel, which is the BN backward itself given that (mean, var) reach the loss
    only through this BN's scale and shift. The gradients autograd delivers for
    ``mean`` and ``var`` are therefore not used: callers must not use them otherwise
    (a SyncBatchNorm's all-reduced statistics carry other processes' gradients, so
    synchronized BNs keep the statistics op's own autograd).
    """

    @staticmethod
    def forward(ctx, x: Tensor, channel_stats: Callable, eps: float):
        mean, var = channel_stats(x)
        ctx.eps = eps
        ctx.save_for_backward(x, mean, var)
        return x.view_as(x), mean, var

    @staticmethod
    def backward(ctx, grad_x, grad_mean, grad_var):
        x, mean, var = ctx.saved_tensors
        acc = statistics_dtype(x)
        grad = grad_x.to(acc)
        centered = x.to(acc) - _per_channel(mean)
        dims = (0, 2, 3)
        grad = (grad - grad.mean(dims, keepdim=True)
                - centered * (grad * centered).mean(dims, keepdim=True)
                / _per_channel(var + ctx.eps))
        return grad.to(x.dtype), None, None


def batch_norm_input(x: Tensor, channel_stats: Callable,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x view, mean, biased var)`` for a BN applied by the convs that read the view (see
    ``_BatchNormInput``; not for synchronized BNs)."""
    return _BatchNormInput.apply(x, channel_stats, eps)
