"""Loading of the compiled extension ``fused_resnet._C``.

The package works without the extension (reference and Triton paths); whatever needs it
asks :func:`load_error` or :func:`require` and gets the reason it is missing. Loading is
lazy, so ``import fused_resnet`` never touches the CUDA runtime.
"""

from __future__ import annotations

from typing import Optional

import torch

_NOT_TRIED = "not tried yet"
# None once loaded, else why not; set by the first load_error() call.
_load_error: Optional[str] = _NOT_TRIED


def _load() -> Optional[str]:
    try:
        from fused_resnet import _C  # noqa: F401  (importing registers the ops)
    except ImportError as error:
        return (f"{error}; build it with `pip install --no-build-isolation -e .` where nvcc "
                "is available (see the README)")
    from fused_resnet import cuda_ops

    cuda_ops.register_python_parts()
    return None


# Under torch.compile the answer is taken at trace time as a constant: loading (an import
# and op registrations) is not something to trace.
@torch.compiler.assume_constant_result
def load_error() -> Optional[str]:
    """None once ``fused_resnet._C`` is loaded and its ops registered, else why it is not."""
    global _load_error
    if _load_error is _NOT_TRIED:
        _load_error = _load()
    return _load_error


def require() -> None:
    """Raise a RuntimeError saying why the extension is unavailable, if it is."""
    error = load_error()
    if error is not None:
        raise RuntimeError(f"the C++/CUDA extension fused_resnet._C is not available: {error}")
