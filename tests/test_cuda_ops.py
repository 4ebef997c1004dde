"""The ops of the cuda backend (CUTLASS convolutions and channel reductions in
fused_resnet._C) and its blocks.

Without a GPU: the op schemas, fakes and autograd formulas are checked with opcheck and
fp64 gradcheck through the ops' CPU kernels (their plain-PyTorch meaning,
fused_resnet.op_reference); the blocks are composed from the same ops on CPU in fp64 and
compared with the reference; the backend's refusals are checked. On a GPU (marked
``gpu``): each op and each block against fp64 truth within eager's error in fp16 and
bf16, on NaN-poisoned memory.
"""

import math

import pytest
import torch

import fused_resnet
from blockcases import build_plain, case_id, compare_with_reference, run_steps
from fused_resnet import backends, cuda_ops, extension, op_reference, reference
from fused_resnet.fused_blocks import FusedBlocks
from fused_resnet.testing import errors_beyond_eager

pytestmark = pytest.mark.skipif(extension.load_error() is not None,
                                reason=f"fused_resnet._C is not built: {extension.load_error()}")

# Channel counts the CUTLASS kernels take (multiples of 8), with stride 2, projections,
# and every block kind.
CUDA_BLOCK_CASES = [
    ("basic", 16, 16, 1, False),
    ("basic", 8, 16, 2, True),
    ("bottleneck", 32, 8, 1, False),   # 32 = 8 * expansion 4: identity shortcut
    ("bottleneck", 16, 8, 2, True),
    ("preact_basic", 16, 16, 1, False),
    ("preact_basic", 8, 24, 2, True),
    ("preact_bottleneck", 32, 32, 1, False),
    ("preact_bottleneck", 16, 32, 2, True),
]

# (prologue, epilogue): which fused conv each block plan uses.
CONV_FUSIONS = ["plain", "prologue", "prologue_residual", "statistics", "prologue_statistics",
                "epilogue", "epilogue_residual_relu"]


def _conv_arguments(fusion, dtype, device, c_in=8, c_out=16, stride=2, batch=3, h=7, w=5):
    x = torch.randn(batch, c_in, h, w, dtype=dtype, device=device)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=dtype, device=device) / math.sqrt(9 * c_in)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    arguments = dict(x=x, weight=weight, stride=stride, in_scale=None, in_shift=None,
                     out_scale=None, out_shift=None, residual=None, out_relu=False,
                     statistics="statistics" in fusion)
    if fusion.startswith("prologue"):
        arguments["in_scale"] = torch.rand(c_in, device=device, dtype=dtype) + 0.5
        arguments["in_shift"] = torch.randn(c_in, device=device, dtype=dtype) * 0.5
    if fusion.startswith("epilogue"):
        arguments["out_scale"] = torch.rand(c_out, device=device, dtype=dtype) + 0.5
        arguments["out_shift"] = torch.randn(c_out, device=device, dtype=dtype) * 0.5
    if "residual" in fusion:
        arguments["residual"] = torch.randn(batch, c_out, p, q, dtype=dtype, device=device)
    arguments["out_relu"] = fusion.endswith("relu")
    return arguments


def _differentiable(arguments):
    # The epilogue's scale and shift are folded BatchNorms of inference: no gradient.
    return {k: (v.detach().requires_grad_(not k.startswith("out_"))
                if isinstance(v, torch.Tensor) else v) for k, v in arguments.items()}


@pytest.mark.parametrize("fusion", CONV_FUSIONS)
def test_cuda_conv_passes_opcheck_and_gradcheck_on_its_cpu_kernel(fusion):
    arguments = _differentiable(_conv_arguments(fusion, torch.float64, "cpu"))
    torch.library.opcheck(torch.ops.fused_resnet.cuda_conv.default,
                          tuple(arguments.values()))
    tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)
               and v.requires_grad}

    def outputs(*values):
        y, mean, var = cuda_ops.cuda_conv(**{**arguments, **dict(zip(tensors, values))})
        # Weighted so that the statistics' gradients do not cancel.
        return y, mean * torch.arange(mean.numel()), var
    # The backward is the shared formula plus the dgrad/wgrad ops: checked numerically.
    assert torch.autograd.gradcheck(outputs, tuple(tensors.values()), atol=1e-6)


@pytest.mark.parametrize("op, arguments", [
    ("cuda_conv_dgrad", lambda a, g: (g, a["weight"], a["x"], 2, a["in_scale"], a["in_shift"])),
    ("cuda_conv_dgrad", lambda a, g: (g, a["weight"], a["x"], 2, None, None,
                                      torch.randn_like(a["x"]))),
    ("cuda_conv_wgrad", lambda a, g: (g, a["x"], a["weight"], 2, a["in_scale"], a["in_shift"])),
    ("cuda_channel_stats", lambda a, g: (a["x"],)),
    ("affine_relu_backward", lambda a, g: (torch.randn_like(a["x"]), a["x"], a["in_scale"],
                                           a["in_shift"], None)),
    ("add_relu_backward", lambda a, g: (torch.randn_like(a["x"]), torch.randn_like(a["x"]),
                                        a["x"], a["in_scale"], torch.randn_like(a["x"]),
                                        a["in_shift"])),
    ("add_relu_backward", lambda a, g: (torch.randn_like(a["x"]), torch.randn_like(a["x"]),
                                        a["x"], None, torch.randn_like(a["x"]), None)),
    ("statistics_backward", lambda a, g: (torch.randn_like(a["x"]), a["x"], a["in_scale"],
                                          a["in_shift"], a["in_scale"], None)),
    ("statistics_backward", lambda a, g: (torch.randn_like(a["x"]), a["x"], a["in_scale"],
                                          a["in_shift"], a["in_scale"], a["in_shift"])),
])
def test_backward_and_statistics_ops_pass_opcheck_on_their_cpu_kernels(op, arguments):
    a = _conv_arguments("prologue", torch.float64, "cpu")
    grad = torch.randn(3, 16, 4, 3, dtype=torch.float64)
    torch.library.opcheck(getattr(torch.ops.fused_resnet, op).default, arguments(a, grad))


def _finalize_arguments(device, dtype=torch.float64, channels=16):
    mean = torch.randn(channels, dtype=dtype, device=device)
    var = torch.rand(channels, dtype=dtype, device=device) + 0.1
    weight = torch.rand(channels, dtype=dtype, device=device) + 0.5
    bias = torch.randn(channels, dtype=dtype, device=device)
    return mean, var, weight, bias


@pytest.mark.parametrize("affine", [True, False])
def test_bn_scale_shift_passes_opcheck_and_gradcheck_on_its_cpu_kernel(affine):
    mean, var, weight, bias = [t.requires_grad_() for t in _finalize_arguments("cpu")]
    args = (mean, var, weight if affine else None, bias if affine else None, 1e-5)
    torch.library.opcheck(torch.ops.fused_resnet.bn_scale_shift.default, args)
    tensors = [t for t in args[:4] if t is not None]
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.fused_resnet.bn_scale_shift(*t, *[None] * (4 - len(t)), 1e-5),
        tensors)


@pytest.mark.parametrize("affine", [True, False])
def test_bn_scale_shift_backward_passes_opcheck_and_is_the_finalize_gradient(affine):
    mean, var, weight, bias = _finalize_arguments("cpu")
    grad_scale, grad_shift = torch.randn(16, dtype=torch.float64), torch.randn(16,
                                                                               dtype=torch.float64)
    args = (grad_scale, grad_shift, mean, var, weight if affine else None,
            bias if affine else None, 1e-5)
    torch.library.opcheck(torch.ops.fused_resnet.bn_scale_shift_backward.default, args)
    inputs = [t.requires_grad_() for t in (mean, var, weight, bias)][:4 if affine else 2]
    scale, shift = reference.scale_shift_from_statistics(
        mean, var, weight if affine else None, bias if affine else None, 1e-5)
    expected = torch.autograd.grad((scale, shift), inputs, (grad_scale, grad_shift))
    got = torch.ops.fused_resnet.bn_scale_shift_backward(*args)
    torch.testing.assert_close(got[:len(inputs)], list(expected))
    assert all(g.numel() == 0 for g in got[len(inputs):])


@pytest.mark.parametrize("affine", [True, False])
def test_bn_statistics_backward_passes_opcheck_on_its_cpu_kernel(affine):
    mean, var, weight, bias = _finalize_arguments("cpu")
    grad, y = (torch.randn(3, 16, 4, 5, dtype=torch.float64) for _ in range(2))
    grads = [torch.randn(16, dtype=torch.float64) for _ in range(2)]
    parameters = (weight, bias) if affine else (None, None)
    torch.library.opcheck(torch.ops.fused_resnet.bn_statistics_backward.default,
                          (grad, y, *grads, mean, var, *parameters, 1e-5))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_bn_train_finalize_passes_opcheck_and_updates_as_batch_norm(momentum):
    mean, var, weight, bias = _finalize_arguments("cpu")
    running = [torch.randn(16, dtype=torch.float64), torch.rand(16, dtype=torch.float64) + 1]
    batches = torch.tensor(4)
    args = (mean, var, weight, bias, 1e-5, *running, batches, momentum, 10)
    torch.library.opcheck(torch.ops.fused_resnet.bn_train_finalize.default,
                          tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    # Against nn.BatchNorm2d's own update, from a batch with these statistics.
    bn = torch.nn.BatchNorm2d(16, momentum=momentum).double()
    with torch.no_grad():
        bn.running_mean.copy_(running[0]), bn.running_var.copy_(running[1])
        bn.num_batches_tracked.fill_(4)
    x = torch.randn(10, 16, 1, 1, dtype=torch.float64)
    bn(x)
    batch_mean, batch_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    scale, shift = torch.ops.fused_resnet.bn_train_finalize(
        batch_mean, batch_var, weight, bias, 1e-5, *running, batches, momentum, 10)
    torch.testing.assert_close(running, [bn.running_mean, bn.running_var])
    assert batches.item() == bn.num_batches_tracked.item() == 5
    torch.testing.assert_close((scale, shift), reference.scale_shift_from_statistics(
        batch_mean, batch_var, weight, bias, 1e-5))


def _conv_bn_train_arguments(fusion, device, dtype, momentum, **shape):
    """cuda_conv_bn_train's arguments: a conv (``fusion`` "statistics" or
    "prologue_statistics") and a training BN with running statistics and a batch count."""
    conv = _conv_arguments(fusion, dtype, device, **shape)
    _, _, weight, bias = _finalize_arguments(device, dtype, conv["weight"].shape[0])
    running = [torch.randn_like(weight), torch.rand_like(weight) + 1,
               torch.tensor(4, device=device)]
    return (conv["x"], conv["weight"], conv["stride"], conv["in_scale"], conv["in_shift"],
            weight, bias, 1e-5, *running, momentum)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("fusion", ["statistics", "prologue_statistics"])
def test_cuda_conv_bn_train_passes_opcheck_and_is_conv_then_finalize(fusion, momentum):
    arguments = _conv_bn_train_arguments(fusion, "cpu", torch.float64, momentum)
    torch.library.opcheck(torch.ops.fused_resnet.cuda_conv_bn_train.default,
                          tuple(a.clone() if isinstance(a, torch.Tensor) else a
                                for a in arguments))
    x, weight, stride, in_scale, in_shift, bn_weight, bn_bias, eps, *state, _ = arguments
    expected_state = [t.clone() for t in state]
    y, mean, var = cuda_ops.cuda_conv(x, weight, stride, in_scale, in_shift, None, None, None,
                                      False, True)
    expected = (y, mean, var, *op_reference.bn_train_finalize(
        mean, var, bn_weight, bn_bias, eps, *expected_state, momentum, y.numel() // y.shape[1]))
    got = torch.ops.fused_resnet.cuda_conv_bn_train(*arguments)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(state, expected_state)
    assert state[2].item() == 5


def test_bn_update_running_stats_passes_opcheck_and_blends_as_batch_norm():
    mean, var, running_mean, running_var = _finalize_arguments("cpu")
    torch.library.opcheck(torch.ops.fused_resnet.bn_update_running_stats.default,
                          (mean, var, running_mean.clone(), running_var.clone(), 0.1, 12))
    expected_mean = 0.9 * running_mean + 0.1 * mean
    expected_var = 0.9 * running_var + 0.1 * var * 12 / 11
    torch.ops.fused_resnet.bn_update_running_stats(mean, var, running_mean, running_var, 0.1, 12)
    torch.testing.assert_close(running_mean, expected_mean)
    torch.testing.assert_close(running_var, expected_var)


@pytest.fixture
def cuda_plan_as_reference(monkeypatch):
    """backend='reference' runs the cuda backend's block plan (on the cuda ops' CPU
    kernels), which backend='cuda' itself only runs on CUDA tensors."""
    plan = backends.BACKENDS["reference"]._replace(functions=FusedBlocks(cuda_ops.KERNELS))
    monkeypatch.setitem(backends.BACKENDS, "reference", plan)


def _cpu_steps(case):
    return [(torch.randn(3, case[1], 7, 5, dtype=torch.float64), "train"),
            (torch.randn(1, case[1], 5, 7, dtype=torch.float64), "eval"),
            (torch.randn(2, case[1], 5, 5, dtype=torch.float64), "no_grad")]


@pytest.mark.parametrize("case", CUDA_BLOCK_CASES, ids=case_id)
def test_cuda_block_plan_matches_reference_on_cpu_kernels(case, request):
    """The cuda backend's composition of its ops computes the reference's outputs,
    gradients and running statistics (fp64, through the ops' CPU kernels)."""
    block, steps = build_plain(case).double(), _cpu_steps(case)
    truth = run_steps(fused_resnet.convert(block, backend="reference"), steps)
    request.getfixturevalue("cuda_plan_as_reference")
    fused = run_steps(fused_resnet.convert(block, backend="reference"), steps)
    assert fused.keys() == truth.keys()
    for name, expected in truth.items():
        torch.testing.assert_close(fused[name], expected, msg=name)


@pytest.mark.parametrize("case", [CUDA_BLOCK_CASES[3], CUDA_BLOCK_CASES[7]], ids=case_id)
def test_cuda_block_plan_compiles_fullgraph(case, cuda_plan_as_reference):
    """The cuda ops' schemas, fakes and autograd trace without graph breaks, and the
    compiled plan computes what the plain block computes (fp64, on the CPU kernels)."""
    torch._dynamo.reset()
    block, steps = build_plain(case).double(), _cpu_steps(case)
    compiled = torch.compile(fused_resnet.convert(block, backend="reference"), fullgraph=True)
    expected = run_steps(block, steps)
    actual = {name.replace("_orig_mod.", ""): value
              for name, value in run_steps(compiled, steps).items()}
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name)


@pytest.mark.parametrize("make_input, message", [
    (lambda: torch.randn(2, 16, 4, 4), "input dtype is torch.float32"),
    (lambda: torch.randn(2, 16, 4, 4, dtype=torch.float64), "input dtype is torch.float64"),
    (lambda: torch.randn(2, 16, 4, 4).half(), "the input is on cpu"),
])
def test_cuda_backend_refuses_what_its_kernels_cannot_run(make_input, message):
    x = make_input()
    block = fused_resnet.BasicBlock(16, 16, backend="cuda").to(x.dtype)
    with pytest.raises(fused_resnet.BackendUnavailableError, match=message):
        block(x)


def test_cuda_backend_names_channel_counts_that_are_not_multiples_of_8():
    block = fused_resnet.Bottleneck(24, 6, backend="cuda").half()  # width 6, 24 out
    with pytest.raises(fused_resnet.BackendUnavailableError,
                       match=r"channel counts \[6\] are not multiples of 8"):
        block(torch.randn(2, 24, 4, 4).half())


def test_auto_does_not_route_to_cuda_before_its_gpu_suite_has_run():
    x = torch.randn(2, 16, 4, 4).half()
    assert "GPU test suite" in backends.BACKENDS["cuda"].why_not(x, {}, True)
    assert "the input is on cpu" in backends.BACKENDS["cuda"].why_not(x, {}, False)


def _launch_plan(kernel, problem, sm_count):
    tile_m, tile_n, tile_k, grid_m, grid_n, split_k = \
        torch.ops.fused_resnet.conv_launch_plan(kernel, problem, sm_count)
    return dict(tile=(tile_m, tile_n, tile_k), blocks=grid_m * grid_n * split_k,
                split_k=split_k)


@pytest.mark.parametrize("sm_count", [132, 108, 1000])
@pytest.mark.parametrize("kernel", ["wgrad", "wgrad_prologue"])
def test_wgrad_is_split_to_fill_the_gpu_while_slices_keep_two_iterations(kernel, sm_count):
    # ResNet-50's first 3x3 at batch 32: 1 x 9 small tiles, 3136 iterations of 32 pixels.
    plan = _launch_plan(kernel, [32, 56, 56, 64, 64, 3, 3, 1], sm_count)
    assert plan["tile"] == (64, 64, 32)  # 64 output channels: the 64-row tile
    assert plan["blocks"] >= sm_count and plan["split_k"] <= 3136 // 2
    # Too few pixels for that many slices: at most one slice per two iterations.
    assert _launch_plan(kernel, [1, 8, 8, 64, 64, 3, 3, 1], sm_count)["split_k"] == 1
    # Enough output tiles already (stage 4, 4 x 36 large tiles at 132 SMs): no slicing.
    assert _launch_plan(kernel, [32, 7, 7, 512, 512, 3, 3, 1], 132)["split_k"] == 1


@pytest.mark.parametrize("kernel", ["fprop", "fprop_statistics", "fprop_prologue", "dgrad",
                                    "dgrad_prologue"])
def test_small_tiles_only_where_large_ones_leave_multiprocessors_idle(kernel):
    # Stage 4 at batch 32: 13 x 4 large tiles < 132 SMs; at batch 256, 98 x 4.
    assert _launch_plan(kernel, [32, 7, 7, 512, 512, 3, 3, 1], 132)["tile"] == (64, 64, 32)
    assert _launch_plan(kernel, [256, 7, 7, 512, 512, 3, 3, 1], 132)["tile"] == (128, 128, 32)


@pytest.mark.parametrize("kernel", ["fprop", "fprop_statistics", "fprop_prologue", "dgrad",
                                    "dgrad_prologue", "wgrad", "wgrad_prologue"])
def test_launch_dry_run_passes_real_launches_and_rejects_what_cutlass_cannot_run(kernel):
    # The launchers' host code without a GPU: one-slice and split-K wgrad, both tiles, stride
    # 2 (but for dgrad_prologue, the unit-stride dgrad, which refuses it).
    for problem in ([1, 9, 7, 16, 32, 3, 3, 1], [256, 56, 56, 64, 64, 3, 3, 1],
                    [32, 14, 14, 256, 512, 3, 3, 2]):
        if kernel == "dgrad_prologue" and problem[-1] == 2:
            with pytest.raises(RuntimeError, match="dgrad_prologue is the unit-stride dgrad"):
                torch.ops.fused_resnet.conv_launch_check(kernel, problem, 132)
            continue
        torch.ops.fused_resnet.conv_launch_check(kernel, problem, 132)
    # 12 channels: CUTLASS's 8-element vectors do not fit, and its can_implement says so.
    with pytest.raises(RuntimeError, match="CUTLASS cannot run this problem"):
        torch.ops.fused_resnet.conv_launch_check(kernel, [1, 8, 8, 12, 16, 3, 3, 1], 132)


@pytest.mark.parametrize("kernel, problem, message", [
    ("conv", [1, 8, 8, 8, 8, 3, 3, 1], "kernel must be one of fprop, .* got 'conv'"),
    ("fprop", [1, 8, 8, 8, 8, 3, 3], r"problem must be \[n, h, w, c, k, r, s, stride\]"),
    ("fprop", [1, 8, 8, 8, 8, 2, 2, 1], "odd filter extents"),
])
def test_launch_plan_names_a_bad_argument(kernel, problem, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fused_resnet.conv_launch_plan(kernel, problem, 132)


def test_cuda_backend_refuses_gpus_older_than_ampere(monkeypatch):
    # A fake CUDA tensor stands for the input: its device is all the check reads.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 16, 4, 4, dtype=torch.half, device="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = backends.BACKENDS["cuda"].why_not(x, {}, False)
    assert "Tesla T4) has compute capability 7.5" in reason and "8.0 (Ampere)" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert backends.BACKENDS["cuda"].why_not(x, {}, False) is None


# --- on a GPU ------------------------------------------------------------------------------

# The conv shapes run on a GPU. On a 132-SM GPU (H100, H200) they take both tile
# configurations of each kernel, and wgrad's split-K (test_gpu_conv_shapes_take_every_tile).
GPU_CONV_SHAPES = {
    "b1-9x7-s1": dict(batch=1, h=9, w=7, stride=1),
    "b3-7x5-s2": dict(batch=3, h=7, w=5, stride=2),
    "b2-14x14-s2-64to128": dict(batch=2, h=14, w=14, stride=2, c_in=64, c_out=128),
    "b0": dict(batch=0, h=5, w=5, stride=1),
    "b8-28x28-s1-64to64-splitk": dict(batch=8, h=28, w=28, stride=1, c_in=64, c_out=64),
    "b8-56x56-s1-64to128-large": dict(batch=8, h=56, w=56, stride=1, c_in=64, c_out=128),
    "b32-56x56-s2-64to128-large": dict(batch=32, h=56, w=56, stride=2, c_in=64, c_out=128),
}


def test_gpu_conv_shapes_take_every_tile():
    taken = set()
    for shape in GPU_CONV_SHAPES.values():
        shape = {**dict(c_in=8, c_out=16, batch=3), **shape}
        problem = [shape["batch"], shape["h"], shape["w"], shape["c_in"], shape["c_out"], 3, 3,
                   shape["stride"]]
        if shape["batch"] == 0:  # no launch
            continue
        for kernel in ("fprop", "fprop_statistics", "fprop_prologue", "dgrad", "dgrad_prologue",
                       "wgrad", "wgrad_prologue"):
            if kernel == "dgrad_prologue" and shape["stride"] != 1:
                continue
            plan = _launch_plan(kernel, problem, 132)
            taken.add((kernel, shape["stride"] if kernel == "dgrad" else 1, plan["tile"][0],
                       plan["split_k"] > 1))
    for kernel in ("fprop", "fprop_statistics", "fprop_prologue", "dgrad", "dgrad_prologue"):
        for stride in ((1, 2) if kernel == "dgrad" else (1,)):
            assert {(kernel, stride, 128, False), (kernel, stride, 64, False)} <= taken
    for kernel in ("wgrad", "wgrad_prologue"):
        assert {(kernel, 1, 64, True), (kernel, 1, 128, True)} <= taken, taken

@pytest.fixture
def poisoned_cuda_memory():
    """Fill the CUDA caching allocator's free blocks with NaN, so that the C++ ops' own
    allocations (at::empty) start as NaN and an element a kernel leaves unwritten fails."""
    torch.cuda.empty_cache()
    # Allocations up to 1 MB come from the small pool's 2 MB segments, larger ones from the
    # large pool: poison both.
    blocks = [torch.full((1 << 17,), math.nan, device="cuda") for _ in range(8)]
    blocks.append(torch.full((1 << 27,), math.nan, device="cuda"))
    del blocks
    yield


def _op_results(arguments, run):
    """Outputs of one fused conv and the gradients of every differentiable input."""
    arguments = _differentiable(arguments)
    y, mean, var = run(**arguments)
    results = {"y": y.detach()}
    loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum()
    if mean.numel():
        results.update(mean=mean.detach(), var=var.detach())
        loss = loss + (mean * torch.arange(mean.numel(), device=y.device)).sum() + var.sum()
    tensors = {k: v for k, v in arguments.items()
               if isinstance(v, torch.Tensor) and v.requires_grad}
    for name, grad in zip(tensors, torch.autograd.grad(loss, list(tensors.values()))):
        results[f"grad {name}"] = grad
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", CONV_FUSIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_CONV_SHAPES.values(), ids=GPU_CONV_SHAPES.keys())
def test_cuda_conv_forward_and_backward_within_eager_error(fusion, dtype, shape,
                                                           poisoned_cuda_memory):
    arguments = _conv_arguments(fusion, torch.float64, "cuda", **shape)
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
    truth = _op_results(arguments, op_reference.fused_conv)
    eager = _op_results(cast, op_reference.fused_conv)
    fused = _op_results(cast, cuda_ops.cuda_conv)
    assert fused["y"].is_contiguous(memory_format=torch.channels_last)
    assert errors_beyond_eager(fused, eager, truth) == []


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="issue #17: CUTLASS's mainloop fusion applies the "
                   "prologue with scale and shift rounded to the tensor dtype; with a shift "
                   "near mean/std the rounding of the shift alone is about 4x the input's own "
                   "(expected to fail until the prologue takes fp32 vectors)")
@pytest.mark.parametrize("mean_over_std", [100.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_prologue_when_the_mean_dwarfs_the_spread(dtype, mean_over_std,
                                                       poisoned_cuda_memory):
    # The prologue of a conv whose input BN sees |mean| / std = mean_over_std: scale =
    # 1 / std, shift = -mean / std, so that x * scale + shift is O(1).
    arguments = _conv_arguments("prologue", torch.float64, "cuda", c_in=16, batch=2, h=9,
                                w=7, stride=1)
    std = torch.rand(16, dtype=torch.float64, device="cuda") * 0.5 + 0.25
    mean = std * mean_over_std
    arguments["x"] = arguments["x"] * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    arguments["in_scale"], arguments["in_shift"] = 1 / std, -mean / std + 0.1
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and k not in ("in_scale", "in_shift")
            else v for k, v in arguments.items()}
    cast["in_scale"], cast["in_shift"] = (arguments[k].float() for k in ("in_scale", "in_shift"))
    truth = _op_results(arguments, op_reference.fused_conv)
    eager = _op_results(cast, op_reference.fused_conv)
    fused = _op_results(cast, cuda_ops.cuda_conv)
    assert errors_beyond_eager(fused, eager, truth) == []


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["cuda_conv_dgrad", "cuda_conv_wgrad"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_conv_backward_names_a_prologue_vector_of_the_wrong_size(op, stride):
    # The stride-1 dgrad reads the vectors in its epilogue, per channel of x: a short one
    # would be read past its end.
    arguments = _conv_arguments("prologue", torch.float16, "cuda", c_in=16, stride=stride)
    x, weight = arguments["x"], arguments["weight"]
    grad = torch.randn_like(cuda_ops.cuda_conv(**arguments)[0])
    tensors = (grad, weight, x) if op == "cuda_conv_dgrad" else (grad, x, weight)
    with pytest.raises(RuntimeError, match=r"in_scale must be a vector of x.size\(1\) = 16"):
        getattr(torch.ops.fused_resnet, op)(*tensors, stride, arguments["in_scale"][:8],
                                            arguments["in_shift"])


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", ["prologue", "prologue_statistics"])
def test_cuda_conv_reads_vectors_that_start_off_alignment(fusion, poisoned_cuda_memory):
    # Per-channel vectors sliced from a larger tensor start 2 bytes past a 16-byte boundary;
    # CUTLASS reads them in 16-byte vectors, so the op must hand it aligned copies.
    arguments = _conv_arguments(fusion, torch.float16, "cuda", c_in=16)
    for name in ("in_scale", "in_shift"):
        padded = torch.empty(17, dtype=torch.float16, device="cuda")
        padded[1:] = arguments[name]
        arguments[name] = padded[1:]
    aligned = {k: v.clone() if k.startswith("in_") else v for k, v in arguments.items()}
    sliced = _op_results(arguments, cuda_ops.cuda_conv)
    expected = _op_results(aligned, cuda_ops.cuda_conv)
    for name, value in expected.items():
        torch.testing.assert_close(sliced[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("fusion", ["statistics", "prologue_statistics"])
@pytest.mark.parametrize("shape", [GPU_CONV_SHAPES["b3-7x5-s2"],
                                   GPU_CONV_SHAPES["b8-56x56-s1-64to128-large"]],
                         ids=["small-tiles", "large-tiles"])
def test_cuda_conv_bn_train_is_conv_then_finalize(fusion, momentum, shape,
                                                  poisoned_cuda_memory):
    # The same epilogue partials merged in the same order by the finalize's merge and by
    # cuda_conv's: bitwise equal, and so within eager's error wherever cuda_conv is
    # (test_cuda_conv_forward_and_backward_within_eager_error).
    arguments = _conv_bn_train_arguments(fusion, "cuda", torch.bfloat16, momentum, **shape)
    x, weight, stride, in_scale, in_shift, bn_weight, bn_bias, eps, *state, _ = arguments
    bn_weight, bn_bias = bn_weight.float(), bn_bias.float()
    state[:2] = [t.float() for t in state[:2]]
    expected_state = [t.clone() for t in state]
    y, mean, var = cuda_ops.cuda_conv(x, weight, stride, in_scale, in_shift, None, None, None,
                                      False, True)
    expected = (y, mean, var, *torch.ops.fused_resnet.bn_train_finalize(
        mean, var, bn_weight, bn_bias, eps, *expected_state, momentum, y.numel() // y.shape[1]))
    got = torch.ops.fused_resnet.cuda_conv_bn_train(x, weight, stride, in_scale, in_shift,
                                                    bn_weight, bn_bias, eps, *state, momentum)
    for name, a, b in zip(("y", "mean", "var", "scale", "shift"), got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [GPU_CONV_SHAPES["b1-9x7-s1"],
                                   GPU_CONV_SHAPES["b8-56x56-s1-64to128-large"]],
                         ids=["small-tiles", "large-tiles"])
def test_cuda_dgrad_epilogue_applies_the_prologue_backward_as_its_pass(shape,
                                                                        poisoned_cuda_memory):
    # At stride 1 the dgrad's epilogue does what affine_relu_backward's pass does after the
    # plain dgrad: the same products of the same rounded gradient, so grad_x is bitwise
    # equal; the sums are merged in another order (rounding only).
    arguments = _conv_arguments("prologue", torch.bfloat16, "cuda", **shape)
    x, weight, scale, shift = (arguments[k] for k in ("x", "weight", "in_scale", "in_shift"))
    y = cuda_ops.cuda_conv(**arguments)[0]
    grad = torch.randn_like(y)
    fused = torch.ops.fused_resnet.cuda_conv_dgrad(grad, weight, x, 1, scale, shift)
    plain = torch.ops.fused_resnet.cuda_conv_dgrad(grad, weight, x, 1, None, None)[0]
    separate = cuda_ops.affine_relu_backward(plain, x, scale.float(), shift.float())
    torch.testing.assert_close(fused[0], separate[0], rtol=0, atol=0)
    torch.testing.assert_close(fused[1:], separate[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [GPU_CONV_SHAPES["b3-7x5-s2"],
                                   GPU_CONV_SHAPES["b8-56x56-s1-64to128-large"]],
                         ids=["small-tiles", "large-tiles"])
def test_cuda_conv_statistics_stay_exact_when_the_mean_dwarfs_the_spread(dtype, shape):
    # A conv output of mean 1000 and unit spread per channel (a shift folded into one
    # input channel that is 1 everywhere): the epilogue's Welford states and their merge
    # must keep the variance (a sum of squares would lose it entirely in fp32).
    arguments = _conv_arguments("statistics", torch.float64, "cuda", **shape)
    arguments["x"][:, 0] = 1.0
    arguments["weight"][:, 0] = 0.0
    arguments["weight"][:, 0, 1, 1] = 1000.0
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
    y, mean, var = cuda_ops.cuda_conv(**cast)
    expected_mean, expected_var = reference.batch_statistics(y.double())
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_channel_stats_stay_exact_when_the_mean_dwarfs_the_spread(dtype):
    x = (1000 + torch.randn(4, 16, 9, 9, device="cuda")).to(dtype)
    mean, var = cuda_ops.cuda_channel_stats(x)
    expected_mean, expected_var = reference.batch_statistics(x.double())
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_bn_finalize_matches_reference(running_dtype):
    mean, var, weight, bias = _finalize_arguments("cuda", torch.float32, channels=200)
    scale, shift = torch.ops.fused_resnet.bn_scale_shift(mean, var, weight, bias, 1e-5)
    expected = reference.scale_shift_from_statistics(mean, var, weight, bias, 1e-5)
    torch.testing.assert_close((scale, shift), expected)
    running = [torch.randn(200, device="cuda").to(running_dtype) for _ in range(2)]
    expected = [t.clone() for t in running]
    torch.ops.fused_resnet.bn_update_running_stats(mean, var, *running, 0.1, 7)
    reference.blend_running_stats(mean, var, *expected, 0.1, 7)
    torch.testing.assert_close(running, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
def test_cuda_statistics_backward_within_eager_error(dtype, scaled, poisoned_cuda_memory):
    # A mean of 1000 standard deviations: y - mean must be taken in fp32, per element.
    y64 = torch.randn(3, 24, 7, 5, dtype=torch.float64, device="cuda") + 1000.0
    vectors = [y64.mean((0, 2, 3))] + [torch.randn(24, dtype=torch.float64, device="cuda")
                                       for _ in range(2)]
    grad_scale = torch.rand(24, dtype=torch.float64, device="cuda") + 0.5 if scaled else None
    grad64 = torch.randn_like(y64)
    truth = {"grad": op_reference.statistics_backward(grad64, y64, *vectors, grad_scale)}
    cast = [t.to(dtype) for t in (grad64, y64)]
    floats = [v.float() for v in vectors] + [None if grad_scale is None else grad_scale.float()]
    eager = {"grad": op_reference.statistics_backward(*cast, *floats)}
    fused = {"grad": cuda_ops.statistics_backward(*cast, *floats)}
    assert fused["grad"].is_contiguous(memory_format=torch.channels_last)
    assert errors_beyond_eager(fused, eager, truth) == []


@pytest.mark.gpu
@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_cuda_add_relu_backward_is_both_single_input_passes(projection, poisoned_cuda_memory):
    # The same masked pass, merged in the same order: bitwise what two single-input calls
    # give (which test_cuda_block_within_eager_error checks against fp64).
    grad, output, x, residual = (torch.randn(3, 24, 7, 5, device="cuda", dtype=torch.bfloat16)
                                 .contiguous(memory_format=torch.channels_last)
                                 for _ in range(4))
    scale = torch.rand(24, device="cuda") + 0.5
    residual_scale = torch.rand(24, device="cuda") + 0.5 if projection else None
    fused = cuda_ops.add_relu_backward(grad, output, x, scale, residual, residual_scale)
    main = cuda_ops.affine_relu_backward(grad, x, scale, None, output)
    shortcut = cuda_ops.affine_relu_backward(grad, residual, residual_scale, None, output)
    for got, expected in zip(fused, (*main, shortcut[0], shortcut[1])):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_bn_train_finalize_matches_reference(momentum, running_dtype):
    mean, var, weight, bias = _finalize_arguments("cuda", torch.float32, channels=1500)
    states = [[torch.randn(1500, device="cuda").to(running_dtype),
               (torch.rand(1500, device="cuda") + 1).to(running_dtype),
               torch.tensor(6, device="cuda")] for _ in range(2)]
    got = torch.ops.fused_resnet.bn_train_finalize(mean, var, weight, bias, 1e-5, *states[0],
                                                   momentum, 9)
    expected = op_reference.bn_train_finalize(mean, var, weight, bias, 1e-5, *states[1],
                                              momentum, 9)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(states[0], states[1])


@pytest.mark.gpu
@pytest.mark.parametrize("affine", [True, False])
def test_cuda_bn_statistics_backward_is_its_two_ops_in_one_pass(affine, poisoned_cuda_memory):
    # bn_scale_shift_backward, then statistics_backward, on a y of mean 1000 per channel
    # (y - mean taken in fp32 per element in both): the same formulas, one pass.
    y = (torch.randn(3, 24, 7, 5, device="cuda") + 1000).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    mean, var = reference.batch_statistics(y.float())
    weight, bias = ((torch.rand(24, device="cuda") + 0.5, torch.randn(24, device="cuda"))
                    if affine else (None, None))
    grads = [torch.randn(24, device="cuda") for _ in range(2)]
    fused = torch.ops.fused_resnet.bn_statistics_backward(grad, y, *grads, mean, var, weight,
                                                          bias, 1e-5)
    grad_mean, grad_var, grad_weight, grad_bias = torch.ops.fused_resnet.bn_scale_shift_backward(
        *grads, mean, var, weight, bias, 1e-5)
    expected = [cuda_ops.statistics_backward(grad, y, mean, grad_mean, grad_var), grad_weight,
                grad_bias]
    # The same fp32 formulas in both; the compiler may contract them into FMAs differently,
    # so the results may differ by rounding: within an ulp of bf16, fp32 ulps for the rest.
    torch.testing.assert_close(fused[0], expected[0], rtol=2 ** -8, atol=0)
    torch.testing.assert_close(fused[1:], expected[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_bn_scale_shift_backward_matches_reference():
    mean, var, weight, bias = _finalize_arguments("cuda", torch.float32, channels=200)
    grads = [torch.randn(200, device="cuda") for _ in range(2)]
    got = torch.ops.fused_resnet.bn_scale_shift_backward(*grads, mean, var, weight, bias, 1e-5)
    expected = op_reference.bn_scale_shift_backward(*grads, mean, var, weight, bias, 1e-5)
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("stat_dtype, param_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16), (torch.float16, torch.float32)], ids=str)
def test_cuda_bn_scale_shift_reads_every_dtype(stat_dtype, param_dtype):
    """A .half()/.bfloat16() module's running statistics and parameters are read as they
    are (no conversion launch first), mixed dtypes too, and strided vectors; fp32
    results within fp32 rounding of the reference on the same values."""
    mean, var, weight, bias = _finalize_arguments("cuda", torch.float32, channels=400)
    stats = [t.to(stat_dtype)[::2] for t in (mean, var)]
    params = [t.to(param_dtype)[::2] for t in (weight, bias)]
    scale, shift = torch.ops.fused_resnet.bn_scale_shift(*stats, *params, 1e-5)
    assert scale.dtype == torch.float32 and scale.shape == (200,)
    expected = reference.scale_shift_from_statistics(*stats, *[p.float() for p in params],
                                                     1e-5)
    torch.testing.assert_close((scale, shift), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_BLOCK_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "non_contiguous"])
def test_cuda_block_within_eager_error(case, dtype, layout, poisoned_cuda_memory):
    compare_with_reference(case, dtype, "cuda", layout, "cuda")


@pytest.mark.gpu
def test_cuda_block_is_clean_under_compute_sanitizer(tmp_path):
    """memcheck on a small training step and an inference step of a projection block."""
    import shutil
    import subprocess
    import sys
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not shutil.which(sanitizer):
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "step.py"
    script.write_text(
        "import torch, fused_resnet\n"
        "block = fused_resnet.Bottleneck(16, 8, stride=2, backend='cuda').cuda().half()\n"
        "x = torch.randn(3, 16, 7, 5, device='cuda').half().requires_grad_()\n"
        "block(x).float().sum().backward()\n"
        "block.eval()\n"
        "with torch.no_grad():\n"
        "    block(x)\n"
        "torch.cuda.synchronize()\n")
    result = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
                             sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
