"""Property tests: hypothesis draws block configurations and checks the fused backends
against the reference (fp64 truth, error within 2x the reference backend's in the drawn
dtype, in a majority of three draws of weights and input).

Profiles (conftest.py): "ci" (default) is derandomized with a few examples, because the
Triton interpreter is slow; HYPOTHESIS_PROFILE=long draws many more for manual runs.
"""

import copy

import pytest
import torch
from hypothesis import given, strategies as st

import fused_resnet
from blockcases import build_plain, run_steps
from fused_resnet import backends, structure
from fused_resnet.testing import errors_beyond_eager_redrawing

# bf16 products are wrong under the Triton interpreter (DESIGN.md): GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available()
                                           else [])


@st.composite
def block_configs(draw):
    kind = draw(st.sampled_from(["basic", "bottleneck", "preact_basic", "preact_bottleneck"]))
    stride = draw(st.sampled_from([1, 2]))
    in_channels = draw(st.integers(2, 9))
    # A pre-activation bottleneck's middle width is width // 4; at least 2 channels there.
    width = draw(st.integers(8 if kind == "preact_bottleneck" else 2, 9))
    out_channels = width * 4 if kind == "bottleneck" else width
    # Pre-activation blocks project exactly when needed; post-activation ones may always.
    projection = stride != 1 or in_channels != out_channels or (
        not kind.startswith("preact") and draw(st.booleans()))
    case = (kind, in_channels, width, stride, projection)
    shape = (draw(st.integers(2, 3)), draw(st.integers(3, 6)), draw(st.integers(3, 6)))
    return case, shape, draw(st.sampled_from(["train", "eval"])), draw(st.sampled_from(DTYPES))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@given(config=block_configs())
def test_fused_backend_matches_reference_on_drawn_blocks(backend, config):
    case, (batch, h, w), mode, dtype = config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Up to three draws of weights and input (fixed seeds: hypothesis replays an example
    # the same way), re-drawn only where the first has a tensor beyond the bound: one draw
    # of a tensor with a handful of elements cannot fail it (errors_beyond_eager_redrawing;
    # the long profile found a 6-element fp32 weight gradient at 3.4x in one draw, within
    # 2x in the nine others).
    def draw(seed):
        torch.manual_seed(seed)
        block = build_plain(case).to(device)
        x = torch.randn(batch, case[1], h, w, device=device)
        fused_block = fused_resnet.convert(copy.deepcopy(block).to(dtype), backend=backend)
        reason = backends.BACKENDS[backend].why_not(
            x.to(dtype), structure.block_arguments(fused_block, fused_block.spec), False)
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")
        steps = [(x, mode)]
        truth = run_steps(fused_resnet.convert(copy.deepcopy(block).double(),
                                               backend="reference"), steps)
        eager = run_steps(fused_resnet.convert(block.to(dtype), backend="reference"), steps)
        return run_steps(fused_block, steps), eager, truth

    assert errors_beyond_eager_redrawing(draw) == []
