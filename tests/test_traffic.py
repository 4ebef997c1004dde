"""The traffic counter (``fused_resnet.bench.traffic``, ``bench --traffic``): its counts
against a count by hand, and the counted ResNet-50 training step and eval forward of each
fused plan against eager's (the gate that keeps a change from adding traffic)."""

import json

import pytest
import torch
from torch import nn

from fused_resnet.bench import cli, traffic, workloads


def _bytes(*shapes, dtype=torch.float32):
    return sum(torch.Size(s).numel() for s in shapes) * torch.finfo(dtype).bits // 8


def test_conv_relu_step_matches_a_count_by_hand():
    n, c, k, h, w = 3, 5, 7, 9, 11
    with torch.device("meta"):
        module = nn.Sequential(nn.Conv2d(c, k, 3, padding=1, bias=False), nn.ReLU())
        x = torch.empty(n, c, h, w, requires_grad=True)
        grad = torch.empty(n, k, h, w)
    x_shape, w_shape, y_shape = (n, c, h, w), (k, c, 3, 3), (n, k, h, w)

    def step():
        module(x).backward(grad)

    counted = traffic.count(module, step, [x, grad])
    # convolution: x, w -> y; relu: y -> z; threshold_backward: grad, z -> gz;
    # convolution_backward: gz, x, w -> gx, gw (the bias gradient is not asked for).
    assert counted["launches"] == 4, counted["by_op"]
    assert counted["bytes"] == _bytes(x_shape, w_shape, y_shape, y_shape, y_shape,
                                      y_shape, y_shape, y_shape, y_shape, x_shape, w_shape,
                                      x_shape, w_shape)
    # relu saves its output; the conv saves x and w, which existed before the step.
    assert counted["saved_bytes"] == _bytes(y_shape)
    # y and z are live together; gz, gx, gw at most add to them.
    assert _bytes(y_shape, y_shape) <= counted["peak_bytes"] <= _bytes(
        y_shape, y_shape, y_shape, x_shape, w_shape)


def test_views_and_allocations_are_not_launches():
    with torch.device("meta"):
        x = torch.empty(4, 6)
    counted = traffic.count(nn.Identity(), lambda: (x.view(2, 12).t(), torch.empty(3)), [x])
    assert counted["launches"] == 0 and counted["bytes"] == 0


def test_cli_writes_one_record_per_contender_and_mode(tmp_path, capsys):
    path = tmp_path / "traffic.json"
    assert cli.main(["--traffic", "--model", "resnet18", "--batch-size", "2",
                     "--image-size", "32", "--contenders", "eager", "reference",
                     "--json", str(path)]) == 0
    records = json.loads(path.read_text())["results"]
    assert [(r["contender"], r["mode"]) for r in records] == [
        ("eager", "train"), ("reference", "train"), ("eager", "eval"), ("reference", "eval")]
    for r in records:
        assert {"launches", "bytes", "saved_bytes", "peak_bytes"} <= r.keys()
        assert r["launches"] > 0 and r["bytes"] > 0
    assert records[0]["saved_bytes"] > 0 and records[2]["saved_bytes"] == 0
    assert "resnet18 train batch 2" in capsys.readouterr().out


def test_cli_refuses_compiled_contenders():
    with pytest.raises(SystemExit):
        cli.parse_args(["--traffic", "--contenders", "eager", "compile"])


# --- the gate: ResNet-50, batch 256, bf16, channels_last ----------------------------------

def _resnet50_counts() -> dict:
    args = cli.parse_args(["--traffic"])
    results = {}
    for workload in cli.build_workloads(args, "meta"):
        for name in ("eager", "triton", "cuda"):
            module = workloads.contender_module(name, workload.module)
            try:
                results[name, workload.mode] = traffic.count_workload(module, workload)
            except Exception as error:  # the cuda plan needs the built extension
                results[name, workload.mode] = error
    return results


@pytest.fixture(scope="module")
def resnet50_counts():
    return _resnet50_counts()


def _ratio(counts, backend, mode, key):
    fused = counts[backend, mode]
    if isinstance(fused, Exception):
        pytest.skip(f"the {backend} plan cannot be counted here: {fused}")
    return fused[key] / counts["eager", mode][key]


# Ceilings: the plans' ratios to eager as counted at this commit, rounded up. A change
# that adds traffic fails here; lower a ceiling when the plan improves.
CEILINGS = {("train", "launches"): {"triton": 4.70, "cuda": 4.11},
            ("train", "bytes"): {"triton": 0.995, "cuda": 2.38},
            ("train", "saved_bytes"): {"triton": 0.85, "cuda": 0.85},
            ("eval", "launches"): {"triton": 3.31, "cuda": 1.23},
            ("eval", "bytes"): {"triton": 0.446, "cuda": 0.446}}
# Issue #12's targets for the plans, and those not met yet (strict xfails: a plan that
# meets one fails its xfail, and the mark comes off).
TARGETS = {("train", "launches"): 1.0, ("train", "bytes"): 0.8,
           ("train", "saved_bytes"): 0.85, ("eval", "launches"): 1.0, ("eval", "bytes"): 0.5}
NOT_MET = {
    ("triton", "train", "launches"): "per-channel BatchNorm finalize (scale/shift, running "
    "statistics) and its autograd run as chains of small aten ops",
    ("triton", "eval", "launches"): "per-channel scale/shift folding runs as small aten ops",
    ("triton", "train", "bytes"): "the statistics gradient is a separate pass, and the "
    "BN-add-ReLU backward writes a gradient the next conv's backward reads back",
    ("cuda", "train", "launches"): "as triton",
    ("cuda", "eval", "launches"): "as triton",
    ("cuda", "train", "bytes"): "the statistics gradient is a chain of fp32 aten ops "
    "(the triton plan has one kernel for it) and the statistics a separate read",
}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode, key", list(CEILINGS))
def test_plan_adds_no_traffic(resnet50_counts, backend, mode, key):
    assert _ratio(resnet50_counts, backend, mode, key) <= CEILINGS[mode, key][backend]


@pytest.mark.parametrize("backend, mode, key", [
    pytest.param(backend, mode, key, marks=pytest.mark.xfail(
        strict=True, reason=f"issue #12: {NOT_MET[backend, mode, key]}"))
    if (backend, mode, key) in NOT_MET else (backend, mode, key)
    for backend in ("triton", "cuda") for mode, key in TARGETS])
def test_plan_meets_the_target(resnet50_counts, backend, mode, key):
    assert _ratio(resnet50_counts, backend, mode, key) <= TARGETS[mode, key]
