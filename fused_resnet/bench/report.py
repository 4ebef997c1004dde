"""Presenting benchmark results: the stdout table, a markdown table, a PNG chart.

A result is one contender on one workload (a dict, see
:func:`fused_resnet.bench.cli.measure`): either timings (``median_s``, ``images_per_s``,
``speedup_vs_eager`` ...) or ``error``.
``python -m fused_resnet.bench.report RESULTS.json`` prints the markdown table of a
recorded run and can draw its chart, for the README.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Iterable, Optional

GIB = 2**30


def group_key(result: dict) -> tuple:
    return result["workload"], result["mode"], result["batch_size"]


def groups(results: Iterable[dict]) -> list[tuple[tuple, list[dict]]]:
    """Results grouped by workload, mode and batch size, in order of appearance."""
    return [(key, list(members)) for key, members in itertools.groupby(results, group_key)]


def add_ratios(results: list[dict]) -> None:
    """Speed-ups against eager and ``torch.compile`` within each group."""
    for _, members in groups(results):
        rates = {r["contender"]: r.get("images_per_s") for r in members}
        for r in members:
            for baseline in ("eager", "compile"):
                if "images_per_s" in r and rates.get(baseline):
                    r[f"speedup_vs_{baseline}"] = r["images_per_s"] / rates[baseline]


def _number(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


COLUMNS = [  # header, width, how to show a result
    ("images/s", 11, lambda r: _number(r.get("images_per_s"), ".1f")),
    ("median ms", 11, lambda r: _number(r["median_s"] * 1e3, ".3f")),
    ("IQR ms", 9, lambda r: _number((r["q3_s"] - r["q1_s"]) * 1e3, ".3f")),
    ("vs eager", 9, lambda r: _number(r.get("speedup_vs_eager"), ".2f", "x")),
    ("vs compile", 11, lambda r: _number(r.get("speedup_vs_compile"), ".2f", "x")),
    ("roofline", 9, lambda r: _number(100 * r["roofline_fraction"], ".0f", "%")
     if r.get("roofline_fraction") is not None else "-"),
    ("peak GiB", 9, lambda r: _number(r["peak_memory_bytes"] / GIB, ".2f")
     if r.get("peak_memory_bytes") is not None else "-"),
]


def format_table(results: list[dict], columns: list = COLUMNS) -> str:
    """One titled table per workload, mode and batch size."""
    lines = []
    for (workload, mode, batch), members in groups(results):
        title = f"{workload} {mode} batch {batch}"
        if members[0].get("description"):
            title += f": {members[0]['description']}"
        header = f"{'contender':<22}" + "".join(h.rjust(w) for h, w, _ in columns)
        lines += ["", title, header, "-" * len(header)]
        for r in members:
            if "error" in r:
                lines.append(f"{r['contender']:<22}  {r['error']}")
            else:
                lines.append(f"{r['contender']:<22}"
                             + "".join(show(r).rjust(w) for _, w, show in columns))
    return "\n".join(lines[1:])


# The counted quantities of a traffic result (fused_resnet.bench.traffic), as
# (key, header, scale, format).
TRAFFIC_COUNTS = [("launches", "launches", 1, ".0f"), ("bytes", "GB", 1e9, ".1f"),
                  ("saved_bytes", "saved GB", 1e9, ".2f"), ("peak_bytes", "peak GB", 1e9, ".2f")]


def add_traffic_ratios(results: list[dict]) -> None:
    """Each count as a ratio to eager's within its group (``bytes_vs_eager``, ...)."""
    for _, members in groups(results):
        eager = next((r for r in members if r["contender"] == "eager" and "error" not in r),
                     None)
        for r in members:
            for key, *_ in TRAFFIC_COUNTS:
                if eager is not None and key in r and eager[key]:
                    r[f"{key}_vs_eager"] = r[key] / eager[key]


def _count_column(key: str, header: str, scale: float, spec: str):
    def show(r: dict) -> str:
        ratio = r.get(f"{key}_vs_eager")
        return f"{r[key] / scale:{spec}}" + ("" if ratio is None else f" ({ratio:.2f}x)")
    return header, 19, show


TRAFFIC_COLUMNS = [_count_column(*count) for count in TRAFFIC_COUNTS] + [
    ("ideal GB", 10, lambda r: _number(r.get("ideal_bytes", 0) / 1e9 or None, ".1f"))]


def format_traffic_table(results: list[dict]) -> str:
    """:func:`format_table` of counted traffic: each count and its ratio to eager's."""
    return format_table(results, TRAFFIC_COLUMNS)


def markdown_table(results: list[dict]) -> str:
    """One markdown table for a whole run: a row per workload, a column per contender,
    each cell images/s and the speed-up against eager (or the roofline fraction for block
    workloads)."""
    contenders = list(dict.fromkeys(r["contender"] for r in results))
    lines = ["| workload | mode | batch | " + " | ".join(contenders) + " |",
             "|" + "---|" * (3 + len(contenders))]
    for (workload, mode, batch), members in groups(results):
        by_contender = {r["contender"]: r for r in members}
        cells = []
        for name in contenders:
            r = by_contender.get(name)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("error: " + r["error"].replace("|", "\\|"))
            else:
                cell = f"{r['images_per_s']:.0f}/s"
                if r.get("speedup_vs_eager") is not None:
                    cell += f" ({r['speedup_vs_eager']:.2f}x)"
                if r.get("roofline_fraction") is not None:
                    cell += f", {100 * r['roofline_fraction']:.0f}% roofline"
                cells.append(cell)
        lines.append(f"| {workload} | {mode} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """A PNG of speed-ups against eager: one panel per mode and batch size, a group of bars
    per workload, a bar per contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["mode"], r["batch_size"]) for r in results))
    contenders = list(dict.fromkeys(r["contender"] for r in results))
    group_keys = [key for key, _ in groups(results)]
    width = 0.8 / len(contenders)
    figure, axes = plt.subplots(len(panels), 1, squeeze=False,
                                figsize=(max(6, 1.2 * len(group_keys) / len(panels)),
                                         3.2 * len(panels)))
    failures = {}  # reason -> its number in the caption
    for axis, (mode, batch) in zip(axes[:, 0], panels):
        workloads = [key[0] for key in group_keys if key[1:] == (mode, batch)]
        for index, contender in enumerate(contenders):
            members = {r["workload"]: r for r in results
                       if (r["mode"], r["batch_size"], r["contender"]) == (mode, batch,
                                                                           contender)}
            positions = [position + index * width for position in range(len(workloads))]
            axis.bar(positions, [members.get(w, {}).get("speedup_vs_eager", 0.0)
                                 for w in workloads], width, label=contender)
            for position, workload in zip(positions, workloads):
                if "error" in members.get(workload, {}):
                    number = failures.setdefault(f"{contender}: {members[workload]['error']}",
                                                 len(failures) + 1)
                    axis.text(position, 0.02, f"failed ({number})", rotation=90,
                              fontsize=7, ha="center", va="bottom",
                              transform=axis.get_xaxis_transform())
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([position + 0.4 - width / 2 for position in range(len(workloads))],
                        workloads, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("speed-up vs eager")
        axis.set_title(f"{mode}, batch {batch}", fontsize=9)
    if failures:
        figure.text(0.01, 0.005, "\n".join(f"({number}) {reason[:150]}"
                                           for reason, number in failures.items()),
                    fontsize=6, va="bottom")
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", fontsize=8,
                  ncols=len(contenders))
    caption = 0.12 * len(failures) / figure.get_figheight()
    figure.tight_layout(rect=(0, caption, 1, 1 - 0.25 / figure.get_figheight()))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.bench.report",
                                     description="Markdown table (and chart) of a recorded "
                                     "benchmark run.")
    parser.add_argument("results", help="JSON written by fused-resnet-bench --json")
    parser.add_argument("--plot", help="also draw the chart into this PNG")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        run = json.load(f)
    environment = run["environment"]
    print(f"{environment['device']}, torch {environment['torch']}, triton "
          f"{environment['triton']}, CUDA {environment['cuda']}, fused_resnet commit "
          f"{(environment['commit'] or 'unknown')[:10]}"
          f"{' with uncommitted changes' if environment.get('dirty') else ''}\n")
    if not environment.get("timings_are_measurements", True):
        print("CPU run: its timings are not measurements (see fused-resnet-bench's notice); "
              "only the checks and the errors mean something.\n")
    print(markdown_table(run["results"]))
    if args.plot:
        plot(run["results"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
