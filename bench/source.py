"""Event-source throughput: parse alone, our trio source, a bare recv() loop, pyudev.

Every receiver is measured in this one run against the same burst of synthetic kernel
uevents (written by a separate emitter process to a zram device this benchmark creates),
so the ratios hold on a noisy machine. The bare recv() loop is the ceiling: it does
nothing but receive. Run as root: ``python -m bench source [--events N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyudev
import trio

from hotrelay.core.uevent import Uevent, Wire, parse, serialize
from hotrelay.daemon.source import EventSource, Overflow, SourceItem, SourceKind
from hotrelay.kernel import netlink
from hotrelay.testing.hotplug import ZramDevice

BUFFER = 64 * 1024 * 1024
IDLE_END = 1.0  # seconds without a matching event that end a receive run
GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "uevents"

EMITTER = """
import os, sys, time
path, count = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY)
start = time.perf_counter()
for _ in range(count):
    os.pwrite(fd, b"change", 0)
print(count / (time.perf_counter() - start))
"""


@dataclass(frozen=True)
class Result:
    method: str
    received: int
    sent: int
    seconds: float
    emit_rate: float | None = None
    overflows: int = 0
    worst_lost: int | None = None  # over all rounds, when this is a median

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.received if self.worst_lost is None else self.worst_lost


def start_emitter(syspath: Path, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", EMITTER, str(syspath / "uevent"), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def finish_emitter(emitter: subprocess.Popen[str]) -> float:
    out, _ = emitter.communicate(timeout=120)
    return float(out.strip())


def bench_raw(zram: ZramDevice, count: int) -> Result:
    marker = f"change@{zram.devpath}\0".encode()
    with netlink.open_uevent_socket(
        netlink.KERNEL_GROUP, rcvbuf=BUFFER, passcred=False, nonblocking=False
    ) as sock:
        sock.settimeout(IDLE_END)
        emitter = start_emitter(zram.syspath, count)
        start = time.perf_counter()
        received = 0
        last = start
        try:
            while received < count:
                if sock.recv(8192).startswith(marker):
                    received += 1
                    last = time.perf_counter()
        except TimeoutError:
            pass
        emit_rate = finish_emitter(emitter)
    return Result("bare recv() loop (ceiling)", received, count, last - start, emit_rate)


def bench_trio_source(zram: ZramDevice, count: int) -> Result:
    async def run() -> Result:
        received = overflows = 0
        with EventSource(SourceKind.KERNEL, rcvbuf=BUFFER) as source:
            send, receive = trio.open_memory_channel[Sequence[SourceItem]](1024)
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run, send)
                emitter = start_emitter(zram.syspath, count)
                start = last = time.perf_counter()
                with trio.move_on_after(IDLE_END) as idle:
                    async for batch in receive:
                        for item in batch:
                            if isinstance(item, Overflow):
                                overflows += 1
                            elif item.devpath == zram.devpath and item.action == "change":
                                received += 1
                                last = time.perf_counter()
                        idle.deadline = trio.current_time() + IDLE_END
                        if received >= count:
                            break
                nursery.cancel_scope.cancel()
        emit_rate = await trio.to_thread.run_sync(finish_emitter, emitter)
        return Result("hotrelay trio source", received, count, last - start, emit_rate, overflows)

    return trio.run(run)


def bench_pyudev(zram: ZramDevice, count: int) -> Result:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.set_receive_buffer_size(BUFFER)
    monitor.start()
    emitter = start_emitter(zram.syspath, count)
    start = last = time.perf_counter()
    received = overflows = 0
    while received < count:
        try:
            device = monitor.poll(timeout=IDLE_END)
        except OSError:
            overflows += 1  # pyudev reports ENOBUFS as OSError(errno None)
            continue
        if device is None:
            break
        if device.device_path == zram.devpath:
            received += 1
            last = time.perf_counter()
    emit_rate = finish_emitter(emitter)
    return Result("pyudev Monitor.poll()", received, count, last - start, emit_rate, overflows)


def bench_parse(name: str, data: bytes, count: int) -> Result:
    start = time.perf_counter()
    for _ in range(count):
        parse(data)
    return Result(name, count, count, time.perf_counter() - start)


def median_result(results: Sequence[Result]) -> Result:
    """The median-rate run, reporting the worst loss and overflows of all runs."""
    middle = sorted(results, key=lambda r: r.rate)[len(results) // 2]
    return dataclasses.replace(
        middle,
        overflows=max(r.overflows for r in results),
        worst_lost=max(r.lost for r in results),
    )


def table(results: Sequence[Result], ceiling: float) -> str:
    lines = [
        "| method | events/s | vs ceiling | received | lost | overflows | emitter events/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r.rate / ceiling:.0%}" if r.emit_rate is not None and ceiling else "n/a"
        emit = f"{r.emit_rate:,.0f}" if r.emit_rate is not None else "-"
        lines.append(
            f"| {r.method} | {r.rate:,.0f} | {ratio} | {r.received:,} | {r.lost:,} "
            f"| {r.overflows} | {emit} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench source")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench source: needs root (netlink groups, zram)")
    count: int = args.events

    kernel_bytes = (GOLDEN / "kernel-zram-add.bin").read_bytes()
    udev_bytes = (GOLDEN / "udev-zram-add.bin").read_bytes()
    results = [
        bench_parse("parse() kernel format (no I/O)", kernel_bytes, count),
        bench_parse("parse() libudev format (no I/O)", udev_bytes, count),
    ]
    runs: list[Callable[[ZramDevice, int], Result]] = [bench_raw, bench_trio_source, bench_pyudev]
    rounds: list[list[Result]] = [[] for _ in runs]
    with ZramDevice() as zram:
        # Interleaved so that a noisy minute hurts every method alike; medians reported.
        for round_ in range(args.rounds):
            for i, run in enumerate(runs):
                rounds[i].append(run(zram, count))
                print(
                    f"  round {round_ + 1}: {rounds[i][-1].method}: {rounds[i][-1].rate:,.0f}/s",
                    file=sys.stderr,
                )
    results += [median_result(r) for r in rounds]
    ceiling = results[2].rate
    source = results[3]
    report = "\n".join(
        [
            f"### Event source: burst of {count:,} synthetic uevents, 64 MiB buffer "
            f"(median of {args.rounds} interleaved rounds; lost = worst round)",
            "",
            table(results, ceiling),
            "",
            f"Target: trio source >= 60% of the ceiling with zero loss -> "
            f"{source.rate / ceiling:.0%}, lost {source.lost}.",
            "",
            f"Round trip check: {serialize(parse(udev_bytes), Wire.UDEV) == udev_bytes}; "
            f"{Uevent.__name__} frozen dataclass; machine: {os.cpu_count()} CPUs, "
            f"kernel {os.uname().release}.",
        ]
    )
    return report


if __name__ == "__main__":
    print(main())
