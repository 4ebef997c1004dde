"""How a backend's fp16 autocast training step compares with eager over many draws.

For one block configuration behind a conv-BN-ReLU stem (as in test_semantics.py's autocast
test), each draw builds a new model and input, runs one training step in fp64, in eager
fp16 autocast and on the backend, and records each tensor's RMS error ratio
(backend / eager, both against fp64). Prints the median and maximum ratio per tensor and
how many draws had any tensor beyond ``ERROR_FACTOR``. The tests judge three draws; this
shows the spread behind that choice and measures precision changes.

    TRITON_INTERPRET=1 python tests/precision_sweep.py \
        --case "('preact_bottleneck', 32, 32, 2, True)" --draws 12
"""

from __future__ import annotations

import argparse
import ast
import statistics

import torch

from fused_resnet.testing import ERROR_FACTOR, errors_beyond_eager, rms
from test_semantics import autocast_draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True,
                        help="(kind, in channels, width, stride, projection), as in blockcases")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--size", type=int, nargs=2, default=(8, 7), metavar=("H", "W"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    case = ast.literal_eval(args.case)

    ratios: dict[str, list[float]] = {}
    draws_beyond = 0
    for seed in range(args.draws):
        _, (result, eager, truth) = autocast_draw(case, args.backend, args.device, seed,
                                                  args.size)
        draws_beyond += bool(errors_beyond_eager(result, eager, truth))
        for name, reference in truth.items():
            if reference.is_floating_point():
                eager_error = rms(eager[name].double() - reference)
                ratios.setdefault(name, []).append(
                    rms(result[name].double() - reference) / max(eager_error, 1e-30))
    print(f"{case} on {args.backend}, {args.draws} draws: {draws_beyond} with a tensor beyond "
          f"{ERROR_FACTOR} x eager's error")
    for name, values in ratios.items():
        print(f"  {name:42s} ratio median {statistics.median(values):5.2f} "
              f"max {max(values):6.2f}")


if __name__ == "__main__":
    main()
