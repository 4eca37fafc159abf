"""Storm and cost for ``python -m bench headline``.

100 containers (bare namespace containers: ``unshare`` with their own pid, mount, net,
uts and ipc namespaces, a tmpfs on /dev, a default-deny v1 devices cgroup and a
cgroup2 directory each, named to hotrelay as ``pid:`` targets) and 1,000 rules: one
that sends every new zram disk to all 100 containers and 999 that match nothing here
(USB serial adapters, disks by serial, webcams, NVMe, a few zram rules on attributes),
each naming one to three of the containers.

A storm is one burst written by a separate emitter process: N synthetic ``change``
uevents, 99% on a zram disk no rule matches and 1% on a second zram disk that the
emitter hot-adds after the first 1% of the burst (so its real ``add`` is in the middle
of the storm) and that the matching rule sends into every container. The daemon's
``status`` counters are read every 20 ms: events received and processed, overflows.
The end state is correct when the second disk's node is in every container's /dev
with the right numbers and every container's device cgroup allows it; an event lost
to an overflow must be recovered by the resync. The ceiling is a bare ``recv()`` loop
(64 MiB buffer, nothing else) on the same bursts, measured before the daemon starts
and after it stops.

Cost: the daemon's RSS and CPU while idle with the 100 containers and 1,000 rules
(after one warm-up plug, so the per-container namespace helpers exist), and its RSS
again after every storm (the soak).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.headline_latency import Zram, log
from hotrelay.kernel import netlink
from hotrelay.testing.daemon import RunningDaemon
from hotrelay.testing.sandbox import OCI_DEFAULT_ALLOW, remove_cgroup_tree

CGROUP_ROOT = Path("/sys/fs/cgroup")
BUFFER = 64 * 1024 * 1024
POLL = 0.02
QUIET = 1.0  # seconds without a new event that end a receive
STORM_TIMEOUT = 300.0
NODE_PREFIX = "hrs-"
ADD_EVENTS = 2  # a zram hot_add: add@/devices/virtual/block/zramN and add@.../bdi/MAJ:N

EMITTER = """
import json, os, sys, time
noise, count, add_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
write = os.pwrite
a = os.open(noise, os.O_WRONLY)
index = None
matching = done = 0
error = None
began = time.monotonic()
start = time.perf_counter()
try:
    for _ in range(add_at):
        write(a, b"change", 0)
    done = add_at
    fd = os.open("/sys/class/zram-control/hot_add", os.O_RDONLY)
    index = int(os.read(fd, 64))
    os.close(fd)
    b = os.open(f"/sys/block/zram{index}/uevent", os.O_WRONLY)
    rest = count - add_at
    noise_per_match = range(99)
    for _ in range(rest // 100):
        write(b, b"change", 0)
        matching += 1
        for _ in noise_per_match:
            write(a, b"change", 0)
        done += 100
    for _ in range(rest - (rest // 100) * 100):
        write(a, b"change", 0)
        done += 1
except OSError as exc:  # another session removed one of our disks
    error = str(exc)
seconds = time.perf_counter() - start
print(json.dumps({"index": index, "count": done, "matching": matching, "seconds": seconds,
                  "began": began, "error": error}))
"""


# -- the containers ------------------------------------------------------------------------


@dataclass
class Member:
    index: int
    outer: subprocess.Popen[bytes]
    pid: int
    devices: Path


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                found += [
                    int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Fleet:
    """N namespace containers with their own /dev; close() kills and reaps them all."""

    def __init__(self, count: int) -> None:
        self.name = f"hotrelay-headline-{os.getpid()}"
        self.parents = [CGROUP_ROOT / "devices" / self.name, CGROUP_ROOT / "unified" / self.name]
        self.members: list[Member] = []
        try:
            for parent in self.parents:
                parent.mkdir()
            for index in range(count):
                self.members.append(self._start(index))
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> Member:
        cgroups = [parent / f"c{index}" for parent in self.parents]
        for cgroup in cgroups:
            cgroup.mkdir()
        devices = cgroups[0]
        _write(devices / "devices.deny", "a")
        for rule in OCI_DEFAULT_ALLOW:
            _write(devices / "devices.allow", rule)
        join = " && ".join(f"echo $$ > {cg}/cgroup.procs" for cg in cgroups)
        inner = "mount -t tmpfs -o mode=0755,size=256k hrstorm /dev && exec sleep 1000000"
        outer = subprocess.Popen(
            ["/bin/sh", "-c", f"{join} && exec unshare --mount --pid --fork --mount-proc --net "
             f"--uts --ipc --kill-child /bin/sh -c '{inner}'"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not (children := _children(outer.pid)) or _comm(children[0]) != "sleep":
            if time.monotonic() > deadline or outer.poll() is not None:
                raise RuntimeError(f"storm container {index} did not start")
            time.sleep(0.002)
        return Member(index, outer, children[0], devices)

    def node_ok(self, member: Member, major: int, minor: int) -> bool:
        """The node is in the container's /dev and its device cgroup allows it."""
        try:
            st = os.stat(f"/proc/{member.pid}/root/dev/{NODE_PREFIX}zram{minor}")
        except FileNotFoundError:
            return False
        if st.st_rdev != os.makedev(major, minor):
            return False
        return f"b {major}:{minor} rwm" in (member.devices / "devices.list").read_text()

    def node_gone(self, member: Member, minor: int) -> bool:
        return not os.path.lexists(f"/proc/{member.pid}/root/dev/{NODE_PREFIX}zram{minor}")

    def close(self) -> None:
        for member in self.members:
            # pid 1 first: unshare reaps it and exits, so nothing is orphaned.
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.pid, signal.SIGKILL)
            try:
                member.outer.wait(10)
            except subprocess.TimeoutExpired:
                member.outer.kill()
                member.outer.wait()
        self.members.clear()
        for parent in self.parents:
            remove_cgroup_tree(parent, timeout=10.0)


# -- the rules ----------------------------------------------------------------------------


MIXES = {
    "indexed": "every rule indexed by an exact value",
    "mixed": "2% scanned rules (zram disks by attr.disksize: globs, read sysfs on each event)",
}


def rule_files(
    pids: list[int], total: int, index: int, mix: str = "mixed", seed: int = 8
) -> dict[str, str]:
    """``total`` rules: one that sends zram ``index`` to every container (one index, as
    other sessions on this machine hot-add zram devices too), the rest matching nothing
    on this host; in files of 100 rules. The same rules for the same seed. With mix
    "indexed" the 2% zram-by-size rules become exact zram names (indexed too)."""
    rng = random.Random(seed)
    every = ", ".join(f'"pid:{pid}"' for pid in pids)
    rules = [
        "[[rule]]\n"
        'name = "storm-zram"\n'
        f"target = [{every}]\n"
        "[rule.match]\n"
        'subsystem = "block"\n'
        f'kernel = "zram{index}"\n'
        "[rule.device]\n"
        f'path = "/dev/{NODE_PREFIX}{{kernel}}"\n'
        'mode = "0660"\n'
    ]

    def targets() -> str:
        return ", ".join(f'"pid:{pid}"' for pid in rng.sample(pids, rng.randint(1, 3)))

    for i in range(1, total):
        kind = i % 50
        head = f'[[rule]]\nname = "quiet-{i}"\ntarget = [{targets()}]\n[rule.match]\n'
        vendor, product = f"{rng.randrange(0x10000):04x}", f"{rng.randrange(0x10000):04x}"
        usb = f'usb = {{ vendor = "{vendor}", product = "{product}" }}\n'
        device = ""
        if kind < 20:  # serial adapters and radio dongles (40%)
            body = f'subsystem = "tty"\n{usb}'
            device = f'[rule.device]\npath = "/dev/serial-{i}"\ngroup = 20\nmode = "0660"\n'
        elif kind < 30:  # disks by kernel name (20%)
            body = f'subsystem = "block"\nkernel = "{rng.choice(["sd", "vd", "xvd"])}q{i}"\n'
        elif kind < 35:  # disks by serial (10%)
            body = f'subsystem = "block"\nkernel = "sd*"\nenv.ID_SERIAL = "DISK{i:06d}"\n'
        elif kind < 40:  # webcams and HID (10%)
            subsystem = rng.choice(["video4linux", "hidraw", "input"])
            body = f'subsystem = "{subsystem}"\n{usb}'
        elif kind < 47:  # NVMe and mmc (14%)
            body = f'subsystem = "block"\nkernel = "nvme{i}n1|mmcblk{i}"\n'
        elif kind < 49:  # one exact USB serial adapter by serial number (4%)
            serial = f"A{rng.randrange(16**8):08X}"
            body = (
                f'subsystem = "tty"\nusb = {{ vendor = "{vendor}", product = "{product}", '
                f'serial = "{serial}" }}\n'
            )
        elif mix == "indexed":  # a zram disk by its exact name (2%)
            body = f'subsystem = "block"\nkernel = "zram{1000 + i}"\n'
        else:  # zram disks of one exact size (2%): globs, scanned on every block event
            body = f'subsystem = "block"\nkernel = "zram*"\nattr.disksize = "{i * 4096 + 7}"\n'
        rules.append(head + body + device)
    files = {}
    for start in range(0, len(rules), 100):
        files[f"{start // 100:02d}-storm.toml"] = "\n".join(rules[start : start + 100])
    return files


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Burst:
    size: int
    emitted: int = 0
    matching: int = 0
    emit_seconds: float = 0.0
    index: int | None = None
    began: float = 0.0  # CLOCK_MONOTONIC of the emitter's first write
    error: str | None = None  # the emitter could not finish (a disk of ours vanished)

    @property
    def emit_rate(self) -> float:
        return self.emitted / self.emit_seconds if self.emit_seconds else 0.0


def start_emitter(noise: Zram, noise_index: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", EMITTER, f"/sys/block/zram{noise_index}/uevent", str(size),
         str(size // 100)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish_emitter(emitter: subprocess.Popen[str], burst: Burst, zram: Zram) -> None:
    out, _ = emitter.communicate(timeout=STORM_TIMEOUT)
    data = json.loads(out)
    burst.emitted = data["count"]
    burst.matching = data["matching"]
    burst.emit_seconds = data["seconds"]
    burst.index = data["index"]
    burst.began = data["began"]
    burst.error = data["error"]
    if burst.index is not None:
        zram.mine.add(burst.index)


def ensure_noise(zram: Zram, noise_index: int) -> int:
    """The noise disk's index; a new disk if another session removed ours."""
    if Path(f"/sys/block/zram{noise_index}").exists():
        return noise_index
    zram.mine.discard(noise_index)
    _, index = zram.add()
    log(f"zram{noise_index} (ours) was removed by another process; noise now on zram{index}")
    return index


def emission_rate(noise_index: int, count: int = 50_000, runs: int = 3) -> float:
    """uevents/s a bare pwrite() loop gets out of the kernel, with no one listening
    (the best of ``runs``: other sessions on this machine only ever slow it down)."""
    fd = os.open(f"/sys/block/zram{noise_index}/uevent", os.O_WRONLY | os.O_CLOEXEC)
    try:
        best = 0.0
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(count):
                os.pwrite(fd, b"change", 0)
            best = max(best, count / (time.perf_counter() - start))
        return best
    finally:
        os.close(fd)


def seqnum() -> int:
    """The kernel's uevent sequence number: every uevent on the machine counts."""
    return int(Path("/sys/kernel/uevent_seqnum").read_text())


CANDIDATES = (b"change@/devices/virtual/block/zram", b"add@/devices/virtual/b")


@dataclass
class Ceiling:
    burst: Burst
    received: int  # ours
    seconds: float  # the emitter's first write to our last message
    foreign: int  # other processes' uevents during the run (the machine is shared)

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0


def measure_ceiling(zram: Zram, noise_index: int, size: int, attempts: int = 3) -> Ceiling:
    """A bare recv() loop; again if another session removed a disk of ours meanwhile."""
    for _ in range(attempts):
        noise_index = ensure_noise(zram, noise_index)
        ceiling = _measure_ceiling(zram, noise_index, size)
        if ceiling.burst.error is None:
            break
        log(f"ceiling {size:,}: emitter failed ({ceiling.burst.error}), again")
    return ceiling


def _measure_ceiling(zram: Zram, noise_index: int, size: int) -> Ceiling:
    """A bare recv() loop: nothing but receive (and count ours by their header)."""
    burst = Burst(size)
    counts: dict[bytes, int] = {}
    candidates = 0  # zram change/add messages: ours, unless another process makes some
    last = 0.0
    first_seq = seqnum()
    with netlink.open_uevent_socket(
        netlink.KERNEL_GROUP, rcvbuf=BUFFER, passcred=False, nonblocking=False
    ) as sock:
        sock.settimeout(QUIET)
        emitter = start_emitter(zram, noise_index, size)
        with contextlib.suppress(TimeoutError, socket.timeout):
            while candidates < size + ADD_EVENTS:
                data = sock.recv(8192)
                head = data[: data.find(b"\0")]
                counts[head] = counts.get(head, 0) + 1
                if head.startswith(CANDIDATES):
                    candidates += 1
                    last = time.monotonic()
        finish_emitter(emitter, burst, zram)
    emitted_total = seqnum() - first_seq
    ours = [f"change@/devices/virtual/block/zram{noise_index}".encode()]
    if burst.index is not None:
        block = f"/devices/virtual/block/zram{burst.index}"
        bdi = f"/devices/virtual/bdi/{zram.major}:{burst.index}"
        ours += [f"change@{block}".encode(), f"add@{block}".encode(), f"add@{bdi}".encode()]
        zram.remove(burst.index)
    received = sum(counts.get(head, 0) for head in ours)
    return Ceiling(burst, received, last - burst.began, max(0, emitted_total - size - ADD_EVENTS))


@dataclass
class Storm:
    burst: Burst
    received: int = 0  # by the daemon's socket, ours and anyone else's
    processed: int = 0  # events the relay handled
    duplicates: int = 0  # dropped as already seen by a resync
    overflows: int = 0
    resyncs: int = 0
    seconds: float = 0.0  # the emitter's first write until every event of ours was consumed
    complete: bool = False  # every event of ours was consumed (no overflow lost one)
    end_state: float | None = None  # the emitter's first write to every container correct
    correct: int = 0  # containers with the node and the grant at the end
    attempts: int = 1
    mix: str = ""
    rss_after_kb: int = 0  # the daemon's, after the storm and the unplug
    mismatch: bool = False  # the matching disk got another index than predicted
    samples: list[tuple[float, int]] = field(default_factory=list)  # (t, consumed)

    @property
    def expected(self) -> int:
        # and the real hot_add of the matching disk: an add for the disk, one for its bdi
        return self.burst.emitted + ADD_EVENTS

    @property
    def rate(self) -> float:
        consumed = self.expected if self.complete else self.processed + self.duplicates
        return consumed / self.seconds if self.seconds else 0.0

    @property
    def foreign(self) -> int | None:
        """Other processes' uevents the daemon received meanwhile (None after a loss)."""
        if self.overflows:
            return None
        return max(0, self.received - self.expected)

    @property
    def lost(self) -> int:
        """Ours the kernel dropped: a lower bound when others' events arrived too."""
        return max(0, self.expected - self.received)

    @property
    def disturbed(self) -> bool:
        """Another session's uevents or zram devices got in the way: measure again."""
        if self.mismatch or self.burst.error:
            return True
        return self.foreign is not None and self.foreign > max(100, self.expected // 100)


def _counters(daemon: RunningDaemon) -> dict[str, Any]:
    counters: dict[str, Any] = daemon.status()["counters"]
    return counters


def _consumed(counters: dict[str, Any], before: dict[str, Any]) -> int:
    return int(
        counters["events"]
        - before["events"]
        + counters["duplicates_dropped"]
        - before["duplicates_dropped"]
    )


class Aim:
    """Points the matching rule at one zram index (a rewrite and a reload when it moves)."""

    def __init__(
        self, daemon: RunningDaemon, pids: list[int], rules: int, index: int, mix: str
    ) -> None:
        self.daemon, self.pids, self.rules = daemon, pids, rules
        self.index, self.mix = index, mix

    def __call__(self, index: int, mix: str | None = None) -> None:
        mix = mix or self.mix
        if (index, mix) != (self.index, self.mix):
            self.daemon.write_rules(rule_files(self.pids, self.rules, index, mix))
            self.daemon.request("reload")
            self.index, self.mix = index, mix


def measure_storm(
    daemon: RunningDaemon, fleet: Fleet, zram: Zram, noise_index: int, size: int, aim: Aim
) -> Storm:
    burst = Burst(size)
    storm = Storm(burst)
    predicted = zram.predict()
    aim(predicted)
    settle(daemon)
    before = _counters(daemon)
    emitter = start_emitter(zram, noise_index, size)
    spawned = time.monotonic()
    last_consumed = 0
    last_change = spawned
    done_at: float | None = None
    end_state_at: float | None = None
    pending = list(fleet.members)
    emitter_done = False
    while True:
        if not emitter_done and emitter.poll() is not None:
            finish_emitter(emitter, burst, zram)
            emitter_done = True
        counters = _counters(daemon)
        now = time.monotonic()
        consumed = _consumed(counters, before)
        if consumed != last_consumed:
            last_consumed, last_change = consumed, now
        storm.samples.append((now, consumed))
        if emitter_done and done_at is None and consumed >= storm.expected:
            done_at, storm.complete = now, True
        if emitter_done and (burst.index != predicted or burst.error):
            storm.mismatch = True  # another process took the index: not relayed, by design
            break
        if burst.index is not None and pending:
            pending = [m for m in pending if not fleet.node_ok(m, zram.major, burst.index)]
            if not pending:
                end_state_at = time.monotonic()
        quiet = now - last_change > QUIET
        if emitter_done and not pending and (done_at is not None or quiet):
            break
        if now - spawned > STORM_TIMEOUT:
            log(f"storm {size:,}: gave up after {STORM_TIMEOUT:.0f} s")
            break
        time.sleep(POLL)
    after = _counters(daemon)
    storm.received = after["source_received"] - before["source_received"]
    storm.processed = after["events"] - before["events"]
    storm.duplicates = after["duplicates_dropped"] - before["duplicates_dropped"]
    storm.overflows = after["overflows"] - before["overflows"]
    storm.resyncs = after["resyncs"] - before["resyncs"]
    began = burst.began or spawned
    storm.seconds = (done_at if done_at is not None else last_change) - began
    storm.samples = [(t - began, n) for t, n in storm.samples]
    if end_state_at is not None:
        storm.end_state = end_state_at - began
    if burst.index is not None:
        storm.correct = sum(fleet.node_ok(m, zram.major, burst.index) for m in fleet.members)
        if storm.mismatch:
            zram.remove(burst.index)
        else:
            unplug(daemon, fleet, zram, burst.index)
    return storm


def plug(fleet: Fleet, zram: Zram, aim: Aim, timeout: float = 60) -> int:
    """Hot-add one matching disk; returns its index once every container has it."""
    for _ in range(10):
        index = zram.predict()
        aim(index)
        _, got = zram.add()
        if got == index:
            break
        zram.remove(got)
    else:
        raise RuntimeError("zram indexes keep being taken by another process")
    deadline = time.monotonic() + timeout
    while not all(fleet.node_ok(m, zram.major, index) for m in fleet.members):
        if time.monotonic() > deadline:
            raise RuntimeError(f"zram{index} not relayed into every container in {timeout} s")
        time.sleep(POLL)
    return index


def unplug(
    daemon: RunningDaemon, fleet: Fleet, zram: Zram, index: int, timeout: float = 120
) -> None:
    zram.remove(index, timeout=30)
    deadline = time.monotonic() + timeout
    while not all(fleet.node_gone(m, index) for m in fleet.members):
        if time.monotonic() > deadline:
            raise RuntimeError(f"zram{index} nodes still in containers after {timeout} s")
        time.sleep(POLL)
    settle(daemon)


def settle(daemon: RunningDaemon, quiet: float = 0.5, timeout: float = 60) -> None:
    """Until the daemon's event and job counters stop moving."""
    deadline = time.monotonic() + timeout
    last = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        status = daemon.status()
        counters = status["counters"]
        now_state = (
            counters["events"],
            counters["applied"],
            counters["undone"],
            len(status["failing"]),
        )
        if now_state != last:
            last, since = now_state, time.monotonic()
        elif time.monotonic() - since > quiet:
            return
        time.sleep(0.05)


# -- cost ---------------------------------------------------------------------------------


def _stat_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


@dataclass
class Memory:
    rss_kb: int
    pss_kb: int
    helpers: int
    helpers_rss_kb: int
    helpers_pss_kb: int


def memory(pid: int) -> Memory:
    # The fork server (the daemon's child) and the helpers it forked (its children).
    servers = [c for c in _children(pid) if "nshelper" in _cmdline(c)]
    helpers = [*servers, *(h for server in servers for h in _children(server))]
    return Memory(
        _status_kb(pid, "VmRSS"),
        _pss_kb(pid),
        len(helpers),
        sum(_status_kb(h, "VmRSS") for h in helpers),
        sum(_pss_kb(h) for h in helpers),
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def idle_cpu(daemon: RunningDaemon, pid: int, seconds: float, tries: int = 5) -> tuple[float, int]:
    """Share of one CPU the daemon (threads included) used over ``seconds`` of idling,
    and how many uevents (from other processes) it received meanwhile: the first
    window without any, else the one with the fewest."""
    best: tuple[float, int] | None = None
    for _ in range(tries):
        received = _counters(daemon)["source_received"]
        start_cpu, start = _stat_cpu(pid), time.monotonic()
        time.sleep(seconds)
        cpu = (_stat_cpu(pid) - start_cpu) / (time.monotonic() - start)
        heard = _counters(daemon)["source_received"] - received
        if best is None or heard < best[1]:
            best = (cpu, heard)
        if heard == 0:
            break
    assert best is not None
    return best


# -- the whole run ------------------------------------------------------------------------


@dataclass
class StormResult:
    containers: int
    rules: int
    sizes: list[int]
    mixes: tuple[str, ...]
    ceilings: list[list[Ceiling]]  # per size: before and after the daemon
    storms: list[Storm]
    idle: Memory
    idle_cpu: float
    idle_seconds: float
    after: Memory
    soak_events: int
    idle_heard: int  # uevents (of other processes) the daemon received while idle
    emission: tuple[float, float]  # uevents/s one writer gets out: no netns, the containers'

    start_seconds: float  # daemon start-up with the containers and rules
    seconds: float
    notes: list[str]


def measure(
    *,
    containers: int,
    rules: int,
    sizes: list[int],
    idle_seconds: float,
    mixes: tuple[str, ...] = tuple(MIXES),
    attempts: int = 3,
) -> StormResult:
    started = time.monotonic()
    zram = Zram()
    notes: list[str] = []
    fleet: Fleet | None = None
    daemon: RunningDaemon | None = None
    tmpfs = Path(tempfile.mkdtemp(prefix="hotrelay-headline-storm-"))
    mounted = False
    try:
        _, noise_index = zram.add()
        # The kernel broadcasts each uevent into every network namespace owned by the
        # initial user namespace: what the containers' own netns cost the emitter.
        alone = emission_rate(noise_index)
        fleet = Fleet(containers)
        log(f"storm: {containers} containers up in {time.monotonic() - started:.1f} s")
        crowded = emission_rate(noise_index)
        log(f"storm: emission {alone:,.0f}/s alone, {crowded:,.0f}/s with the containers")
        ceilings: list[list[Ceiling]] = [[measure_ceiling(zram, noise_index, s)] for s in sizes]
        log("storm: ceiling (before) " + ", ".join(f"{c[0].rate:,.0f}/s" for c in ceilings))

        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755,size=256m", "hrstorm", str(tmpfs)], check=True
        )
        mounted = True
        workdir = tmpfs / "daemon"
        workdir.mkdir()
        pids = [m.pid for m in fleet.members]
        first = zram.predict()
        files = rule_files(pids, rules, first, mixes[0])
        daemon = RunningDaemon(
            files,
            config="[runtimes]\nenabled = []\n",
            workdir=workdir,
            extra_args=("--log-level", "info"),
        )
        begin = time.monotonic()
        daemon.start(timeout=120)
        start_seconds = time.monotonic() - begin
        status = daemon.status()
        if status["rules"] != rules or len(status["containers"]) != containers:
            notes.append(
                f"daemon sees {status['rules']} rules and {len(status['containers'])} containers"
            )
        assert daemon.process is not None
        pid = daemon.process.pid
        aim = Aim(daemon, pids, rules, first, mixes[0])
        # Warm-up: one plug into every container starts the namespace helpers.
        index = plug(fleet, zram, aim)
        unplug(daemon, fleet, zram, index)
        idle = memory(pid)
        cpu, heard = idle_cpu(daemon, pid, idle_seconds)
        log(f"storm: idle RSS {idle.rss_kb / 1024:.1f} MiB, CPU {cpu:.2%} ({heard} uevents heard)")
        storms = []
        soak = 0
        for mix in mixes:
            aim(aim.index, mix)
            for size in sizes:
                for attempt in range(1, attempts + 1):
                    noise_index = ensure_noise(zram, noise_index)
                    storm = measure_storm(daemon, fleet, zram, noise_index, size, aim)
                    storm.attempts = attempt
                    storm.mix = mix
                    storm.rss_after_kb = memory(pid).rss_kb
                    soak += storm.burst.emitted
                    log(
                        f"storm {mix} {size:,} (attempt {attempt}): {storm.rate:,.0f} events/s, "
                        f"received {storm.received:,} of {storm.expected:,}, overflows "
                        f"{storm.overflows}, end state {storm.end_state}, correct "
                        f"{storm.correct}, RSS {storm.rss_after_kb / 1024:.0f} MiB"
                    )
                    if not storm.disturbed:
                        break
                storms.append(storm)
        settle(daemon)
        time.sleep(1.0)
        after = memory(pid)
        daemon.stop()
        for i, size in enumerate(sizes):
            ceilings[i].append(measure_ceiling(zram, noise_index, size))
        log("storm: ceiling (after) " + ", ".join(f"{c[1].rate:,.0f}/s" for c in ceilings))
        return StormResult(
            containers, rules, sizes, mixes, ceilings, storms, idle, cpu, idle_seconds, after, soak,
            heard, (alone, crowded), start_seconds, time.monotonic() - started, notes,
        )  # fmt: skip
    except BaseException:
        if daemon is not None:
            sys.stderr.write(f"--- hotrelay run log (tail) ---\n{daemon.log()[-5000:]}\n")
        raise
    finally:
        if daemon is not None:
            daemon.stop()
            subprocess.run(["rm", "-rf", "--one-file-system", str(daemon.workdir)], check=False)
        if fleet is not None:
            fleet.close()
        zram.close()
        if mounted:
            subprocess.run(["umount", "-l", str(tmpfs)], check=False)
        with contextlib.suppress(OSError):
            tmpfs.rmdir()
