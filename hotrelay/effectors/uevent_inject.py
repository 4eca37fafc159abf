"""Uevents replayed into a container's network namespace.

The kernel only broadcasts uevents into network namespaces owned by the initial user
namespace, and udev's (group 2) messages never cross network namespaces, so a
container with a network namespace of its own hears nothing of a device we hand it
unless we tell it. Two messages, sent by the container's namespace helper:

- kernel format, as an ``UEVENT_SEND`` netlink request (nlmsghdr type 0x10,
  NLM_F_REQUEST|NLM_F_ACK) to the kernel itself: the kernel appends a SEQNUM and
  rebroadcasts it on group 1 of that netns from port id 0, so udevd, libudev's
  kernel monitors and libusb accept it as the kernel's own. At most 2048 bytes,
  SEQNUM included, so we send it without one.
- libudev format on group 2, which libudev monitors accept when no udevd runs inside.

Both carry SCM_CREDENTIALS naming the host ids of the container's root (the kernel's
rebroadcast keeps the request's credentials): a receiver in the container's user
namespace then sees uid 0, and libudev drops messages from anyone else. Host root
would otherwise show up there as the overflow uid 65534.

``auto`` sends the kernel message alone when the container runs udevd (its
/run/udev/control exists; udevd then sends its own group-2 message after applying
the container's rules) and both otherwise. A container on the host's network already
hears the host's events: it gets nothing, so there are no duplicates.

DEVNAME and DEVLINKS in the message are the container's paths, not the host's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hotrelay.core.containers import ContainerRef
from hotrelay.core.uevent import Uevent, Wire, serialize
from hotrelay.effectors.nshelper import InjectionError, NamespaceHelpers, shares_host_network

__all__ = [
    "KERNEL_UEVENT_LIMIT",
    "UDEV_CONTROL",
    "InjectionRecord",
    "UeventInjector",
    "container_view",
]

# UEVENT_BUFFER_SIZE: the kernel refuses a rebroadcast whose nlmsghdr, text and the
# SEQNUM=<u64> it appends exceed it.
KERNEL_UEVENT_LIMIT = 2048
_NLMSGHDR_SIZE = 16
_SEQNUM_ROOM = len("SEQNUM=18446744073709551615") + 1
UDEV_CONTROL = "/run/udev/control"
# Properties udevd adds on the host; they describe the host's udev database (and its
# paths), not the container, and a kernel-format message never carries them.
_UDEV_ONLY = ("DEVLINKS", "TAGS", "CURRENT_TAGS", "USEC_INITIALIZED")
# libudev drops a message without a non-zero SEQNUM; coldplugged adds have none.
_fallback_seqnum = itertools.count(1)


@dataclass(frozen=True, slots=True)
class InjectionRecord:
    """What was sent into which container (``wires`` empty and ``skipped`` set if nothing)."""

    container: str
    action: str
    devpath: str
    wires: tuple[Wire, ...] = ()
    skipped: str | None = None
    devname: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "action": self.action,
            "devpath": self.devpath,
            "wires": [wire.value for wire in self.wires],
            "skipped": self.skipped,
            "devname": self.devname,
        }


def container_view(
    uevent: Uevent,
    wire: Wire,
    *,
    devname: str | None = None,
    devlinks: Sequence[str] = (),
    seqnum: int | None = None,
) -> Uevent:
    """The event as the container should see it, on ``wire``.

    ``devname`` is the node's path in the container (absolute, below /dev); None keeps
    the event's own. Kernel format: DEVNAME relative to /dev, no SEQNUM (the kernel
    adds it) and none of udevd's properties. udev format: DEVNAME absolute, DEVLINKS
    the container's symlinks (absolute), a non-zero SEQNUM.
    """
    node = devname if devname is not None else uevent.node
    changes: dict[str, str | None] = {}
    if wire is Wire.KERNEL:
        changes = dict.fromkeys(_UDEV_ONLY, None)
        changes["SEQNUM"] = None
        if node is not None:
            changes["DEVNAME"] = node.removeprefix("/dev/")
        return uevent.replace(wire=Wire.KERNEL, **changes)
    if node is not None:
        changes["DEVNAME"] = node
    changes["DEVLINKS"] = " ".join(devlinks) if devlinks else None
    if uevent.seqnum is None or uevent.seqnum == 0:
        changes["SEQNUM"] = str(seqnum if seqnum else next(_fallback_seqnum))
    return uevent.replace(wire=Wire.UDEV, **changes)


class UeventInjector:
    """Inject uevents into containers through their namespace helpers."""

    def __init__(self, helpers: NamespaceHelpers) -> None:
        self._helpers = helpers

    async def wires_for(self, container: ContainerRef) -> tuple[Wire, ...]:
        """What ``auto`` sends: kernel alone if udevd runs inside, else both."""
        helper = await self._helpers.get(container)
        if await helper.exists(UDEV_CONTROL):
            return (Wire.KERNEL,)
        return (Wire.KERNEL, Wire.UDEV)

    async def inject(
        self,
        container: ContainerRef,
        uevent: Uevent,
        *,
        wire: Wire | None = None,
        devname: str | None = None,
        devlinks: Sequence[str] = (),
    ) -> InjectionRecord:
        """Send ``uevent`` into the container's netns on ``wire`` (None: auto).

        ``devname``/``devlinks`` are the container-side node path and symlinks.
        Raises InjectionError (a kernel message too big, the kernel refusing it).
        """
        name = container.target
        if shares_host_network(container):
            return InjectionRecord(
                name,
                uevent.action,
                uevent.devpath,
                skipped="the container shares the host's network namespace and hears it",
            )
        wires = (wire,) if wire is not None else await self.wires_for(container)
        payloads: list[tuple[Wire, bytes]] = []
        for each in wires:
            view = container_view(uevent, each, devname=devname, devlinks=devlinks)
            payload = serialize(view, each)
            if each is Wire.KERNEL and (
                len(payload) + _NLMSGHDR_SIZE + _SEQNUM_ROOM > KERNEL_UEVENT_LIMIT
            ):
                raise InjectionError(
                    name,
                    f"{uevent.action} uevent for {uevent.devpath} is {len(payload)} bytes; "
                    f"the kernel rebroadcasts at most {KERNEL_UEVENT_LIMIT} including its "
                    "header and SEQNUM",
                )
            payloads.append((each, payload))
        uid = container.uid_map.to_host(0)
        gid = container.gid_map.to_host(0)
        if uid is None or gid is None:
            raise InjectionError(name, "its root (uid/gid 0) is not mapped to any host id")
        helper = await self._helpers.get(container)
        for each, payload in payloads:
            await helper.send_uevent(each.value, payload, uid=uid, gid=gid)
        return InjectionRecord(
            name,
            uevent.action,
            uevent.devpath,
            wires=tuple(each for each, _ in payloads),
            devname=devname if devname is not None else uevent.node,
        )
