"""The trusted event source: uevents from netlink, only from senders we trust.

hotrelay acts as root on what it hears, so who sent a message matters as much as what
it says:
- on the kernel group (1) only the kernel, port id 0, is believed; any process may
  send to the group or unicast to our port, and those messages are dropped;
- on the udev group (2) only a multicast from udevd itself is believed: its
  SCM_CREDENTIALS must say uid 0 in the host's user namespace (what libudev checks)
  *and* carry the pid of udevd or of one of its workers (``hotrelay.daemon.udevd``).
  uid 0 alone is not enough: any root process with CAP_NET_ADMIN in the host's netns
  may send to the group, but only CAP_SYS_ADMIN may claim another pid. Root in a
  user-namespaced container shows up as its host uid (or 65534), so it is dropped.
Every dropped message is counted by reason. When the socket's buffer overflowed the
kernel reports ENOBUFS once; the source then sends an explicit ``Overflow`` so the
relay resynchronises instead of silently running on with a hole in its picture.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hotrelay.core.uevent import LIBUDEV_PREFIX, Uevent, UeventParseError, parse, parse_kernel
from hotrelay.daemon.udevd import UdevdIdentity
from hotrelay.kernel import netlink

__all__ = [
    "DEFAULT_RCVBUF",
    "UDEV_CONTROL",
    "EventSource",
    "Overflow",
    "SourceItem",
    "SourceKind",
    "SourceStats",
    "resolve_source_kind",
]

DEFAULT_RCVBUF = 64 * 1024 * 1024
UDEV_CONTROL = Path("/run/udev/control")
# Bounds the work done between checkpoints, so one burst cannot starve other tasks.
MAX_BATCH = 512


class SourceKind(enum.Enum):
    KERNEL = "kernel"
    UDEV = "udev"
    AUTO = "auto"


def resolve_source_kind(kind: SourceKind, *, udev_control: Path = UDEV_CONTROL) -> SourceKind:
    """``auto`` listens to udevd when it runs (its control socket exists), else the kernel."""
    if kind is not SourceKind.AUTO:
        return kind
    return SourceKind.UDEV if udev_control.exists() else SourceKind.KERNEL


@dataclass(frozen=True, slots=True)
class Overflow:
    """The kernel dropped messages for us: everything we know may be stale."""

    kind: SourceKind


SourceItem = Uevent | Overflow


@dataclass(slots=True)
class SourceStats:
    received: int = 0
    accepted: int = 0
    dropped_untrusted: int = 0
    dropped_malformed: int = 0
    dropped_truncated: int = 0
    overflows: int = 0
    last_drop: str | None = field(default=None)

    def as_dict(self) -> dict[str, int | str | None]:
        return {
            "received": self.received,
            "accepted": self.accepted,
            "dropped_untrusted": self.dropped_untrusted,
            "dropped_malformed": self.dropped_malformed,
            "dropped_truncated": self.dropped_truncated,
            "overflows": self.overflows,
            "last_drop": self.last_drop,
        }


class EventSource:
    """A bound uevent socket plus the trust policy; ``run`` pumps it into a channel.

    The socket is bound when the source is made, so that a caller can subscribe first
    and enumerate existing devices second without missing an event in between.
    """

    def __init__(
        self,
        kind: SourceKind = SourceKind.AUTO,
        *,
        rcvbuf: int = DEFAULT_RCVBUF,
        udev_control: Path = UDEV_CONTROL,
    ) -> None:
        self.kind = resolve_source_kind(kind, udev_control=udev_control)
        group = netlink.UDEV_GROUP if self.kind is SourceKind.UDEV else netlink.KERNEL_GROUP
        self.stats = SourceStats()
        self._group = group
        self._sock = netlink.open_uevent_socket(group, rcvbuf=rcvbuf)
        self._receiver = netlink.Receiver(self._sock)
        self.rcvbuf = netlink.receive_buffer_size(self._sock)
        # Learned after binding: a message udevd sends meanwhile is queued, and judged
        # once udevd is known.
        self.udevd = UdevdIdentity(udev_control) if self.kind is SourceKind.UDEV else None
        # udev-group messages dropped only because udevd was not known: once it is, the
        # relay resynchronises (a restarted udevd's first events may be among them).
        self._missed_while_unknown = False

    def close(self) -> None:
        self._sock.close()
        if self.udevd is not None:
            self.udevd.close()

    def __enter__(self) -> EventSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def _untrusted_because(self, sender: netlink.Sender) -> str | None:
        if self._group == netlink.KERNEL_GROUP:
            if sender.portid == 0:
                return None
            return f"kernel group: sender port id {sender.portid} is not the kernel"
        if not (sender.groups & netlink.UDEV_GROUP and sender.uid == 0):
            return (
                f"udev group: sender uid {sender.uid} (port id {sender.portid}, "
                f"groups {sender.groups:#x}) is not host root multicasting"
            )
        assert self.udevd is not None
        known = self.udevd.pid is not None
        problem = self.udevd.untrusted_because(sender.pid)
        if problem is None:
            return None
        if not known and self.udevd.pid is None:
            self._missed_while_unknown = True
        return f"udev group: {problem}"

    def _vet(self, datagram: netlink.Datagram) -> Uevent | None:
        """The parsed event if the sender is trusted and the message well-formed."""
        stats = self.stats
        untrusted = self._untrusted_because(datagram.sender)
        if untrusted is not None:
            stats.dropped_untrusted += 1
            stats.last_drop = untrusted
            return None
        if datagram.truncated:
            stats.dropped_truncated += 1
            stats.last_drop = f"message over {netlink.RECV_BUFFER_SIZE - 1} bytes"
            return None
        if datagram.data.startswith(LIBUDEV_PREFIX) != (self._group == netlink.UDEV_GROUP):
            stats.dropped_malformed += 1
            stats.last_drop = "message in the other group's wire format"
            return None
        try:
            uevent = parse(datagram.data)
        except UeventParseError as exc:
            stats.dropped_malformed += 1
            stats.last_drop = str(exc)
            return None
        stats.accepted += 1
        return uevent

    def receive_ready(self) -> list[SourceItem]:
        """Everything already queued on the socket (up to MAX_BATCH), without blocking."""
        if self._group == netlink.KERNEL_GROUP:
            return self._receive_kernel()
        items: list[SourceItem] = []
        udevd = self.udevd
        assert udevd is not None
        udevd.revalidate()
        learned = udevd.learned
        while len(items) < MAX_BATCH:
            try:
                datagram = self._receiver.receive()
            except BlockingIOError:
                break
            except OSError as exc:
                self._overflowed(exc, items)
                continue
            self.stats.received += 1
            uevent = self._vet(datagram)
            if uevent is not None:
                items.append(uevent)
        if udevd.learned != learned and self._missed_while_unknown:
            # udevd became known after messages were dropped for want of it: what they
            # said is lost, so the picture may be stale, exactly as after an overflow.
            self._missed_while_unknown = False
            items.insert(0, Overflow(self.kind))
        return items

    def _receive_kernel(self) -> list[SourceItem]:
        # The hot path: up to a few hundred thousand messages a second in a storm, so
        # the trust check and parse are inlined and nothing is allocated per message
        # beyond the bytes and the Uevent itself. Same policy as _vet.
        items: list[SourceItem] = []
        stats = self.stats
        receive_from = self._receiver.receive_from
        received = 0
        while received < MAX_BATCH:
            try:
                data, portid, truncated = receive_from()
            except BlockingIOError:
                break
            except OSError as exc:
                self._overflowed(exc, items)
                continue
            received += 1
            if portid != 0:
                stats.dropped_untrusted += 1
                stats.last_drop = f"kernel group: sender port id {portid} is not the kernel"
            elif truncated:
                stats.dropped_truncated += 1
                stats.last_drop = f"message over {netlink.RECV_BUFFER_SIZE - 1} bytes"
            elif data.startswith(LIBUDEV_PREFIX):
                stats.dropped_malformed += 1
                stats.last_drop = "message in the other group's wire format"
            else:
                try:
                    items.append(parse_kernel(data))
                except UeventParseError as exc:
                    stats.dropped_malformed += 1
                    stats.last_drop = str(exc)
        stats.received += received
        stats.accepted += sum(isinstance(item, Uevent) for item in items)
        return items

    def _overflowed(self, exc: OSError, items: list[SourceItem]) -> None:
        if not netlink.is_overflow(exc):
            raise exc
        self.stats.overflows += 1
        items.append(Overflow(self.kind))

    async def run(
        self,
        send: trio.MemorySendChannel[Sequence[SourceItem]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send batches of trusted events and overflows until cancelled.

        A slow consumer applies back-pressure through the channel; the socket buffer
        then fills and the kernel's ENOBUFS turns into an Overflow, never a silent loss.
        """
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            items = self.receive_ready()
            if items:
                await send.send(items)
            else:
                await trio.lowlevel.checkpoint()
