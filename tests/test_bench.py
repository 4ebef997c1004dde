"""The benchmark CLI on a tiny CPU workload: output format, JSON, failing contenders."""

import json

import torch

from fused_resnet import bench, reference

TINY = ["--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--warmup", "0",
        "--iterations", "2"]


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    assert bench.main(TINY + ["--contenders", "eager", "reference", "cuda",
                              "--json", str(path)]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "CPU figures say nothing about GPU speed" in out
    assert "contender" in out and "images/s" in out and "vs eager" in out
    data = json.loads(path.read_text())
    assert {"device", "torch", "triton", "cuda", "commit"} <= set(data["environment"])
    assert data["workload"]["model"] == "resnet18"
    results = {r["contender"]: r for r in data["results"]}
    assert results["eager"]["speedup_vs_eager"] == 1.0
    assert results["reference"]["images_per_s"] > 0
    assert results["reference"]["q1_s"] <= results["reference"]["median_s"] \
        <= results["reference"]["q3_s"]
    if not torch.cuda.is_available():
        assert "cuda" in results["cuda"]["error"] and "images_per_s" not in results["cuda"]


def test_a_wrong_contender_gets_its_error_and_no_number(monkeypatch, capsys):
    real = reference.basic_block
    monkeypatch.setattr(reference, "basic_block", lambda *a, **k: real(*a, **k) * 1.5)
    bench.main(TINY + ["--mode", "eval", "--contenders", "eager", "reference"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("reference")][0]
    assert "output differs from eager" in line


def test_bad_arguments_are_rejected(capsys):
    import pytest
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--batch-size", "0"])
    assert "--batch-size must be at least 1" in capsys.readouterr().err
