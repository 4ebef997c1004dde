"""The four drop-in fused residual blocks.

Each subclasses its plain counterpart in :mod:`fused_resnet.plain`, so constructor
arguments, attribute names and ``state_dict`` keys are those of torchvision (post-
activation) and timm ``resnetv2`` (pre-activation); only ``forward`` differs: it reads
the parameters into the block function of the selected backend (see
:mod:`fused_resnet.backends`). Every block takes one more keyword argument, ``backend``
("auto", "reference", "triton", "cuda", or None to follow the process-wide default).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from fused_resnet import backends, plain, structure


@torch.compiler.assume_constant_result
def _has_autocast(device_type: str) -> bool:
    """Whether ``device_type`` has autocast at all (``torch.is_autocast_enabled`` raises for
    those without, e.g. the benchmark's meta tensors). A constant for ``torch.compile``:
    Dynamo in torch 2.11 cannot trace ``torch.amp.is_autocast_available`` (graph break
    gb0007)."""
    return torch.amp.is_autocast_available(device_type)


class FusedBlockMixin:
    """``forward`` and backend handling shared by the four fused blocks."""

    spec: structure.BlockSpec
    plain_class: type[nn.Module]

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        backends.check_backend_name(backend)
        self.backend = backend
        problem = structure.block_problem(self, self.spec)
        if problem is not None:
            raise ValueError(f"{type(self).__name__} cannot be fused: {problem}")
        self.record_structure()

    def record_structure(self) -> None:
        """Remember the structure the block is fused for (see :func:`structure.snapshot`):
        a forward after a change to it runs the plain module computation instead."""
        self.__dict__["_built_from"] = structure.snapshot(self)

    @property
    def in_channels(self) -> int:
        return getattr(self, self.spec.convs[0]).in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            # FX symbolic tracing (torchvision's create_feature_extractor) records the
            # plain computation; to keep the block fused in the graph instead, trace it as
            # a leaf module.
            return self.plain_class.forward(self, x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected input of shape "
                             f"(N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        now = structure.snapshot(self)
        if now != self._built_from:
            # Changed since it was fused: still fusable (SyncBatchNorm conversion, an
            # equivalent replacement) or not (then the plain module computes).
            problem = structure.block_problem(self, self.spec) or structure.hook_problem(self)
            if problem is not None:
                return self._plain_forward(x, now, problem)
            if not torch.compiler.is_compiling():
                self.__dict__["_built_from"] = now
        arguments = structure.block_arguments(self, self.spec)
        device_type = x.device.type
        if _has_autocast(device_type) and torch.is_autocast_enabled(device_type):
            return self._autocast_forward(x, arguments)
        return self._run(x, arguments)

    def _plain_forward(self, x: torch.Tensor, now: tuple, problem: str) -> torch.Tensor:
        """The plain module computation over the block's children as they are now: what
        the model computes after a hook, a parametrization or a replaced child that the
        fused block cannot compute. Warns once per block; under ``torch.compile`` (which
        notices the change and retraces into this path) without a warning, which Dynamo
        cannot trace."""
        if not torch.compiler.is_compiling() and not self.__dict__.get("_warned_change"):
            self.__dict__["_warned_change"] = True
            change = structure.describe_change(self._built_from, now)
            warnings.warn(
                f"fused_resnet: this {type(self).__name__} changed after it was fused "
                f"({change}) and cannot be fused as it is now ({problem}), so it runs as "
                "the plain module. Undo the change, or re-convert once it is final: model = "
                "fused_resnet.convert(fused_resnet.unfuse(model)).", stacklevel=3)
        return self.plain_class.forward(self, x)

    def _run(self, x: torch.Tensor, arguments: dict) -> torch.Tensor:
        backend = backends.select(self, x, arguments, self.backend)
        if x.shape[0] == 0:  # nothing to compute: no kernel launches on an empty grid
            backend = backends.BACKENDS["reference"]
        return getattr(backend.functions, self.spec.function)(x, **arguments)

    def _autocast_forward(self, x: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The block under ``torch.autocast``: convolutions in the autocast dtype, as eager
        PyTorch runs them, with BatchNorm parameters and statistics kept in their own
        dtype. The output dtype is eager's: the autocast dtype, promoted with the input's
        when the identity shortcut adds the input itself."""
        dtype = torch.get_autocast_dtype(x.device.type)
        for name in self.spec.convs:
            arguments[name] = arguments[name].to(dtype)
        if arguments["shortcut"] is not None:
            arguments["shortcut"] = arguments["shortcut"]._replace(
                weight=arguments["shortcut"].weight.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            out = self._run(x.to(dtype), arguments)
        output_dtype = dtype if self.downsample is not None else torch.promote_types(dtype,
                                                                                     x.dtype)
        return out.to(output_dtype)

    def __prepare_scriptable__(self) -> nn.Module:
        # Called by torch.jit.script, which cannot compile the fused forward (backend
        # dispatch, custom ops). Returning the plain module here would unfuse the caller's
        # model in place (torch.jit.script swaps in what this returns), so say what to do.
        raise RuntimeError(
            f"torch.jit.script cannot compile fused_resnet's {type(self).__name__}: script "
            "fused_resnet.unfuse(model) instead, a copy with plain modules and the same "
            "parameter values (or use torch.compile / torch.export on the fused model)")

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class BasicBlock(FusedBlockMixin, plain.BasicBlock):
    """Fused post-activation BasicBlock; arguments as torchvision's, plus ``backend``."""

    spec = structure.BASIC
    plain_class = plain.BasicBlock


class Bottleneck(FusedBlockMixin, plain.Bottleneck):
    """Fused post-activation Bottleneck v1.5; arguments as torchvision's, plus ``backend``."""

    spec = structure.BOTTLENECK
    plain_class = plain.Bottleneck


class PreActBasicBlock(FusedBlockMixin, plain.PreActBasicBlock):
    """Fused pre-activation BasicBlock; arguments as :class:`plain.PreActBasicBlock`."""

    spec = structure.PRE_ACT_BASIC
    plain_class = plain.PreActBasicBlock


class PreActBottleneck(FusedBlockMixin, plain.PreActBottleneck):
    """Fused pre-activation Bottleneck; arguments as :class:`plain.PreActBottleneck`."""

    spec = structure.PRE_ACT_BOTTLENECK
    plain_class = plain.PreActBottleneck


FUSED_BLOCKS = {cls.spec: cls for cls in (BasicBlock, Bottleneck, PreActBasicBlock,
                                          PreActBottleneck)}
