"""NETLINK_KOBJECT_UEVENT sockets: open, receive with the sender's identity, send.

The sender's identity is what makes a uevent trustworthy: the kernel sends from port
id 0, and every message carries SCM_CREDENTIALS that the kernel fills in (a sender can
only claim another uid with CAP_SETUID, i.e. as root). See ``hotrelay.daemon.source``.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
UDEV_GROUP = 2

SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)
_UCRED = struct.Struct("=iII")
_CMSG_SPACE = socket.CMSG_SPACE(_UCRED.size)

# One receive buffer larger than any uevent, so MSG_TRUNC reliably flags an oversized one.
RECV_BUFFER_SIZE = 64 * 1024 + 1


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a netlink message: its port id, the groups it was sent to, its creds."""

    portid: int
    groups: int
    pid: int | None
    uid: int | None
    gid: int | None


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes
    sender: Sender
    truncated: bool


def open_uevent_socket(
    groups: int, *, rcvbuf: int | None = None, passcred: bool = True, nonblocking: bool = True
) -> socket.socket:
    """A uevent socket bound to ``groups`` (a bitmask: 1 kernel, 2 udev).

    ``rcvbuf`` is forced with SO_RCVBUFFORCE (root may exceed net.core.rmem_max); a
    burst larger than the buffer is lost and reported as ENOBUFS on the next receive.
    """
    flags = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    if nonblocking:
        flags |= socket.SOCK_NONBLOCK
    sock = socket.socket(socket.AF_NETLINK, flags, NETLINK_KOBJECT_UEVENT)
    try:
        if rcvbuf is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if passcred:
            sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def receive_buffer_size(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


class Receiver:
    """Receives datagrams into one preallocated buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buffer)

    def receive(self) -> Datagram:
        """One datagram with its sender's credentials (needs SO_PASSCRED).

        Raises BlockingIOError when none is queued, OSError(ENOBUFS) after a loss.
        """
        nbytes, ancdata, msg_flags, address = self._sock.recvmsg_into([self._view], _CMSG_SPACE)
        pid = uid = gid = None
        for level, kind, payload in ancdata:
            is_creds = level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS
            if is_creds and len(payload) >= _UCRED.size:
                pid, uid, gid = _UCRED.unpack_from(payload)
        portid, groups = address
        return Datagram(
            data=bytes(self._view[:nbytes]),
            sender=Sender(portid=portid, groups=groups, pid=pid, uid=uid, gid=gid),
            truncated=bool(msg_flags & socket.MSG_TRUNC),
        )

    def receive_from(self) -> tuple[bytes, int, bool]:
        """One datagram as (data, sender port id, truncated), without credentials.

        The lean path for the kernel group, where the port id alone tells the kernel
        from anyone else: no ancillary data and no objects per message. MSG_TRUNC makes
        the kernel report a datagram's full length even when it did not fit.
        """
        nbytes, (portid, _groups) = self._sock.recvfrom_into(self._buffer, 0, socket.MSG_TRUNC)
        if nbytes > RECV_BUFFER_SIZE:
            return bytes(self._view), portid, True
        return bytes(self._view[:nbytes]), portid, False


def is_overflow(exc: OSError) -> bool:
    return exc.errno == errno.ENOBUFS


def send_credentials(pid: int, uid: int, gid: int) -> tuple[int, int, bytes]:
    """An SCM_CREDENTIALS control message for ``socket.sendmsg``."""
    return (socket.SOL_SOCKET, SCM_CREDENTIALS, _UCRED.pack(pid, uid, gid))
