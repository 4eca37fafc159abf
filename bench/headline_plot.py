"""PNG plots for ``python -m bench headline`` (matplotlib, a bench-only dependency).

matplotlib is imported dynamically, so the package and mypy work without it; without
it the plots are skipped and the report says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.headline_latency import KERNEL, Cell, percentile
from bench.headline_storm import StormResult


def pyplot() -> Any | None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


STYLES = {
    "hotrelay": "-",
    "hotrelay, state on ext4": "-.",
    "naive shell relay": "--",
    "lxc-device": ":",
    "LXD unix-block": (0, (5, 1, 1, 1)),
    KERNEL: (0, (1, 1)),
}


def latency_cdf(cells: Sequence[Cell], path: Path) -> bool:
    """One panel per container: a CDF line per method there, the kernel floor in each."""
    plt = pyplot()
    if plt is None:
        return False
    floor = next((c for c in cells if c.method.name == KERNEL and c.samples), None)
    boxes: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.method.name != KERNEL:
            boxes.setdefault(cell.box.key, []).append(cell)
    columns = 3
    rows = (len(boxes) + columns - 1) // columns
    fig, axes = plt.subplots(
        rows, columns, figsize=(15, 4.2 * rows), dpi=100, sharex=True, squeeze=False
    )
    colors = plt.get_cmap("tab10")
    methods = list(STYLES)
    for ax, group in zip(axes.flat, boxes.values(), strict=False):
        for cell in [*group, *([floor] if floor is not None else [])]:
            if not cell.samples:
                continue
            values = sorted(s * 1000 for s in cell.samples)
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(
                values,
                fractions,
                where="post",
                linestyle=STYLES.get(cell.method.name, "-"),
                color="black"
                if cell.method.name == KERNEL
                else colors(methods.index(cell.method.name) % 10),
                linewidth=2.0 if cell.method.name == "hotrelay" else 1.3,
                label=f"{cell.method.name} (p99 {percentile(values, 0.99):.1f} ms)",
            )
        failing = [c for c in group if not c.samples and c.error]
        for n, cell in enumerate(failing):
            ax.text(0.02, 0.97 - 0.07 * n, f"{cell.method.name}: fails here", fontsize=7,
                    color="grey", transform=ax.transAxes, va="top")  # fmt: skip
        ax.set_title(group[0].box.label, fontsize=10)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.axhline(0.99, color="grey", linewidth=0.5)
        ax.axvline(10, color="red", linewidth=0.6, linestyle="--")
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(boxes) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("hot_add to usable inside (ms, log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of plugs")
    fig.suptitle(
        "Hotplug-to-usable latency, CDF per method on each container "
        "(red dashed: the 10 ms target; grey: p99)"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def storm_throughput(result: StormResult, path: Path) -> bool:
    """Grouped bars per burst: emitter, bare recv() ceiling, the daemon per rule mix."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    groups = [f"{size:,}" for size in result.sizes]
    series: list[tuple[str, list[float]]] = [
        (
            "emitter (uevents written/s)",
            [sum(c.burst.emit_rate for c in cs) / len(cs) for cs in result.ceilings],
        ),
        (
            "bare recv() loop: the ceiling",
            [sum(c.rate for c in cs) / len(cs) for cs in result.ceilings],
        ),
    ]
    for mix in result.mixes:
        rates = [0.0 if s.disturbed else s.rate for s in result.storms if s.mix == mix]
        series.append((f"hotrelay run ({mix} rules)", rates))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        for bar, value in zip(bars, values, strict=False):
            ax.annotate(
                f"{value / 1000:.0f}k",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(len(groups)), [f"burst of {g}" for g in groups])
    ax.set_ylabel("uevents per second")
    ax.set_title(
        f"Storm: {result.containers} containers, {result.rules} rules, 1% of events matching"
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(series))
    ax.grid(True, axis="y", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
