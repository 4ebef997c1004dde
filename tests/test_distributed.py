"""DDP and SyncBatchNorm with fused blocks: two gloo processes on the CPU.

DDP: a converted model trained for a few steps under DistributedDataParallel ends where
the same eager model trained the same way ends. SyncBatchNorm: a model converted with
``sync_bn=True`` normalizes with the statistics of both processes' batches, which is the
math of ``nn.SyncBatchNorm``: the same as one process running the whole batch. (The real
``nn.SyncBatchNorm``, and DDP around it, refuse CPU tensors, so the single-process run is
the comparison: outputs, gradients through the optimizer's updates, running statistics.)
On a GPU the same two processes (both on the one GPU, gloo) also train the model with the
real ``nn.SyncBatchNorm``, in the test's dtype and in fp64, and the fused run is compared
with it.
"""

import os
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fused_resnet
from blockcases import post_act_downsample, randomize_batch_norms
from fused_resnet import plain
from fused_resnet.testing import errors_beyond_eager

WORLD, PER_RANK, STEPS = 2, 3, 3
# fp64 where the backend runs it (exact up to summation order); the triton kernels take
# fp32 at most, whose rounding over three SGD steps stays below these bounds.
DTYPES = {"reference": torch.float64, "triton": torch.float32}
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4,
                                                                             atol=2e-5)}


class Run(NamedTuple):
    """What each of the two processes trains: a converted model of ``channels`` input
    channels on ``backend``, in ``dtype`` on ``device``."""

    backend: str
    dtype: torch.dtype
    sync_bn: bool
    channels: int = 4
    device: str = "cpu"


def _plain_model(channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    c = channels
    return randomize_batch_norms(nn.Sequential(
        plain.BasicBlock(c, c),
        plain.Bottleneck(c, c // 2, stride=2, downsample=post_act_downsample(c, 2 * c, 2)),
        plain.PreActBasicBlock(2 * c, 2 * c)))


def _batches(dtype, channels: int = 4, device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * PER_RANK, channels, 6, 6, generator=generator)
            .to(device, dtype) for _ in range(STEPS)]


def _loss(out: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    return (out * weights.view_as(out)).sum()


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


def _train_torch_sync_batch_norm(run: Run, dtype: torch.dtype, rows) -> dict:
    """The plain model with ``nn.SyncBatchNorm`` (GPU only), trained as the fused one."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_plain_model(run.channels))
    model = model.to(run.device, dtype)
    outputs = _train(model, _batches(dtype, run.channels, run.device), rows,
                     average_gradients=True)
    return {"outputs": outputs, "state": model.state_dict()}


def _worker(rank: int, init_file: str, run: Run, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = _batches(run.dtype, run.channels, run.device)
    fused = fused_resnet.convert(_plain_model(run.channels).to(run.device, run.dtype),
                                 backend=run.backend, sync_bn=run.sync_bn)
    if run.sync_bn:
        # DDP refuses SyncBatchNorm in CPU modules, so the gradients are averaged by hand,
        # as DDP would average them.
        out = {"fused outputs": _train(fused, batches, rows, average_gradients=True)}
    else:
        out = {"fused outputs": _train(DistributedDataParallel(fused), batches, rows)}
    out["fused state"] = fused.state_dict()
    if not run.sync_bn:
        eager = _plain_model(run.channels).to(run.device, run.dtype)
        out["eager outputs"] = _train(DistributedDataParallel(eager), batches, rows)
        out["eager state"] = eager.state_dict()
    elif run.device == "cuda":
        out["torch sync"] = _train_torch_sync_batch_norm(run, run.dtype, rows)
        out["torch sync fp64"] = _train_torch_sync_batch_norm(run, torch.float64, rows)
    torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(tmp_path, run: Run) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "store"), run, str(tmp_path)), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("backend", list(DTYPES))
def test_ddp_training_matches_eager_ddp(tmp_path, backend):
    runs = _spawn(tmp_path, Run(backend, DTYPES[backend], sync_bn=False))
    tolerance = TOLERANCE[DTYPES[backend]]
    for rank, run in enumerate(runs):
        for step, (a, b) in enumerate(zip(run["fused outputs"], run["eager outputs"])):
            torch.testing.assert_close(a, b, **tolerance, msg=f"rank {rank} step {step}")
        for name, value in run["eager state"].items():
            torch.testing.assert_close(run["fused state"][name], value, **tolerance,
                                       msg=f"rank {rank} {name}")


@pytest.mark.parametrize("backend", list(DTYPES))
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(tmp_path, backend):
    runs = _spawn(tmp_path, Run(backend, DTYPES[backend], sync_bn=True))
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


def _flatten(run: dict) -> dict[str, torch.Tensor]:
    tensors = {f"step {step} output": out for step, out in enumerate(run["outputs"])}
    tensors.update({f"state {name}": value for name, value in run["state"].items()})
    return tensors


@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype", [("triton", torch.float32),
                                            ("triton", torch.float16),
                                            ("cuda", torch.float16)],
                         ids=["triton-fp32", "triton-fp16", "cuda-fp16"])
def test_sync_batch_norm_matches_torch_sync_batch_norm(tmp_path, backend, dtype):
    # 16 channels: the cuda backend takes multiples of 8 only.
    runs = _spawn(tmp_path, Run(backend, dtype, sync_bn=True, channels=16, device="cuda"))
    for rank, run in enumerate(runs):
        fused = _flatten({"outputs": run["fused outputs"], "state": run["fused state"]})
        if dtype == torch.float32:
            torch.testing.assert_close(fused, _flatten(run["torch sync"]),
                                       **TOLERANCE[dtype], msg=f"rank {rank}")
        else:
            assert errors_beyond_eager(fused, _flatten(run["torch sync"]),
                                       _flatten(run["torch sync fp64"])) == [], f"rank {rank}"


def test_convert_with_sync_bn_keeps_blocks_fused():
    model = fused_resnet.convert(_plain_model(), backend="reference", sync_bn=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.SyncBatchNorm for m in norms)
    assert len(model.fusion_report.swapped) == 3
    # Outside a process group SyncBatchNorm normalizes locally, as nn.SyncBatchNorm does.
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(model(x), _plain_model()(x))
