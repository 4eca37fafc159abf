"""Our libudev serializer against the real libudev (through pyudev).

libudev listeners install an in-kernel socket filter that compares the MurmurHash2 of
the subsystem and the tag bloom in our header; a wrong hash silently drops the message.
These tests send our bytes on the udev group and let real libudev decide.
"""

from __future__ import annotations

import pytest
import pyudev

from hotrelay.core.uevent import Uevent, Wire, serialize
from hotrelay.kernel import netlink

pytestmark = pytest.mark.privileged


def event(devpath: str, subsystem: str, **extra: str) -> Uevent:
    # libudev (sd-device's device_verify) refuses an event without a non-zero SEQNUM.
    props = {"ACTION": "add", "DEVPATH": devpath, "SUBSYSTEM": subsystem, "SEQNUM": "1", **extra}
    return Uevent.from_properties(props, Wire.UDEV)


def udev_monitor() -> pyudev.Monitor:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.set_receive_buffer_size(1 << 20)
    return monitor


def send_all(*events: Uevent) -> None:
    with netlink.open_uevent_socket(0, nonblocking=False, passcred=False) as sock:
        for e in events:
            sock.sendto(serialize(e, Wire.UDEV), (0, netlink.UDEV_GROUP))


def received(monitor: pyudev.Monitor) -> list[pyudev.Device]:
    devices = []
    while (device := monitor.poll(timeout=0.5)) is not None:
        devices.append(device)
    return devices


def test_libudev_subsystem_filter_accepts_our_hash() -> None:
    monitor = udev_monitor()
    monitor.filter_by("block", device_type="disk")
    monitor.start()
    send_all(
        event("/devices/virtual/net/hr-not-block", "net"),
        event("/devices/virtual/block/hr-part", "block", DEVTYPE="partition"),
        event("/devices/virtual/block/hr-disk", "block", DEVTYPE="disk", DEVNAME="/dev/hr"),
    )
    devices = received(monitor)
    assert [d.device_path for d in devices] == ["/devices/virtual/block/hr-disk"]
    (disk,) = devices
    assert disk.action == "add"
    assert disk.subsystem == "block"
    assert disk.properties["DEVNAME"] == "/dev/hr"


def test_libudev_tag_filter_accepts_our_bloom() -> None:
    monitor = udev_monitor()
    monitor.filter_by_tag("hotrelay")
    monitor.start()
    send_all(
        event("/devices/virtual/misc/hr-untagged", "misc"),
        event("/devices/virtual/misc/hr-other", "misc", TAGS=":seat:uaccess:"),
        event("/devices/virtual/misc/hr-tagged", "misc", TAGS=":seat:hotrelay:"),
    )
    assert [d.device_path for d in received(monitor)] == ["/devices/virtual/misc/hr-tagged"]
