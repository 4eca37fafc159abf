"""What the namespace helpers cost: memory per container, the first plug, fan-out.

Three measurements, each with its baseline from the same run:

1. **Memory.** N sandbox containers (half privileged, half user-namespaced) each get
   a device node through the daemon's helper pool (``NamespaceHelpers`` +
   ``DeviceNodes``, as in the daemon). Then the USS (Private_Clean + Private_Dirty
   from /proc/PID/smaps_rollup) of every process the pool spawned (the fork server
   and its helpers) is summed and divided by N. Baseline: the USS of one separate
   interpreter that imports what a helper imports, which is what each container
   cost when every helper was its own interpreter.
2. **First plug into a fresh container.** make_node into a container that has no
   helper yet (fork included) against make_node into one whose helper runs: the
   difference is what a fresh (or idled-out) helper adds.
3. **One device to many containers.** One node made in each of M containers at once
   (concurrently across containers, as the executor runs them), from the first
   request to the last node in place, cold (helpers forked on the way) and warm.

Run as root: ``python -m bench helpers [--containers 10,100] [--fresh 20] [--fanout 200]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import trio

from bench.devnode import run_like_tmpfs
from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceType
from hotrelay.effectors.devnode import DeviceNodes
from hotrelay.effectors.nshelper import NamespaceHelpers
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import IdMap, Sandbox

USERNS = IdMap(0, 100000, 65536)


def uss_kib(pid: int) -> int:
    """Private (unshared) memory of a process, in KiB."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def interpreter_uss() -> int:
    """USS of a separate interpreter that imports what a helper imports."""
    code = "import hotrelay.effectors.nshelper.server, sys; sys.stdout.write('ready\\n'); "
    code += "sys.stdout.flush(); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return uss_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def sandboxes(stack: ExitStack, count: int, prefix: str) -> list[ContainerRef]:
    refs = []
    for i in range(count):
        box = Sandbox.create(
            userns=USERNS if i % 2 else None, devices="allow-all", name_prefix=prefix
        )
        stack.callback(box.close)
        refs.append(box.ref())
    return refs


async def make(nodes: DeviceNodes, ref: ContainerRef, path: str, zram: ZramDevice) -> None:
    await nodes.make_node(ref, path, type=DeviceType.BLOCK, major=zram.major, minor=zram.minor)


def _pool_pids(helpers: NamespaceHelpers) -> set[int]:
    pids = {helper.helper_pid for helper in helpers.running()}
    if helpers.fork_server_pid is not None:
        pids.add(helpers.fork_server_pid)
    return pids


async def memory(count: int, zram: ZramDevice, state: Path) -> tuple[int, list[int], int]:
    """(USS KiB of the fork server, USS KiB of each helper, total USS KiB once idle
    helpers are closed) with ``count`` containers holding a device."""
    with ExitStack() as stack:
        refs = sandboxes(stack, count, "bench-mem")
        async with NamespaceHelpers() as helpers:
            nodes = DeviceNodes(helpers, nodes_dir=state)
            for ref in refs:
                await make(nodes, ref, f"/dev/bench-mem/{zram.name}", zram)
            assert helpers.fork_server_pid is not None
            server = uss_kib(helpers.fork_server_pid)
            each = [uss_kib(helper.helper_pid) for helper in helpers.running()]
            # The heal pass's first node check takes a view of each tmpfs /dev (through
            # the helper, once); after the idle timeout the helpers close and the checks
            # need none: the steady state of containers holding devices.
            for ref in refs:
                await helpers.node_exists(ref, f"/dev/bench-mem/{zram.name}")
            await helpers.close_idle(now=float("inf"))
            for ref in refs:
                if not await helpers.node_exists(ref, f"/dev/bench-mem/{zram.name}"):
                    raise RuntimeError(f"{ref.target}: the node is gone")
            if helpers.running():
                raise RuntimeError("a node check forked a helper again")
            idle = sum(uss_kib(pid) for pid in _pool_pids(helpers))
    return server, each, idle


async def first_plug(count: int, zram: ZramDevice, state: Path) -> tuple[list[float], list[float]]:
    """make_node times: (into containers without a helper, into ones with a running one)."""
    cold: list[float] = []
    warm: list[float] = []
    with ExitStack() as stack:
        refs = sandboxes(stack, count, "bench-first")
        async with NamespaceHelpers() as helpers:
            nodes = DeviceNodes(helpers, nodes_dir=state)
            # The fork server itself starts once per daemon; not part of a plug.
            await make(nodes, refs[0], "/dev/bench-first/warmup", zram)
            for ref in refs[1:]:
                start = time.perf_counter()
                await make(nodes, ref, "/dev/bench-first/a", zram)
                cold.append(time.perf_counter() - start)
                start = time.perf_counter()
                await make(nodes, ref, "/dev/bench-first/b", zram)
                warm.append(time.perf_counter() - start)
    return cold, warm


async def fanout(count: int, zram: ZramDevice, state: Path) -> tuple[float, float]:
    """Seconds until one node is in each of ``count`` containers: (cold, warm)."""
    with ExitStack() as stack:
        refs = sandboxes(stack, count, "bench-fan")
        async with NamespaceHelpers() as helpers:
            nodes = DeviceNodes(helpers, nodes_dir=state)
            await helpers.get(refs[0])  # the fork server runs already, as in a daemon
            results = []
            for path in ("/dev/bench-fan/cold", "/dev/bench-fan/warm"):
                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for ref in refs:
                        nursery.start_soon(make, nodes, ref, path, zram)
                results.append(time.perf_counter() - start)
    return results[0], results[1]


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench helpers")
    parser.add_argument("--containers", default="10,100")
    parser.add_argument("--fresh", type=int, default=20)
    parser.add_argument("--fanout", type=int, default=200)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench helpers: needs root (namespaces, zram, mounts)")
    counts = [int(c) for c in args.containers.split(",")]
    load_before = os.getloadavg()[0]

    async def run() -> tuple[
        list[tuple[int, list[int], int]], tuple[list[float], list[float]], tuple[float, float]
    ]:
        with (
            ZramDevice() as zram,
            tempfile.TemporaryDirectory(prefix="hotrelay-bench-") as tmp,
            run_like_tmpfs(Path(tmp)),
        ):
            state = Path(tmp) / "hotrelay" / "nodes"
            mem = [await memory(count, zram, state) for count in counts]
            first = await first_plug(args.fresh + 1, zram, state)
            fan = await fanout(args.fanout, zram, state)
        return mem, first, fan

    mem, (cold, warm), (fan_cold, fan_warm) = trio.run(run)
    baseline = interpreter_uss()
    lines = [
        "### Namespace helpers: memory, first plug, fan-out",
        "",
        "| containers holding a device | helpers | fork server KiB | helper KiB (mean) | "
        "all / containers KiB | after the idle timeout, / containers KiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for count, (server, each, idle) in zip(counts, mem, strict=True):
        per = (server + sum(each)) / count
        lines.append(
            f"| {count} | {len(each)} | {server} | {statistics.mean(each):.0f} | {per:.0f} | "
            f"{idle / count:.0f} |"
        )
    lines += [
        "",
        f"Baseline, same run: one interpreter per container (what each helper used to be) "
        f"{baseline} KiB.",
    ]
    extra = [c - w for c, w in zip(cold, warm, strict=True)]
    lines += [
        "",
        "| first plug into a fresh container | samples | p50 ms | p90 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        f"| no helper yet (fork included) | {len(cold)} | {statistics.median(cold) * 1e3:.2f} | "
        f"{percentile(cold, 0.9) * 1e3:.2f} | {max(cold) * 1e3:.2f} |",
        f"| helper running | {len(warm)} | {statistics.median(warm) * 1e3:.2f} | "
        f"{percentile(warm, 0.9) * 1e3:.2f} | {max(warm) * 1e3:.2f} |",
        f"| extra for a fresh helper | {len(extra)} | {statistics.median(extra) * 1e3:.2f} | "
        f"{percentile(extra, 0.9) * 1e3:.2f} | {max(extra) * 1e3:.2f} |",
        "",
        f"One device to {args.fanout} containers at once (half user-namespaced): "
        f"{fan_cold:.3f} s with a helper forked for each on the way, "
        f"{fan_warm:.3f} s with their helpers running.",
        "",
        "Goals (issue 12): <= 1 MiB per container, <= 10 ms extra for the first plug, "
        "<= 1 s for one device to 200 containers.",
        f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}, load average "
        f"{load_before:.2f} before the run. Command: python -m bench helpers "
        f"--containers {args.containers} --fresh {args.fresh} --fanout {args.fanout}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
