"""``convert`` swaps residual blocks for fused ones; ``unfuse`` gives plain modules back.

A block is swapped only when fused_resnet can vouch that the fused block computes the same
function: its class is one whose ``forward`` is known (torchvision, timm, fused_resnet's
plain blocks) and its children pass :func:`fused_resnet.structure.block_problem`; no
hook sits on it or inside it, and none of its modules is shared with the rest of the
model. The fused block holds the very same child modules, so parameters, buffers and
``state_dict`` keys are unchanged and checkpoints load both ways. Everything else is left
as it is, with the reason in the report.

Neither torchvision nor timm is imported: blocks are recognized by class name and
structure.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

from torch import nn

from fused_resnet import backends, stem, structure
from fused_resnet.blocks import FUSED_BLOCKS, FusedBlockMixin

# Classes whose forward computes exactly the block function of their spec.
KNOWN_BLOCK_CLASSES = {
    "torchvision.models.resnet.BasicBlock": structure.BASIC,
    "timm.models.resnet.BasicBlock": structure.BASIC,
    "fused_resnet.plain.BasicBlock": structure.BASIC,
    "torchvision.models.resnet.Bottleneck": structure.BOTTLENECK,
    "timm.models.resnet.Bottleneck": structure.BOTTLENECK,
    "fused_resnet.plain.Bottleneck": structure.BOTTLENECK,
    "timm.models.resnetv2.PreActBasic": structure.PRE_ACT_BASIC,
    "fused_resnet.plain.PreActBasicBlock": structure.PRE_ACT_BASIC,
    "timm.models.resnetv2.PreActBottleneck": structure.PRE_ACT_BOTTLENECK,
    "fused_resnet.plain.PreActBottleneck": structure.PRE_ACT_BOTTLENECK,
}

# Where convert keeps the block it replaced, so that unfuse can give back the original class.
_ORIGINAL = "_fused_resnet_original"


class SwappedBlock(NamedTuple):
    name: str
    source: str   # class of the original block
    fused: str    # class of the fused block


class LeftBlock(NamedTuple):
    name: str
    source: str
    reason: str


class ConversionReport(NamedTuple):
    """What :func:`convert` swapped and what it left, with the reason."""

    swapped: list[SwappedBlock]
    left: list[LeftBlock]

    def __str__(self) -> str:
        lines = [f"fused_resnet.convert: {len(self.swapped)} blocks swapped, "
                 f"{len(self.left)} left"]
        lines += [f"  swapped {b.name or '(model)'}: {b.source} -> {b.fused}"
                  for b in self.swapped]
        lines += [f"  left    {b.name or '(model)'}: {b.source}: {b.reason}" for b in self.left]
        return "\n".join(lines)


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _looks_like_block(module: nn.Module) -> Optional[structure.BlockSpec]:
    """The spec whose conv and norm names ``module`` has as children, if any. Containers
    (timm's stem is an nn.Sequential with conv1..conv3 and norm1..norm2) run their
    children in a chain, never a residual block."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return None
    children = dict(module.named_children())
    for spec in structure.SPECS:
        if all(name in children for name in spec.convs + spec.norms):
            return spec
    return None


def _shared_problem(block: nn.Module, use_count: dict[int, int]) -> Optional[str]:
    for name, module in block.named_modules(remove_duplicate=False):
        if use_count[id(module)] > 1:
            return (f"{name or 'the block'} is shared with another part of the model; "
                    "swapping it would change that part")
    return None


def _why_not_fusable(block: nn.Module, spec: structure.BlockSpec,
                     use_count: dict[int, int]) -> Optional[str]:
    known_spec = KNOWN_BLOCK_CLASSES.get(_qualified_name(block))
    if known_spec is not spec:
        return (f"class {_qualified_name(block)} is not a block whose forward fused_resnet "
                "knows (torchvision, timm or fused_resnet.plain blocks)")
    return (structure.block_problem(block, spec) or structure.hook_problem(block)
            or _shared_problem(block, use_count))


def _adopt(cls: type[nn.Module], source: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``source``'s children and plain attributes (not copies)."""
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    block.__dict__.update({k: v for k, v in source.__dict__.items() if not k.startswith("_")})
    block._modules.update(source._modules)
    return block


def _fused_from(block: nn.Module, spec: structure.BlockSpec, backend: str) -> nn.Module:
    fused = _adopt(FUSED_BLOCKS[spec], block)
    fused.backend = backend
    fused.record_structure()
    # Kept outside the module tree (no state_dict entries) for unfuse.
    fused.__dict__[_ORIGINAL] = block
    return fused


# Models whose forward applies bn1 + ReLU + maxpool as the BatchNormReLUMaxPool in bn1
# does, when it is one (fused_resnet.models.ResNet).
_STEM_MODELS = {"fused_resnet.models.ResNet"}


def _fuse_stem(model: nn.Module, backend: str, use_count: dict[int, int]) -> None:
    """Swap ``model.bn1`` for a :class:`stem.BatchNormReLUMaxPool` (or move the one there
    to ``backend``) where the stem is the ImageNet one: a plain BN and a 3x3 stride-2
    max-pool, unshared and without hooks."""
    bn, pool = getattr(model, "bn1", None), getattr(model, "maxpool", None)
    if isinstance(bn, stem.BatchNormReLUMaxPool):
        bn.backend = backend
        return
    standard_pool = (type(pool) is nn.MaxPool2d and not pool.ceil_mode
                     and not pool.return_indices and pool.dilation in (1, (1, 1))
                     and all(v in (size, (size, size)) for v, size in zip(
                         (pool.kernel_size, pool.stride, pool.padding), (3, 2, 1))))
    if (type(bn) is nn.BatchNorm2d and standard_pool
            and structure.hook_problem(bn) is None and structure.hook_problem(pool) is None
            and use_count[id(bn)] == 1 and use_count[id(pool)] == 1):
        model.bn1 = stem.fused_from(bn, backend)


def _convert_tree(module: nn.Module, prefix: str, backend: str, use_count: dict[int, int],
                  report: ConversionReport) -> nn.Module:
    """``module`` with every fusable block below it (or itself) swapped, and every block
    that was already fused moved to ``backend``; a stem of :data:`_STEM_MODELS` fused."""
    if _qualified_name(module) in _STEM_MODELS:
        _fuse_stem(module, backend, use_count)
    if isinstance(module, FusedBlockMixin):
        module.backend = backend
        report.swapped.append(SwappedBlock(prefix, _qualified_name(module),
                                           _qualified_name(module)))
        return module
    spec = _looks_like_block(module)
    if spec is not None:
        reason = _why_not_fusable(module, spec, use_count)
        if reason is None:
            fused = _fused_from(module, spec, backend)
            report.swapped.append(SwappedBlock(prefix, _qualified_name(module),
                                               _qualified_name(fused)))
            return fused
        report.left.append(LeftBlock(prefix, _qualified_name(module), reason))
        return module
    for name, child in list(module.named_children()):
        converted = _convert_tree(child, f"{prefix}.{name}" if prefix else name, backend,
                                  use_count, report)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False,
            sync_bn: bool = False, process_group: Optional[object] = None) -> nn.Module:
    """Swap every residual block of ``model`` that can be fused for its fused module.

    Args:
        model: a torchvision ResNet, a timm ResNet or ResNetV2, any model built from such
            blocks, or a single block (then the fused block is returned). Blocks that are
            already fused stay, moved to ``backend``.
        backend: the backend the fused blocks use ("auto", "reference", "triton", "cuda",
            or None to follow the process-wide default).
        inplace: modify ``model`` itself; by default a deep copy is converted.
        sync_bn: also turn every ``nn.BatchNorm2d`` into ``nn.SyncBatchNorm``
            (``nn.SyncBatchNorm.convert_sync_batchnorm``), so that training normalizes
            with the statistics of the whole ``process_group`` (default: the world). The
            fused blocks merge their kernels' per-channel statistics over the group.

    Returns:
        The converted model. Its ``fusion_report`` attribute is a
        :class:`ConversionReport`: every block swapped, every block left and why.
    """
    backends.check_backend_name(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    use_count: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        use_count[id(module)] = use_count.get(id(module), 0) + 1
    report = ConversionReport([], [])
    converted = _convert_tree(model, "", backend, use_count, report)
    if sync_bn:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(converted, process_group)
    converted.fusion_report = report
    return converted


def _unfused(block: FusedBlockMixin) -> nn.Module:
    original = block.__dict__.get(_ORIGINAL)
    if original is None:
        plain = _adopt(block.plain_class, block)
        del plain.backend
        return plain
    # Re-point the original at the fused block's current children, which may have been
    # replaced or reloaded since convert.
    original._modules.update(block._modules)
    original.training = block.training
    return original


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every fused block by a plain eager module holding the same parameters.

    Blocks made by :func:`convert` get their original class back (torchvision, timm);
    blocks built directly get the matching :mod:`fused_resnet.plain` class. For
    TorchScript, ONNX export, or any tool that needs standard modules.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, FusedBlockMixin):
        return _unfused(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FusedBlockMixin):
                setattr(module, child_name, _unfused(child))
            elif isinstance(child, stem.BatchNormReLUMaxPool):
                setattr(module, child_name, stem.plain_from(child))
    return model
