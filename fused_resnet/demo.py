"""``python -m fused_resnet.demo``: convert a torchvision ResNet-50 and check it.

Converts the model and prints the conversion report, then runs a training step
(forward, backward) and an eval forward with the original model in the working dtype
and in fp64, and with the converted model in the working dtype. Every output, gradient
and running statistic of the converted model must be as close to the fp64 result as
eager PyTorch's is (within :data:`fused_resnet.testing.ERROR_FACTOR`); the exit status is
1 otherwise. Runs on the GPU when one is present, else on the CPU. It checks
correctness; it does not measure speed.
"""

from __future__ import annotations

import sys

import torch

import fused_resnet
from fused_resnet.testing import errors_beyond_eager, float64_copy, train_and_eval_step


def main() -> int:
    try:
        import torchvision
    except ImportError:
        print("the demo needs torchvision: pip install torchvision", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    original = torchvision.models.resnet50().to(device)
    fused = fused_resnet.convert(original)
    print(fused.fusion_report)
    images = torch.randn(4, 3, 64, 64, device=device)
    truth = train_and_eval_step(float64_copy(original), images.double())
    eager = train_and_eval_step(original, images)
    result = train_and_eval_step(fused, images)
    failures = errors_beyond_eager(result, eager, truth)
    print(f"\nResNet-50 on {device}: {len(truth)} tensors checked against fp64 (outputs in "
          "train and eval, every gradient, every running statistic): "
          + ("MATCH, every error within the eager error bound" if not failures
             else "MISMATCH\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
