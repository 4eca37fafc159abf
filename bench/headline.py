"""``python -m bench headline``: the numbers users choose a hotplug relay on, side by side
with what they would use instead, in one run.

1. Hotplug-to-usable latency (bench/headline_latency.py): hotrelay against a naive
   shell relay, ``lxc-device`` and LXD's own ``unix-block`` hotplug, on the same
   containers, with the kernel's own devtmpfs node as the floor.
2. Storm (bench/headline_storm.py): bursts of synthetic uevents, 1% matching, with 100
   containers and 1,000 rules, against a bare ``recv()`` ceiling.
3. Cost: the daemon's RSS and CPU idle, and its RSS after the storms (the soak).

Writes bench/results/headline.md (the caller, ``python -m bench``, writes it from the
returned text) and the PNG plots bench/results/headline-latency-cdf.png and
bench/results/headline-storm.png. Root only. A full run takes about 12-15 minutes on
2 CPUs; ``--quick`` takes about 3.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import headline_latency as latency
from bench import headline_plot as plot
from bench import headline_storm as storm
from bench.headline_latency import (
    HOTRELAY,
    HOTRELAY_EXT4,
    KERNEL,
    LXC_DEVICE,
    LXD_HOTPLUG,
    NAIVE,
    Cell,
    LatencyResult,
    percentile,
)
from bench.headline_storm import MIXES, StormResult

RESULTS = Path(__file__).resolve().parent / "results"
LATENCY_PNG = "headline-latency-cdf.png"
STORM_PNG = "headline-storm.png"

TARGET_P99_MS = 10.0
TARGET_VS_NAIVE = 10.0
TARGET_VS_LXD = 20.0
TARGET_STORM = 0.5
TARGET_IDLE_MB = 60.0
TARGET_GROWTH = 0.10


def _ms(value: float) -> str:
    return f"{value * 1000:.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def _p(cell: Cell, fraction: float) -> float:
    return percentile(cell.samples, fraction)


# -- latency ------------------------------------------------------------------------------

METHOD_ORDER = [HOTRELAY, HOTRELAY_EXT4, NAIVE, LXC_DEVICE, LXD_HOTPLUG, KERNEL]


def latency_report(result: LatencyResult, plotted: bool) -> list[str]:
    lines = [
        "### 1. Hotplug-to-usable latency",
        "",
        f"From the zram `hot_add` read to a process inside the container opening the node "
        f"(`open()` + `fstat()`: a block device with the right numbers). {result.plugs} plugs "
        f"per container and method ({result.lxd_plugs} for LXD's own hotplug), in "
        f"{result.rounds} interleaved rounds, each visit starting with one discarded warm-up "
        f"plug; the device is hot-removed and the node gone inside before the next plug.",
        "",
        "| container | method | plugs | p50 ms | p95 ms | p99 ms | max ms | failed | "
        "p99 / hotrelay's |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(
        result.cells,
        key=lambda c: (
            [b.key for b in _boxes(result)].index(c.box.key),
            METHOD_ORDER.index(c.method.name),
        ),
    )
    hotrelay = {c.box.key: c for c in result.cells if c.method.name == HOTRELAY and c.samples}
    for cell in ordered:
        if cell.error is not None and not cell.samples:
            lines.append(
                f"| {cell.box.label} | {cell.method.name} | - | fails: {_clip(_reason(cell))} "
                "| | | | | |"
            )
            continue
        base = hotrelay.get(cell.box.key)
        ratio = (
            f"{_p(cell, 0.99) / _p(base, 0.99):.1f}x"
            if base is not None and cell.method.name != HOTRELAY
            else "-"
        )
        extra = f" ({cell.discarded} discarded)" if cell.discarded else ""
        lines.append(
            f"| {cell.box.label} | {cell.method.name} | {len(cell.samples)}{extra} "
            f"| {_ms(_p(cell, 0.5))} | {_ms(_p(cell, 0.95))} | {_ms(_p(cell, 0.99))} "
            f"| {_ms(max(cell.samples))} | {cell.failed} | {ratio} |"
        )
    lines += ["", *targets_latency(result), ""]
    lines += probe_notes(result)
    lines += [
        "",
        f"Latency plot: `{LATENCY_PNG}`."
        if plotted
        else "No plot: matplotlib is not installed (`pip install matplotlib`).",
    ]
    return lines


def _boxes(result: LatencyResult) -> list[latency.Box]:
    seen: dict[str, latency.Box] = {}
    for cell in result.cells:
        seen.setdefault(cell.box.key, cell.box)
    return list(seen.values())


def _reason(cell: Cell) -> str:
    """The method's own error message, without the probe's raw outcome."""
    error = cell.error or ""
    return (
        error.rsplit(" (timeout ", 1)[0] + f" (no usable node within {cell.method.timeout:.0f} s)"
    )


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def targets_latency(result: LatencyResult) -> list[str]:
    find = latency.find
    lines = ["Targets (p99):", ""]
    for box in _boxes(result):
        mine = find(result, HOTRELAY, box.key)
        if mine is None or not mine.samples:
            continue
        p99 = _p(mine, 0.99) * 1000
        lines.append(
            f"- {box.label}: hotrelay p99 {p99:.2f} ms < {TARGET_P99_MS:.0f} ms: "
            f"{_verdict(p99 < TARGET_P99_MS)}"
        )
        naive = find(result, NAIVE, box.key)
        if naive is not None and naive.samples:
            ratio = _p(naive, 0.99) * 1000 / p99
            ok = _verdict(ratio >= TARGET_VS_NAIVE)
            lines.append(
                f"  - vs the naive shell relay (p99 {_p(naive, 0.99) * 1000:.2f} ms): "
                f"{ratio:.2f}x, target >= {TARGET_VS_NAIVE:.0f}x: {ok}"
            )
        elif naive is not None and naive.error:
            lines.append(f"  - the naive shell relay cannot serve it: {_clip(_reason(naive), 120)}")
        device = find(result, LXC_DEVICE, box.key)
        if device is not None and device.samples:
            ratio = _p(device, 0.99) * 1000 / p99
            lines.append(
                f"  - vs lxc-device (p99 {_p(device, 0.99) * 1000:.2f} ms): {ratio:.2f}x, "
                f"target > 1x (below lxc-device): {_verdict(ratio > 1)}"
            )
        elif device is not None and device.error:
            lines.append(f"  - lxc-device cannot serve it: {_clip(_reason(device), 120)}")
        lxd = find(result, LXD_HOTPLUG, box.key)
        if lxd is not None and lxd.samples:
            ratio = _p(lxd, 0.99) * 1000 / p99
            lines.append(
                f"  - vs LXD's unix-block hotplug (p99 {_p(lxd, 0.99) * 1000:.2f} ms): "
                f"{ratio:.2f}x, target >= {TARGET_VS_LXD:.0f}x: {_verdict(ratio >= TARGET_VS_LXD)}"
            )
    floor = find(result, KERNEL, "host")
    if floor is not None and floor.samples:
        lines.append(
            f"- Floor: the host's own devtmpfs node /dev/zramN opens after p50 "
            f"{_ms(_p(floor, 0.5))} / p99 {_ms(_p(floor, 0.99))} ms (hot_add itself, the "
            "kernel's devtmpfs thread and the probe): no relay can beat that."
        )
    return lines


def probe_notes(result: LatencyResult) -> list[str]:
    periods = []
    shares = []
    for attempts, cpu, wall in result.calibration.values():
        periods.append(wall / attempts * 1e6)
        shares.append(cpu / wall)
    period = sum(periods) / len(periods)
    share = sum(shares) / len(shares)
    return [
        f"The probe (bench/headline_probe.py) is the same program in every container for "
        f"every method: it joins the container's device cgroups, user and mount namespaces, "
        f"then polls `open()` every {result.interval * 1e6:.0f} us (select() on its command "
        f"pipe, 1 ns timer slack). Calibrated in each container for 1 s: one attempt every "
        f"{period:.0f} us on average (so a sample is late by at most that), costing "
        f"{share:.1%} of one CPU while it waits.",
        "Discarded plugs (not counted): another process on this machine took the predicted "
        "zram index first (the method was set up for that one index).",
        f"Run: {result.seconds / 60:.1f} min; load average before/after: "
        f"{result.loadavg[0].split()[0]} / {result.loadavg[1].split()[0]}.",
        *(f"Note: {note}" for note in result.notes),
    ]


# -- storm and cost -----------------------------------------------------------------------


def storm_report(result: StormResult, plotted: bool, scale_note: str) -> list[str]:
    lines = [
        "### 2. Storm",
        "",
        f"{result.containers} containers, {result.rules} rules (one sends the matching zram "
        "disk to every container; the rest match nothing here: USB serial adapters, disks by "
        "name or serial, webcams, NVMe, zram disks of other sizes), daemon state on tmpfs. "
        "Each burst: 99% `change` uevents on a zram disk no rule matches, 1% on a second "
        "disk that the emitter hot-adds 1% into the burst and that must end up in every "
        "container. Rates count from the emitter's first write to the last event consumed. "
        "The ceiling is a bare `recv()` loop on the same bursts, before the daemon started "
        "and after it stopped (mean of the two)." + scale_note,
        "",
        "| rules | burst | emitter ev/s | ceiling ev/s | hotrelay ev/s | vs ceiling | "
        "received / sent | lost | overflows | end state correct | end state after s | "
        "RSS after MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ceiling = {
        size: sum(c.rate for c in cs) / len(cs)
        for size, cs in zip(result.sizes, result.ceilings, strict=True)
    }
    for s in result.storms:
        roof = ceiling[s.burst.size]
        if s.disturbed:
            why = (
                f"emitter failed: {s.burst.error}"
                if s.burst.error
                else "another process took the matching disk's zram index"
                if s.mismatch
                else f"{s.foreign:,} uevents of other processes arrived meanwhile"
            )
            lines.append(
                f"| {s.mix} | {s.burst.size:,} ({s.attempts} tries) | invalid: {_clip(why, 90)} "
                "| | | | | | | | | |"
            )
            continue
        lost = f"{s.lost:,}" if s.overflows == 0 else f">= {s.lost:,} (overflow; resync)"
        state = f"{s.correct}/{result.containers}"
        after = f"{s.end_state:.2f}" if s.end_state is not None else "never"
        tries = f" ({s.attempts} tries)" if s.attempts > 1 else ""
        lines.append(
            f"| {s.mix} | {s.burst.size:,}{tries} | {s.burst.emit_rate:,.0f} | {roof:,.0f} "
            f"| {s.rate:,.0f} | {s.rate / roof:.0%} | {s.received:,} / {s.expected:,} | {lost} "
            f"| {s.overflows} | {state} | {after} | {s.rss_after_kb / 1024:.1f} |"
        )
    lines += [""]
    for s in result.storms:
        if s.disturbed:
            lines.append(f"- {s.mix} rules, {s.burst.size:,}: no valid run (see the table)")
            continue
        ok = s.rate / ceiling[s.burst.size] >= TARGET_STORM and s.correct == result.containers
        lines.append(
            f"- {s.mix} rules, {s.burst.size:,}: {s.rate / ceiling[s.burst.size]:.0%} of the "
            f"ceiling (target >= {TARGET_STORM:.0%}), end state "
            f"{'correct' if s.correct == result.containers else 'WRONG'}: {_verdict(ok)}"
            + (f"; other processes' uevents during it: {s.foreign:,}" if s.foreign else "")
        )
    lines += [
        "",
        "Rule mixes: " + "; ".join(f"`{m}`: {MIXES[m]}" for m in result.mixes) + ".",
        f"Why the ceiling is what it is: one writer gets {result.emission[0]:,.0f} uevents/s "
        f"out of the kernel with no container running and {result.emission[1]:,.0f}/s with "
        f"the {result.containers} containers' network namespaces (the kernel broadcasts every "
        "uevent into each netns owned by the initial user namespace), nobody listening; "
        "with a receiver on the other CPU the ceiling is the emitter's rate.",
        "Ceiling runs: "
        + "; ".join(
            f"{size:,}: {cs[0].rate:,.0f} / {cs[-1].rate:,.0f} ev/s (received "
            f"{cs[0].received:,} / {cs[-1].received:,} of {size + storm.ADD_EVENTS:,})"
            for size, cs in zip(result.sizes, result.ceilings, strict=True)
        )
        + ".",
        "",
        f"Storm plot: `{STORM_PNG}`."
        if plotted
        else "No plot: matplotlib is not installed (`pip install matplotlib`).",
    ]
    return lines


def cost_report(result: StormResult) -> list[str]:
    idle, after = result.idle, result.after
    growth = after.rss_kb / idle.rss_kb - 1
    helpers = (
        f"{idle.helpers} namespace helper processes (the fork server and one helper per "
        "container used in the last 30 s; "
        f"{idle.helpers_rss_kb / 1024:.0f} MiB RSS, {idle.helpers_pss_kb / 1024:.0f} MiB PSS "
        "together)"
    )
    return [
        "### 3. Cost",
        "",
        "| measurement | value | target |",
        "|---|---:|---|",
        f"| daemon start-up with {result.containers} containers and {result.rules} rules "
        f"| {result.start_seconds:.2f} s | |",
        f"| idle RSS (daemon process) | {idle.rss_kb / 1024:.1f} MiB "
        f"| < {TARGET_IDLE_MB:.0f} MB: {_verdict(idle.rss_kb * 1024 < TARGET_IDLE_MB * 1e6)} |",
        f"| idle PSS (daemon process) | {idle.pss_kb / 1024:.1f} MiB | |",
        f"| idle CPU over {result.idle_seconds:.0f} s | {result.idle_cpu:.2%} of one CPU | |",
        f"| namespace helpers (fork server + helpers) | {idle.helpers} processes, "
        f"{idle.helpers_rss_kb / 1024:.0f} MiB RSS / {idle.helpers_pss_kb / 1024:.0f} MiB PSS | |",
        f"| RSS after the soak ({result.soak_events:,} uevents) | {after.rss_kb / 1024:.1f} MiB "
        f"| growth < {TARGET_GROWTH:.0%}: {growth:+.1%}, {_verdict(growth < TARGET_GROWTH)} |",
        f"| helpers after the soak | {after.helpers} processes, "
        f"{after.helpers_rss_kb / 1024:.0f} MiB RSS | |",
        "",
        f"RSS after each storm: {', '.join(f'{s.rss_after_kb / 1024:.0f}' for s in result.storms)} "
        "MiB (in storm order). A storm's backlog waits in the netlink socket's buffer "
        "(kernel memory, bounded by `rcvbuf`), not in the daemon: at most "
        "`pump.INPUT_BUFFER` batches of parsed uevents are queued inside it.",
        "",
        f"Idle: measured after one warm-up plug into every container, so the {helpers} "
        "exist, "
        f"in a window where the daemon received {result.idle_heard} uevents. The soak is every "
        "storm above, on the same daemon; its RSS after each storm is in the storm table.",
        *(f"Note: {note}" for note in result.notes),
    ]


# -- main ---------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"headline: signal {signum}, cleaning up")


def _sizes(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench headline")
    parser.add_argument("--plugs", type=int, default=500, help="per container and method")
    parser.add_argument("--lxd-plugs", type=int, default=500, help="for LXD's own hotplug")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--interval", type=float, default=0.0002, help="probe poll, seconds")
    parser.add_argument("--containers", type=int, default=100, help="storm containers")
    parser.add_argument("--rules", type=int, default=1000, help="storm rules")
    parser.add_argument("--storm", default="10000,100000,1000000", help="burst sizes")
    parser.add_argument(
        "--storm-scale", type=float, default=1.0, help="multiply the burst sizes (e.g. 0.1)"
    )
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"rule mixes ({', '.join(MIXES)})")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--only", default="latency,storm", help="sections to run")
    parser.add_argument("--no-lxd", action="store_true", help="skip LXD (engine start ~10 s)")
    parser.add_argument("--no-ext4", action="store_true", help="skip the ext4 state-dir row")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="50 plugs, 2 rounds, 20 containers, 200 rules, bursts 10k,100k",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench headline: needs root (containers, cgroups, netlink, zram)")
    if args.quick:
        args.plugs, args.lxd_plugs, args.rounds = 50, 50, 2
        args.containers, args.rules, args.storm, args.idle_seconds = 20, 200, "10000,100000", 3.0
    sections = set(args.only.split(","))
    signal.signal(signal.SIGTERM, _terminate)
    RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Headline benchmarks",
        "",
        f"Machine: {os.cpu_count()} CPUs, kernel {platform.release()}, Python "
        f"{platform.python_version()}; {now}. Command: "
        f"`{' '.join(['python -m bench headline', *(argv or [])])}`.",
        "",
    ]
    if "latency" in sections:
        try:
            lat = latency.measure(
                plugs=args.plugs,
                lxd_plugs=args.lxd_plugs,
                rounds=args.rounds,
                interval=args.interval,
                with_lxd=not args.no_lxd,
                with_ext4=not args.no_ext4,
            )
        except Exception as exc:  # report what failed; the storm may still run
            lines += ["### 1. Hotplug-to-usable latency", "", f"Failed: {exc!r}", ""]
        else:
            plotted = plot.latency_cdf(lat.cells, RESULTS / LATENCY_PNG)
            lines += [*latency_report(lat, plotted), ""]
            # Written now, so a failing storm does not lose the latency table.
            (RESULTS / "headline.md").write_text("\n".join(lines) + "\n")
    if "storm" in sections:
        sizes = [max(1000, int(s * args.storm_scale)) for s in _sizes(args.storm)]
        scale_note = (
            f" Burst sizes scaled by {args.storm_scale} (--storm-scale)."
            if args.storm_scale != 1.0
            else ""
        )
        try:
            result = storm.measure(
                containers=args.containers,
                rules=args.rules,
                sizes=sizes,
                idle_seconds=args.idle_seconds,
                mixes=tuple(m for m in args.mixes.split(",") if m),
            )
        except Exception as exc:
            lines += ["### 2. Storm and 3. Cost", "", f"Failed: {exc!r}", ""]
        else:
            plotted = plot.storm_throughput(result, RESULTS / STORM_PNG)
            lines += [*storm_report(result, plotted, scale_note), ""]
            lines += [*cost_report(result), ""]
    lines.append(f"Whole run: {(time.monotonic() - started) / 60:.1f} min.")
    print(f"  [headline] done in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr)
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
