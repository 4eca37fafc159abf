"""Shared by the adversarial suite (tests/privileged/test_adversarial_*.py).

What the suite checks is what a container and the kernel see, never what the daemon
says about itself: nodes opened and read from inside each sandbox (one ``nsenter`` per
sandbox for any number of paths), the v1 ``devices.list`` of its cgroup, the v2 device
programs attached to it (PROG_QUERY), and the daemon process seen from /proc (its
children, its descriptors, its memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotrelay.core import bpf_program as bp
from hotrelay.kernel import bpf
from hotrelay.testing.daemon import RunningDaemon
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import OCI_DEFAULT_RULES, Sandbox

__all__ = [
    "RUNTIME_PROGRAM",
    "ChildProcess",
    "Monitor",
    "about",
    "children",
    "devices_list",
    "fd_count",
    "grant_listed",
    "host_has",
    "inside_state",
    "intent_violations",
    "ledger",
    "ledger_for",
    "mount_points",
    "netlink_portids",
    "ours",
    "rss_kib",
    "v2_attach",
    "v2_programs",
    "zram_rules",
]

RULE = """
[[rule]]
name = "{name}"
target = [{targets}]
[rule.match]
subsystem = "block"
kernel = "{kernel}"
[rule.device]
path = "{path}"
mode = "0640"
group = {group}
"""


def ours(prefix: str) -> str:
    """A cgroup: target for the sandboxes this test process names ``prefix``: sandbox
    names carry our pid, so another test session on the same host is never matched."""
    return f"cgroup:/hotrelay-test/{prefix}-{os.getpid()}-*"


def zram_rules(
    *targets: str,
    kernel: str = "zram*",
    path: str = "/dev/disks/{kernel}",
    group: str | int = 6,
    name: str = "zram",
) -> dict[str, str]:
    """One rule: block devices named like ``kernel`` into every target, at ``path``."""
    quoted = ", ".join(f'"{t}"' for t in targets)
    group_value = f'"{group}"' if isinstance(group, str) else str(group)
    # Values are not formatted again: the path's "{kernel}" reaches the rule loader.
    text = RULE.format(name=name, targets=quoted, kernel=kernel, path=path, group=group_value)
    return {f"10-{name}.toml": text}


# -- from inside a sandbox ---------------------------------------------------------------

_PROBE = """
for p in "$@"; do
  if [ ! -e "$p" ] && [ ! -L "$p" ]; then echo "absent $p"
  elif [ -L "$p" ]; then echo "symlink $p"
  elif [ ! -b "$p" ] && [ ! -c "$p" ]; then echo "other $p"
  elif dd if="$p" of=/dev/null bs=4096 count=1 2>/dev/null; then echo "ok $p"
  else echo "denied $p"; fi
done
"""


def inside_state(sandbox: Sandbox, paths: Iterable[str], *, timeout: float = 30) -> dict[str, str]:
    """For each path, as the sandbox's root sees it in its own namespaces and cgroups:
    ``ok`` (a device node that opens and reads), ``denied`` (a node that does not
    open: the device cgroup says no), ``absent``, ``symlink`` or ``other``."""
    wanted = list(paths)
    if not wanted:
        return {}
    result = sandbox.run(["/bin/sh", "-c", _PROBE, "probe", *wanted], timeout=timeout)
    states: dict[str, str] = {}
    for line in result.stdout.decode().splitlines():
        state, _, path = line.partition(" ")
        states[path] = state
    assert set(states) == set(wanted), result
    return states


def devices_list(sandbox: Sandbox) -> str:
    return (sandbox.devices_cgroup / "devices.list").read_text()


def grant_listed(sandbox: Sandbox, zram: ZramDevice) -> bool:
    """Does the sandbox's v1 devices.list hold an entry for exactly this device?"""
    prefix = f"b {zram.major}:{zram.minor} "
    return any(line.startswith(prefix) for line in devices_list(sandbox).splitlines())


# -- cgroup v2 device programs -------------------------------------------------------------

# What runc attaches for the OCI defaults (as tests/privileged/test_cgroups_v2.py).
RUNTIME_PROGRAM = bp.assemble(OCI_DEFAULT_RULES)


def v2_attach(sandbox: Sandbox) -> int:
    """Attach a runc-like device program to the sandbox's cgroup2 directory, so grants
    go through the v2 layer too. The cgroup holds it; removing the cgroup (the sandbox's
    close) detaches it. Returns the program id."""
    fd = bpf.prog_load(bp.encode(RUNTIME_PROGRAM), name="runtime_like")
    try:
        cg = bpf.open_cgroup(sandbox.unified_cgroup)
        try:
            bpf.prog_attach(cg, fd, flags=bpf.BPF_F_ALLOW_MULTI)
        finally:
            os.close(cg)
        return bpf.prog_info(fd).id
    finally:
        os.close(fd)


def v2_programs(sandbox: Sandbox) -> tuple[tuple[bp.Insn, ...], ...]:
    """The device programs attached to the sandbox's cgroup2 directory, read back."""
    cg = bpf.open_cgroup(sandbox.unified_cgroup)
    try:
        ids = bpf.prog_query(cg).prog_ids
    finally:
        os.close(cg)
    programs = []
    for prog_id in ids:
        with contextlib.suppress(bpf.BpfError):
            fd = bpf.get_prog_fd_by_id(prog_id)
            try:
                programs.append(bp.decode(bpf.prog_xlated(fd)[1]))
            finally:
                os.close(fd)
    return tuple(programs)


# -- the daemon process, from /proc ----------------------------------------------------------


@dataclass(frozen=True)
class ChildProcess:
    pid: int
    state: str  # "Z" for a zombie
    cmdline: str


def children(pid: int) -> list[ChildProcess]:
    """The direct children of ``pid`` (the daemon's namespace helpers, ...)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            found.append(ChildProcess(int(entry.name), fields[0], text or f"[{comm}]"))
    return found


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def netlink_portids(pid: int, protocol: int = 15) -> list[tuple[int, int]]:
    """(port id, groups) of the NETLINK_KOBJECT_UEVENT sockets process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    found = []
    for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
        fields = line.split()
        # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        if int(fields[1]) == protocol and int(fields[9]) in inodes:
            found.append((int(fields[2]), int(fields[3], 16)))
    return found


def ledger(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """The daemon's ledger entries, read while it runs (an entry deleted between the
    listing and the read is simply gone; RunningDaemon.ledger() would raise)."""
    entries = []
    for path in sorted((daemon.state_dir / "ledger").glob("*.json")):
        with contextlib.suppress(FileNotFoundError):
            entries.append(json.loads(path.read_text()))
    return entries


def ledger_for(daemon: RunningDaemon, devpath: str) -> list[dict[str, Any]]:
    return [e for e in ledger(daemon) if f" {devpath} " in e["key"]]


def status_counters(daemon: RunningDaemon) -> Mapping[str, Any]:
    counters: Mapping[str, Any] = daemon.status()["counters"]
    return counters


@contextlib.contextmanager
def uevent_sender() -> Iterator[socket.socket]:
    """A host-netns NETLINK_KOBJECT_UEVENT socket of our own (port id != 0)."""
    from hotrelay.kernel import netlink

    sock = netlink.open_uevent_socket(0, nonblocking=False, passcred=False)
    try:
        yield sock
    finally:
        sock.close()


def paths_for(devices: Sequence[ZramDevice], template: str = "/dev/disks/{}") -> list[str]:
    return [template.format(d.name) for d in devices]


class Monitor:
    """The daemon's ``monitor`` feed, collected by a thread: what the pump really handled
    (every trusted uevent it took in, every action it ran), in order."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.connect(str(daemon.socket))
        self._sock.sendall(b'{"id": 1, "verb": "monitor"}\n')
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._buffer = b""
        first = self._line()
        assert json.loads(first).get("result") == {"subscribed": True}, first
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            data = self._sock.recv(65536)
            if not data:
                raise EOFError
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _run(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                event = json.loads(self._line()).get("event")
                if event is not None:
                    with self._lock:
                        self.events.append(event)

    def seen(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def uevents(self, devpath: str) -> list[dict[str, Any]]:
        return [e for e in self.seen() if e.get("type") == "uevent" and e.get("devpath") == devpath]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def unexpected_tracebacks(log: str) -> list[str]:
    """Tracebacks in a daemon log. There are none to expect: the namespace helpers
    print none (not even when the daemon is SIGKILLed under them), and the daemon
    logs failures as one line each."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    return [block[:2000] for block in blocks]


# -- the rules' intent, checked from inside and from the kernel ------------------------------


def host_has(major: int, minor: int) -> bool:
    return Path(f"/sys/dev/block/{major}:{minor}").exists()


def intent_violations(
    daemon: RunningDaemon,
    *,
    boxes: Sequence[Sandbox],
    devices: Sequence[ZramDevice],
    gone: Sequence[ZramDevice],
    with_program: Iterable[str],
    node_dir: str,
    link_dir: str | None,
    rule: str,
) -> list[str]:
    """Every way the state differs from a rule that relays each of ``devices`` into every
    one of ``boxes`` (cgroup: targets) at ``node_dir/NAME`` (and ``link_dir/NAME``); empty
    when it is right. ``gone`` are devices of ours that left: nothing of them may stay,
    unless another device has taken their numbers since. Only our own devices are
    judged: the host may plug others meanwhile, which the rule relays too."""
    problems: list[str] = []
    programs = set(with_program)
    # A device of ours can vanish under us when another test session on this host
    # hot-removes by index (its own device gone, ours took the number): not ours to judge.
    devices = [d for d in devices if d.present]
    present = {(d.major, d.minor): d for d in devices}
    left = [d for d in gone if (d.major, d.minor) not in present and not host_has(d.major, d.minor)]
    for box in boxes:
        paths = [f"{node_dir}/{d.name}" for d in devices]
        links = [f"{link_dir}/{d.name}" for d in devices] if link_dir else []
        stale = [f"{node_dir}/{d.name}" for d in left]
        states = inside_state(box, [*paths, *links, *stale])
        problems += [f"{box.name}: {p} is {states[p]}" for p in paths if states[p] != "ok"]
        problems += [f"{box.name}: {p} is {states[p]}" for p in links if states[p] == "absent"]
        problems += [
            f"{box.name}: stale {p} is {states[p]}" for p in stale if states[p] != "absent"
        ]
        listed = devices_list(box).splitlines()
        for major, minor in present:
            if not any(line.startswith(f"b {major}:{minor} ") for line in listed):
                problems.append(f"{box.name}: devices.list lacks b {major}:{minor}")
        for device in left:
            if any(line.startswith(f"b {device.major}:{device.minor} ") for line in listed):
                problems.append(f"{box.name}: stale devices.list entry for {device.name}")
        if box.name in programs:
            problems += program_problems(box, present, left)
        # User-namespaced containers get bind mounts: exactly one per present device.
        mounted = sorted(m for m in mount_points(box) if m.startswith(node_dir + "/"))
        wanted = sorted(paths) if box.userns is not None else []
        mine = {f"{node_dir}/{d.name}" for d in [*devices, *left]}
        if [m for m in mounted if m in mine] != wanted:
            problems.append(f"{box.name}: node mounts {mounted}, expected {wanted}")
    entries = [e for e in ledger(daemon) if e["key"].endswith(f" {rule}")]
    running = {box.pid for box in boxes}
    for entry in entries:
        pid = entry["record"].get("container", {}).get("pid")
        if pid not in running:
            problems.append(f"ledger entry for a container that is gone: {entry['key']}")
        elif not entry["record"].get("complete") and any(
            f" {d.devpath} " in entry["key"] for d in devices
        ):
            problems.append(f"ledger entry not complete: {entry['key']}")
    keys = {e["key"] for e in entries}
    for box in boxes:
        for device in devices:
            key = f"cgroup:/hotrelay-test/{box.name} {device.devpath} {rule}"
            if key not in keys:
                problems.append(f"ledger lacks {key}")
    return problems


def mount_points(box: Sandbox) -> list[str]:
    """Mount points of the sandbox's mount namespace (/proc/PID/mountinfo, field 5)."""
    text = Path(f"/proc/{box.pid}/mountinfo").read_text()
    return [line.split()[4].replace("\\040", " ") for line in text.splitlines()]


def program_problems(
    box: Sandbox, present: Mapping[tuple[int, int], ZramDevice], left: Sequence[ZramDevice]
) -> list[str]:
    """The cgroup's device programs: exactly one, ours with the runtime's original
    instructions unchanged behind the prefix (or the original itself), granting every
    present device and none that left."""
    programs = v2_programs(box)
    if len(programs) != 1:
        return [f"{box.name}: {len(programs)} device programs attached, not 1"]
    (program,) = programs
    found = bp.split_prepended(program)
    granted: set[tuple[int | None, int | None]] = set()
    if found is None:
        if program != RUNTIME_PROGRAM:
            return [f"{box.name}: the attached program is neither the runtime's nor ours"]
    elif found.original != RUNTIME_PROGRAM:
        return [f"{box.name}: the runtime's instructions changed behind our prefix"]
    else:
        granted = {(g.major, g.minor) for g in found.grants}
    problems = [
        f"{box.name}: program lacks {d.name}" for n, d in present.items() if n not in granted
    ]
    problems += [
        f"{box.name}: program still grants {d.name}" for d in left if (d.major, d.minor) in granted
    ]
    return problems


def about(daemon: RunningDaemon, problems: Sequence[str], limit: int = 80) -> str:
    """The daemon's log lines (not DEBUG) naming a device or container of ``problems``."""
    words = {w for p in problems for w in p.replace(":", " ").split() if "zram" in w or "-" in w}
    words = {w.rsplit("/", 1)[-1] for w in words if len(w) > 4}
    lines = [
        line
        for line in daemon.log().splitlines()
        if " DEBUG " not in line and any(w in line for w in words)
    ]
    return "\n".join(line[:400] for line in lines[-limit:])
