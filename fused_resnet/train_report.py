"""What :mod:`fused_resnet.train` reports: the weights' relative difference of two runs,
the per-epoch line, the markdown table, the JSON-lines log and the chart of the curves.

A history is a list of records, one per epoch and model (``backend``: ``eager`` or a
backend name), with ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``,
``images_per_s``, ``lr``, ``seconds`` (the epoch's wall time, training and evaluating every
model) and, when two runs are compared, ``weight_rel_diff``.
``python -m fused_resnet.train_report LOG.jsonl`` prints the table of a recorded log.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from torch import nn


def weight_relative_difference(a: nn.Module, b: nn.Module) -> float:
    """||w_a - w_b|| / ||w_a|| over all parameters of two models with the same parameter
    names (a fused model keeps its plain model's), in fp64."""
    b_parameters = dict(b.named_parameters())
    difference = norm = 0.0
    for name, weight in a.named_parameters():
        other = b_parameters[name]
        difference += (weight.double() - other.double()).square().sum().item()
        norm += weight.double().square().sum().item()
    return math.sqrt(difference / norm)


def backends(history: list[dict]) -> list[str]:
    """The models of a history, in order of appearance."""
    return list(dict.fromkeys(r["backend"] for r in history))


def by_epoch(history: list[dict]) -> dict[int, dict[str, dict]]:
    """epoch -> backend -> record."""
    table: dict[int, dict[str, dict]] = {}
    for record in history:
        table.setdefault(record["epoch"], {})[record["backend"]] = record
    return table


def epoch_line(history: list[dict], epoch: int, epochs: int) -> str:
    """One epoch's figures on one line, for the console."""
    records = by_epoch(history)[epoch]
    parts = [f"{name}: train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:.2f}%, "
             f"test loss {r['test_loss']:.4f} acc {100 * r['test_acc']:.2f}%, "
             f"{r['images_per_s']:.0f} img/s" for name, r in records.items()]
    first = next(iter(records.values()))
    if "weight_rel_diff" in first:
        parts.append(f"weight rel. diff {first['weight_rel_diff']:.3g}")
    return f"epoch {epoch}/{epochs} " + " | ".join(parts) + f" | {first['seconds']:.1f} s"


METRICS = [  # header, record key, format
    ("train loss", "train_loss", ".4f"),
    ("train acc %", "train_acc", ".2%"),
    ("test loss", "test_loss", ".4f"),
    ("test acc %", "test_acc", ".2%"),
    ("images/s", "images_per_s", ".0f"),
]


def format_table(history: list[dict]) -> str:
    """A markdown table, one row per epoch; compared runs get a column per model for each
    figure, and the weights' relative difference."""
    names = backends(history)
    compared = len(names) > 1
    header = ["epoch"]
    for title, _, _ in METRICS:
        header += [f"{title} ({name})" if compared else title for name in names]
    header += ["weight rel. diff"] if compared else []
    header += ["lr", "seconds"]
    rows = []
    for epoch, records in by_epoch(history).items():
        cells = [str(epoch)]
        for _, key, spec in METRICS:
            cells += [format(records[name][key], spec).rstrip("%") for name in names]
        first = records[names[0]]
        cells += [f"{first['weight_rel_diff']:.3e}"] if compared else []
        cells += [f"{first['lr']:.4g}", f"{first['seconds']:.1f}"]
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(history: list[dict], path: Path) -> None:
    """A PNG of the loss and accuracy curves (training solid, test dashed), and for
    compared runs the weights' relative difference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = backends(history)
    panels = 3 if len(names) > 1 else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    for color, name in enumerate(names):
        records = [r for r in history if r["backend"] == name]
        epochs = [r["epoch"] for r in records]
        for axis, key in zip(axes, ("loss", "acc")):
            scale = 100 if key == "acc" else 1
            for part, style in (("train", "-o"), ("test", "--o")):
                axis.plot(epochs, [scale * r[f"{part}_{key}"] for r in records], style,
                          color=f"C{color}", ms=3, label=f"{name} {part}")
    axes[0].set(title="cross-entropy loss", xlabel="epoch")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    if panels == 3:
        records = [r for r in history if r["backend"] == names[0]]
        axes[2].semilogy([r["epoch"] for r in records],
                         [max(r["weight_rel_diff"], 1e-300) for r in records], "-o", ms=3)
        axes[2].set(title=f"||w_{names[0]} - w_{names[1]}|| / ||w_{names[0]}||",
                    xlabel="epoch")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in axes[:2]:
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(history: list[dict], out: Path) -> None:
    """``log.jsonl``, ``summary.md`` and ``curves.png`` under ``out``, rewritten whole from
    the history (a resumed run's files cover the epochs before the resume too)."""
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (out / "summary.md").write_text(format_table(history) + "\n")
    try:
        plot(history, out / "curves.png")
    except ImportError:  # matplotlib is optional (the `bench` extra)
        print("matplotlib is not installed: no curves.png")


def read_log(path: str) -> list[dict]:
    """The history in a ``log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m fused_resnet.train_report LOG.jsonl [--plot PNG]``."""
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.train_report",
                                     description="Print the table of a training log.")
    parser.add_argument("log", help="a log.jsonl written by fused_resnet.train")
    parser.add_argument("--plot", help="also draw the curves into this PNG file")
    args = parser.parse_args(argv)
    history = read_log(args.log)
    print(format_table(history))
    if args.plot:
        plot(history, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
