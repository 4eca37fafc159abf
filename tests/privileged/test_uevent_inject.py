"""Uevents injected into a container's network namespace, heard from inside it.

The listeners are what containers really run: pyudev (libudev) monitors on the udev
and kernel sources, and a raw netlink socket on the kernel group, all inside the
sandbox as its root. Listeners in the host's netns prove the injection stays inside.
A privileged sandbox's netns belongs to the initial user namespace, so the kernel
broadcasts every host event into it as well: assertions pick our events by their
container-side DEVNAME, which no host event carries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import pytest
import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.uevent import Uevent, Wire, parse
from hotrelay.effectors.nshelper import InjectionError, NamespaceHelpers
from hotrelay.effectors.uevent_inject import UeventInjector, container_view
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import UeventListener, UeventMessage
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

P = ParamSpec("P")
R = TypeVar("R")

SANDBOXES: dict[str, IdMap | None] = {
    "privileged": None,
    "userns-0-0": IdMap(0, 0, 65536),
    "userns-0-100000": IdMap(0, 100000, 65536),
}

# Runs inside the sandbox as its root: a libudev monitor, one JSON line per device.
MONITOR = """
import json, sys, pyudev
monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=sys.argv[1])
monitor.start()
print(json.dumps({"ready": True}), flush=True)
while True:
    device = monitor.poll(timeout=60)
    if device is None:
        break
    print(json.dumps({"action": device.action, "devname": device.device_node,
                      "devpath": device.device_path, "seqnum": device.sequence_number}),
          flush=True)
"""


async def blocking(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class LibudevMonitor:
    """pyudev's Monitor (source 'udev' or 'kernel') running inside a sandbox."""

    def __init__(self, sandbox: Sandbox, source: str) -> None:
        self.source = source
        self._proc = sandbox.popen([sys.executable, "-c", MONITOR, source])
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        ready = self._next(time.monotonic() + 20)
        if ready != {"ready": True}:
            self.close()
            raise RuntimeError(f"pyudev monitor ({source}) did not start: {self._stderr()}")

    def _stderr(self) -> str:
        if self._proc.poll() is None or self._proc.stderr is None:
            return ""
        return self._proc.stderr.read().decode(errors="replace")

    def _next(self, deadline: float) -> dict[str, Any] | None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        record: dict[str, Any] = json.loads(line)
        return record

    def collect(
        self, predicate: Callable[[dict[str, Any]], bool], count: int, timeout: float
    ) -> list[dict[str, Any]]:
        """Events matching predicate, once count of them arrived or timeout passed."""
        deadline = time.monotonic() + timeout
        while sum(1 for e in self.events if predicate(e)) < count:
            record = self._next(deadline)
            if record is None:
                break
            self.events.append(record)
        return [e for e in self.events if predicate(e)]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> LibudevMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture(params=list(SANDBOXES))
def box(request: pytest.FixtureRequest, make_sandbox: SandboxFactory) -> Sandbox:
    return make_sandbox(userns=SANDBOXES[request.param], devices="allow-all")


@pytest.fixture
async def helpers() -> AsyncIterator[NamespaceHelpers]:
    async with NamespaceHelpers() as pool:
        yield pool


def private_run(sandbox: Sandbox, *, udevd: bool) -> None:
    """A /run of the sandbox's own (it shares the host's root filesystem); with
    ``udevd``, the /run/udev/control a running udevd would leave there."""
    script = "mount -t tmpfs -o mode=755 tmpfs /run"
    if udevd:
        script += " && mkdir /run/udev && touch /run/udev/control"
    sandbox.run(["sh", "-c", script])


def zram_uevent(zram: ZramDevice, action: str) -> Uevent:
    """The event the kernel sends for zram, from its own sysfs uevent file."""
    properties = {"ACTION": action, "DEVPATH": zram.devpath, "SUBSYSTEM": "block"}
    for line in (zram.syspath / "uevent").read_text().splitlines():
        key, _, value = line.partition("=")
        properties[key] = value
    properties["SEQNUM"] = "4242"
    return Uevent.from_properties(properties)


def ours(devname: str) -> Callable[[UeventMessage], bool]:
    """A raw message carrying our container-side DEVNAME (kernel or udev format)."""
    return lambda m: m.env.get("DEVNAME") in (devname, devname.removeprefix("/dev/"))


@contextmanager
def host_listeners() -> Iterator[list[UeventListener]]:
    listeners = [UeventListener.start(None, group=group) for group in (1, 2)]
    try:
        yield listeners
    finally:
        for listener in listeners:
            listener.close()


async def test_add_and_remove_reach_libudev_and_kernel_listeners_inside(
    box: Sandbox, zram: ZramDevice, helpers: NamespaceHelpers
) -> None:
    await blocking(private_run, box, udevd=True)  # makes libudev bind group 2 inside
    devname = f"/dev/hr-{secrets.token_hex(4)}/zigbee"
    injector = UeventInjector(helpers)
    ref = box.ref()
    with (
        LibudevMonitor(box, "udev") as udev_monitor,
        LibudevMonitor(box, "kernel") as kernel_monitor,
        UeventListener.start(box, group=1) as raw_kernel,
        host_listeners() as on_host,
    ):
        for action in ("add", "remove"):
            event = zram_uevent(zram, action)
            for wire in (Wire.KERNEL, Wire.UDEV):
                record = await injector.inject(ref, event, wire=wire, devname=devname)
                assert record.wires == (wire,)
                assert record.devname == devname

        def is_ours(e: dict[str, Any]) -> bool:
            return bool(e["devname"] == devname)

        for monitor in (udev_monitor, kernel_monitor):
            seen = await blocking(monitor.collect, is_ours, 2, 10.0)
            assert [(e["action"], e["devpath"]) for e in seen] == [
                ("add", zram.devpath),
                ("remove", zram.devpath),
            ], monitor.source
        raw = await blocking(raw_kernel.messages, timeout=2.0)
        kernel_messages = [m for m in raw if ours(devname)(m)]
        assert [m.header for m in kernel_messages] == [
            f"add@{zram.devpath}",
            f"remove@{zram.devpath}",
        ]
        for message in kernel_messages:
            assert message.port == 0  # the kernel's own rebroadcast
            assert message.uid == 0  # the container's root, as the container sees it
            assert message.env["DEVNAME"] == devname.removeprefix("/dev/")
            assert message.env["SEQNUM"] != "4242"  # the kernel numbered it
        for listener in on_host:
            heard = await blocking(listener.messages, timeout=0.5)
            assert [m.header for m in heard if ours(devname)(m)] == []


@pytest.mark.parametrize("userns", ["privileged", "userns-0-100000"])
async def test_auto_sends_udev_format_only_without_udevd(
    make_sandbox: SandboxFactory, zram: ZramDevice, helpers: NamespaceHelpers, userns: str
) -> None:
    box = make_sandbox(userns=SANDBOXES[userns], devices="allow-all")
    await blocking(private_run, box, udevd=False)
    injector = UeventInjector(helpers)
    ref = box.ref()
    devname = f"/dev/hr-{secrets.token_hex(4)}"
    event = zram_uevent(zram, "add")
    with UeventListener.start(box, group=2) as raw_udev:
        record = await injector.inject(ref, event, devname=devname, devlinks=["/dev/by-x/y"])
        assert record.wires == (Wire.KERNEL, Wire.UDEV)
        message = await blocking(raw_udev.wait_for, ours(devname))
        assert message.is_libudev
        assert (message.uid, message.gid) == (0, 0)  # libudev accepts only root
        received = parse(message.raw)
        assert received.devname == devname
        assert received.get("DEVLINKS") == "/dev/by-x/y"
        assert received.seqnum == 4242

        await blocking(box.run, ["sh", "-c", "mkdir /run/udev && touch /run/udev/control"])
        record = await injector.inject(ref, event, devname=devname + "b")
        assert record.wires == (Wire.KERNEL,)  # udevd inside sends its own udev message
        later = await blocking(raw_udev.messages, timeout=0.5)
        assert [m for m in later if ours(devname + "b")(m)] == []


async def test_containers_on_the_host_network_get_nothing(
    sandbox: Sandbox, zram: ZramDevice, helpers: NamespaceHelpers
) -> None:
    injector = UeventInjector(helpers)
    devname = f"/dev/hr-{secrets.token_hex(4)}"
    event = zram_uevent(zram, "add")
    declared = dataclasses.replace(sandbox.ref(), host_network=True)
    # Ourselves as a "container": same netns inode as the daemon's, not declared.
    me = ContainerRef(
        runtime=Runtime.PID,
        name=str(os.getpid()),
        pid=os.getpid(),
        namespaces={"net": os.stat("/proc/self/ns/net").st_ino},
    )
    with UeventListener.start(sandbox, group=1) as inside, host_listeners() as on_host:
        for ref in (declared, me):
            record = await injector.inject(ref, event, devname=devname)
            assert record.wires == ()
            assert record.skipped is not None
            assert "host's network namespace" in record.skipped
        for listener in (inside, *on_host):
            heard = await blocking(listener.messages, timeout=0.5)
            assert [m.header for m in heard if ours(devname)(m)] == []
    assert helpers.running() == []  # nothing was even started for them


async def test_oversized_kernel_uevent_is_refused_with_a_clear_error(
    sandbox: Sandbox, zram: ZramDevice, helpers: NamespaceHelpers
) -> None:
    event = zram_uevent(zram, "change").replace(HOTRELAY_PADDING="x" * 2100)
    injector = UeventInjector(helpers)
    with pytest.raises(InjectionError, match=r"container pid:\d+: change uevent .* 2048"):
        await injector.inject(sandbox.ref(), event, wire=Wire.KERNEL)
    # The udev format has no such limit; the helper goes on.
    record = await injector.inject(sandbox.ref(), event, wire=Wire.UDEV)
    assert record.wires == (Wire.UDEV,)


def test_container_view_rewrites_paths_per_wire() -> None:
    host = Uevent.from_properties(
        {
            "ACTION": "add",
            "DEVPATH": "/devices/usb1/1-1/tty/ttyUSB0",
            "SUBSYSTEM": "tty",
            "DEVNAME": "/dev/ttyUSB0",
            "MAJOR": "188",
            "MINOR": "0",
            "SEQNUM": "77",
            "DEVLINKS": "/dev/serial/by-id/usb-host-only",
            "TAGS": ":systemd:",
            "USEC_INITIALIZED": "123",
            "ID_SERIAL": "dongle",
        },
        Wire.UDEV,
    )
    kernel = container_view(host, Wire.KERNEL, devname="/dev/zigbee")
    assert kernel.wire is Wire.KERNEL
    assert kernel.devname == "zigbee"
    assert kernel.seqnum is None
    assert {"DEVLINKS", "TAGS", "USEC_INITIALIZED"}.isdisjoint(kernel.properties)
    udev = container_view(host, Wire.UDEV, devname="/dev/zigbee", devlinks=["/dev/serial/by-id/z"])
    assert udev.devname == "/dev/zigbee"
    assert udev.get("DEVLINKS") == "/dev/serial/by-id/z"
    assert udev.seqnum == 77
    assert udev.get("ID_SERIAL") == "dongle"
    coldplugged = container_view(host.replace(SEQNUM=None), Wire.UDEV)
    assert coldplugged.seqnum is not None
    assert coldplugged.seqnum > 0
    assert coldplugged.get("DEVLINKS") is None  # no container symlinks given
    assert coldplugged.devname == "/dev/ttyUSB0"
