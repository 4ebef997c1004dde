"""The data of :mod:`fused_resnet.train`: CIFAR-10 or synthetic images, with a batch order
and augmentation that depend only on (seed, epoch, sample), so that every backend, any
number of workers and a resumed run see the same batches."""

from __future__ import annotations

import argparse
import random
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

CLASSES = 10


class UsageError(ValueError):
    """A command-line argument that turned out wrong after parsing (a model name the
    library does not know, a missing dataset, a checkpoint of another run)."""


def derived_rng(*parts: object) -> random.Random:
    """A generator determined by ``parts`` alone (strings seed through SHA-512, the same
    in every process and Python run)."""
    return random.Random("/".join(map(str, parts)))


class Images(Dataset):
    """uint8 images and their labels. With ``seed``, a training set: its keys are
    (epoch, index) pairs, and the random crop of the ``pad``-padded image and the flip of a
    sample derive from (seed, epoch, index), so they do not depend on the worker that loads
    it, on the order of loading, or on a resume."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 seed: Optional[int] = None, pad: int = 0) -> None:
        self.size = images.shape[-1]
        self.images = F.pad(images, (pad,) * 4) if pad else images
        self.labels, self.seed, self.pad = labels, seed, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        if self.seed is None:
            return self.images[key], self.labels[key]
        epoch, index = key
        rng = derived_rng("augment", self.seed, epoch, index)
        top, left = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
        image = self.images[index, :, top:top + self.size, left:left + self.size]
        return (image.flip(-1) if rng.random() < 0.5 else image), self.labels[index]


class EpochSampler(Sampler):
    """The keys of an :class:`Images` training set for one epoch (:meth:`set_epoch`), in an
    order drawn from the seed and the epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(
            derived_rng("order", self.seed, self.epoch).getrandbits(63))
        return ((self.epoch, i) for i in torch.randperm(self.size, generator=generator).tolist())


def fake_data(count: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uint8 images of :data:`CLASSES` classes: each class a smooth random pattern
    (learnable despite crops and flips), each image that pattern plus noise."""
    generator = torch.Generator().manual_seed(derived_rng("fake", seed).getrandbits(63))
    coarse = torch.rand(CLASSES, 3, 4, 4, generator=generator)
    patterns = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.randint(CLASSES, (count,), generator=generator)
    noise = torch.randn(count, 3, image_size, image_size, generator=generator)
    images = (patterns[labels] + 0.25 * noise) * 255
    return images.clamp(0, 255).to(torch.uint8), labels


def cifar10(root: str, download: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """CIFAR-10's training and test sets as uint8 NCHW images and int64 labels."""
    from torchvision.datasets import CIFAR10  # torchvision is needed for the real data only

    sets = []
    for train in (True, False):
        try:
            data = CIFAR10(root, train=train, download=download)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise UsageError(f"--data {root}: no CIFAR-10 there ({error}); pass --download "
                             "to fetch it, or --fake-data N for synthetic images") from None
        sets.append((torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor(data.targets)))
    return tuple(sets)


def data_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """The training loader (keys from an :class:`EpochSampler`; whole batches only, as a
    batch of one image fails BatchNorm) and the test loader."""
    if args.fake_data is not None:
        images, labels = fake_data(args.fake_data + max(args.fake_data // 5, 1),
                                   args.image_size, args.seed)
        train = images[:args.fake_data], labels[:args.fake_data]
        test = images[args.fake_data:], labels[args.fake_data:]
    else:
        train, test = cifar10(args.data, args.download)
    # 4 pixels of padding for CIFAR's 32: the same fraction of smaller fake images.
    train_set = Images(*train, seed=args.seed, pad=args.image_size // 8)
    common = dict(batch_size=args.batch_size, num_workers=args.workers,
                  pin_memory=torch.device(args.device).type == "cuda",
                  persistent_workers=args.workers > 0)
    return (DataLoader(train_set, sampler=EpochSampler(len(train_set), args.seed),
                       drop_last=True, **common),
            DataLoader(Images(*test), **common))
