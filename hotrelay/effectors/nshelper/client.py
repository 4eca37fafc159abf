"""The daemon's handle on one helper process (trio side).

Requests are serialized per helper. A helper that misses its deadline, breaks the
protocol or is cancelled mid-request is killed (through its pidfd: a late reply must
not answer the next request, and a stuck filesystem call must not stay stuck); the
pool forks a fresh one on the next use.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import TypeVar

import trio

from hotrelay.core.containers import ContainerRef
from hotrelay.effectors.nshelper.errors import HelperError, HelperTimeoutError, error_for_kind
from hotrelay.effectors.nshelper.protocol import (
    RECEIVE_BUFFER,
    AccountTexts,
    BindNode,
    Created,
    DevDirectory,
    Directory,
    Existence,
    Exists,
    Failure,
    MakeNode,
    MakeSymlink,
    Ping,
    Pong,
    ProtocolError,
    ReadAccounts,
    Removed,
    RemoveNode,
    RemoveSymlink,
    Reply,
    Request,
    RouteSocket,
    SendUevent,
    Sent,
    Socket,
    decode_reply,
    encode,
)
from hotrelay.effectors.nshelper.server import ANCILLARY_BUFFER, fds_from, rights
from hotrelay.kernel import ns

__all__ = ["DEFAULT_TIMEOUT", "NamespaceHelper", "receive_reply"]

DEFAULT_TIMEOUT = 5.0
R = TypeVar("R", bound=Reply)


async def receive_reply(sock: trio.socket.SocketType) -> tuple[Reply, list[int]] | None:
    """One reply and its descriptors; None at EOF. ProtocolError for anything not ours."""
    data, ancdata, flags, _ = await sock.recvmsg(
        RECEIVE_BUFFER, ANCILLARY_BUFFER, socket.MSG_CMSG_CLOEXEC
    )
    fds = fds_from(ancdata)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("reply truncated (too large or too many descriptors)")
        return decode_reply(data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class NamespaceHelper:
    """One helper process serving one container."""

    def __init__(
        self,
        container: ContainerRef,
        sock: trio.socket.SocketType,
        pidfd: int,
        *,
        helper_pid: int,
        joined_net: bool,
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.container = container
        self.request_timeout = request_timeout
        self.helper_pid = helper_pid
        self.joined_net = joined_net
        self.last_used = time.monotonic()
        self._sock = sock
        self._pidfd = pidfd
        self._lock = trio.Lock()
        self._broken = False
        self._killed = False

    @property
    def exited(self) -> bool:
        """The helper process has exited (its pidfd turned readable)."""
        return self._pidfd < 0 or not ns.is_alive(self._pidfd)

    @property
    def stuck(self) -> bool:
        """Killed, and still not gone: waiting in the kernel on the container's files."""
        return self._killed and not self.exited

    @property
    def alive(self) -> bool:
        return not self._broken and not self.exited

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def wait_exited(self) -> None:
        """Wait until the helper exits on its own (socket closed, container gone)."""
        if self._pidfd >= 0:
            await trio.lowlevel.wait_readable(self._pidfd)

    async def wait_ready(self) -> int:
        """The helper's first message says it runs in the container; its pid."""
        reply, _ = await self._receive()
        if isinstance(reply, Pong):
            return reply.pid
        raise HelperError(self.container.target, "namespace helper did not start properly")

    async def _receive(self) -> tuple[Reply, list[int]]:
        received = await receive_reply(self._sock)
        if received is None:
            self._broken = True
            raise HelperError(
                self.container.target, "namespace helper exited (did the container stop?)"
            )
        reply, fds = received
        if len(fds) != (1 if isinstance(reply, Socket | Directory | AccountTexts) else 0):
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{reply.op} reply with {len(fds)} descriptors")
        return reply, fds

    async def exchange(
        self, request: Request, expect: type[R], *, fds: Sequence[int] = ()
    ) -> tuple[R, list[int]]:
        """One request, its reply of type ``expect`` and the reply's descriptors.

        A Failure is raised as an InjectionError subclass; anything else unexpected
        (a deadline missed, a reply not of our protocol or of another type) kills the
        helper and raises HelperError.
        """
        name = self.container.target
        async with self._lock:
            if not self.alive:
                raise HelperError(name, "namespace helper is not running")
            try:
                message = encode(request)
            except ProtocolError as exc:
                raise HelperError(name, f"{request.op}: {exc}") from None
            try:
                with trio.fail_after(self.request_timeout):
                    await self._sock.sendmsg([message], rights(fds))
                    reply, reply_fds = await self._receive()
                if not isinstance(reply, (expect, Failure)):
                    for fd in reply_fds:
                        os.close(fd)
                    raise ProtocolError(f"expected {expect.__name__}, got {reply.op}")
            except trio.TooSlowError:
                await self.kill()
                raise HelperTimeoutError(
                    name, f"{request.op} did not finish within {self.request_timeout} s"
                ) from None
            except ConnectionError as exc:
                await self.kill()
                raise HelperError(
                    name, f"{request.op}: namespace helper exited (did the container stop?)"
                ) from exc
            except (OSError, ProtocolError) as exc:
                await self.kill()
                raise HelperError(name, f"{request.op}: lost the namespace helper: {exc}") from exc
            except BaseException:
                await self.kill()
                raise
            finally:
                self.last_used = time.monotonic()
        if isinstance(reply, Failure):
            raise error_for_kind(reply.kind)(
                name, reply.message, path=reply.path, errno=reply.errno
            )
        return reply, reply_fds

    async def call(self, request: Request, expect: type[R], *, fds: Sequence[int] = ()) -> R:
        """One request and its reply (which carries no descriptors)."""
        reply, _ = await self.exchange(request, expect, fds=fds)
        return reply

    async def kill(self) -> None:
        """SIGKILL it through its pidfd and wait (briefly, once) until it is gone.

        A helper waiting on a filesystem that never answers (a hung FUSE mount) cannot
        die until the kernel lets it: its pidfd is then kept, so that ``exited`` keeps
        telling the pool whether it is still stuck.
        """
        self._broken = True
        with trio.CancelScope(shield=True):
            self._sock.close()
            if self._pidfd < 0 or self._killed:
                if self.exited:
                    self._close_pidfd()
                return
            self._killed = True
            if not self.exited:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                with trio.move_on_after(2.0):
                    await trio.lowlevel.wait_readable(self._pidfd)
            if self.exited:
                self._close_pidfd()

    async def aclose(self, *, grace: float = 2.0) -> None:
        """Stop it: EOF first, SIGKILL if it lingers."""
        self._broken = True
        self._sock.close()
        with trio.CancelScope(shield=True):
            if self._pidfd >= 0 and not self.exited:
                with trio.move_on_after(grace):
                    await trio.lowlevel.wait_readable(self._pidfd)
            await self.kill()

    def forget(self) -> None:
        """Release what we hold of a helper that has exited on its own."""
        self._broken = True
        self._sock.close()
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            pidfd, self._pidfd = self._pidfd, -1
            os.close(pidfd)

    # -- typed requests -----------------------------------------------------------------

    async def ping(self) -> int:
        return (await self.call(Ping(), Pong)).pid

    async def make_node(
        self,
        path: str,
        *,
        kind: str,
        major: int,
        minor: int,
        mode: int,
        uid: int,
        gid: int,
        dir_uid: int,
        dir_gid: int,
    ) -> Created:
        """mknod at path; uid/gid/dir ids are host ids."""
        request = MakeNode(path, kind, major, minor, mode, uid, gid, dir_uid, dir_gid)
        return await self.call(request, Created)

    async def bind_node(
        self, path: str, tree: int, *, kind: str, major: int, minor: int, dir_uid: int, dir_gid: int
    ) -> Created:
        """Mount the detached tree (an open_tree fd made on the host) at path."""
        request = BindNode(path, kind, major, minor, dir_uid, dir_gid)
        return await self.call(request, Created, fds=(tree,))

    async def make_symlink(self, path: str, target: str, *, dir_uid: int, dir_gid: int) -> Created:
        return await self.call(MakeSymlink(path, target, dir_uid, dir_gid), Created)

    async def remove_node(
        self, path: str, *, kind: str, major: int, minor: int, method: str, dirs: Sequence[str]
    ) -> Removed:
        request = RemoveNode(path, kind, major, minor, method, tuple(dirs))
        return await self.call(request, Removed)

    async def remove_symlink(self, path: str, target: str, *, dirs: Sequence[str]) -> Removed:
        return await self.call(RemoveSymlink(path, target, tuple(dirs)), Removed)

    async def exists(self, path: str) -> bool:
        """Whether path exists in the container (symlinks resolved within its root)."""
        return (await self.call(Exists(path), Existence)).exists

    async def send_uevent(self, wire: str, payload: bytes, *, uid: int, gid: int) -> None:
        """Send a uevent in the container's netns: wire "kernel" (UEVENT_SEND, the kernel
        rebroadcasts it on group 1) or "udev" (group 2, credentials uid/gid)."""
        await self.call(SendUevent(wire, payload.hex(), uid, gid), Sent)

    async def dev_directory(self) -> int:
        """An O_PATH fd of the container's /dev (InjectionError if /dev is not tmpfs)."""
        _, fds = await self.exchange(DevDirectory(), Directory)
        return fds[0]

    async def read_accounts(self) -> tuple[str, str]:
        """The container's /etc/passwd and /etc/group texts ("" for a missing file).

        Raises AccountReadError when a file is unsafe to read (a device node, a FIFO,
        too big, ...), HelperError when the read does not finish in time.
        """
        reply, fds = await self.exchange(ReadAccounts(), AccountTexts)
        try:
            data = b""
            want = reply.passwd + reply.group
            while len(data) < want:
                chunk = os.pread(fds[0], want - len(data), len(data))
                if not chunk:
                    raise HelperError(self.container.target, "read_accounts: short memfd")
                data += chunk
        finally:
            os.close(fds[0])
        passwd, group = data[: reply.passwd], data[reply.passwd :]
        return passwd.decode(errors="replace"), group.decode(errors="replace")

    async def route_socket(self) -> socket.socket:
        """A NETLINK_ROUTE socket created inside the container's network namespace."""
        _, fds = await self.exchange(RouteSocket(), Socket)
        return socket.socket(fileno=fds[0])
