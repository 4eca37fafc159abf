"""Coldplug: the devices that already exist, as synthetic ``add`` uevents.

The relay subscribes to the event source first and enumerates second, so a device
that appears in between is seen twice (once here, once live) rather than never; the
relay de-duplicates by devpath. Enumeration reads sysfs (and udev's database when
udevd runs) through pyudev; it blocks, so callers in trio run it in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyudev

from hotrelay.core.uevent import Uevent, UeventParseError, Wire

__all__ = ["enumerate_devices", "uevent_from_device"]


def uevent_from_device(device: pyudev.Device, wire: Wire = Wire.KERNEL) -> Uevent:
    """An ``add`` Uevent describing ``device`` as it is now (no SEQNUM: it was never sent)."""
    properties: dict[str, str] = {
        "ACTION": "add",
        "DEVPATH": device.device_path,
        "SUBSYSTEM": device.subsystem or "",
    }
    for key, value in device.properties.items():
        properties.setdefault(key, value)
    properties.pop("SEQNUM", None)
    devname = properties.get("DEVNAME")
    if wire is Wire.KERNEL and devname and devname.startswith("/dev/"):
        # pyudev makes DEVNAME absolute; the kernel's own events say it relative to /dev.
        properties["DEVNAME"] = devname.removeprefix("/dev/")
    return Uevent.from_properties(properties, wire)


def enumerate_devices(
    subsystems: Iterable[str] | None = None,
    *,
    wire: Wire = Wire.KERNEL,
    context: pyudev.Context | None = None,
) -> Iterator[Uevent]:
    """Every existing device (optionally only these subsystems) as an ``add`` Uevent.

    A device that vanishes while we read it, or has no subsystem, is skipped.
    """
    context = context or pyudev.Context()
    wanted = list(subsystems) if subsystems is not None else [None]
    for subsystem in wanted:
        enumerator = context.list_devices()
        if subsystem is not None:
            enumerator = enumerator.match_subsystem(subsystem)
        for device in enumerator:
            try:
                yield uevent_from_device(device, wire)
            except (UeventParseError, OSError, pyudev.DeviceNotFoundError):
                continue
