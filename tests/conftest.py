import math
import os
import warnings

import torch
import torch._functorch.config

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which
# has to be chosen before fused_resnet (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# AOTAutograd's on-disk cache keys a compiled graph by its forward only, so a changed
# backward formula of one of the project's ops would be served from an older run's
# cache (seen: a clone at an older commit running a newer checkout's backward op).
torch._functorch.config.enable_autograd_cache = False

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=6, derandomize=True, deadline=None)
settings.register_profile("long", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_quiet_auto_backend():
    torch.manual_seed(0)
    # The one-time 'auto' fallback warning is tested on its own in test_backends.py.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fused_resnet: backend='auto'")
        yield


@pytest.fixture
def device():
    """Where the Triton kernels run: the GPU, or the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fill every tensor from torch.empty/empty_like with NaN, so that an element a kernel
    forgets to write shows up in the comparison instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
