"""The trusted event source against the real kernel: real hotplug, real spoofing."""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from fake_udevd import FakeUdevd

from hotrelay.core.uevent import Uevent, Wire, serialize
from hotrelay.daemon.coldplug import enumerate_devices
from hotrelay.daemon.source import EventSource, Overflow, SourceItem, SourceKind
from hotrelay.kernel import netlink
from hotrelay.testing.hotplug import VethPair, ZramDevice, write_synthetic_uevent

pytestmark = pytest.mark.privileged


class Events:
    """Events from a running source, keeping what one wait did not consume for the next."""

    def __init__(self, channel: trio.MemoryReceiveChannel[Sequence[SourceItem]]) -> None:
        self._channel = channel
        self._pending: deque[SourceItem] = deque()

    async def _next(self) -> SourceItem:
        while not self._pending:
            self._pending.extend(await self._channel.receive())
        return self._pending.popleft()

    async def wait_for(
        self, predicate: Callable[[Uevent], bool], *, seconds: float = 5.0
    ) -> Uevent:
        seen: list[str] = []
        with trio.move_on_after(seconds):
            while True:
                item = await self._next()
                if isinstance(item, Uevent):
                    if predicate(item):
                        return item
                    seen.append(f"{item.action} {item.devpath}")
        pytest.fail(f"no matching uevent within {seconds}s; saw {seen[-20:]}")


@asynccontextmanager
async def running(source: EventSource) -> AsyncIterator[Events]:
    send, receive = trio.open_memory_channel[Sequence[SourceItem]](10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        yield Events(receive)
        nursery.cancel_scope.cancel()


def spoof_socket() -> socket.socket:
    return netlink.open_uevent_socket(0, nonblocking=False, passcred=False)


SPOOF = Uevent.from_properties(
    {"ACTION": "add", "DEVPATH": "/devices/virtual/block/hotrelay-spoof", "SUBSYSTEM": "block"}
)


async def test_zram_hot_add_and_remove_arrive_as_block_uevents() -> None:
    with EventSource(SourceKind.KERNEL) as source:
        async with running(source) as items:
            with ZramDevice() as zram:
                added = await items.wait_for(
                    lambda e: e.action == "add" and e.devpath.endswith(f"/{zram.name}")
                )
                assert added.subsystem == "block"
                assert added.devtype == "disk"
                assert added.devname == zram.name
                assert added.node == str(zram.devnode)
                assert added.devnum == (zram.major, zram.minor)
                assert added.wire is Wire.KERNEL
                assert isinstance(added.seqnum, int)
            removed = await items.wait_for(
                lambda e: e.action == "remove" and e.devpath == added.devpath
            )
            assert removed.devnum == added.devnum
            assert removed.seqnum is not None
            assert added.seqnum < removed.seqnum
    assert source.stats.dropped_untrusted == 0


async def test_veth_pair_produces_net_uevents() -> None:
    with EventSource(SourceKind.KERNEL) as source:
        async with running(source) as items:
            with VethPair() as veth:
                names = {veth.name, veth.peer_name}
                seen: dict[str, Uevent] = {}
                while set(seen) != names:
                    event = await items.wait_for(
                        lambda e: e.subsystem == "net" and e.get("INTERFACE") in names - set(seen),
                    )
                    seen[event.properties["INTERFACE"]] = event
                ifindexes = {veth.name: veth.index, veth.peer_name: veth.peer_index}
                for name, event in seen.items():
                    assert event.action == "add"
                    assert event.devpath.endswith(f"/net/{name}")
                    assert event.get("IFINDEX") == str(ifindexes[name])


async def test_synthetic_uevent_carries_its_arguments() -> None:
    with EventSource(SourceKind.KERNEL) as source, ZramDevice() as zram:
        async with running(source) as items:
            write_synthetic_uevent(zram.syspath, "change", args={"HOTRELAY": "synthetic"})
            event = await items.wait_for(lambda e: e.get("SYNTH_ARG_HOTRELAY") == "synthetic")
            assert event.action == "change"
            assert event.devpath.endswith(f"/{zram.name}")
            assert event.get("SYNTH_UUID") is not None


async def test_spoofed_kernel_group_messages_are_dropped_and_counted() -> None:
    with EventSource(SourceKind.KERNEL) as source, ZramDevice() as zram, spoof_socket() as spoof:
        async with running(source) as items:
            data = serialize(SPOOF)
            spoof.sendto(data, (0, netlink.KERNEL_GROUP))  # multicast to the kernel group
            spoof.sendto(data, (source_portid(source), 0))  # unicast straight to our port
            # A real kernel event sent after the spoofs proves they were processed first.
            write_synthetic_uevent(zram.syspath, "change", args={"MARK": "afterspoof"})
            event = await items.wait_for(
                lambda e: e.get("SYNTH_ARG_MARK") == "afterspoof" or "spoof" in e.devpath,
            )
            assert event.get("SYNTH_ARG_MARK") == "afterspoof"
    assert source.stats.dropped_untrusted == 2
    assert "is not the kernel" in (source.stats.last_drop or "")


def source_portid(source: EventSource) -> int:
    with socket.socket(fileno=os.dup(source.fileno())) as sock:
        portid, _groups = sock.getsockname()
    return int(portid)


async def test_udev_group_trusts_only_udevd() -> None:
    genuine = SPOOF.replace(DEVPATH="/devices/virtual/block/hotrelay-udev", TAGS=":hotrelay:")
    by_worker = genuine.replace(DEVPATH="/devices/virtual/block/hotrelay-udev-worker")
    with (
        FakeUdevd() as udevd,
        EventSource(SourceKind.UDEV, udev_control=udevd.control) as source,
        spoof_socket() as sender,
    ):
        assert source.udevd is not None
        assert source.udevd.pid == udevd.pid
        async with running(source) as items:
            target = (0, netlink.UDEV_GROUP)
            data = serialize(genuine, Wire.UDEV)
            # uid 1000 claimed through SCM_CREDENTIALS (root may claim any uid): dropped.
            nonroot = [netlink.send_credentials(os.getpid(), 1000, 1000)]
            sender.sendmsg([data], nonroot, 0, target)
            # Host root, libudev format, multicast, but not udevd: dropped.
            sender.sendmsg([data], [], 0, target)
            # udevd, but in the kernel's format: not what udevd sends, dropped.
            udevd.send(serialize(genuine, Wire.KERNEL))
            # udevd's manager and its worker, libudev format: accepted.
            assert udevd.send(data) == udevd.pid
            assert udevd.send(serialize(by_worker, Wire.UDEV), worker=True) == udevd.worker_pid
            event = await items.wait_for(lambda e: e.devpath == genuine.devpath)
            from_worker = await items.wait_for(lambda e: e.devpath == by_worker.devpath)
    assert event.wire is Wire.UDEV
    assert event == genuine.replace(wire=Wire.UDEV)
    assert from_worker == by_worker.replace(wire=Wire.UDEV)
    assert source.stats.accepted == 2
    assert source.stats.dropped_untrusted == 2
    assert source.stats.dropped_malformed == 1


async def test_tiny_buffer_burst_reports_overflow_and_keeps_going() -> None:
    with EventSource(SourceKind.KERNEL, rcvbuf=4096) as source, ZramDevice() as zram:
        # Nobody reads while the burst lands, so the kernel must drop most of it.
        for _ in range(2000):
            write_synthetic_uevent(zram.syspath, "change")
        items: list[SourceItem] = []
        while batch := source.receive_ready():
            items += batch
        assert any(isinstance(item, Overflow) for item in items)
        assert source.stats.overflows >= 1
        assert source.stats.accepted < 2000
        async with running(source) as channel:
            write_synthetic_uevent(zram.syspath, "change", args={"MARK": "afteroverflow"})
            await channel.wait_for(lambda e: e.get("SYNTH_ARG_MARK") == "afteroverflow")


async def test_coldplug_enumerates_an_existing_device_as_add() -> None:
    with ZramDevice() as zram:
        found = [e for e in enumerate_devices(["block"]) if e.devpath.endswith(f"/{zram.name}")]
    assert len(found) == 1
    (event,) = found
    assert event.action == "add"
    assert event.seqnum is None
    assert event.devname == zram.name
    assert event.devnum == (zram.major, zram.minor)
