"""Python side of the ops compiled into ``fused_resnet._C``: wrappers, fake kernels (for
``torch.compile`` and meta tensors), CPU kernels and autograd formulas.

The schemas and the CUDA kernels are registered in C++ (``csrc/``) under the
``fused_resnet`` namespace:

  cuda_conv, cuda_conv_bn_train, cuda_conv_dgrad, cuda_conv_wgrad, cuda_channel_stats
      the CUTLASS convolutions (batch statistics gathered in the conv's epilogue;
      cuda_conv_bn_train also finalizes the training BatchNorm the conv feeds, merging
      those statistics in the same launch) and channel reductions of the ``cuda`` backend,
      with the schemas of the ``triton_*`` ops (fakes and autograd shared,
      :mod:`op_support`);
  scale_shift_add_relu
      BN-apply + (BN'd) shortcut + ReLU in one pass (C++ CPU and CUDA kernels);
  affine_relu_backward, add_relu_backward
      the backward of that pass (for one input or for both, a block's shortcut with it) and
      of a BN-ReLU prologue: ReLU mask, input gradients and per-channel reductions in one
      pass;
  statistics_backward, bn_statistics_backward
      a conv output's gradient through its batch statistics added in one pass (the second
      op also derives that gradient's terms from the BN's scale/shift gradients and gives
      the BN's parameter gradients);
  bn_scale_shift, bn_scale_shift_backward, bn_update_running_stats, bn_train_finalize
      the BatchNorm finalize: batch statistics to scale/shift (differentiable, its
      backward one kernel), the running-statistics update, and a training BN's whole
      finalize (scale/shift, running statistics, batch count) in one launch.

``scale_shift_add_relu`` has a C++ CPU kernel; the CPU kernels of the other ops are their
plain-PyTorch meaning (:mod:`fused_resnet.op_reference`, :mod:`fused_resnet.reference`),
which lets every op be checked with ``opcheck`` and ``gradcheck`` on a machine without a
GPU. :data:`KERNELS` is the op set the ``cuda`` backend's blocks are composed from.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import extension, op_reference, op_support, reference
from fused_resnet.fused_blocks import Kernels

_VECTOR_BYTES = 16


def _ops():
    extension.require()
    return torch.ops.fused_resnet


def cuda_conv(x: Tensor, weight: Tensor, stride: int, in_scale: Optional[Tensor],
              in_shift: Optional[Tensor], out_scale: Optional[Tensor],
              out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
              statistics: bool) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`fused_resnet.op_reference.fused_conv`. On CUDA: fp16/bf16 NHWC tensors,
    channel counts multiples of 8; a prologue takes no epilogue but a residual."""
    return _ops().cuda_conv(x, weight, stride, in_scale, in_shift, out_scale, out_shift,
                            residual, out_relu, statistics)


def cuda_channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) in fp32 (Welford per thread, Chan merges)."""
    return _ops().cuda_channel_stats(x)


def scale_shift_add_relu(x: Tensor, scale: Tensor, shift: Tensor,
                         residual: Optional[Tensor] = None,
                         residual_scale: Optional[Tensor] = None,
                         residual_shift: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``[relu](x * scale[c] + shift[c] [+ residual [* residual_scale[c] + residual_shift[c]]])``
    in one pass (BN-apply + shortcut (with its BN) + ReLU).

    ``x``: (N, C, H, W), contiguous in NCHW or channels_last; ``residual``: same shape,
    dtype and memory format; the vectors: (C,), any floating dtype, used in fp32 (fp64 for
    fp64 ``x``). The output has ``x``'s dtype and memory format. Differentiable in all
    tensor arguments. Reference: :func:`fused_resnet.reference.scale_shift_add_relu`.
    """
    return _ops().scale_shift_add_relu(x, scale, shift, residual, residual_scale,
                                       residual_shift, relu)


def _vectorizable(x: Tensor) -> bool:
    """Whether the CUDA channel kernels take ``x``: they move 16-byte vectors of channels,
    so other CUDA tensors (channel counts that do not fill them, fp64) take the
    plain-PyTorch formula (CPU and meta tensors go to the op: its CPU kernel is that
    formula)."""
    return x.device.type != "cuda" or (
        x.dtype != torch.float64 and x.shape[1] % (_VECTOR_BYTES // x.element_size()) == 0)


def affine_relu_backward(grad: Tensor, x: Tensor, scale: Optional[Tensor] = None,
                         shift: Optional[Tensor] = None,
                         output: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`fused_resnet.op_reference.affine_relu_backward` and
    :func:`_vectorizable`."""
    if not _vectorizable(x):
        return op_reference.affine_relu_backward(grad, x, scale, shift, output)
    return _ops().affine_relu_backward(grad, x, scale, shift, output)


def add_relu_backward(grad: Tensor, output: Tensor, x: Tensor, scale: Optional[Tensor],
                      residual: Tensor, residual_scale: Optional[Tensor]) -> tuple:
    """See :func:`fused_resnet.op_reference.add_relu_backward` and :func:`_vectorizable`."""
    if not _vectorizable(x):
        return op_reference.add_relu_backward(grad, output, x, scale, residual, residual_scale)
    return _ops().add_relu_backward(grad, output, x, scale, residual, residual_scale)


def statistics_backward(grad: Tensor, y: Tensor, mean: Tensor, grad_mean: Tensor,
                        grad_var: Tensor, grad_scale: Optional[Tensor] = None) -> Tensor:
    """See :func:`fused_resnet.op_reference.statistics_backward` and
    :func:`_vectorizable`."""
    if not _vectorizable(y):
        return op_reference.statistics_backward(grad, y, mean, grad_mean, grad_var, grad_scale)
    return _ops().statistics_backward(grad, y, mean, grad_mean, grad_var, grad_scale)


def _bn_add_relu(a: Tensor, a_scale: Tensor, a_shift: Tensor, residual: Optional[Tensor],
                 r_scale: Optional[Tensor], r_shift: Optional[Tensor], relu: bool) -> Tensor:
    # The block's tensors in one memory format (channels_last, the convs' output), which
    # is what the kernel's 16-byte vector path reads.
    residual = None if residual is None else op_support.channels_last(residual)
    return scale_shift_add_relu(op_support.channels_last(a), a_scale, a_shift, residual,
                                r_scale, r_shift, relu)




def _bn_scale_shift(mean: Tensor, var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    # Statistics and parameters in any float dtype (a .half() module's running
    # statistics): the kernel reads them as they are, so no conversion launches first.
    return torch.ops.fused_resnet.bn_scale_shift(mean, var, weight, bias, eps)


def _bn_update_running_stats(mean: Tensor, var: Tensor, running_mean: Tensor,
                             running_var: Tensor, factor: float, count: int) -> None:
    torch.ops.fused_resnet.bn_update_running_stats(mean, var, running_mean, running_var,
                                                   factor, count)


def _bn_train_finalize(mean, var, weight, bias, eps, running_mean, running_var,
                       num_batches_tracked, momentum, count) -> tuple[Tensor, Tensor]:
    # A training BN's scale/shift, running statistics and batch count in one launch.
    return _ops().bn_train_finalize(mean, var, weight, bias, eps, running_mean, running_var,
                                    num_batches_tracked, momentum, count)


def _bn_scale_shift_backward_op(*args) -> list[Tensor]:
    return _ops().bn_scale_shift_backward(*args)


def _cuda_conv_bn_train(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _ops().cuda_conv_bn_train(*args)


def _bn_statistics_backward(grad: Tensor, y: Tensor, *vectors_and_eps) -> list[Tensor]:
    """See :func:`fused_resnet.op_reference.bn_statistics_backward` and
    :func:`_vectorizable`."""
    if not _vectorizable(y):
        return op_reference.bn_statistics_backward(grad, y, *vectors_and_eps)
    return _ops().bn_statistics_backward(grad, y, *vectors_and_eps)


def _cuda_conv_dgrad(grad, weight, x, stride, in_scale, in_shift, other=None):
    return _ops().cuda_conv_dgrad(grad, weight, x, stride, in_scale, in_shift, other)


def _cuda_conv_wgrad(grad, x, weight, stride, in_scale, in_shift):
    return _ops().cuda_conv_wgrad(grad, x, weight, stride, in_scale, in_shift)


# The conv's backward: the gradient through its output's batch statistics is added in one
# pass of statistics_backward before dgrad and wgrad read it.
_conv_backward = op_support.conv_backward(_cuda_conv_dgrad, _cuda_conv_wgrad,
                                          statistics_backward=statistics_backward)

KERNELS = Kernels(conv=cuda_conv, bn_add_relu=_bn_add_relu, channel_stats=cuda_channel_stats,
                  finalize=reference.Finalize(
                      _bn_scale_shift, _bn_update_running_stats,
                      training=op_support.train_finalize(_bn_train_finalize,
                                                         _bn_scale_shift_backward_op)),
                  conv_sharing_input=op_support.conv_sharing_input(cuda_conv, _conv_backward),
                  # The BN's backward and the statistics gradient in one pass.
                  conv_bn_train=op_support.conv_bn_train(
                      _cuda_conv_bn_train, _bn_scale_shift_backward_op, _conv_backward,
                      _bn_statistics_backward))


# --- fakes, CPU kernels, autograd --------------------------------------------------------

def _conv_dgrad_cpu(grad, weight, x, stride, in_scale, in_shift, other=None):
    return op_reference.conv_dgrad(grad, weight, x, stride, in_scale, in_shift, other=other)


def _scale_shift_add_relu_fake(x, scale, shift, residual, residual_scale, residual_shift, relu):
    return torch.empty_like(x)


def _affine_relu_backward_fake(grad, x, scale, shift, output):
    return (torch.empty_like(x, memory_format=torch.channels_last),
            x.new_empty(x.shape[1], dtype=op_support.statistics_dtype(x)),
            x.new_empty(x.shape[1], dtype=op_support.statistics_dtype(x)))


def _add_relu_backward_fake(grad, output, x, scale, residual, residual_scale):
    grad_x, dot, total = _affine_relu_backward_fake(grad, x, scale, None, output)
    return grad_x, dot, total, torch.empty_like(grad_x), torch.empty_like(dot)


def _bn_train_finalize_fake(mean, var, weight, bias, eps, *running_and_count):
    return op_support.bn_scale_shift_fake(mean, var, weight, bias, eps)


def _scale_shift_add_relu_setup_context(ctx, inputs, output):
    x, scale, shift, residual, residual_scale, residual_shift, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.dtypes = [None if t is None else t.dtype
                  for t in (scale, shift, residual_scale, residual_shift)]
    ctx.save_for_backward(x, scale, residual, residual_scale, output)


def _scale_shift_add_relu_backward(ctx, grad_output):
    x, scale, residual, residual_scale, output = ctx.saved_tensors
    mask = output if ctx.relu else None
    if ctx.has_residual and ctx.relu:  # both inputs' gradients in one pass
        grad_x, grad_scale, grad_shift, grad_residual, grad_residual_scale = add_relu_backward(
            grad_output, output, x, scale, residual, residual_scale)
        grads = [grad_x, grad_scale, grad_shift, grad_residual, grad_residual_scale,
                 grad_shift]
    else:
        grad_x, grad_scale, grad_shift = affine_relu_backward(grad_output, x, scale, None,
                                                              mask)
        grads = [grad_x, grad_scale, grad_shift, None, None, None]
        if ctx.has_residual:
            grads[3:] = affine_relu_backward(grad_output, residual, residual_scale, None, mask)
    for index, dtype in zip((1, 2, 4, 5), ctx.dtypes):
        grads[index] = None if dtype is None else grads[index].to(dtype)
    return (*grads, None)


def register_python_parts() -> None:
    """Attach fakes, CPU kernels and autograd to the C++ ops; called once the library is
    loaded."""
    ops = {
        "cuda_conv": (op_support.conv_fake, op_reference.fused_conv),
        "cuda_conv_bn_train": (op_support.conv_bn_train_fake, op_reference.conv_bn_train),
        "cuda_conv_dgrad": (op_support.conv_dgrad_fake, _conv_dgrad_cpu),
        "cuda_conv_wgrad": (op_support.conv_wgrad_fake, op_reference.conv_wgrad),
        "cuda_channel_stats": (op_support.channel_stats_fake, reference.batch_statistics),
        "affine_relu_backward": (_affine_relu_backward_fake, op_reference.affine_relu_backward),
        "add_relu_backward": (_add_relu_backward_fake, op_reference.add_relu_backward),
        "bn_scale_shift": (op_support.bn_scale_shift_fake,
                           reference.scale_shift_from_statistics),
        "bn_update_running_stats": (lambda *args: None, reference.blend_running_stats),
        "bn_scale_shift_backward": (op_support.bn_scale_shift_backward_fake,
                                    op_reference.bn_scale_shift_backward),
        "statistics_backward": (op_support.statistics_backward_fake,
                                op_reference.statistics_backward),
        "bn_statistics_backward": (op_support.bn_statistics_backward_fake,
                                   op_reference.bn_statistics_backward),
        "bn_train_finalize": (_bn_train_finalize_fake, op_reference.bn_train_finalize),
    }
    for name, (fake, cpu_kernel) in ops.items():
        torch.library.register_fake(f"fused_resnet::{name}")(fake)
        torch.library.register_kernel(f"fused_resnet::{name}", "cpu")(cpu_kernel)
    torch.library.register_fake("fused_resnet::scale_shift_add_relu")(_scale_shift_add_relu_fake)
    torch.library.register_autograd("fused_resnet::scale_shift_add_relu",
                                    _scale_shift_add_relu_backward,
                                    setup_context=_scale_shift_add_relu_setup_context)
    torch.library.register_autograd(
        "fused_resnet::bn_scale_shift",
        op_support.bn_scale_shift_backward(torch.ops.fused_resnet.bn_scale_shift_backward),
        setup_context=op_support.bn_scale_shift_setup_context)
    op_support.register_conv_autograd("fused_resnet::cuda_conv", _conv_backward)
    op_support.register_channel_stats_autograd("fused_resnet::cuda_channel_stats")
