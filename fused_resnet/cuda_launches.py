"""What each C++/CUDA op of ``fused_resnet._C`` launches on a GPU, declared for the traffic
counter (:mod:`fused_resnet.bench.traffic`), which cannot see inside a C++ op on the meta
device.

Each model below takes the op's arguments (meta tensors) and a ``record(kernel_name,
tensors)`` callback, and does what the C++ implementation does: the ATen calls it makes
(dtype conversions of per-channel vectors, layout copies, zero-filled buffers, the
weight fold of an epilogue scale), which the counter counts by its usual rule as they
run, and one ``record`` per CUDA kernel or memset it launches, with the tensors that kernel
reads and writes. It returns the op's outputs (as its fake does). The C++ code each model
follows is named in its docstring; ``tests/test_cuda_launches.py`` checks every model
against the kernels a real call launches (CUDA profiler, on a GPU).

Launch plans (tile, split-K) are those for :data:`SM_COUNT` multiprocessors, an H100 or
H200, the GPUs the benchmarks target.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fused_resnet import op_support

SM_COUNT = 132
# csrc/channel_kernels.cu's grid: 16-byte vectors, 8 vectors x 32 rows per block, about
# eight blocks per multiprocessor.
_VECTOR_BYTES, _VECTORS_PER_BLOCK, _ROW_LANES, _BLOCKS_PER_SM = 16, 8, 32, 8

Record = Callable[[str, list], None]


def _nhwc(t: Optional[Tensor]) -> Optional[Tensor]:
    """conv_ops.cpp ``nhwc``: channels_last (a copy when it is not; an aligned copy of a
    misaligned tensor, which meta tensors never are)."""
    return None if t is None else op_support.channels_last(t)


def _vector(v: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """conv_ops.cpp ``channel_vector``: ``dtype``, dense."""
    return None if v is None else v.to(dtype).contiguous()


def _prologue_vectors(record: Record, scale: Optional[Tensor], shift: Optional[Tensor],
                      dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """conv_ops.cpp ``prologue_vectors``: both as they are when they already are dense
    ``dtype`` vectors, else both converted by one kernel (batch_norm_finalize.cu
    ``stacked_vectors_cuda``)."""
    if scale is None:
        return None, None
    if all(v.dtype == dtype and v.is_contiguous() for v in (scale, shift)):
        return scale, shift
    both = scale.new_empty((2, scale.numel()), dtype=dtype)
    common = scale.dtype if scale.dtype == shift.dtype else torch.float32
    record("stacked_vectors_kernel", [scale.to(common).contiguous(),
                                      shift.to(common).contiguous(), both])
    return both[0], both[1]


def _partials(x: Tensor, floats_per_state: int) -> Tensor:
    """channel_kernels.cu ``partials_buffer``: one state per (row block, channel)."""
    channels = x.shape[1]
    width = _VECTOR_BYTES // x.element_size()
    channel_blocks = -(-channels // (_VECTORS_PER_BLOCK * width))
    rows = x.numel() // channels
    row_blocks = max(1, min(max(SM_COUNT * _BLOCKS_PER_SM // channel_blocks, 1),
                            -(-rows // _ROW_LANES)))
    return x.new_empty((row_blocks * channels, floats_per_state), dtype=torch.float32)


def _channel_statistics(record: Record, x: Tensor) -> tuple[Tensor, Tensor]:
    """channel_kernels.cu ``channel_statistics_cuda``: Welford partials, then a merge."""
    mean = x.new_empty(x.shape[1], dtype=torch.float32)
    var = torch.empty_like(mean)
    if x.numel() == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    partials = _partials(x, 3)
    record("welford_partials_kernel", [x, partials])
    record("welford_finish_kernel", [partials, mean, var])
    return mean, var


def _masked_affine_backward(record: Record, grad: Tensor, x: Tensor, scale, shift, output,
                            residual=None, residual_scale=None) -> tuple:
    """channel_kernels.cu ``masked_affine_backward``: the masked pass with per-block sums,
    then their merge (zero-filled sums only for an empty x); (grad_x, dot, sum) and, with a
    residual, (grad_residual, dot_residual) after them."""
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    total = x.new_empty(x.shape[1], dtype=torch.float32)
    sums = [torch.empty_like(total), total]  # dot, sum
    second = []
    if residual is not None:
        second = [torch.empty_like(grad_x), torch.empty_like(total)]
        sums.append(second[1])
    if x.numel() == 0:
        for t in sums:
            t.zero_()
    else:
        partials = _partials(x, 3)
        record("affine_relu_backward_kernel",
               [t for t in (grad, x, scale, shift, output, residual, residual_scale, grad_x,
                            *second[:1], partials) if t is not None])
        record("sums_finish_kernel", [partials, *sums])
    return (grad_x, *sums[:2], *second)


def _plan(kernel: str, x: Tensor, weight: Tensor, stride: int) -> list[int]:
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    return torch.ops.fused_resnet.conv_launch_plan(kernel, [n, h, w, c, k, r, s, stride],
                                                   SM_COUNT)


def _conv_forward(record: Record, x, weight, stride, in_scale, in_shift, out_scale, out_shift,
                  residual, out_relu, statistics) -> tuple[Tensor, Optional[Tensor]]:
    """conv_ops.cpp ``conv_forward``: (y, the epilogue's statistics partials, one Welford
    state per row tile and channel, or None)."""
    scale, shift = _prologue_vectors(record, in_scale, in_shift, x.dtype)
    x, weight = _nhwc(x), _nhwc(weight)
    if out_scale is not None:  # folded into the weight
        folded = torch.empty_like(weight, memory_format=torch.channels_last)
        if weight.numel():
            record("scaled_filters_kernel", [weight, out_scale.contiguous(), folded])
        weight = folded
    bias = _vector(out_shift, torch.float32)
    y, _, _ = op_support.conv_fake(x, weight, stride, in_scale, in_shift, out_scale,
                                   out_shift, residual, out_relu, False)
    residual = _nhwc(residual)
    if not y.numel():
        return y, None
    kernel = "fprop_prologue" if in_scale is not None else (
        "fprop_statistics" if statistics else "fprop")
    partials = None
    if statistics:
        grid_m = _plan(kernel, x, weight, stride)[3]
        partials = x.new_empty(grid_m * y.shape[1] * 3, dtype=torch.float32)
    record("cutlass_fprop", [t for t in (x, weight, scale, shift, bias, residual, y, partials)
                             if t is not None])
    return y, partials


def cuda_conv(record: Record, x, weight, stride, in_scale, in_shift, out_scale, out_shift,
              residual, out_relu, statistics):
    """conv_ops.cpp ``cuda_conv``: the statistics' partials merged by one kernel."""
    y, partials = _conv_forward(record, x, weight, stride, in_scale, in_shift, out_scale,
                                out_shift, residual, out_relu, statistics)
    if not statistics:
        empty = x.new_empty(0, dtype=torch.float32)
        return y, empty, torch.empty_like(empty)
    if partials is None:  # an empty output: NaN statistics
        return (y, *_channel_statistics(record, y))
    mean, var = (y.new_empty(y.shape[1], dtype=torch.float32) for _ in range(2))
    record("welford_finish_kernel", [partials, mean, var])
    return y, mean, var


def cuda_conv_bn_train(record: Record, x, weight, stride, in_scale, in_shift, bn_weight,
                       bn_bias, eps, running_mean, running_var, num_batches_tracked,
                       momentum):
    """conv_ops.cpp ``cuda_conv_bn_train``: the conv with its epilogue's statistics, then
    batch_norm_finalize.cu's merge and finalize in one kernel."""
    y, partials = _conv_forward(record, x, weight, stride, in_scale, in_shift, None, None,
                                None, False, True)
    mean, var = (y.new_empty(y.shape[1], dtype=torch.float32) for _ in range(2))
    param_type = _finalize_types(mean, var, bn_weight, bn_bias)[1]
    params = [_vector(p, param_type) for p in (bn_weight, bn_bias) if p is not None]
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    record("bn_merge_train_finalize_kernel",
           [t for t in (partials, *params, running_mean, running_var, num_batches_tracked,
                        mean, var, scale, shift) if t is not None])
    return y, mean, var, scale, shift


def cuda_conv_dgrad(record: Record, grad, weight, x, stride, in_scale, in_shift, other=None):
    """conv_ops.cpp ``cuda_conv_dgrad``: CUTLASS dgrad, adding ``other`` in its epilogue
    when there is no prologue; through a prologue at stride 1 its epilogue applies the
    prologue's backward and writes per-row-tile sums, which one kernel merges; at stride 2
    (or for an empty x) the prologue's backward is a pass after it; ``other`` after a
    prologue is added last."""
    grad, weight, x = _nhwc(grad), _nhwc(weight), _nhwc(x)
    grad_input = torch.empty_like(x, memory_format=torch.channels_last)
    if in_scale is None:
        if grad_input.numel():
            record("cutlass_dgrad", [t for t in (grad, weight, _nhwc(other), grad_input)
                                     if t is not None])
        empty = x.new_empty(0, dtype=torch.float32)
        return grad_input, empty, torch.empty_like(empty)
    vectors = [_vector(v, torch.float32) for v in (in_scale, in_shift)]
    if grad_input.numel() and stride == 1:
        grid_m = _plan("dgrad_prologue", x, weight, stride)[3]
        partials = x.new_empty(grid_m * x.shape[1] * 3, dtype=torch.float32)
        record("cutlass_dgrad", [grad, weight, x, *vectors, grad_input, partials])
        grad_x = grad_input
        sums = [x.new_empty(x.shape[1], dtype=torch.float32) for _ in range(2)]  # dot, sum
        record("sums_finish_kernel", [partials, *sums])
    else:
        if grad_input.numel():
            record("cutlass_dgrad", [grad, weight, grad_input])
        grad_x, *sums = _masked_affine_backward(record, grad_input, x, *vectors, None)
    if other is not None:
        grad_x.add_(other)
    return (grad_x, *sums)


def cuda_conv_wgrad(record: Record, grad, x, weight, stride, in_scale, in_shift):
    """conv_ops.cpp ``cuda_conv_wgrad``: split-K CUTLASS wgrad into fp32 partials (which
    its slices overwrite whole: not zeroed first), their reduction into the weight's dtype,
    and a copy when the weight is not channels_last."""
    scale, shift = _prologue_vectors(record, in_scale, in_shift, x.dtype)
    grad, x = _nhwc(grad), _nhwc(x)
    if grad.numel() == 0:
        return torch.zeros_like(weight)
    grad_weight = torch.empty_like(weight)
    krsc = grad_weight if grad_weight.is_contiguous(memory_format=torch.channels_last) else \
        torch.empty(weight.shape, dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    kernel = "wgrad" if in_scale is None else "wgrad_prologue"
    split_k = _plan(kernel, x, weight, stride)[5]
    k, c, r, s = weight.shape
    partials = x.new_empty((split_k, k, r, s, c), dtype=torch.float32)
    record("cutlass_wgrad", [t for t in (grad, x, scale, shift, partials) if t is not None])
    record("cutlass_splitk_reduction", [partials, krsc])
    if krsc is not grad_weight:
        grad_weight.copy_(krsc)
    return grad_weight


def cuda_channel_stats(record: Record, x):
    """conv_ops.cpp ``cuda_channel_stats``."""
    return _channel_statistics(record, _nhwc(x))


def affine_relu_backward(record: Record, grad, x, scale=None, shift=None, output=None):
    """conv_ops.cpp ``affine_relu_backward``."""
    return _masked_affine_backward(record, _nhwc(grad), _nhwc(x),
                                   _vector(scale, torch.float32),
                                   _vector(shift, torch.float32), _nhwc(output))


def add_relu_backward(record: Record, grad, output, x, scale, residual, residual_scale):
    """conv_ops.cpp ``add_relu_backward``: both inputs in one masked pass."""
    return _masked_affine_backward(record, _nhwc(grad), _nhwc(x), _vector(scale, torch.float32),
                                   None, _nhwc(output), _nhwc(residual),
                                   _vector(residual_scale, torch.float32))


def scale_shift_add_relu(record: Record, x, scale, shift, residual, residual_scale,
                         residual_shift, relu):
    """scale_shift_add_relu_cuda.cu: the vectors in the compute type, one pass."""
    compute = torch.promote_types(x.dtype, torch.float32)
    vectors = [_vector(v, compute) for v in (scale, shift, residual_scale, residual_shift)]
    y = torch.empty_like(x)
    if x.numel():
        record("scale_shift_add_relu_kernel",
               [t for t in (x, residual, *vectors, y) if t is not None])
    return y


def _finalize_types(mean, var, weight, bias) -> tuple[torch.dtype, torch.dtype]:
    """batch_norm_finalize.cu ``finalize_types``: the dtypes the finalize kernels read the
    statistics and the parameters in, each pair's own when it has one, else fp32."""
    params = {p.dtype for p in (weight, bias) if p is not None}
    return (mean.dtype if var.dtype == mean.dtype else torch.float32,
            params.pop() if len(params) == 1 else mean.dtype if not params else torch.float32)


def bn_scale_shift(record: Record, mean, var, weight, bias, eps):
    """batch_norm_finalize.cu ``bn_scale_shift_cuda``: statistics and parameters read in
    their own dtypes (:func:`_finalize_types`), fp32 results converted to the statistics'
    dtype when that is wider."""
    stat_type, param_type = _finalize_types(mean, var, weight, bias)
    stats = [_vector(mean, stat_type), _vector(var, stat_type)]
    params = [_vector(p, param_type) for p in (weight, bias) if p is not None]
    scale = mean.new_empty(mean.numel(), dtype=torch.float32)
    shift = torch.empty_like(scale)
    if mean.numel() == 0:
        return scale, shift
    record("bn_scale_shift_kernel", [*stats, *params, scale, shift])
    dtype = torch.promote_types(mean.dtype, torch.float32)
    return scale.to(dtype), shift.to(dtype)


def statistics_backward(record: Record, grad, y, mean, grad_mean, grad_var, grad_scale):
    """conv_ops.cpp ``statistics_backward``: one elementwise pass."""
    grad, y = _nhwc(grad), _nhwc(y)
    vectors = [_vector(v, torch.float32) for v in (mean, grad_mean, grad_var, grad_scale)]
    out = torch.empty_like(y, memory_format=torch.channels_last)
    if y.numel():
        record("statistics_backward_kernel",
               [grad, y, *[v for v in vectors if v is not None], out])
    return out


def bn_statistics_backward(record: Record, grad, y, grad_scale, grad_shift, mean, var, weight,
                           bias, eps):
    """conv_ops.cpp ``bn_statistics_backward``: one elementwise pass; block 0 also writes
    the BN's parameter gradients, in the parameters' dtype when they share one, else in fp32
    and converted."""
    grad, y = _nhwc(grad), _nhwc(y)
    vectors = [_vector(v, torch.float32) for v in (grad_scale, grad_shift, mean, var)]
    one_type = weight is None or bias is None or weight.dtype == bias.dtype
    parameters = [None if p is None else (p.contiguous() if one_type else
                                          _vector(p, torch.float32)) for p in (weight, bias)]
    out = torch.empty_like(y, memory_format=torch.channels_last)
    gradients = [mean.new_empty(0, dtype=torch.float32) if p is None else torch.empty_like(p)
                 for p in parameters]
    record("statistics_backward_kernel",
           [t for t in (grad, y, *vectors, parameters[0], out, *gradients)
            if t is not None and t.numel()])
    if not one_type:
        gradients = [g.to(p.dtype) for g, p in zip(gradients, (weight, bias))]
    return [out, *gradients]


def bn_scale_shift_backward(record: Record, grad_scale, grad_shift, mean, var, weight, bias,
                            eps):
    """batch_norm_finalize.cu ``bn_scale_shift_backward_cuda``: computed in the types the
    forward reads (:func:`_finalize_types`), gradients converted back to the inputs'
    dtypes."""
    stat_type, weight_type = _finalize_types(mean, var, weight, bias)
    stats = [_vector(mean, stat_type), _vector(var, stat_type)]
    weight_d = _vector(weight, weight_type)
    grad_mean, grad_var = (mean.new_empty(mean.numel(), dtype=stat_type) for _ in range(2))
    grad_weight, grad_bias = (
        mean.new_empty(0 if p is None else mean.numel(),
                       dtype=torch.float32 if p is None else weight_type)
        for p in (weight, bias))
    if mean.numel():
        record("bn_scale_shift_backward_kernel",
               [t for t in (_vector(grad_scale, torch.float32),
                            _vector(grad_shift, torch.float32), *stats, weight_d, grad_mean,
                            grad_var, grad_weight, grad_bias) if t is not None and t.numel()])
    return [grad_mean.to(mean.dtype), grad_var.to(var.dtype),
            grad_weight if weight is None else grad_weight.to(weight.dtype),
            grad_bias if bias is None else grad_bias.to(bias.dtype)]


def bn_train_finalize(record: Record, mean, var, weight, bias, eps, running_mean, running_var,
                      num_batches_tracked, momentum, count):
    """batch_norm_finalize.cu ``bn_train_finalize_cuda``: one kernel (one block)."""
    stats = [_vector(mean, torch.float32), _vector(var, torch.float32)]
    param_type = _finalize_types(mean, var, weight, bias)[1]
    params = [_vector(p, param_type) for p in (weight, bias) if p is not None]
    scale = mean.new_empty(mean.numel(), dtype=torch.float32)
    shift = torch.empty_like(scale)
    record("bn_train_finalize_kernel",
           [t for t in (*stats, *params, running_mean, running_var, num_batches_tracked,
                        scale, shift) if t is not None])
    return scale, shift


def bn_update_running_stats(record: Record, mean, var, running_mean, running_var, factor,
                            count):
    """batch_norm_finalize.cu ``bn_update_running_stats_cuda``."""
    if mean.numel() == 0:
        return None
    stats = [_vector(mean, torch.float32), _vector(var, torch.float32)]
    record("bn_update_running_stats_kernel", [*stats, running_mean, running_var])
    return None


MODELS: dict[str, Callable] = {
    "cuda_conv": cuda_conv, "cuda_conv_bn_train": cuda_conv_bn_train,
    "cuda_conv_dgrad": cuda_conv_dgrad,
    "cuda_conv_wgrad": cuda_conv_wgrad, "cuda_channel_stats": cuda_channel_stats,
    "affine_relu_backward": affine_relu_backward, "add_relu_backward": add_relu_backward,
    "scale_shift_add_relu": scale_shift_add_relu, "bn_scale_shift": bn_scale_shift,
    "bn_update_running_stats": bn_update_running_stats,
    "bn_scale_shift_backward": bn_scale_shift_backward, "bn_train_finalize": bn_train_finalize,
    "statistics_backward": statistics_backward,
    "bn_statistics_backward": bn_statistics_backward,
}
