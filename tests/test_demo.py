"""The README's main job without a GPU: ``python -m fused_resnet.demo`` passes for the
seeds and thread counts a user may have, and fails on a converted model that computes
something else."""

import os
import subprocess
import sys

import pytest

from fused_resnet import demo, reference


@pytest.mark.parametrize("seed, threads", [(0, 1), (0, 2), (0, 4), (1, 2), (2, 2), (3, 1)])
def test_demo_passes_for_any_seed_and_thread_count(seed, threads):
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    run = subprocess.run([sys.executable, "-m", "fused_resnet.demo", "--seed", str(seed)],
                         capture_output=True, text=True, env=environment, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "same function: 322 tensors in fp64" in run.stdout
    assert run.stdout.count("MATCH") == 2 and "MISMATCH" not in run.stdout


def test_demo_fails_when_the_converted_model_computes_something_else(monkeypatch, capsys):
    # The converted (reference backend) blocks normalize with 10x the BatchNorm eps; the
    # original torchvision blocks are untouched.
    real_batch_norm = reference.batch_norm

    def wrong_eps(x, bn, *args, **kwargs):
        return real_batch_norm(x, bn._replace(eps=bn.eps * 10), *args, **kwargs)

    monkeypatch.setattr(reference, "batch_norm", wrong_eps)
    assert demo.main([]) == 1
    output = capsys.readouterr().out
    assert "same function: 322 tensors in fp64 (outputs in train and eval, every gradient, " \
           "every running statistic): MISMATCH" in output
