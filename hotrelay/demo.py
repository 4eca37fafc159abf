"""``hotrelay demo``: real hotplug next to a throwaway container, narrated.

It starts a namespace container (its own mount, pid and net namespaces, a tmpfs /dev
and a default-deny device cgroup), hotplugs a zram disk and a veth pair on the host,
sends a forged uevent, and shows what hotrelay's trusted event source makes of each.
Everything it creates is removed before it returns, also on failure or Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import trio

from hotrelay.core.uevent import Uevent, serialize
from hotrelay.daemon.source import EventSource, SourceItem, SourceKind
from hotrelay.errors import HotrelayError, NotRootError
from hotrelay.kernel import netlink
from hotrelay.testing.hotplug import VethPair, ZramDevice, write_synthetic_uevent
from hotrelay.testing.inside import open_inside
from hotrelay.testing.sandbox import Sandbox

__all__ = ["run_demo"]

WAIT = 5.0


class DemoError(HotrelayError):
    pass


class _Heard:
    """Trusted events from the running source, with leftovers kept between waits."""

    def __init__(self, channel: trio.MemoryReceiveChannel[Sequence[SourceItem]]) -> None:
        self._channel = channel
        self._pending: deque[SourceItem] = deque()

    async def wait_for(self, what: str, predicate: Callable[[Uevent], bool]) -> Uevent:
        with trio.move_on_after(WAIT):
            while True:
                while not self._pending:
                    self._pending.extend(await self._channel.receive())
                item = self._pending.popleft()
                if isinstance(item, Uevent) and predicate(item):
                    return item
        raise DemoError(f"demo: no {what} uevent within {WAIT:.0f} s")


def _show(out: TextIO, event: Uevent, since: float) -> None:
    ms = (time.perf_counter() - since) * 1000
    devnum = f" {event.major}:{event.minor}" if event.devnum else ""
    out.write(
        f"    heard  {event.action:<6} {event.devpath} ({event.subsystem}{devnum}) "
        f"seqnum {event.seqnum}, {ms:.1f} ms after the plug\n"
    )


async def _demo(out: TextIO, source: EventSource, heard: _Heard, sandbox: Sandbox) -> None:
    out.write(
        f"container: pid {sandbox.pid}, own mount/pid/net namespaces, tmpfs /dev, "
        f"device cgroup {sandbox.devices_cgroup}\n"
    )

    out.write("\n1. hotplug a zram disk on the host\n")
    zram = ZramDevice()
    start = time.perf_counter()
    with zram:
        out.write(f"    plugged {zram.devnode} ({zram.major}:{zram.minor})\n")
        added = await heard.wait_for("zram add", lambda e: e.devpath == zram.devpath)
        _show(out, added, start)
        err = await trio.to_thread.run_sync(open_inside, sandbox, str(zram.devnode))
        out.write(
            f"    inside the container: open({zram.devnode}) -> "
            f"{errno.errorcode.get(err, 'ok') if err else 'ok'}"
            f"{' (no node, and the device cgroup denies it)' if err else ''}\n"
        )
        start = time.perf_counter()
    removed = await heard.wait_for(
        "zram remove", lambda e: e.action == "remove" and e.devpath == added.devpath
    )
    _show(out, removed, start)

    out.write("\n2. hotplug a veth pair on the host\n")
    start = time.perf_counter()
    with VethPair() as veth:
        out.write(f"    plugged {veth.name} <-> {veth.peer_name}\n")
        pending = {veth.name, veth.peer_name}
        while pending:  # the kernel announces the two ends in either order
            event = await heard.wait_for(
                "veth add", lambda e: e.subsystem == "net" and e.sysname in pending
            )
            pending.discard(event.sysname)
            _show(out, event, start)

        out.write("\n3. a forged uevent, sent by a process to the kernel's group\n")
        forged = Uevent.from_properties(
            {"ACTION": "add", "DEVPATH": "/devices/virtual/block/forged", "SUBSYSTEM": "block"}
        )
        before = source.stats.dropped_untrusted
        with netlink.open_uevent_socket(0, nonblocking=False, passcred=False) as sock:
            sock.sendto(serialize(forged), (0, netlink.KERNEL_GROUP))
        # A genuine event sent after the forgery arrives after it, so once we hear it
        # the forgery has been judged.
        write_synthetic_uevent(Path("/sys/class/net", veth.name), "change", args={"DEMO": "1"})
        event = await heard.wait_for(
            "genuine",
            lambda e: e.devpath == forged.devpath or e.get("SYNTH_ARG_DEMO") == "1",
        )
        if event.devpath == forged.devpath or source.stats.dropped_untrusted == before:
            raise DemoError("demo: the forged uevent was not dropped")
        out.write(f"    dropped: {source.stats.last_drop}\n")


async def run_demo(out: TextIO) -> int:
    if os.geteuid() != 0:
        raise NotRootError("demo: run as root (it creates namespaces, cgroups and devices)")
    out.write(
        "hotrelay demo: the trusted event source next to a throwaway container.\n"
        "(Relaying into the container - cgroup grant, node, uevent - is not built yet;\n"
        " this shows what hotrelay hears and what it refuses.)\n\n"
    )
    with EventSource(SourceKind.AUTO) as source:
        out.write(f"listening to {source.kind.value} uevents, buffer {source.rcvbuf} bytes\n")
        sandbox = await trio.to_thread.run_sync(lambda: Sandbox.create(name_prefix="demo"))
        try:
            send, receive = trio.open_memory_channel[Sequence[SourceItem]](1024)
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run, send)
                await _demo(out, source, _Heard(receive), sandbox)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sandbox.close)
        stats = source.stats
        out.write(
            f"\nsummary: {stats.accepted} trusted uevents, {stats.dropped_untrusted} untrusted "
            f"dropped, {stats.overflows} overflows; container, zram and veth removed.\n"
        )
    return 0
