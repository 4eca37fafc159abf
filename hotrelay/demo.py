"""``hotrelay demo``: the whole flow, on a throwaway container, narrated.

It starts a user-namespaced container (its own mount, pid, net and user namespaces,
root mapped to host uid 100000, a tmpfs /dev, a default-deny device cgroup) and the
real ``hotrelay run`` daemon with a built-in rule; hotplugs a zram disk and a veth
pair on the host; shows them arrive inside the container (the node with its owner and
mode, the uevent heard inside, the interface under its new name, and the timing);
unplugs them and shows them leave; and removes everything it made, also on failure.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import TextIO

from hotrelay.errors import HotrelayError, NotRootError
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import VethPair, ZramDevice
from hotrelay.testing.inside import UeventListener, UeventMessage, open_inside, stat_inside
from hotrelay.testing.sandbox import IdMap, Sandbox

__all__ = ["DEMO_RULES", "run_demo"]

DEMO_RULES = """\
# The demo's built-in rules: every zram disk, and one end (…a) of veth pairs named
# hrdemo*, go into the demo container.
[[rule]]
name = "demo-disks"
target = ["pid:{pid}"]
[rule.match]
subsystem = "block"
kernel = "zram*"
[rule.device]
path = "/dev/demo/{{kernel}}"
mode = "0660"
group = "disk"

[[rule]]
name = "demo-nic"
target = ["pid:{pid}"]
[rule.match]
subsystem = "net"
kernel = "hrdemo*a"
[rule.netdev]
name = "demo0"
"""

WAIT = 5.0


class DemoError(HotrelayError):
    pass


def _ms(since: float) -> str:
    return f"{(time.perf_counter() - since) * 1000:.1f} ms"


def _wait(what: str, probe: object) -> None:
    try:
        eventually(probe, timeout=WAIT)  # type: ignore[arg-type]
    except TimeoutError:
        raise DemoError(f"demo: {what} within {WAIT:.0f} s") from None


def _heard(listener: UeventListener, devpath: str, action: str) -> UeventMessage:
    def about(message: UeventMessage) -> bool:
        env = message.env
        return env.get("DEVPATH") == devpath and env.get("ACTION") == action and "DEVNAME" in env

    try:
        return listener.wait_for(about, timeout=WAIT)
    except TimeoutError:
        raise DemoError(f"demo: the container heard no {action} uevent for {devpath}") from None


def _link_inside(container: Sandbox, name: str) -> bool:
    result = container.run(["ip", "-o", "link", "show", name], check=False)
    return result.returncode == 0


def _disk(out: TextIO, container: Sandbox, listener: UeventListener) -> None:
    out.write("\n1. plug a disk into the host: a zram device\n")
    start = time.perf_counter()
    with ZramDevice() as zram:
        path = f"/dev/demo/{zram.name}"
        _wait(
            f"{path} did not become usable inside the container",
            lambda: open_inside(container, path, read=4096) == 0,
        )
        usable = _ms(start)
        info = stat_inside(container, path)
        heard = _heard(listener, zram.devpath, "add")
        out.write(
            f"   host:   {zram.devnode} ({zram.major}:{zram.minor}) appeared\n"
            f"   inside: {path} usable (read 4096 bytes) {usable} after the plug\n"
            f"           {stat.filemode(info.st_mode)} uid {info.st_uid} gid {info.st_gid} "
            '("disk" in the container, whose root is host uid 100000)\n'
            f"           heard: {heard.header} DEVNAME={heard.env.get('DEVNAME')} "
            f"from port {heard.port} (the kernel)\n"
        )
        start = time.perf_counter()
    _wait(
        f"{path} was not removed inside the container",
        lambda: open_inside(container, path) == errno.ENOENT,
    )
    _heard(listener, zram.devpath, "remove")
    out.write(f"   unplugged: gone inside {_ms(start)} later, remove uevent heard\n")


def _nic(out: TextIO, container: Sandbox) -> None:
    out.write("\n2. plug a network interface into the host: a veth pair\n")
    start = time.perf_counter()
    with VethPair(prefix="hrdemo") as veth:
        _wait("demo0 did not appear inside the container", lambda: _link_inside(container, "demo0"))
        moved = _ms(start)
        gone_from_host = not os.path.exists(f"/sys/class/net/{veth.name}") or not os.path.exists(
            f"/sys/class/net/{veth.peer_name}"
        )
        out.write(
            f"   host:   {veth.name} <-> {veth.peer_name} appeared\n"
            f"   inside: one end is now demo0, {moved} after the plug"
            f"{' (and gone from the host)' if gone_from_host else ''}\n"
        )
        start = time.perf_counter()
    _wait("demo0 did not leave the container", lambda: not _link_inside(container, "demo0"))
    out.write(f"   unplugged: demo0 gone inside {_ms(start)} later\n")


def run_demo(out: TextIO) -> int:
    if os.geteuid() != 0:
        raise NotRootError("demo: run as root (it creates namespaces, cgroups and devices)")
    out.write(
        "hotrelay demo: hotplug into a running, user-namespaced container.\n"
        "Everything made here (container, daemon, devices) is removed at the end.\n"
    )
    container = Sandbox.create(userns=IdMap(0, 100000, 65536), name_prefix="demo")
    try:
        out.write(
            f"\ncontainer: pid {container.pid}; root is host uid 100000; own mount, pid, net, "
            f"user namespaces;\n           tmpfs /dev; default-deny device cgroup "
            f"{container.devices_cgroup}\n"
        )
        rules = {"demo.toml": DEMO_RULES.format(pid=container.pid)}
        with RunningDaemon(rules, echo_log=False) as daemon:
            pid = daemon.process.pid if daemon.process else "?"
            out.write(f"daemon:    hotrelay run (pid {pid}), control socket {daemon.socket}\n")
            listener = UeventListener.start(container, group=1)
            try:
                _disk(out, container, listener)
                _nic(out, container)
            finally:
                listener.close()
            status = daemon.status()
            counters = status.get("counters", {})
            out.write(
                f"\ndaemon counters: {counters.get('source_accepted', '?')} uevents heard, "
                f"{counters.get('applied', '?')} bindings applied, "
                f"{counters.get('undone', '?')} undone, {counters.get('failures', '?')} failures\n"
            )
            if counters.get("failures"):
                # Say why, from the daemon's own log: a demo that only counts is no help.
                failed = [line for line in daemon.log().splitlines() if " failed" in line]
                out.write("".join(f"  {line}\n" for line in failed[-5:]))
    finally:
        container.close()
    out.write("cleaned up: container, daemon, zram device and veth pair are gone.\n")
    return 0
