"""``python -m fused_resnet.train`` (also ``fused-resnet-train``): train a ResNet on CIFAR-10
with fused blocks, or two copies of it side by side to check that a fused backend trains
as eager PyTorch does.

Models: the ResNets of :mod:`fused_resnet.models` with the CIFAR stem (``resnet18`` ...,
``preact_resnet18`` ...), or ``torchvision:NAME`` / ``timm:NAME`` converted with
:func:`fused_resnet.convert` (their ImageNet stems run on 32x32 images too). ``--backend
eager`` trains the plain modules; ``reference``, ``triton``, ``cuda`` and ``auto`` the
fused blocks on that backend. Every backend starts from the same weights for a given
``--seed``.

Recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4 on every parameter) with a one-cycle
(default) or cosine learning-rate schedule stepped per batch, cross-entropy loss, random
32x32 crops of the 4-pixel padded image and horizontal flips, CIFAR's mean and std.
``--amp`` runs forward under ``torch.autocast`` (fp16 with a gradient scaler).

``--compare eager,BACKEND`` trains the eager model and a fused copy from the same weights
in lockstep, each batch fed to both, and reports per epoch the losses, accuracies, images/s
of each and the relative difference of their weights, ||w_eager - w_fused|| / ||w_eager||
over all parameters.

``--fake-data N`` replaces CIFAR-10 by N synthetic training images and N/5 test images of
10 classes (a smooth random pattern per class plus noise, drawn from ``--seed``), for
machines without the dataset and for tests; ``--image-size`` shrinks them.

Outputs under ``--out``: ``log.jsonl`` (one record per epoch and model), ``summary.md``
(the table printed at the end), ``curves.png``, ``run.json`` (arguments, environment) and
``checkpoint.pt`` after every epoch. ``--resume CHECKPOINT`` continues a run exactly where it
stopped: the data order and augmentation of a sample depend only on the seed, the epoch and
the sample, never on what ran before. ``--stop-after N`` ends a run after epoch N of
``--epochs`` (to continue it later, e.g. across time-limited sessions).

images/s counts only each model's training steps (forward, backward, optimizer step; on a
GPU synchronized before and after each), not data loading or evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fused_resnet
from fused_resnet import models, train_report
from fused_resnet.backends import BACKEND_NAMES, BackendUnavailableError
from fused_resnet.bench.cli import environment, progress_bar
from fused_resnet.bench.workloads import MODELS
from fused_resnet.train_data import CLASSES, UsageError, data_loaders

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BACKENDS = ("eager", *BACKEND_NAMES)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A resumed run must be the run it continues; the rest (--out, --workers, --stop-after,
# --data) may change between sessions.
MUST_MATCH_ON_RESUME = ("model", "backend", "compare", "epochs", "batch_size", "lr",
                        "schedule", "amp", "fp64", "seed", "fake_data", "image_size")



def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fused-resnet-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18",
                        help=f"one of {', '.join(MODELS)}, torchvision:NAME or timm:NAME "
                        "(default: resnet18)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="eager: plain modules; else fused blocks on this backend "
                      "(default: auto)")
    runs.add_argument("--compare", metavar="eager,BACKEND",
                      help="train eager and a fused copy in lockstep and compare them")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--stop-after", type=int, metavar="EPOCH",
                        help="stop after this epoch (the schedule still spans --epochs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--amp", choices=AMP_DTYPES, help="autocast dtype (default: fp32)")
    precision.add_argument("--fp64", action="store_true",
                           help="train in float64, to compare a backend with eager without "
                           "fp32 rounding (the reference backend runs it, the kernels do not)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model(s)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--workers", type=int,
                        help="data loader processes (default: 4 on cuda, 0 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="data", help="CIFAR-10 directory (default: data)")
    parser.add_argument("--download", action="store_true",
                        help="download CIFAR-10 into --data when it is not there")
    parser.add_argument("--fake-data", type=int, metavar="N",
                        help="N synthetic training images instead of CIFAR-10")
    parser.add_argument("--image-size", type=int, help="side of the --fake-data images "
                        "(default: 32, CIFAR's)")
    parser.add_argument("--out", help="output directory (default: runs/MODEL_BACKEND)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what parse_args cannot, and fill in the defaults that depend on the rest."""
    for name in ("epochs", "batch_size", "fake_data", "image_size", "stop_after"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")
    if args.image_size is not None and args.fake_data is None:
        parser.error("--image-size needs --fake-data: CIFAR-10 images are 32x32")
    if args.fake_data is not None and args.fake_data < args.batch_size:
        parser.error(f"--fake-data {args.fake_data} is fewer images than one batch "
                     f"(--batch-size {args.batch_size})")
    if args.compare is not None:
        eager, _, other = args.compare.partition(",")
        if eager != "eager" or other not in BACKEND_NAMES:
            parser.error(f"--compare {args.compare!r}: expected eager,BACKEND with BACKEND "
                         f"one of {', '.join(BACKEND_NAMES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available")
    if args.workers is None:
        args.workers = 4 if torch.device(args.device).type == "cuda" else 0
    if args.image_size is None:
        args.image_size = 32
    if args.out is None:
        label = args.compare.replace(",", "-vs-") if args.compare else args.backend
        args.out = f"runs/{args.model.replace(':', '-')}_{label}"


def backends_of(args: argparse.Namespace) -> list[str]:
    """The runs' names: one backend, or eager and the fused backend compared with it."""
    return args.compare.split(",") if args.compare else [args.backend]


def normalized(images: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """uint8 images on the device as normalized floats, in the model's memory format."""
    images = images.to(args.device, non_blocking=True).to(dtype(args)).div_(255)
    mean = torch.tensor(CIFAR_MEAN, device=args.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=args.device).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous(memory_format=memory_format(args))


def dtype(args: argparse.Namespace) -> torch.dtype:
    """The parameters' and inputs' dtype (autocast runs the forward in lower precision)."""
    return torch.float64 if args.fp64 else torch.float32


def memory_format(args: argparse.Namespace) -> torch.memory_format:
    """The parameters' and inputs' memory format (``--channels-last``)."""
    return torch.channels_last if args.channels_last else torch.contiguous_format


# ---- models --------------------------------------------------------------------------

def build_model(name: str) -> nn.Module:
    """The plain (eager) model ``name`` with :data:`CLASSES` outputs."""
    source, _, model_name = name.rpartition(":")
    if source == "" and name in MODELS:
        fused = getattr(models, name)(num_classes=CLASSES, stem="cifar", backend="reference")
        return fused_resnet.unfuse(fused)
    if source == "torchvision":
        import torchvision
        if model_name in torchvision.models.list_models():
            return torchvision.models.get_model(model_name, num_classes=CLASSES)
    elif source == "timm":
        import timm
        if timm.is_model(model_name):
            return timm.create_model(model_name, num_classes=CLASSES)
    raise UsageError(f"--model {name!r}: expected one of {', '.join(MODELS)}, or "
                     "torchvision:NAME or timm:NAME with a model name that library knows")


def with_backend(plain: nn.Module, backend: str) -> nn.Module:
    """A copy of ``plain``: as it is for eager, else with its blocks fused on ``backend``."""
    if backend == "eager":
        return copy.deepcopy(plain)
    fused = fused_resnet.convert(plain, backend=backend)
    report = fused.fusion_report
    print(f"{backend}: {len(report.swapped)} blocks fused, {len(report.left)} left"
          + "".join(f"\n  left {b.name}: {b.reason}" for b in report.left))
    return fused


@dataclass
class Run:
    """One model in training: its optimizer, schedule, gradient scaler and step time."""

    name: str
    module: nn.Module       # what is checkpointed and compared
    model: nn.Module        # module, or its torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step_seconds: float = 0.0

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def make_run(plain: nn.Module, backend: str, args: argparse.Namespace,
             total_steps: int) -> Run:
    """``plain`` on ``backend`` with its optimizer, ``total_steps`` schedule and scaler."""
    module = with_backend(plain, backend).to(args.device, dtype(args),
                                             memory_format=memory_format(args))
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    if args.schedule == "onecycle":
        # Momentum stays 0.9: the recipe's, not OneCycleLR's cycled 0.85-0.95.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                        total_steps=total_steps,
                                                        cycle_momentum=False)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.amp == "fp16")
    model = torch.compile(module) if args.compile else module
    return Run(backend, module, model, optimizer, scheduler, scaler)


# ---- training ------------------------------------------------------------------------

def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The forward's autocast of ``--amp``, or nothing."""
    if args.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=AMP_DTYPES[args.amp])


def synchronize(device: str) -> None:
    """Wait for the GPU, so that a step's time is its kernels' (nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor,
               args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of ``run``; its loss and number of correct predictions, and its
    duration added to ``run.step_seconds``."""
    synchronize(args.device)
    start = time.perf_counter()
    with autocast(args):
        logits = run.model(images)
        loss = F.cross_entropy(logits, labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    synchronize(args.device)
    run.step_seconds += time.perf_counter() - start
    return loss.detach(), (logits.argmax(1) == labels).sum()


def _postfix(runs: list[Run], sums: list[list[torch.Tensor]], count: int) -> str:
    """The progress bar's running figures of every run."""
    return " | ".join(f"{run.name} loss {loss.item() / count:.3f} "
                      f"acc {100 * correct.item() / count:.1f}% "
                      f"{count / max(run.step_seconds, 1e-9):.0f} img/s"
                      for run, (loss, correct) in zip(runs, sums))


def train_epoch(runs: list[Run], loader: DataLoader, epoch: int,
                args: argparse.Namespace) -> list[dict]:
    """Every batch of one epoch through every run; each run's training figures."""
    loader.sampler.set_epoch(epoch)
    # fp64 sums: two runs' losses that agree to rounding must print the same figure.
    sums = [[torch.zeros((), dtype=torch.float64, device=args.device) for _ in range(2)]
            for _ in runs]
    lrs = [0.0] * len(runs)
    for run in runs:
        run.step_seconds = 0.0
        run.model.train()
    bar = progress_bar(len(loader))
    count = 0
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = normalized(images, args), labels.to(args.device, non_blocking=True)
        for index, run in enumerate(runs):
            lrs[index] = run.optimizer.param_groups[0]["lr"]
            loss, correct = train_step(run, images, labels, args)
            sums[index][0] += loss * len(labels)
            sums[index][1] += correct
        count += len(labels)
        if bar is not None:
            bar.update()
            if step % 10 == 0 or step == len(loader):  # .item() waits for the device
                bar.set_description(f"epoch {epoch}")
                bar.set_postfix_str(_postfix(runs, sums, count))
    if bar is not None:
        bar.close()
    return [{"train_loss": loss.item() / count, "train_acc": correct.item() / count,
             "images_per_s": count / run.step_seconds, "lr": lr}
            for run, (loss, correct), lr in zip(runs, sums, lrs)]


@torch.no_grad()
def evaluate(runs: list[Run], loader: DataLoader, args: argparse.Namespace) -> list[dict]:
    """Test loss and accuracy of every run (eval mode: running statistics)."""
    sums = [[0.0, 0] for _ in runs]
    for run in runs:
        run.model.eval()
    for images, labels in loader:
        images, labels = normalized(images, args), labels.to(args.device)
        for run_sums, run in zip(sums, runs):
            with autocast(args):
                logits = run.model(images)
            run_sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            run_sums[1] += (logits.argmax(1) == labels).sum().item()
    count = len(loader.dataset)
    return [{"test_loss": loss / count, "test_acc": correct / count} for loss, correct in sums]


def save_checkpoint(path: Path, runs: list[Run], epoch: int, history: list[dict],
                    args: argparse.Namespace) -> None:
    """Everything a resumed run needs, written atomically (a run killed mid-write keeps
    the previous checkpoint)."""
    state = {"epoch": epoch, "arguments": vars(args), "history": history,
             "runs": {run.name: run.state_dict() for run in runs},
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                     else None}}
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def resume(path: str, runs: list[Run], args: argparse.Namespace) -> tuple[int, list[dict]]:
    """Load a checkpoint of the same run into ``runs``; its last epoch and history."""
    if not Path(path).is_file():
        raise UsageError(f"--resume {path}: no such checkpoint file")
    state = torch.load(path, map_location=args.device, weights_only=True)
    saved = state["arguments"]
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {getattr(args, name)})"
               for name in MUST_MATCH_ON_RESUME if saved[name] != getattr(args, name)]
    if changed:
        raise UsageError(f"--resume {path}: the checkpoint is of another run: "
                         + ", ".join(changed))
    for run in runs:
        run.load_state_dict(state["runs"][run.name])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return state["epoch"], state["history"]


def run_epoch(runs: list[Run], loaders: tuple[DataLoader, DataLoader], epoch: int,
              args: argparse.Namespace) -> list[dict]:
    """Train and test every run for one epoch; a record per run."""
    start = time.perf_counter()
    records = train_epoch(runs, loaders[0], epoch, args)
    for record, tested in zip(records, evaluate(runs, loaders[1], args)):
        record.update(tested)
    compared = {}
    if len(runs) == 2:
        compared["weight_rel_diff"] = train_report.weight_relative_difference(
            runs[0].module, runs[1].module)
    seconds = time.perf_counter() - start
    return [{"epoch": epoch, "backend": run.name, **record, "seconds": seconds, **compared}
            for run, record in zip(runs, records)]


def train(args: argparse.Namespace, plain: nn.Module) -> list[dict]:
    """Train ``plain`` (copied for each of :func:`backends_of`) as ``args`` say, writing the
    outputs under ``args.out``; the history of per-epoch records."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(
        {"arguments": vars(args), "environment": environment(torch.device(args.device).type)},
        indent=2))
    loaders = data_loaders(args)
    runs = [make_run(plain, name, args, args.epochs * len(loaders[0]))
            for name in backends_of(args)]
    done, history = resume(args.resume, runs, args) if args.resume else (0, [])
    for epoch in range(done + 1, min(args.epochs, args.stop_after or args.epochs) + 1):
        history += run_epoch(runs, loaders, epoch, args)
        print(train_report.epoch_line(history, epoch, args.epochs), flush=True)
        save_checkpoint(out / "checkpoint.pt", runs, epoch, history, args)
        train_report.write(history, out)
    return history


def main(argv: Optional[list[str]] = None) -> int:
    """The command line (see the module docstring); ``argv`` defaults to ``sys.argv``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the initial weights, the same for every backend
    try:
        history = train(args, build_model(args.model))
    except (UsageError, BackendUnavailableError) as error:
        print(f"fused-resnet-train: error: {error}", file=sys.stderr)
        return 2
    if history:
        print("\n" + train_report.format_table(history))
    print(f"outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
