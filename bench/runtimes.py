"""Runtime adapters: resolving many running containers at start-up, noticing a stop.

N containers are bare namespace containers started here (``unshare --pid --fork
--mount-proc --net --uts --ipc --kill-child sleep``, each in its own v1 devices cgroup
and cgroup2 directory, registered in a private machined-style directory), so the
numbers measure hotrelay, not a runtime's daemon. Measured in the same run:

- start-up resolution of all N through three adapters (``pid:`` targets, one
  ``cgroup:`` glob, machined files) and a watcher's start-up (all N reported);
- the time from SIGKILL of a container's init to the watcher's ContainerStopped,
  through the pidfd, against a baseline that polls the pid every 100 ms.

Run as root: ``python -m bench runtimes [--containers N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerEvent, ContainerStarted, ContainerStopped
from hotrelay.runtimes.base import Adapter
from hotrelay.runtimes.nspawn import NspawnAdapter
from hotrelay.runtimes.raw import CgroupAdapter, PidAdapter
from hotrelay.testing.sandbox import remove_cgroup_tree

CGROUP_ROOT = Path("/sys/fs/cgroup")
HIERARCHIES = ("unified", "devices")
POLL_BASELINE_INTERVAL = 0.1
TARGET_STOP_MS = 50.0


@dataclass
class BenchContainer:
    index: int
    outer: subprocess.Popen[bytes]  # `unshare`, which waits for the init
    init_pid: int


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


class Fleet:
    """N namespace containers with cgroups and machine files; close() undoes it all."""

    def __init__(self, count: int) -> None:
        self.name = f"hotrelay-bench-{os.getpid()}"
        self.cgroup_dirs = [CGROUP_ROOT / hierarchy / self.name for hierarchy in HIERARCHIES]
        self.machines = Path(tempfile.mkdtemp(prefix="hotrelay-bench-machines-"))
        self.containers: list[BenchContainer] = []
        try:
            for parent in self.cgroup_dirs:
                parent.mkdir()
            for index in range(count):
                self.containers.append(self._start(index))
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> BenchContainer:
        cgroups = [parent / f"c{index}" for parent in self.cgroup_dirs]
        for cgroup in cgroups:
            cgroup.mkdir()
        join = " && ".join(f"echo $$ > {cg}/cgroup.procs" for cg in cgroups)
        outer = subprocess.Popen(
            ["/bin/sh", "-c", f"{join} && exec unshare --pid --fork --mount-proc --net --uts "
             "--ipc --kill-child sleep 1000000"],
            stdin=subprocess.DEVNULL,
            # util-linux 2.38's unshare complains about sigprocmask when its child dies.
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not (children := _children(outer.pid)) or _comm(children[0]) != "sleep":
            if time.monotonic() > deadline or outer.poll() is not None:
                raise RuntimeError(f"container {index} did not start")
            time.sleep(0.002)
        init_pid = children[0]
        (self.machines / f"m{index}").write_text(
            f"NAME=m{index}\nLEADER={init_pid}\nCLASS=container\nSCOPE=machine-m{index}.scope\n"
        )
        return BenchContainer(index, outer, init_pid)

    def kill(self, container: BenchContainer) -> None:
        os.kill(container.init_pid, signal.SIGKILL)

    def close(self) -> None:
        for container in self.containers:
            with contextlib.suppress(ProcessLookupError):
                container.outer.kill()  # --kill-child takes the init along
            container.outer.wait()
        self.containers.clear()
        for parent in self.cgroup_dirs:
            remove_cgroup_tree(parent, timeout=2.0)
        shutil.rmtree(self.machines, ignore_errors=True)


def _running(pid: int) -> bool:
    """Not exited (a zombie has exited: its parent just has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2]
    except FileNotFoundError:
        return False
    return state.split()[0] not in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass
class Row:
    what: str
    samples: list[float]  # seconds

    def cells(self) -> str:
        p50 = percentile(self.samples, 0.5) * 1000
        p99 = percentile(self.samples, 0.99) * 1000
        worst = max(self.samples) * 1000
        return f"| {self.what} | {len(self.samples)} | {p50:.2f} | {p99:.2f} | {worst:.2f} |"


async def time_resolution(name: str, make: Callable[[], Adapter], count: int, rounds: int) -> Row:
    samples = []
    for _ in range(rounds):
        adapter = make()
        start = time.perf_counter()
        refs = await adapter.list_running()
        samples.append(time.perf_counter() - start)
        if len(refs) != count:
            raise RuntimeError(f"{name}: resolved {len(refs)} of {count}")
    return Row(name, samples)


async def time_watch_startup(make: Callable[[], Adapter], count: int, rounds: int) -> Row:
    samples = []
    for _ in range(rounds):
        adapter = make()
        send, receive = trio.open_memory_channel[ContainerEvent](count * 2)
        async with trio.open_nursery() as nursery:
            start = time.perf_counter()
            await nursery.start(adapter.watch, send)
            samples.append(time.perf_counter() - start)
            started = 0
            while True:
                try:
                    event = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                started += isinstance(event, ContainerStarted)
            if started != count:
                raise RuntimeError(f"watcher reported {started} of {count}")
            nursery.cancel_scope.cancel()
    return Row(f"watcher start-up ({count} ContainerStarted)", samples)


async def time_stops(fleet: Fleet, victims: list[BenchContainer]) -> Row:
    """SIGKILL each victim's init; time until the watcher says ContainerStopped."""
    adapter = PidAdapter([c.init_pid for c in fleet.containers], resync_interval=3600)
    send, receive = trio.open_memory_channel[ContainerEvent](len(fleet.containers) * 2)
    samples = []
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        while True:
            try:
                receive.receive_nowait()
            except trio.WouldBlock:
                break
        for victim in victims:
            start = time.perf_counter()
            fleet.kill(victim)
            with trio.fail_after(10):
                event = await receive.receive()
            samples.append(time.perf_counter() - start)
            if not isinstance(event, ContainerStopped) or event.container.pid != victim.init_pid:
                raise RuntimeError(f"unexpected event {event}")
        nursery.cancel_scope.cancel()
    return Row("stop noticed: pidfd watcher (SIGKILL -> ContainerStopped)", samples)


async def time_poll_baseline(fleet: Fleet, victims: list[BenchContainer]) -> Row:
    """What a poller checking the pid every 100 ms would see (the baseline)."""
    samples = []
    for victim in victims:
        start = time.perf_counter()
        fleet.kill(victim)
        while True:
            await trio.sleep(POLL_BASELINE_INTERVAL)
            if not _running(victim.init_pid):
                break
        samples.append(time.perf_counter() - start)
    label = f"baseline: poll /proc every {POLL_BASELINE_INTERVAL * 1000:.0f} ms (worst phase)"
    return Row(label, samples)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench runtimes")
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20, help="start-up resolutions timed")
    parser.add_argument("--baseline-stops", type=int, default=10)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench runtimes: needs root (namespaces, cgroups)")
    count: int = args.containers
    rounds: int = args.rounds
    setup_start = time.perf_counter()
    fleet = Fleet(count + args.baseline_stops)
    setup = time.perf_counter() - setup_start
    print(f"  started {len(fleet.containers)} containers in {setup:.1f} s", file=sys.stderr)
    try:
        measured = fleet.containers[:count]
        spare = fleet.containers[count:]
        pids = [c.init_pid for c in measured]
        cgroup_glob = f"/{fleet.name}/c*"

        async def run() -> list[Row]:
            # The baseline containers are killed first, so they do not count below.
            baseline = await time_poll_baseline(fleet, spare)
            del fleet.containers[count:]
            for container in spare:
                container.outer.wait()
            makers: list[tuple[str, Callable[[], Adapter]]] = [
                (f"resolve {count} pid: targets", lambda: PidAdapter(pids)),
                (f"resolve cgroup:{cgroup_glob} ({count} cgroups)",
                 lambda: CgroupAdapter([cgroup_glob])),
                (f"resolve {count} machined files (nspawn)",
                 lambda: NspawnAdapter(fleet.machines)),
            ]  # fmt: skip
            rows = [await time_resolution(name, make, count, rounds) for name, make in makers]
            rows.append(await time_watch_startup(lambda: PidAdapter(pids), count, rounds))
            rows.append(await time_stops(fleet, measured))
            rows.append(baseline)
            return rows

        rows = trio.run(run)
    finally:
        fleet.close()
    per_container = percentile(rows[0].samples, 0.5) / count * 1e6
    stop_p99 = percentile(rows[-2].samples, 0.99) * 1000
    verdict = "met" if stop_p99 < TARGET_STOP_MS else "MISSED"
    return "\n".join(
        [
            f"### Runtime adapters: {count} running namespace containers "
            f"({rounds} start-up rounds; {count} stops)",
            "",
            "| measurement | samples | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            *(row.cells() for row in rows),
            "",
            f"Start-up resolution costs {per_container:.0f} us per container (pid: targets: "
            "pidfd_open, /proc/PID/{stat,cgroup,status,uid_map,gid_map,ns/*}, liveness check).",
            f"Target: stop noticed in < {TARGET_STOP_MS:.0f} ms -> "
            f"p99 {stop_p99:.2f} ms, {verdict}.",
            f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}.",
        ]
    )


if __name__ == "__main__":
    print(main(sys.argv[1:]))
