"""The training script (fused_resnet.train) on synthetic data: its outputs, the compare
mode's figures, an exact resume, deterministic data, and its argument errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from fused_resnet import plain, reference, train, train_data, train_report

# 16x16 images: ResNet-18's last stage runs at 2x2, a step takes about 0.1 s on one core.
TINY = ["--fake-data", "32", "--batch-size", "16", "--image-size", "16", "--epochs", "2"]
RECORD_KEYS = {"epoch", "backend", "train_loss", "train_acc", "test_loss", "test_acc",
               "images_per_s", "lr", "seconds"}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the same reduction order in every run (a bitwise resume), and no
    oversubscription of a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, *argv, name="out"):
    """main() with the tiny workload on the CPU (unless argv says otherwise); the history."""
    out = tmp_path / name
    assert train.main(TINY + ["--device", "cpu", "--out", str(out), *argv]) == 0
    return train_report.read_log(out / "log.jsonl"), out


def test_a_run_writes_its_log_table_chart_and_checkpoint(tmp_path, capsys):
    history, out = run(tmp_path, "--backend", "eager", "--schedule", "cosine")
    assert [(r["epoch"], r["backend"]) for r in history] == [(1, "eager"), (2, "eager")]
    for record in history:
        assert set(record) == RECORD_KEYS
        assert math.isfinite(record["train_loss"]) and 0 <= record["test_acc"] <= 1
        assert record["images_per_s"] > 0 and record["seconds"] > 0
    assert history[1]["lr"] < history[0]["lr"]  # cosine decay
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| epoch | train loss |") and len(table) == 4
    assert table[3].startswith("| 2 | ") and table[3] in capsys.readouterr().out
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arguments = json.loads((out / "run.json").read_text())
    assert arguments["arguments"]["backend"] == "eager"
    assert {"torch", "commit"} <= set(arguments["environment"])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and set(checkpoint["runs"]) == {"eager"}
    assert train_report.main([str(out / "log.jsonl")]) == 0
    assert table[3] in capsys.readouterr().out


def test_fused_runs_start_from_the_weights_of_eager(tmp_path):
    eager, _ = run(tmp_path, "--backend", "eager", "--fp64", "--epochs", "1", name="eager")
    fused, _ = run(tmp_path, "--backend", "reference", "--fp64", "--epochs", "1", name="ref")
    assert math.isclose(eager[0]["train_loss"], fused[0]["train_loss"], rel_tol=1e-12)


def test_compare_eager_and_reference_in_fp64_agree_to_rounding(tmp_path, capsys):
    history, out = run(tmp_path, "--compare", "eager,reference", "--fp64")
    assert [r["backend"] for r in history] == ["eager", "reference"] * 2
    for eager, fused in zip(history[::2], history[1::2]):
        assert eager["weight_rel_diff"] == fused["weight_rel_diff"] < 1e-13
        for key in ("train_loss", "test_loss"):
            assert math.isclose(eager[key], fused[key], rel_tol=1e-12)
        assert eager["train_acc"] == fused["train_acc"] and fused["images_per_s"] > 0
    header = (out / "summary.md").read_text().splitlines()[0]
    assert "train loss (reference)" in header and "weight rel. diff" in header
    assert (out / "curves.png").stat().st_size > 0


def test_compare_sees_a_backend_that_computes_something_else(tmp_path, monkeypatch):
    real = reference.basic_block
    monkeypatch.setattr(reference, "basic_block", lambda *a, **k: real(*a, **k) * (1 + 1e-6))
    history, _ = run(tmp_path, "--compare", "eager,reference", "--fp64", "--epochs", "1")
    assert history[0]["weight_rel_diff"] > 1e-9


def tiny_resnet() -> nn.Module:
    """A stem, a projection block (8 -> 16 channels) and an identity block: what the
    Triton interpreter trains in seconds (ResNet-18's 512-channel blocks take minutes per
    step there)."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), plain.BasicBlock(8, 16, 2, downsample),
                         plain.BasicBlock(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_compare_eager_and_triton_follow_the_same_training(tmp_path, device):
    torch.manual_seed(0)
    model = tiny_resnet()
    args = train.parse_args(["--compare", "eager,triton", "--fake-data", "8", "--batch-size",
                             "4", "--image-size", "8", "--epochs", "1", "--device", device,
                             "--out", str(tmp_path)])
    eager, fused = train.train(args, model)
    assert eager["weight_rel_diff"] < 1e-6  # two steps in fp32; observed 3e-8
    assert math.isclose(eager["train_loss"], fused["train_loss"], rel_tol=1e-5)
    assert math.isclose(eager["test_loss"], fused["test_loss"], rel_tol=1e-4)


def test_a_resumed_run_ends_as_the_uninterrupted_run(tmp_path):
    whole, whole_out = run(tmp_path, "--backend", "eager", name="whole")
    first, first_out = run(tmp_path, "--backend", "eager", "--stop-after", "1", name="first")
    assert len(first) == 1
    resumed, resumed_out = run(tmp_path, "--backend", "eager", "--resume",
                               str(first_out / "checkpoint.pt"), name="resumed")
    timing = {"images_per_s", "seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in whole]
    ends = [torch.load(out / "checkpoint.pt", weights_only=True)["runs"]["eager"]
            for out in (whole_out, resumed_out)]
    for key, value in ends[0]["model"].items():
        assert torch.equal(value, ends[1]["model"][key]), key
    momenta = [[s["momentum_buffer"] for s in end["optimizer"]["state"].values()] for end in ends]
    assert all(torch.equal(a, b) for a, b in zip(*momenta))
    assert ends[0]["scheduler"] == ends[1]["scheduler"]


def test_resuming_another_run_names_what_differs(tmp_path, capsys):
    _, out = run(tmp_path, "--backend", "eager", "--epochs", "1")
    assert train.main(TINY + ["--backend", "eager", "--lr", "0.5", "--device", "cpu",
                              "--resume", str(out / "checkpoint.pt"),
                              "--out", str(tmp_path / "again")]) == 2
    assert "--lr 0.1 (now 0.5)" in capsys.readouterr().err


def test_data_order_and_augmentation_depend_on_seed_epoch_and_sample_only():
    images, labels = train_data.fake_data(16, 8, seed=3)
    again, _ = train_data.fake_data(16, 8, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 8, 8)
    assert torch.equal(images, again) and not torch.equal(images, train_data.fake_data(16, 8, 4)[0])
    dataset = train_data.Images(images, labels, seed=0, pad=1)
    assert all(torch.equal(dataset[(2, i)][0], dataset[(2, i)][0]) for i in range(16))
    assert any(not torch.equal(dataset[(1, i)][0], dataset[(2, i)][0]) for i in range(16))
    sampler = train_data.EpochSampler(16, seed=0)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(i for _, i in order) == list(range(16)) and order == list(sampler)
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != [i for _, i in order]


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "16"], "--image-size needs --fake-data"),
    (["--compare", "reference,triton"], "expected eager,BACKEND"),
    (["--compare", "eager"], "expected eager,BACKEND"),
    (["--fake-data", "8", "--batch-size", "16"], "fewer images than one batch"),
    (["--backend", "eager", "--compare", "eager,reference"], "not allowed with argument"),
    (["--amp", "bf16", "--fp64"], "not allowed with argument"),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet7"], "--model 'resnet7': expected one of resnet18"),
    (["--model", "torchvision:nonet"], "--model 'torchvision:nonet'"),
    (["--fake-data", "0"], "--fake-data must be at least 1"),
])
def test_bad_models_are_refused_with_the_reason(argv, message, capsys):
    try:
        code = train.main(argv + ["--device", "cpu"])
    except SystemExit as exit:
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err


def test_missing_cifar10_names_the_directory_and_the_ways_out(tmp_path, capsys):
    assert train.main(["--backend", "eager", "--device", "cpu", "--data", str(tmp_path),
                       "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"--data {tmp_path}: no CIFAR-10 there" in error
    assert "--download" in error and "--fake-data" in error


def test_the_module_runs_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "fused_resnet.train", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--compare eager,BACKEND" in result.stdout and "--fake-data N" in result.stdout


@pytest.mark.gpu
def test_compare_eager_and_triton_on_a_gpu_in_bf16(tmp_path):
    history, _ = run(tmp_path, "--compare", "eager,triton", "--amp", "bf16",
                     "--channels-last", "--device", "cuda", "--fake-data", "256",
                     "--batch-size", "64", "--image-size", "32", "--epochs", "1")
    eager, fused = history
    # Four bf16 steps: the weights move by a few percent, bf16 rounding differs in a few
    # percent of that.
    assert eager["weight_rel_diff"] < 1e-2
    assert abs(eager["train_loss"] - fused["train_loss"]) < 0.05 * eager["train_loss"]
