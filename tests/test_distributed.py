"""DDP and SyncBatchNorm with fused blocks: two gloo processes on the CPU.

DDP: a converted model trained for a few steps under DistributedDataParallel ends where
the same eager model trained the same way ends. SyncBatchNorm: a model converted with
``sync_bn=True`` normalizes with the statistics of both processes' batches, which is the
math of ``nn.SyncBatchNorm``: the same as one process running the whole batch. (The real
``nn.SyncBatchNorm``, and DDP around it, refuse CPU tensors, so the single-process run is
the comparison: outputs, gradients through the optimizer's updates, running statistics.)
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fused_resnet
from blockcases import post_act_downsample, randomize_batch_norms
from fused_resnet import plain

WORLD, PER_RANK, STEPS = 2, 3, 3
# fp64 where the backend runs it (exact up to summation order); the triton kernels take
# fp32 at most, whose rounding over three SGD steps stays below these bounds.
DTYPES = {"reference": torch.float64, "triton": torch.float32}
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4,
                                                                             atol=2e-5)}


def _plain_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norms(nn.Sequential(
        plain.BasicBlock(4, 4),
        plain.Bottleneck(4, 2, stride=2, downsample=post_act_downsample(4, 8, 2)),
        plain.PreActBasicBlock(8, 8)))


def _batches(dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * PER_RANK, 4, 6, 6, generator=generator).to(dtype)
            for _ in range(STEPS)]


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def _average_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD


def _train(model: nn.Module, batches, rows, average_gradients: bool = False
           ) -> list[torch.Tensor]:
    """SGD steps on ``batches[step][rows]``; the outputs of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs = []
    for batch in batches:
        out = model(batch[rows])
        _loss(out).backward()
        if average_gradients:
            _average_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(out.detach())
    return outputs


def _worker(rank: int, init_file: str, backend: str, sync_bn: bool, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    dtype = DTYPES[backend]
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = _batches(dtype)
    fused = fused_resnet.convert(_plain_model().to(dtype), backend=backend, sync_bn=sync_bn)
    if sync_bn:
        # DDP refuses SyncBatchNorm in CPU modules, so the gradients are averaged by hand,
        # as DDP would average them.
        run = {"fused outputs": _train(fused, batches, rows, average_gradients=True)}
    else:
        run = {"fused outputs": _train(DistributedDataParallel(fused), batches, rows)}
    run["fused state"] = fused.state_dict()
    if not sync_bn:
        eager = _plain_model().to(dtype)
        run["eager outputs"] = _train(DistributedDataParallel(eager), batches, rows)
        run["eager state"] = eager.state_dict()
    torch.save(run, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(tmp_path, backend: str, sync_bn: bool) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "store"), backend, sync_bn, str(tmp_path)),
             nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("backend", list(DTYPES))
def test_ddp_training_matches_eager_ddp(tmp_path, backend):
    runs = _spawn(tmp_path, backend, sync_bn=False)
    tolerance = TOLERANCE[DTYPES[backend]]
    for rank, run in enumerate(runs):
        for step, (a, b) in enumerate(zip(run["fused outputs"], run["eager outputs"])):
            torch.testing.assert_close(a, b, **tolerance, msg=f"rank {rank} step {step}")
        for name, value in run["eager state"].items():
            torch.testing.assert_close(run["fused state"][name], value, **tolerance,
                                       msg=f"rank {rank} {name}")


@pytest.mark.parametrize("backend", list(DTYPES))
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(tmp_path, backend):
    runs = _spawn(tmp_path, backend, sync_bn=True)
    # One process, the whole batch, plain nn.BatchNorm2d; the loss is the sum of the
    # ranks' losses divided by the world size, as DDP averages the ranks' gradients.
    whole = _plain_model().double()
    optimizer = torch.optim.SGD(whole.parameters(), lr=0.05)
    expected_outputs = []
    for batch in _batches(torch.float64):
        out = whole(batch)
        (sum(_loss(out[r * PER_RANK:(r + 1) * PER_RANK]) for r in range(WORLD))
         / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
        expected_outputs.append(out.detach())
    tolerance = TOLERANCE[DTYPES[backend]]
    for rank, run in enumerate(runs):
        for step, output in enumerate(run["fused outputs"]):
            expected = expected_outputs[step][rank * PER_RANK:(rank + 1) * PER_RANK]
            torch.testing.assert_close(output.double(), expected, **tolerance,
                                       msg=f"rank {rank} step {step}")
        for name, value in whole.state_dict().items():
            torch.testing.assert_close(run["fused state"][name].to(value.dtype), value,
                                       **tolerance, msg=f"rank {rank} {name}")


def test_convert_with_sync_bn_keeps_blocks_fused():
    model = fused_resnet.convert(_plain_model(), backend="reference", sync_bn=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.SyncBatchNorm for m in norms)
    assert len(model.fusion_report.swapped) == 3
    # Outside a process group SyncBatchNorm normalizes locally, as nn.SyncBatchNorm does.
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(model(x), _plain_model()(x))
