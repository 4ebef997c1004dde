"""Which module structures the fused blocks compute exactly, and how to read them.

A block is described by a :class:`BlockSpec`: its convolutions in order, the norm paired
with each, where the stride sits, and whether BN-ReLU comes before (pre-activation) or
after (post-activation) each conv. :func:`block_problem` checks a module against a spec
and returns the reason it does not match, or None; the fused modules call it on
construction and the converter on every candidate. :func:`block_arguments` reads a
matching module into the keyword arguments of the block functions of
:mod:`fused_resnet.reference` (and of every backend).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import nn

from fused_resnet.reference import BatchNormParams, Projection


class BlockSpec(NamedTuple):
    function: str                 # name of the block function in reference and backends
    convs: tuple[str, ...]        # conv attribute names, in order
    kernels: tuple[int, ...]      # their kernel sizes
    norms: tuple[str, ...]        # the norm paired with each conv
    strided: str                  # the conv that carries the block's stride
    pre_act: bool                 # norm before its conv (pre-act) or after it (post-act)


BASIC = BlockSpec("basic_block", ("conv1", "conv2"), (3, 3), ("bn1", "bn2"), "conv1", False)
BOTTLENECK = BlockSpec("bottleneck", ("conv1", "conv2", "conv3"), (1, 3, 1),
                       ("bn1", "bn2", "bn3"), "conv2", False)
PRE_ACT_BASIC = BlockSpec("preact_basic_block", ("conv1", "conv2"), (3, 3),
                          ("norm1", "norm2"), "conv1", True)
PRE_ACT_BOTTLENECK = BlockSpec("preact_bottleneck", ("conv1", "conv2", "conv3"), (1, 3, 1),
                               ("norm1", "norm2", "norm3"), "conv2", True)
SPECS = (BOTTLENECK, BASIC, PRE_ACT_BOTTLENECK, PRE_ACT_BASIC)  # most specific first


def _qualified_name(module: object) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_timm_relu_batch_norm(norm: nn.Module) -> bool:
    # timm's BatchNormAct2d is BatchNorm2d followed by `drop` and `act`; with an identity
    # drop and a plain ReLU it is exactly relu(bn(x)), what a pre-activation block applies.
    return (_qualified_name(norm) == "timm.layers.norm_act.BatchNormAct2d"
            and type(getattr(norm, "drop", None)) is nn.Identity
            and type(getattr(norm, "act", None)) is nn.ReLU)


# The children the known forwards call as their activation (torchvision's `relu`, timm
# ResNet's `act1`..`act3`): the fused block applies a ReLU there, so only an exact
# nn.ReLU may fill them (an nn.Identity there means no activation at all).
ACTIVATION_SLOTS = ("relu", "act1", "act2", "act3")


def _is_inert(module: Optional[nn.Module]) -> bool:
    """True for the children a block may hold beside convs, norms and activations
    without changing what the fused block computes: identities, no-op drops."""
    if module is None or type(module) is nn.Identity:
        return True
    return type(module).__name__ == "DropPath" and getattr(module, "drop_prob", None) == 0.0


def conv_problem(name: str, conv: Optional[nn.Module], kernel: int) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{name} is {type(conv).__name__}, expected nn.Conv2d"
    # Dilation before padding: a dilated conv's padding is off too, the dilation is the cause.
    expected = {"kernel_size": (kernel, kernel), "dilation": (1, 1),
                "padding": (kernel // 2, kernel // 2), "groups": 1, "padding_mode": "zeros"}
    for attribute, value in expected.items():
        if getattr(conv, attribute) != value:
            return f"{name}.{attribute}={getattr(conv, attribute)!r}, expected {value!r}"
    if conv.bias is not None:
        return f"{name} has a bias, expected bias=False"
    if conv.stride[0] != conv.stride[1]:
        return f"{name}.stride={conv.stride}, expected equal strides"
    return None


def norm_problem(name: str, norm: Optional[nn.Module], channels: int,
                 pre_act: bool) -> Optional[str]:
    if not (type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm)
            or (pre_act and _is_timm_relu_batch_norm(norm))):
        return (f"{name} is {type(norm).__name__}, expected plain nn.BatchNorm2d or "
                "nn.SyncBatchNorm")
    if norm.num_features != channels:
        return f"{name}.num_features={norm.num_features}, expected {channels}"
    return None


def _post_act_projection_layers(downsample: nn.Module) -> list[nn.Module]:
    # timm's downsample Sequentials may hold an nn.Identity beside the conv and the norm.
    if type(downsample) is not nn.Sequential:
        return []
    return [m for m in downsample if type(m) is not nn.Identity]


def projection_conv(downsample: nn.Module, pre_act: bool) -> Optional[nn.Module]:
    """The conv of a projection shortcut, whatever wraps it."""
    if pre_act:
        return getattr(downsample, "conv", None)
    layers = _post_act_projection_layers(downsample)
    return layers[0] if layers else None


def projection_problem(downsample: nn.Module, spec: BlockSpec, in_channels: int,
                       out_channels: int, stride: int) -> Optional[str]:
    if any(isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) for m in downsample.modules()):
        return (f"downsample ({type(downsample).__name__}) average-pools before its 1x1 "
                "conv (the ResNet-D shortcut), which the fused blocks do not compute")
    if spec.pre_act:
        # A pre-activation projection is a bare 1x1 conv (timm DownsampleConv(preact=True)).
        # timm's DownsampleAvg without pooling (stride 1) is the same 1x1 conv.
        if _qualified_name(downsample) not in ("timm.models.resnetv2.DownsampleConv",
                                               "timm.models.resnetv2.DownsampleAvg",
                                               "fused_resnet.plain.PreActProjection"):
            return f"downsample is {type(downsample).__name__}, expected a 1x1 conv projection"
        if type(getattr(downsample, "norm", None)) not in (type(None), nn.Identity):
            return "downsample has a norm, a pre-activation projection has none"
    else:
        layers = _post_act_projection_layers(downsample)
        if len(layers) != 2:
            return (f"downsample is {type(downsample).__name__}, "
                    "expected nn.Sequential(nn.Conv2d 1x1, nn.BatchNorm2d)")
        problem = norm_problem("downsample norm", layers[1], out_channels, False)
        if problem:
            return problem
    conv = projection_conv(downsample, spec.pre_act)
    problem = conv_problem("downsample conv", conv, 1)
    if problem:
        return problem
    if (conv.in_channels, conv.out_channels, conv.stride[0]) != (in_channels, out_channels,
                                                                 stride):
        return (f"downsample conv maps {conv.in_channels}->{conv.out_channels} channels with "
                f"stride {conv.stride[0]}, expected {in_channels}->{out_channels}, "
                f"stride {stride}")
    return None


def block_problem(block: nn.Module, spec: BlockSpec) -> Optional[str]:
    """Why ``block`` does not have the structure ``spec`` describes, or None if it does."""
    children = dict(block.named_children())
    for name, kernel in zip(spec.convs, spec.kernels):
        problem = conv_problem(name, children.get(name), kernel)
        if problem:
            return problem
    convs = [children[name] for name in spec.convs]
    for previous, following, name in zip(convs, convs[1:], spec.convs[1:]):
        if previous.out_channels != following.in_channels:
            return (f"{name}.in_channels={following.in_channels}, expected "
                    f"{previous.out_channels} (the previous conv's output)")
    for conv_name, conv in zip(spec.convs, convs):
        if conv_name != spec.strided and conv.stride != (1, 1):
            return (f"{conv_name}.stride={conv.stride}, expected (1, 1): the fused block "
                    f"strides in {spec.strided} only")
    for norm_name, conv in zip(spec.norms, convs):
        channels = conv.in_channels if spec.pre_act else conv.out_channels
        problem = norm_problem(norm_name, children.get(norm_name), channels, spec.pre_act)
        if problem:
            return problem
    in_channels, out_channels = convs[0].in_channels, convs[-1].out_channels
    stride = children[spec.strided].stride[0]
    downsample = children.get("downsample")
    if downsample is None:
        if (in_channels, stride) != (out_channels, 1):
            return (f"no downsample, but the block maps {in_channels}->{out_channels} "
                    f"channels with stride {stride}")
    else:
        problem = projection_problem(downsample, spec, in_channels, out_channels, stride)
        if problem:
            return problem
    known = set(spec.convs) | set(spec.norms) | {"downsample"}
    for name, child in children.items():
        if name in ACTIVATION_SLOTS:
            if type(child) is not nn.ReLU:
                return (f"{name} is {type(child).__name__}, expected nn.ReLU: the block "
                        "applies it as its activation")
        elif name not in known and not _is_inert(child):
            return f"{name} ({type(child).__name__}) has no fused counterpart"
    return None


def hook_problem(block: nn.Module) -> Optional[str]:
    """Why ``block`` cannot be fused because of a hook on it or inside it, or None."""
    for name, module in block.named_modules():
        if any(getattr(module, kind) for kind in HOOK_KINDS):
            return f"a hook is registered on {name or 'the block'}; a fused block would skip it"
    return None


def block_arguments(block: nn.Module, spec: BlockSpec) -> dict:
    """Keyword arguments of the block function ``spec.function`` read from ``block``."""
    arguments = {name: getattr(block, name).weight for name in spec.convs}
    arguments.update({name: BatchNormParams.from_module(getattr(block, name))
                      for name in spec.norms})
    arguments["stride"] = getattr(block, spec.strided).stride[0]
    downsample = getattr(block, "downsample", None)
    if downsample is None:
        arguments["shortcut"] = None
    else:
        conv = projection_conv(downsample, spec.pre_act)
        bn = (None if spec.pre_act
              else BatchNormParams.from_module(_post_act_projection_layers(downsample)[1]))
        arguments["shortcut"] = Projection(conv.weight, bn)
    return arguments


_CONV_CONFIGURATION = ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                       "dilation", "groups", "padding_mode")
_NORM_CONFIGURATION = ("num_features", "affine", "track_running_stats")
# The hook dictionaries of a module that run when it is called.
HOOK_KINDS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _configuration(module: nn.Module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return (*(getattr(module, a) for a in _CONV_CONFIGURATION), module.bias is None)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return tuple(getattr(module, a) for a in _NORM_CONFIGURATION)
    return ()


def snapshot(block: nn.Module) -> tuple:
    """What a fused block's computation assumes beyond the values it reads at each call:
    for every submodule, its name, class (a parametrization changes it), the number of
    hooks of each kind on it (pruning adds one) and, for convs and norms, their
    configuration. Cheap to take (attribute reads, no structural check), and equal
    between a block and its deep copy or unpickled copy."""
    return tuple((name, type(module), tuple(len(getattr(module, h)) for h in HOOK_KINDS),
                  _configuration(module))
                 for name, module in block.named_modules() if module is not block)


def describe_change(built: tuple, now: tuple) -> str:
    """What differs between two snapshots of a block, in words."""
    before, after = ({name: rest for name, *rest in s} for s in (built, now))
    changes = [f"{name} was added" for name in after.keys() - before.keys()]
    changes += [f"{name} was removed" for name in before.keys() - after.keys()]
    for name in before.keys() & after.keys():
        (old_type, old_hooks, old_config), (new_type, new_hooks, new_config) = (
            before[name], after[name])
        if old_type is not new_type:
            changes.append(f"{name} is now {new_type.__name__} (was {old_type.__name__})")
        elif old_hooks != new_hooks:
            changes.append(f"{name}'s hooks changed (forward, backward, or pre-hooks)")
        elif old_config != new_config:
            changes.append(f"{name}'s configuration changed")
    return "; ".join(sorted(changes))
