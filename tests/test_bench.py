"""The benchmark CLI, its block workloads and reports on tiny CPU workloads, and the
pytest-benchmark suites' collection (they skip without a GPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.bench import cli, main, report, workloads

TINY = ["--batch-size", "2", "--image-size", "32", "--warmup", "0", "--iterations", "2"]
ROOT = Path(__file__).resolve().parents[1]


def test_model_run_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    assert main(TINY + ["--model", "resnet18", "--contenders", "eager", "reference", "cuda",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "These timings are not measurements" in out
    assert "resnet18 train batch 2" in out and "images/s" in out and "vs eager" in out
    data = json.loads(path.read_text())
    assert {"device", "driver", "torch", "triton", "cuda", "commit"} <= set(data["environment"])
    assert data["arguments"]["model"] == ["resnet18"] and data["device_limits"] is None
    results = {r["contender"]: r for r in data["results"]}
    assert results["eager"]["speedup_vs_eager"] == 1.0
    ours = results["reference"]
    assert ours["q1_s"] <= ours["median_s"] <= ours["q3_s"]
    assert math.isclose(ours["images_per_s"], 2 / ours["median_s"])
    assert math.isclose(ours["speedup_vs_eager"],
                        ours["images_per_s"] / results["eager"]["images_per_s"])
    if not torch.cuda.is_available():
        assert "cuda" in results["cuda"]["error"] and "images_per_s" not in results["cuda"]


@pytest.mark.parametrize("factor", [1.5, float("nan")])
def test_a_wrong_contender_gets_its_error_and_no_number(factor, monkeypatch, capsys):
    real = reference.basic_block
    monkeypatch.setattr(reference, "basic_block", lambda *a, **k: real(*a, **k) * factor)
    main(TINY + ["--mode", "eval", "--contenders", "eager", "reference"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("reference")][0]
    assert "relative RMS error to an fp64 run" in line


def test_every_mode_batch_and_model_combination_is_a_group(tmp_path, capsys):
    path = tmp_path / "r.json"
    main(TINY[:-2] + ["--iterations", "1", "--model", "resnet18", "preact_resnet18",
                      "--mode", "train", "eval", "--batch-size", "2", "3",
                      "--contenders", "eager", "--json", str(path)])
    keys = [report.group_key(r) for r in json.loads(path.read_text())["results"]]
    assert len(set(keys)) == 8 and ("preact_resnet18", "eval", 3) in keys


@pytest.mark.parametrize("arguments, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--iterations", "0"], "--iterations must be at least 1, got 0"),
    (["--autocast", "--dtype", "fp32"], "--autocast needs --dtype fp16 or bf16"),
])
def test_bad_arguments_are_rejected(arguments, message, capsys):
    with pytest.raises(SystemExit):
        main(TINY + arguments)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_graphs_are_refused_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        main(TINY + ["--cuda-graphs"])
    assert "--cuda-graphs needs a CUDA GPU" in capsys.readouterr().err


def test_an_unknown_block_name_lists_the_blocks(capsys):
    assert main(TINY + ["--block", "layer9.0"]) == 2
    error = capsys.readouterr().err
    assert "resnet18 has no block layer9.0" in error and "layer4.1" in error


def test_autocast_runs_fp32_modules_in_bf16(tmp_path, capsys):
    path = tmp_path / "r.json"
    main(TINY + ["--mode", "eval", "--dtype", "bf16", "--autocast", "--contenders", "eager",
                 "reference", "--json", str(path)])
    results = json.loads(path.read_text())["results"]
    assert all("images_per_s" in r for r in results), results
    assert "bf16 autocast" in capsys.readouterr().out


@pytest.mark.parametrize("model, shapes, blocks", [("resnet50", 8, 16), ("resnet18", 7, 8),
                                                   ("preact_resnet34", 7, 16)])
def test_distinct_block_shapes_cover_the_network(model, shapes, blocks):
    distinct = workloads.distinct_blocks(model, 224)
    assert len(distinct) == shapes
    assert sum(len(names) for names, _ in distinct.values()) == blocks
    # Every stage starts with a new shape; ResNet-50's first stage ends at 56x56.
    assert {"layer1.0", "layer2.0", "layer3.0", "layer4.0"} <= set(distinct)
    assert distinct["layer1.0"][1][2:] == (56, 56) and distinct["layer4.0"][1][2:] == (14, 14)


def test_block_cost_of_a_basic_block_by_hand():
    block = fused_resnet.BasicBlock(8, 8)
    n, c, h, w = 2, 8, 5, 5
    conv_flops = 2 * n * h * w * c * c * 9
    activation, weight = n * c * h * w, c * c * 9
    # fp16: 2 bytes. Forward: input read, the one intermediate written and read, output
    # written, two weights read.
    flops, nbytes = workloads.block_cost(block, (n, c, h, w), torch.float16, "eval")
    assert flops == 2 * conv_flops and nbytes == 2 * (4 * activation + 2 * weight)
    # Backward adds: output gradient read, input and intermediate read again, intermediate
    # gradient written and read, input gradient written, weight gradients written.
    flops, nbytes = workloads.block_cost(block, (n, c, h, w), torch.float16, "train")
    assert flops == 6 * conv_flops
    assert nbytes == 2 * (4 * activation + 2 * weight + 6 * activation + 2 * weight)


def test_block_cost_counts_the_projection_flops_only():
    with_projection = fused_resnet.Bottleneck(
        8, 4, stride=2, downsample=torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False),
                                                       torch.nn.BatchNorm2d(16)))
    flops, _ = workloads.block_cost(with_projection, (1, 8, 6, 6), torch.float32, "eval")
    # conv1 1x1 at 6x6, conv2 3x3 stride 2 to 3x3, conv3 1x1 at 3x3, projection at 3x3
    assert flops == 2 * (36 * 8 * 4 + 9 * 4 * 4 * 9 + 9 * 4 * 16 + 9 * 8 * 16)


def test_block_run_reports_the_roofline_fraction(tmp_path, capsys):
    path, chart = tmp_path / "blocks.json", tmp_path / "blocks.png"
    assert main(TINY + ["--block", "layer2.0", "layer1.1", "--mode", "train", "eval",
                        "--contenders", "eager", "reference", "--json", str(path),
                        "--plot", str(chart)]) == 0
    data = json.loads(path.read_text())
    limits = data["device_limits"]
    assert limits["matmul_flops_per_s"] > 0 and limits["copy_bytes_per_s"] > 0
    # layer1.1 shares its shape with layer1.0, which names it.
    assert {r["block"] for r in data["results"]} == {"layer1.0", "layer2.0"}
    for r in data["results"]:
        bound = max(r["flops"] / limits["matmul_flops_per_s"],
                    r["min_bytes"] / limits["copy_bytes_per_s"])
        assert math.isclose(r["roofline_fraction"], bound / r["median_s"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "roofline" in capsys.readouterr().out


def test_report_renders_a_recorded_run_with_the_reasons_of_failures(tmp_path, capsys,
                                                                    monkeypatch):
    import matplotlib.figure

    path = tmp_path / "r.json"
    main(TINY + ["--mode", "eval", "--contenders", "eager", "reference", "cuda",
                 "--json", str(path)])
    capsys.readouterr()
    drawn = []
    real_text = matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.figure.Figure, "text",
                        lambda self, x, y, s, *a, **k: drawn.append(s) or real_text(
                            self, x, y, s, *a, **k))
    assert report.main([str(path), "--plot", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "| workload | mode | batch | eager | reference | cuda |" in out
    row = [l for l in out.splitlines() if l.startswith("| resnet18 |")][0]
    assert "(1.00x)" in row
    assert (tmp_path / "r.png").stat().st_size > 0
    if not torch.cuda.is_available():
        reason = [r for r in json.loads(path.read_text())["results"]
                  if r["contender"] == "cuda"][0]["error"]
        assert f"error: {reason}"[:60] in row            # the markdown cell says why
        assert any(reason[:60] in text for text in drawn)  # and so does the chart
        assert "timings are not measurements" in out


def test_the_check_is_against_fp64_within_eager_error(tmp_path):
    """NCHW training on CPU with the default image size: the reference was called wrong
    by a fixed tolerance against eager's output, when both were about as far from fp64."""
    path = tmp_path / "r.json"
    main(["--warmup", "0", "--iterations", "1", "--nchw", "--mode", "train",
          "--contenders", "eager", "reference", "--json", str(path)])
    results = {r["contender"]: r for r in json.loads(path.read_text())["results"]}
    assert "error" not in results["reference"], results["reference"]
    assert 0 < results["reference"]["relative_rms_vs_fp64"] < 1e-4


def test_the_json_names_the_fused_resnet_commit_that_ran(tmp_path, monkeypatch):
    """From any directory, even inside an unrelated repository: the commit of the checkout
    the package comes from, and whether its sources have uncommitted changes."""
    unrelated = tmp_path / "other"
    unrelated.mkdir()
    subprocess.run(["git", "init", "-q", str(unrelated)], check=True)
    monkeypatch.chdir(unrelated)
    revision = cli.source_revision()
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()

    own_checkout = (Path(fused_resnet.__file__).resolve().parent == ROOT / "fused_resnet"
                    and git("rev-parse", "--show-toplevel") == str(ROOT.resolve()))
    if own_checkout:
        assert revision["commit"] == git("rev-parse", "HEAD")
        assert isinstance(revision["dirty"], bool)
    else:  # an installed copy, or a copy inside another repository (the oldest-versions
        # leg's build/oldest-tree): no commit to name, since the enclosing one is not its own
        assert revision == {"commit": "unknown", "dirty": None}


def test_benchmark_suites_collect_and_skip_without_a_gpu():
    completed = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q",
                                "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    if not torch.cuda.is_available():
        # 2 models x 2 modes x 6 contenders; (8 + 7) block shapes x 2 batches x 2 x 6.
        assert "384 skipped" in completed.stdout
        assert "no CUDA GPU here" in completed.stdout
