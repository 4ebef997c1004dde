"""Backend registry and selection: ``reference``, ``triton``, ``cuda`` and ``auto``.

Every backend provides the four block functions of :mod:`fused_resnet.reference` with
the same signatures. A block module asks :func:`select` for the backend that runs it:

* an explicit backend that cannot run the block raises :class:`BackendUnavailableError`
  saying which backend and why; it never silently runs another one;
* ``auto`` takes the first backend of :data:`AUTO_ORDER` that can run the block and
  warns once per distinct reason about each backend it skipped.

Precedence: a module's own ``backend=`` wins; a module built with ``backend=None``
follows the process-wide default, set by :func:`set_backend` or, for a ``with`` block,
:func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import nn

from fused_resnet import cuda_ops, extension, reference
from fused_resnet.fused_blocks import FusedBlocks

try:
    from fused_resnet import triton_ops
    from fused_resnet.kernels.tuning import INTERPRETED as _TRITON_INTERPRETED
    _TRITON_IMPORT_ERROR: Optional[str] = None
    _TRITON_BLOCKS: Optional[FusedBlocks] = FusedBlocks(triton_ops.KERNELS)
except ImportError as error:  # triton missing or too old: the other backends still work
    _TRITON_INTERPRETED = False
    _TRITON_IMPORT_ERROR = f"triton could not be imported ({error})"
    _TRITON_BLOCKS = None

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")
# Fastest first, by design intent: no GPU measurement exists yet. A per-shape routing
# table measured by the benchmark replaces this (issue #5).
AUTO_ORDER = ("cuda", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this block; the message says why."""


class Backend(NamedTuple):
    name: str
    # why_not(x, arguments, for_auto) -> None when the backend can run the block function
    # on ``x`` with ``arguments`` (those of fused_resnet.structure.block_arguments), else
    # the reason; ``for_auto`` adds the reasons to skip it in 'auto' only (too slow).
    why_not: Callable[[torch.Tensor, dict, bool], Optional[str]]
    # The four block functions, same signatures as fused_resnet.reference (the module
    # itself, or a FusedBlocks); None when the backend cannot be imported (its why_not then
    # always gives a reason).
    functions: Optional[Union[types.ModuleType, FusedBlocks]]


def conv_weights(arguments: dict) -> list[torch.Tensor]:
    """The convolution weights among a block function's arguments, projection included."""
    weights = [v for v in arguments.values() if isinstance(v, torch.Tensor)]
    if arguments.get("shortcut") is not None:
        weights.append(arguments["shortcut"].weight)
    return weights


def _reference_why_not(x: torch.Tensor, arguments: dict, for_auto: bool) -> Optional[str]:
    return None


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Where the fused backends run: CUDA, the CPU under the Triton interpreter (triton only),
# and the meta device, where every op runs its fake (shape-only) implementation: what the
# benchmark's traffic counter (fused_resnet.bench.traffic) counts on.
_FUSED_DEVICES = ("cpu", "cuda", "meta")


def _triton_why_not(x: torch.Tensor, arguments: dict, for_auto: bool) -> Optional[str]:
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    if x.device.type == "cpu" and not _TRITON_INTERPRETED:
        return ("the input is on the CPU; Triton runs CPU tensors only under its interpreter "
                "(set TRITON_INTERPRET=1 before importing fused_resnet)")
    if for_auto and x.device.type == "cpu":
        return ("the Triton interpreter runs CPU tensors for testing, far slower than the "
                "reference; ask for backend='triton' explicitly to use it")
    if x.device.type not in _FUSED_DEVICES:
        return f"the input is on {x.device}, the triton backend runs CUDA tensors"
    if x.dtype not in _TRITON_DTYPES:
        return f"the input dtype is {x.dtype}; the triton kernels take float32, float16, bfloat16"
    if x.dtype == torch.bfloat16 and _TRITON_INTERPRETED and x.device.type == "cpu":
        return "bfloat16 tl.dot gives wrong results under the Triton interpreter"
    mismatched = [w.dtype for w in conv_weights(arguments) if w.dtype != x.dtype]
    if mismatched:
        return f"the input is {x.dtype} but conv weights are {mismatched[0]}"
    return None


_CUDA_DTYPES = (torch.float16, torch.bfloat16)
# CUTLASS's kernels move 16-byte vectors of channels (8 fp16/bf16 values).
_CUDA_CHANNEL_MULTIPLE = 8


def _cuda_why_not(x: torch.Tensor, arguments: dict, for_auto: bool) -> Optional[str]:
    load_error = extension.load_error()
    if load_error is not None:
        return f"the C++/CUDA extension fused_resnet._C is not available ({load_error})"
    # Every reason at once, the device first: fixing one and then meeting the next
    # (a dtype, then the device) is what a user of an fp32 CPU model would otherwise get.
    reasons = []
    if x.device.type not in _FUSED_DEVICES[1:]:
        reasons.append(f"the input is on {x.device}, the cuda backend needs CUDA tensors")
    elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(x.device)
        reasons.append(f"{x.device} ({torch.cuda.get_device_name(x.device)}) has compute "
                       f"capability {major}.{minor}; the cuda backend's CUTLASS kernels need "
                       "8.0 (Ampere) or newer")
    weights = conv_weights(arguments)
    mismatched = [w.dtype for w in weights if w.dtype != x.dtype]
    if x.dtype not in _CUDA_DTYPES:
        reasons.append(f"the input dtype is {x.dtype}; the cuda backend's CUTLASS "
                       "tensor-core kernels take float16 and bfloat16 (use autocast or "
                       ".half()/.bfloat16())")
    elif mismatched:
        reasons.append(f"the input is {x.dtype} but conv weights are {mismatched[0]}")
    channels = sorted({x.shape[1]} | {c for w in weights for c in w.shape[:2]})
    odd = [c for c in channels if c % _CUDA_CHANNEL_MULTIPLE]
    if odd:
        reasons.append(f"channel counts {odd} are not multiples of "
                       f"{_CUDA_CHANNEL_MULTIPLE}, which the CUTLASS kernels need")
    if for_auto:
        reasons.append("the cuda backend has not yet run its GPU test suite on real "
                       "hardware (issue #4); ask for backend='cuda' explicitly to use it")
    return "; ".join(reasons) or None


BACKENDS = {
    "reference": Backend("reference", _reference_why_not, reference),
    "triton": Backend("triton", _triton_why_not, _TRITON_BLOCKS),
    "cuda": Backend("cuda", _cuda_why_not, FusedBlocks(cuda_ops.KERNELS)),
}

_default_backend = "auto"
_warned: set[str] = set()


def check_backend_name(name: Optional[str], argument: str = "backend",
                       allow_none: bool = True) -> None:
    if name in BACKEND_NAMES or (name is None and allow_none):
        return
    expected = ", ".join(repr(n) for n in BACKEND_NAMES) + (" or None" if allow_none else "")
    raise ValueError(f"{argument}={name!r} is not a backend; expected one of {expected}")


def get_backend() -> str:
    """The process-wide default backend used by modules built with ``backend=None``."""
    return _default_backend


def set_backend(name: str) -> None:
    """Set the process-wide default backend."""
    global _default_backend
    check_backend_name(name, "name", allow_none=False)
    _default_backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the default backend inside a ``with`` block, then restore the old one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(block: nn.Module, x: torch.Tensor, arguments: dict,
           requested: Optional[str]) -> Backend:
    """The backend that runs ``block`` on ``x`` with its block function's ``arguments``
    (see the module docstring for the rules)."""
    name = requested or get_backend()
    block_name = type(block).__name__
    if name != "auto":
        backend = BACKENDS[name]
        reason = backend.why_not(x, arguments, False)
        if reason is not None:
            raise BackendUnavailableError(f"backend={name!r} cannot run {block_name}: {reason}")
        return backend
    if x.device.type == "cpu":
        # 'auto' runs CPU tensors on the reference: the fused backends run CUDA tensors
        # (the Triton interpreter is for tests). The reasons each of them would give (a
        # dtype, TRITON_INTERPRET) suggest changes that would not help here.
        _warn_once(f"fused_resnet: backend='auto' runs {block_name} on 'reference': the "
                   "input is on the CPU, and the fused backends ('cuda', 'triton') run "
                   "CUDA tensors; move the model and its input to a GPU to use them")
        return BACKENDS["reference"]
    skipped = []
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        reason = backend.why_not(x, arguments, True)
        if reason is None:
            if skipped:
                _warn_once(f"fused_resnet: backend='auto' runs {block_name} on {candidate!r}; "
                           + "; ".join(skipped))
            return backend
        skipped.append(f"{candidate!r} skipped: {reason}")
    raise AssertionError("the reference backend runs every block")
