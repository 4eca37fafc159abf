"""Node injection latency: from "action issued" to "node openable inside the container".

Each sample starts when the daemon side calls ``DeviceNodes.make_node`` and ends when
a probe process living inside the container (its namespaces and cgroups, as its
root) has opened the new node and said so over a pipe; the probe's round trip is
part of every sample, so the numbers are an upper bound. One zram device is reused
under a different target path each time (/dev/bench/nNNNN), in a privileged sandbox
(mknod) and a user-namespaced one mapped 0->100000 (host node + open_tree +
move_mount). The state dir is a nodev tmpfs, like /run.

Baselines, in the same run: a fresh helper per action (spawn, join, create, exit and
reap: what a fork-per-action daemon pays), and for the privileged sandbox
``nsenter -t PID -m -- mknod`` (nsenter cannot make a usable node in a user
namespace). Run as root: ``python -m bench devnode [--devices N] [--baseline N]``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceType
from hotrelay.effectors.devnode import DeviceNodes, NodeRecord
from hotrelay.effectors.nshelper import NamespaceHelpers
from hotrelay.kernel import libc
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import IdMap, Sandbox

# Inside the container: open each path named on stdin, answer 0 or the errno.
PROBE = """
import os, sys
for line in sys.stdin:
    try:
        os.close(os.open(line.rstrip("\\n"), os.O_RDONLY | os.O_CLOEXEC))
        sys.stdout.write("0\\n")
    except OSError as exc:
        sys.stdout.write(f"{exc.errno}\\n")
    sys.stdout.flush()
"""


@dataclass(frozen=True)
class Row:
    container: str
    method: str
    samples: list[float]  # seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


class Probe:
    """A process inside the sandbox that opens paths on request."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._proc = sandbox.popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE)
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._send = trio.lowlevel.FdStream(os.dup(self._proc.stdin.fileno()))
        self._receive = trio.lowlevel.FdStream(os.dup(self._proc.stdout.fileno()))
        self._buffer = b""

    async def open(self, path: str) -> int:
        await self._send.send_all(path.encode() + b"\n")
        while b"\n" not in self._buffer:
            chunk = await self._receive.receive_some(4096)
            if not chunk:
                raise RuntimeError("probe exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return int(line)

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()
        self._proc.kill()
        self._proc.wait()


async def make(nodes: DeviceNodes, ref: ContainerRef, path: str, zram: ZramDevice) -> NodeRecord:
    return await nodes.make_node(
        ref, path, type=DeviceType.BLOCK, major=zram.major, minor=zram.minor
    )


async def until_openable(probe: Probe, path: str) -> None:
    while (err := await probe.open(path)) != 0:
        if err != 2:  # ENOENT: not there yet; anything else is a failure
            raise OSError(err, os.strerror(err), path)


async def measure(
    probe: Probe, count: int, act: Callable[[int, str], Awaitable[object]], stem: str
) -> list[float]:
    samples = []
    for i in range(count):
        path = f"/dev/bench/{stem}{i:04d}"
        start = time.perf_counter()
        await act(i, path)
        await until_openable(probe, path)
        samples.append(time.perf_counter() - start)
    return samples


async def bench_container(
    label: str, userns: IdMap | None, zram: ZramDevice, devices: int, baseline: int, state: Path
) -> list[Row]:
    rows = []
    with Sandbox.create(userns=userns, devices="allow-all", name_prefix="bench-devnode") as box:
        ref = box.ref()
        probe = Probe(box)
        try:
            async with NamespaceHelpers() as helpers:
                nodes = DeviceNodes(helpers, nodes_dir=state)
                records: list[NodeRecord] = []

                async def long_lived(i: int, path: str) -> None:
                    records.append(await make(nodes, ref, path, zram))

                await nodes.remove_node(ref, await make(nodes, ref, "/dev/bench-warm", zram))
                rows.append(
                    Row(label, "long-lived helper", await measure(probe, devices, long_lived, "n"))
                )
                removals = []
                for record in records:
                    start = time.perf_counter()
                    await nodes.remove_node(ref, record)
                    removals.append(time.perf_counter() - start)
                rows.append(Row(label, "  removal (long-lived)", removals))

            async def fresh_helper(i: int, path: str) -> None:
                async with NamespaceHelpers() as once:
                    record = await make(DeviceNodes(once, nodes_dir=state), ref, path, zram)
                fresh_records.append(record)

            fresh_records: list[NodeRecord] = []
            rows.append(
                Row(
                    label,
                    "fresh helper per action",
                    await measure(probe, baseline, fresh_helper, "f"),
                )
            )
            async with NamespaceHelpers() as helpers:
                nodes = DeviceNodes(helpers, nodes_dir=state)
                for record in fresh_records:
                    await nodes.remove_node(ref, record)

                if userns is None:

                    async def nsenter(i: int, path: str) -> None:
                        await trio.run_process(
                            ["nsenter", "-t", str(box.pid), "-m", "--", "mknod",
                             path, "b", str(zram.major), str(zram.minor)]
                        )  # fmt: skip

                    await trio.run_process(
                        ["nsenter", "-t", str(box.pid), "-m", "--", "mkdir", "-p", "/dev/bench"]
                    )
                    rows.append(
                        Row(
                            label,
                            "nsenter -m mknod per action",
                            await measure(probe, baseline, nsenter, "s"),
                        )
                    )
                    await trio.run_process(
                        ["nsenter", "-t", str(box.pid), "-m", "--", "rm", "-rf", "/dev/bench"]
                    )
        finally:
            await probe.aclose()
    return rows


@contextmanager
def run_like_tmpfs(path: Path) -> Iterator[None]:
    """A tmpfs mounted nodev, as /run (the default state dir) is on most hosts."""
    libc.mount("tmpfs", path, "tmpfs", libc.MS_NODEV | libc.MS_NOSUID, "mode=755")
    try:
        yield
    finally:
        libc.umount2(path, libc.MNT_DETACH)


def render(rows: list[Row], devices: int, baseline: int) -> str:
    lines = [
        f"### Node injection latency: action issued -> node openable inside "
        f"({devices} devices with the long-lived helper, {baseline} per baseline)",
        "",
        "| container | method | samples | p50 ms | p99 ms | max ms | p99 vs long-lived |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for container in dict.fromkeys(row.container for row in rows):
        mine = [row for row in rows if row.container == container]
        ours = mine[0]
        for row in mine:
            ratio = row.percentile(0.99) / ours.percentile(0.99)
            lines.append(
                f"| {container} | {row.method} | {len(row.samples)} | "
                f"{row.percentile(0.5) * 1e3:.2f} | {row.percentile(0.99) * 1e3:.2f} | "
                f"{max(row.samples) * 1e3:.2f} | {ratio:.1f}x |"
            )
        fresh = next(row for row in mine if row.method == "fresh helper per action")
        speedup = fresh.percentile(0.99) / ours.percentile(0.99)
        verdicts.append(
            f"{container}: p99 {ours.percentile(0.99) * 1e3:.2f} ms "
            f"({'<' if ours.percentile(0.99) < 0.002 else '>='} 2 ms), "
            f"{speedup:.0f}x faster than a fresh helper per action"
        )
    lines += [
        "",
        "Target: p99 < 2 ms with the long-lived helper and >= 10x faster than the baseline.",
        *(f"- {verdict}" for verdict in verdicts),
        "",
        f"Each sample includes a probe round trip (pipe to a process inside that opens the "
        f"node). Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench devnode")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=100)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench devnode: needs root (namespaces, zram, mounts)")

    async def run() -> list[Row]:
        rows: list[Row] = []
        with (
            ZramDevice() as zram,
            tempfile.TemporaryDirectory(prefix="hotrelay-bench-") as tmp,
            run_like_tmpfs(Path(tmp)),
        ):
            state = Path(tmp) / "hotrelay" / "nodes"
            for label, userns in (
                ("privileged", None),
                ("userns 0->100000", IdMap(0, 100000, 65536)),
            ):
                rows += await bench_container(
                    label, userns, zram, args.devices, args.baseline, state
                )
                leftover = os.listdir(state) if state.exists() else []
                if leftover:
                    raise RuntimeError(f"host nodes left behind: {leftover}")
        return rows

    return render(trio.run(run), args.devices, args.baseline)


if __name__ == "__main__":
    print(main())
