"""The traffic counter's models of the C++/CUDA ops (fused_resnet.cuda_launches).

Without a GPU: each model returns what the op's fake returns (shapes, dtypes, strides), so
counting through it leaves the rest of the plan as it is. On a GPU (marked ``gpu``): each
model counts exactly the kernels, memsets and copies a real call of the op launches (CUDA
profiler).
"""

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fused_resnet import cuda_launches, extension
from fused_resnet.bench import traffic

pytestmark = pytest.mark.skipif(extension.load_error() is not None,
                                reason=f"fused_resnet._C is not built: {extension.load_error()}")


def _cases(device: str) -> list:
    """(id, op name, arguments) covering each model's branches: prologue or not, epilogue
    scale folding, statistics, split-K or not, a weight that is not channels_last, vector
    dtypes that need converting."""
    dtype = torch.bfloat16

    def t(*shape, dtype=dtype, layout=torch.channels_last):
        return torch.randn(*shape, dtype=dtype, device=device).contiguous(
            memory_format=layout if len(shape) == 4 else torch.contiguous_format)

    def vector(c, dtype=torch.float32):
        return torch.rand(c, dtype=dtype, device=device) + 0.5

    x, weight = t(2, 16, 9, 7), t(32, 16, 3, 3)
    big_x, big_weight = t(8, 64, 28, 28), t(64, 64, 3, 3)
    grad, big_grad = t(2, 32, 9, 7), t(8, 64, 28, 28)
    s16, s32 = vector(16), vector(32)
    return [
        ("conv-plain", "cuda_conv", (x, weight, 1, None, None, None, None, None, False, False)),
        ("conv-prologue-statistics", "cuda_conv",
         (x, weight, 1, s16, s16, None, None, None, False, True)),
        ("conv-epilogue-residual-relu", "cuda_conv",
         (x, weight, 1, None, None, s32, s32, grad, True, False)),
        ("conv-nchw-input", "cuda_conv", (x.contiguous(), weight, 1, None, None, None, None,
                                          None, False, False)),
        ("conv-statistics", "cuda_conv", (x, weight, 2, None, None, None, None, None, False,
                                          True)),
        ("conv-prologue-vectors-of-two-dtypes", "cuda_conv",
         (x, weight, 1, vector(16, dtype), s16, None, None, None, False, False)),
        ("conv-prologue-vectors-in-the-tensor-dtype", "cuda_conv",
         (x, weight, 1, vector(16, dtype), vector(16, dtype), None, None, None, False, False)),
        ("conv-bn-train-prologue", "cuda_conv_bn_train",
         (x, weight, 1, s16, s16, vector(32), vector(32), 1e-5, vector(32), vector(32),
          torch.tensor(3, device=device), 0.1)),
        ("conv-bn-train-bf16-parameters-cumulative", "cuda_conv_bn_train",
         (x, weight, 2, None, None, vector(32, dtype), None, 1e-5, None, None,
          torch.tensor(3, device=device), None)),
        ("dgrad", "cuda_conv_dgrad", (grad, weight, x, 1, None, None)),
        ("dgrad-prologue", "cuda_conv_dgrad", (grad, weight, x, 1, s16, s16)),
        ("dgrad-other", "cuda_conv_dgrad", (grad, weight, x, 1, None, None, x.contiguous())),
        ("dgrad-prologue-other", "cuda_conv_dgrad", (grad, weight, x, 1, s16, s16, x)),
        ("dgrad-prologue-strided", "cuda_conv_dgrad", (t(2, 32, 5, 4), weight, x, 2, s16, s16)),
        ("wgrad", "cuda_conv_wgrad", (grad, x, weight, 1, None, None)),
        # 1 x 9 x 7 pixels: 2 K iterations, one slice
        ("wgrad-one-slice", "cuda_conv_wgrad", (t(1, 32, 9, 7), t(1, 16, 9, 7), weight, 1, s16,
                                                s16)),
        ("wgrad-prologue-splitk", "cuda_conv_wgrad",
         (big_grad, big_x, big_weight, 1, vector(64), vector(64))),
        ("wgrad-nchw-weight", "cuda_conv_wgrad", (grad, x, weight.contiguous(), 1, None, None)),
        ("channel-stats", "cuda_channel_stats", (grad,)),
        ("affine-relu-backward", "affine_relu_backward", (grad, grad, s32, s32, None)),
        ("add-relu-backward-projection", "add_relu_backward", (grad, grad, grad, s32, grad, s32)),
        ("add-relu-backward-identity", "add_relu_backward", (grad, grad, grad, s32, grad, None)),
        ("scale-shift-add-relu", "scale_shift_add_relu",
         (grad, s32, s32, grad, vector(32, dtype), s32, True)),
        ("bn-scale-shift-mixed-parameters", "bn_scale_shift",
         (s32, s32, vector(32, dtype), s32, 1e-5)),
        ("statistics-backward", "statistics_backward", (grad, grad, s32, s32, s32, None)),
        ("statistics-backward-scaled", "statistics_backward",
         (grad.contiguous(), grad, s32, s32, s32, vector(32))),
        ("bn-statistics-backward", "bn_statistics_backward",
         (grad, grad, s32, s32, s32, s32, vector(32), vector(32), 1e-5)),
        ("bn-statistics-backward-bf16-weight-no-bias", "bn_statistics_backward",
         (grad, grad, s32, s32, s32, s32, vector(32, dtype), None, 1e-5)),
        ("bn-scale-shift-backward", "bn_scale_shift_backward",
         (s32, s32, s32, s32, vector(32), vector(32), 1e-5)),
        ("bn-scale-shift-backward-bf16-parameters-no-bias", "bn_scale_shift_backward",
         (s32, s32, s32, s32, vector(32, dtype), None, 1e-5)),
        ("bn-train-finalize", "bn_train_finalize",
         (s32, s32, vector(32), vector(32), 1e-5, vector(32), vector(32),
          torch.tensor(3, device=device), None, 126)),
        ("bn-update-running-stats", "bn_update_running_stats",
         (s32, s32, vector(32), vector(32), 0.1, 126)),
    ]


CASE_IDS = [case[0] for case in _cases("meta")]


def _to_meta(arguments):
    return tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, arguments)


def _counted(op: str, arguments) -> dict:
    """The traffic counter's count of one call of ``op`` on meta copies of ``arguments``."""
    arguments = _to_meta(arguments)
    tensors = [a for a in tree_flatten(arguments)[0] if isinstance(a, torch.Tensor)]
    return traffic.count(nn.Identity(), lambda: getattr(torch.ops.fused_resnet, op)(*arguments),
                         tensors)


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_model_returns_what_the_fake_returns(index):
    _, op, arguments = _cases("meta")[index]
    fake = getattr(torch.ops.fused_resnet, op)(*arguments)
    modeled = cuda_launches.MODELS[op](lambda name, tensors: None, *arguments)

    def layout(out):
        return [(t.shape, t.dtype, t.stride()) for t in tree_flatten(out)[0]
                if isinstance(t, torch.Tensor)]
    assert layout(modeled) == layout(fake)


def test_every_op_of_the_extension_has_a_model():
    names = {schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas()
             if schema.name.startswith("fused_resnet::")}
    ops = {name for name in names if not name.startswith("triton_")}
    assert ops - {"conv_launch_plan", "conv_launch_check"} == set(cuda_launches.MODELS)


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_count_goes_through_the_model(index):
    # The counter records the model's kernels by name (a C++ op alone would be one launch
    # under its own name).
    _, op, arguments = _cases("meta")[index]
    counted = _counted(op, arguments)
    assert op not in counted["by_op"]
    assert counted["launches"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_model_counts_the_kernels_a_real_call_launches(index, monkeypatch):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    _, op, arguments = _cases("cuda")[index]
    monkeypatch.setattr(cuda_launches, "SM_COUNT",
                        torch.cuda.get_device_properties(0).multi_processor_count)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        getattr(torch.ops.fused_resnet, op)(*arguments)
        torch.cuda.synchronize()
    launched = [event.name for event in profiled.events()
                if event.device_type == DeviceType.CUDA]
    counted = _counted(op, arguments)
    assert counted["launches"] == len(launched), (counted["by_op"], launched)
