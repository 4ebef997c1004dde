"""What the benchmark runs: a whole model or one block shape, in one mode, and the
module each contender times.

A model workload is a fused ResNet from :mod:`fused_resnet.models`; its training step is
forward, backward and an SGD step. A block workload is one distinct block shape of such a
model (the first block of a stage, with its projection and stride, or the identity blocks
that follow it), taken from the model so its input size is what the network feeds it; its
training step is forward and backward with the input's gradient, as inside a network.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet.blocks import FusedBlockMixin
from fused_resnet.testing import ERROR_FACTOR, rms

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "preact_resnet18",
          "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152"]
COMPILED = {"compile": None, "compile-max-autotune": "max-autotune"}
CONTENDERS = ["eager", *COMPILED, "reference", "triton", "cuda"]
MODES = ["train", "eval"]


@dataclass
class Workload:
    model: str                       # e.g. "resnet50"
    block: Optional[str]             # the block's module name ("layer2.0"), None for the model
    description: str                 # what a reader needs to recognise the shape
    mode: str                        # "train" or "eval"
    module: nn.Module                # fused (reference backend), on the device, in the dtype
    input: torch.Tensor
    occurrences: int = 1             # how many blocks of the model have this shape
    flops: Optional[float] = None    # of one step; block workloads only (see roofline)
    min_bytes: Optional[float] = None

    @property
    def name(self) -> str:
        return self.model if self.block is None else f"{self.model}.{self.block}"


def contender_module(name: str, fused: nn.Module) -> nn.Module:
    """The module contender ``name`` runs: the unfused eager module (optionally compiled)
    or a copy of the fused module with every block on backend ``name``."""
    if name == "eager" or name in COMPILED:
        eager = fused_resnet.unfuse(fused)
        return eager if name == "eager" else torch.compile(eager, mode=COMPILED[name])
    return fused_resnet.convert(fused, backend=name)


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return rms(a.double() - b.double()) / max(rms(b), 1e-30)


def checked_output(module: nn.Module, workload: Workload,
                   autocast: Callable[[], AbstractContextManager] = nullcontext,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The output a contender's module is checked on: one forward in the workload's mode
    (with the module and input cast to ``dtype`` when given)."""
    module.train(workload.mode == "train")
    with torch.no_grad(), autocast():
        return module.to(dtype)(workload.input.to(dtype or workload.input.dtype))


class Expected(NamedTuple):
    """What a contender's output is checked against: an fp64 run of the eager module, and
    eager's own relative RMS error to it in the benchmark's precision."""

    truth: torch.Tensor
    eager_error: float


def expected_output(workload: Workload,
                    autocast: Callable[[], AbstractContextManager] = nullcontext) -> Expected:
    eager = contender_module("eager", workload.module)
    truth = checked_output(copy.deepcopy(eager), workload, dtype=torch.float64)
    return Expected(truth, relative_rms(checked_output(eager, workload, autocast), truth))


def check(module: nn.Module, workload: Workload, expected: Expected,
          autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    """The relative RMS error of the module's output to the fp64 run; raises
    AssertionError beyond ``ERROR_FACTOR`` times eager's error in the same precision
    (plus a few ulps of the dtype), the rule of the equivalence tests. The forward runs
    on a copy (compiled modules are checked in place) so that the module keeps the
    weights and running statistics every contender starts from."""
    checked = module if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) \
        else copy.deepcopy(module)
    output = checked_output(checked, workload, autocast)
    error = relative_rms(output, expected.truth)
    bound = ERROR_FACTOR * expected.eager_error + 4 * torch.finfo(output.dtype).eps
    if not error <= bound:  # NaN fails too (see fused_resnet.testing)
        raise AssertionError(f"output's relative RMS error to an fp64 run {error:.2e} > "
                             f"{ERROR_FACTOR} x eager's {expected.eager_error:.2e} + "
                             f"{4 * torch.finfo(output.dtype).eps:.0e}")
    return error


def training_step(module: nn.Module, workload: Workload) -> Callable[[], torch.Tensor]:
    """One training step of ``module`` on the workload's input, as a closure."""
    if workload.block is None:
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)

        def model_step():
            output = module(workload.input)
            output.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return output
        return model_step

    # A block's output gradient comes from the rest of the network: a fixed tensor.
    x = workload.input.detach().requires_grad_()
    grad_output = torch.randn_like(module(x).detach())

    def block_step():
        output = module(x)
        output.backward(grad_output)
        module.zero_grad(set_to_none=True)
        x.grad = None
        return output
    return block_step


def eval_step(module: nn.Module, workload: Workload) -> Callable[[], torch.Tensor]:
    def step():
        with torch.no_grad():
            return module(workload.input)
    return step


def step_function(module: nn.Module, workload: Workload) -> Callable[[], torch.Tensor]:
    module.train(workload.mode == "train")
    return (training_step if workload.mode == "train" else eval_step)(module, workload)


def _build_model(name: str, device, dtype: torch.dtype,
                 memory_format: torch.memory_format) -> nn.Module:
    return getattr(models, name)(backend="reference").to(device, dtype).to(
        memory_format=memory_format)


def model_workload(name: str, mode: str, batch_size: int, image_size: int, device,
                   dtype: torch.dtype, memory_format: torch.memory_format) -> Workload:
    torch.manual_seed(0)
    model = _build_model(name, device, dtype, memory_format)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device,
                         dtype=dtype).contiguous(memory_format=memory_format)
    return Workload(name, None, f"{name} {image_size}x{image_size}", mode, model, images)


def _block_inputs(model: nn.Module, image_size: int) -> dict[str, tuple[int, ...]]:
    """The input shape (batch 1) of every fused block of a meta-device ``model``."""
    shapes = {}
    hooks = [block.register_forward_pre_hook(
        lambda module, args, name=name: shapes.__setitem__(name, tuple(args[0].shape)))
        for name, block in model.named_modules() if isinstance(block, FusedBlockMixin)]
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return shapes


def _conv_outputs(block: FusedBlockMixin,
                  input_shape: tuple[int, ...]) -> dict[str, tuple[nn.Conv2d, torch.Size]]:
    """Each conv of ``block`` by name, with its output shape, from a meta-device run of the
    plain block (the fused block reads the conv weights without calling the convs)."""
    plain_block = fused_resnet.unfuse(copy.deepcopy(block).to("meta")).eval()
    outputs = {}
    hooks = [conv.register_forward_hook(
        lambda module, args, output, name=name: outputs.__setitem__(name,
                                                                    (module, output.shape)))
        for name, conv in plain_block.named_modules() if isinstance(conv, nn.Conv2d)]
    with torch.no_grad():
        plain_block(torch.empty(input_shape, device="meta"))
    for hook in hooks:
        hook.remove()
    return outputs


def block_cost(block: FusedBlockMixin, input_shape: tuple[int, ...],
               dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """FLOPs and the minimal bytes a block moves in one step (the roofline's inputs).

    FLOPs: 2 per multiply-add of every convolution (projection included); a training step
    (forward, dgrad, wgrad) costs three times the forward. Minimal bytes, a lower bound
    for any implementation of the block: the input read once, each main-path conv output
    but the last written once and read once, the output written once, the weights read
    once; the projection's output never leaves the chip (a fusing kernel can compute it
    beside the last conv). Training adds the backward: the output gradient read, the
    input and each intermediate read again, each intermediate's gradient written and
    read, the input gradient written, the weight gradients written. BatchNorm parameters
    and statistics (a few values per channel) are left out.
    """
    convs = _conv_outputs(block, input_shape)
    flops = sum(2 * shape.numel() * conv.in_channels * conv.kernel_size[0]
                * conv.kernel_size[1] for conv, shape in convs.values())
    *inner, last = block.spec.convs
    intermediates = sum(convs[name][1].numel() for name in inner)
    inputs, outputs = torch.Size(input_shape).numel(), convs[last][1].numel()
    weights = sum(conv.weight.numel() for conv, _ in convs.values())
    elements = inputs + 2 * intermediates + outputs + weights
    if mode == "train":
        flops *= 3
        # output gradient read; intermediate gradients written and read; input and
        # weight gradients written
        gradients = outputs + 2 * intermediates + inputs + weights
        elements += inputs + intermediates + gradients
    return float(flops), float(elements * torch.finfo(dtype).bits // 8)


def _shape_key(block: FusedBlockMixin, input_shape: tuple[int, ...]) -> tuple:
    convs = [getattr(block, name) for name in block.spec.convs]
    return (block.spec.function, input_shape, tuple(c.out_channels for c in convs),
            getattr(block, block.spec.strided).stride[0], block.downsample is not None)


def _describe(block: FusedBlockMixin, input_shape: tuple[int, ...]) -> str:
    convs = [getattr(block, name) for name in block.spec.convs]
    stride = getattr(block, block.spec.strided).stride[0]
    shortcut = "projection" if block.downsample is not None else "identity"
    widths = "-".join(str(c) for c in [convs[0].in_channels]
                      + [conv.out_channels for conv in convs])
    return (f"{block.spec.function} {widths} {input_shape[2]}x{input_shape[3]} "
            f"stride {stride} {shortcut}")


def distinct_blocks(model_name: str, image_size: int) -> dict[str, tuple[list[str], tuple]]:
    """The distinct block shapes of ``model_name``: for each, the module names of the
    blocks that have it (the first names the shape) and their input shape at batch 1.
    Computed on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = getattr(models, model_name)(backend="reference")
    input_shapes = _block_inputs(model, image_size)
    shapes: dict[tuple, list[str]] = {}
    for name, shape in input_shapes.items():
        shapes.setdefault(_shape_key(model.get_submodule(name), shape), []).append(name)
    return {names[0]: (names, input_shapes[names[0]]) for names in shapes.values()}


def block_workloads(model_name: str, mode: str, batch_size: int, image_size: int, device,
                    dtype: torch.dtype, memory_format: torch.memory_format,
                    only: Optional[list[str]] = None) -> list[Workload]:
    """One workload per distinct block shape of ``model_name`` (or per shape of the blocks
    in ``only``, by module name such as ``layer2.0``), in network order."""
    shapes = distinct_blocks(model_name, image_size)
    if only is not None:
        known = {name for names, _ in shapes.values() for name in names}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise ValueError(f"{model_name} has no block {', '.join(unknown)}; its blocks "
                             f"are {', '.join(sorted(known))}")
        shapes = {first: shape for first, shape in shapes.items() if set(shape[0]) & set(only)}
    torch.manual_seed(0)
    model = _build_model(model_name, device, dtype, memory_format)
    built = []
    for first, (names, shape) in shapes.items():
        block = model.get_submodule(first)
        input_shape = (batch_size, *shape[1:])
        flops, min_bytes = block_cost(block, input_shape, dtype, mode)
        x = torch.randn(input_shape, device=device, dtype=dtype).contiguous(
            memory_format=memory_format)
        built.append(Workload(model_name, first, _describe(block, shape), mode, block, x,
                              occurrences=len(names), flops=flops, min_bytes=min_bytes))
    return built
