import warnings

import pytest
import torch


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
