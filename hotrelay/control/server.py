"""The control socket server: a unix socket, one task per client, peers checked by the kernel.

Each connection is served by its own task in the server's nursery, so a slow, stalled
or hostile client only ever holds up itself:
- every write has a deadline (``send_timeout``); a client that does not read its
  answers is disconnected when it passes;
- a ``monitor`` client gets its own bounded queue, filled without waiting from the
  daemon's feed; when the queue is full the client is dropped, never waited for;
- a request line is at most ``MAX_LINE`` bytes; a longer one is refused and the
  connection closed, so no client makes the daemon buffer without bound;
- no request kills the server: handler errors become error responses, and a bug in
  serving one connection is logged and ends only that connection.

Who the peer is comes from the kernel (SO_PEERCRED, SO_PEERGROUPS), never from the
request: root may use every verb, members of the configured group the read-only ones.
The socket file is made 0600 (0660 and group-owned when a group is configured) under a
umask, so that it is never more open than that, even for an instant.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hotrelay.control.protocol import (
    ATTACH_OPTIONS,
    MAX_LINE,
    Access,
    ControlHandler,
    ErrorCode,
    LineBuffer,
    LineTooLong,
    Peer,
    ProtocolError,
    Request,
    denied_message,
    encode_error,
    encode_event,
    encode_result,
    parse_request,
    peer_access,
    verb_allowed,
)
from hotrelay.core.config import DEFAULT_SOCKET, Config
from hotrelay.errors import HotrelayError

__all__ = [
    "Broadcaster",
    "ControlServer",
    "ControlSettings",
    "ControlSocketError",
    "activation_socket",
    "bind_control_socket",
    "prepare_socket_directory",
    "read_peer",
    "resolve_group",
    "serve_control",
]

log = logging.getLogger("hotrelay.control")

SD_LISTEN_FDS_START = 3
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python lacks the name
_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_GID = struct.Struct("=I")
_MAX_GROUPS = 65536  # NGROUPS_MAX
RECEIVE_CHUNK = 65536
# accept() errors that mean "out of resources now", not "the listener is broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class ControlSocketError(HotrelayError):
    """The control socket cannot be set up (path taken, permissions, bad activation fd)."""


@dataclass(frozen=True, slots=True)
class ControlSettings:
    path: Path = Path(DEFAULT_SOCKET)
    group: int | None = None  # gid whose members may use the read-only verbs
    max_clients: int = 256
    send_timeout: float = 5.0  # seconds a client may take to read one write
    monitor_queue: int = 256  # lines a monitor client may fall behind before it is dropped

    @classmethod
    def from_config(cls, config: Config) -> ControlSettings:
        """Settings for ``config``, its socket_group resolved to a gid now (so a missing
        group is an error at start, not a surprise at the first connection)."""
        return cls(Path(config.socket), resolve_group(config.socket_group))


def resolve_group(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(
            f"socket_group {group!r}: no such group (create it, or remove socket_group)"
        ) from None


# Setting the socket up.


def prepare_socket_directory(directory: Path, group: int | None, *, own: bool = False) -> None:
    """Create the socket's directory private (0700; 0710 and group-owned with a group, so
    that members can reach the socket but not list the state next to it).

    An existing directory is left alone (it may be /run itself) unless ``own`` says it
    is the daemon's own state directory (the default layout, /run/hotrelay): that one
    is set to what a fresh one would be, since an earlier run without the group (or
    with another) would otherwise keep members out for good. Only a directory that is
    already closed to others is adjusted: a shared one such as /run never is.
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        info = directory.lstat()
        private = stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o007
        if own and private and info.st_uid == os.geteuid():
            _set_private(directory, group)
            return
        if group is not None and not (
            info.st_mode & 0o001 or (info.st_gid == group and info.st_mode & 0o010)
        ):
            log.warning(
                "%s is not searchable by group %d: socket_group members cannot reach the "
                "socket (chgrp %d and chmod g+x the directory, or use a dedicated one)",
                directory,
                group,
                group,
            )
        return
    _set_private(directory, group)


def _set_private(directory: Path, group: int | None) -> None:
    if group is not None:
        os.chown(directory, -1, group)
        os.chmod(directory, 0o710)
    else:
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask


def _remove_stale(path: Path) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse anything else."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale control socket %s (nothing listens on it)", path)
        path.unlink(missing_ok=True)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a listener with a full backlog: someone is there
    finally:
        probe.close()
    raise ControlSocketError(
        f"{path}: another process is listening on it (is hotrelay already running?)"
    )


def bind_control_socket(
    path: Path, *, group: int | None = None, backlog: int = 1024
) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 (0660 root:group with a group).

    Blocks briefly (probing a stale socket): call it from a thread in async code.
    """
    try:
        prepare_socket_directory(path.parent, group)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise ControlSocketError(f"{path}: cannot set up the control socket: {exc}") from None
    try:
        # The umask makes bind() create the file 0600, so it is never open to others.
        # The umask is process-wide; this only makes a concurrent file creation stricter.
        previous = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)
        if group is not None:
            os.chown(path, -1, group)
            os.chmod(path, 0o660)  # connect() needs write permission on the socket file
        # Room for more than max_clients waiting connects: while the event loop is busy
        # (a uevent storm) a full backlog makes connect() fail with EAGAIN, so clients
        # under the limit would be refused by the kernel instead of served.
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"{path}: cannot bind the control socket: {exc}") from None
    return sock


def activation_socket(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> socket.socket | None:
    """The listening socket systemd passed (socket activation), or None.

    Follows sd_listen_fds(3): fds start at 3, LISTEN_PID must be ours. The variables are
    removed so that processes we start do not think the fd is theirs.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        raise ControlSocketError(
            f"systemd passed {count} sockets; hotrelay takes one (the control socket)"
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ControlSocketError(f"fd {SD_LISTEN_FDS_START} from systemd: {exc}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ControlSocketError(
            f"fd {SD_LISTEN_FDS_START} from systemd is not a unix stream socket "
            "(ListenStream=/run/hotrelay/control.sock in hotrelay.socket)"
        )
    sock.set_inheritable(False)
    return sock


def read_peer(sock: trio.socket.SocketType | socket.socket) -> Peer:
    """Who is on the other end, as of connect(): pid, uid, gid and supplementary groups."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: trio.socket.SocketType | socket.socket) -> frozenset[int]:
    count = 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * _GID.size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and count < _MAX_GROUPS:
                count *= 4
                continue
            if exc.errno == errno.ENOPROTOOPT:
                return frozenset()  # before Linux 4.13: only the primary gid counts
            raise
        return frozenset(item[0] for item in _GID.iter_unpack(raw[: len(raw) - len(raw) % 4]))


# The daemon's feed for monitor clients.


class Broadcaster:
    """Fan-out of monitor events: ``publish`` never blocks, a lagging subscriber is cut off.

    The daemon can implement ``ControlHandler.subscribe`` with ``broadcaster.subscribe``.
    A subscriber whose buffer is full has its channel closed (it sees the end of the
    feed) rather than slowing down the daemon, and is counted in ``dropped``.
    """

    def __init__(self, buffer: int = 1024) -> None:
        self._buffer = buffer
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self._subscribers.discard(channel)
                channel.close()
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](self._buffer)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()

    def close(self) -> None:
        """End every subscriber's feed (the daemon is stopping)."""
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()


# Serving.


class _Stalled(Exception):
    """The client did not take a write within the deadline."""


async def _dispatch(handler: ControlHandler, request: Request) -> Any:
    args = request.args
    match request.verb:
        case "status":
            return handler.status()
        case "list":
            return handler.grants()
        case "attach":
            options = {name: args[name] for name in ATTACH_OPTIONS if name in args}
            return await handler.attach(args["target"], args["device"], options)
        case "detach":
            return await handler.detach(args["target"], args["device"])
        case "reload":
            return await handler.reload()
        case "refresh":
            return await handler.refresh(args["runtime"], args["name"])
    raise AssertionError(f"verb {request.verb!r} validated but not dispatched")


class _Connection:
    def __init__(self, server: ControlServer, stream: trio.SocketStream, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.access = peer_access(
            peer, owner_uid=server.owner_uid, read_only_gid=server.settings.group
        )
        self.label = f"pid {peer.pid} uid {peer.uid}"

    async def send(self, line: bytes) -> None:
        with trio.move_on_after(self.server.settings.send_timeout):
            await self.stream.send_all(line)
            return
        raise _Stalled

    async def run(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        while True:
            data = await self.stream.receive_some(RECEIVE_CHUNK)
            if not data:
                return
            too_long = False
            try:
                lines = buffer.feed(data)
            except LineTooLong as exc:
                lines, too_long = exc.complete, True
            for line in lines:
                if await self.request(line):
                    return
            if too_long:
                log.warning("control: %s sent a line over %d bytes; closing", self.label, MAX_LINE)
                await self.send(
                    encode_error(
                        None,
                        f"request line longer than {MAX_LINE} bytes; closing the connection",
                        ErrorCode.INVALID,
                    )
                )
                return

    async def request(self, line: bytes) -> bool:
        """Answer one request line; True when the connection is done (monitor ended)."""
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            await self.send(encode_error(exc.request_id, exc.message, ErrorCode.INVALID))
            return False
        if not verb_allowed(request.verb, self.access):
            log.info("control: %s may not use %s", self.label, request.verb)
            message = denied_message(self.peer, self.access, request.verb)
            await self.send(encode_error(request.id, message, ErrorCode.DENIED))
            return False
        if request.verb == "monitor":
            await self.monitor(request)
            return True
        await self.send(await self.call(request))
        return False

    async def call(self, request: Request) -> bytes:
        try:
            result = await _dispatch(self.server.handler, request)
        except HotrelayError as exc:
            return encode_error(request.id, str(exc), ErrorCode.FAILED)
        except Exception as exc:
            log.exception("control: %s from %s failed", request.verb, self.label)
            return encode_error(request.id, _internal(exc), ErrorCode.INTERNAL)
        try:
            return encode_result(request.id, result)
        except (TypeError, ValueError) as exc:
            log.exception("control: the result of %s is not JSON", request.verb)
            return encode_error(request.id, _internal(exc), ErrorCode.INTERNAL)

    async def monitor(self, request: Request) -> None:
        try:
            subscription = self.server.handler.subscribe()
        except HotrelayError as exc:
            await self.send(encode_error(request.id, str(exc), ErrorCode.FAILED))
            return
        except Exception as exc:
            log.exception("control: monitor from %s failed", self.label)
            await self.send(encode_error(request.id, _internal(exc), ErrorCode.INTERNAL))
            return
        with subscription as events:
            # Only now: a client that saw this line will see every later event.
            await self.send(encode_result(request.id, {"subscribed": True}))
            outbox_send, outbox = trio.open_memory_channel[bytes](
                self.server.settings.monitor_queue
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_outbox, outbox, nursery.cancel_scope)
                nursery.start_soon(self._until_eof, nursery.cancel_scope)
                async with outbox_send:
                    async for event in events:
                        try:
                            line = encode_event(request.id, event)
                        except (TypeError, ValueError):
                            log.exception("control: a monitor event is not JSON: %r", event)
                            continue
                        try:
                            outbox_send.send_nowait(line)
                        except trio.WouldBlock:
                            log.warning(
                                "control: dropping monitor client %s: %d events behind",
                                self.label,
                                self.server.settings.monitor_queue,
                            )
                            self.server.dropped += 1
                            nursery.cancel_scope.cancel()
                            break
                # The feed ended (or we gave up): the writer flushes what is queued.

    async def _write_outbox(
        self, outbox: trio.MemoryReceiveChannel[bytes], done: trio.CancelScope
    ) -> None:
        try:
            async with outbox:
                async for first in outbox:
                    # Coalesce what is queued into one write: fewer syscalls in a burst.
                    chunk = [first]
                    size = len(first)
                    while size < RECEIVE_CHUNK:
                        try:
                            line = outbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        chunk.append(line)
                        size += len(line)
                    await self.send(b"".join(chunk))
        except _Stalled:
            log.warning("control: dropping monitor client %s: not reading", self.label)
            self.server.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client left; _until_eof notices too
        done.cancel()

    async def _until_eof(self, done: trio.CancelScope) -> None:
        # A monitor client sends nothing more; reading is how we notice it left.
        try:
            while await self.stream.receive_some(RECEIVE_CHUNK):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()


def _internal(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc} (details in the daemon's log)"


class ControlServer:
    """Serves one listening socket; ``serve`` runs until cancelled."""

    def __init__(
        self, handler: ControlHandler, settings: ControlSettings, *, owner_uid: int | None = None
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self.clients = 0
        self.refused = 0
        self.dropped = 0
        self.path: Path | None = None

    def stats(self) -> dict[str, int]:
        return {"clients": self.clients, "refused": self.refused, "dropped": self.dropped}

    async def serve(
        self,
        *,
        listener: socket.socket | None = None,
        task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind (unless given a listening socket, e.g. from systemd) and serve until
        cancelled; the socket file we made is removed on the way out."""
        owned = listener is None
        if listener is None:
            listener = await trio.to_thread.run_sync(
                lambda: bind_control_socket(self.settings.path, group=self.settings.group)
            )
        bound = listener.getsockname()
        self.path = Path(bound) if isinstance(bound, str) and bound else None
        identity = _identity(self.path) if owned and self.path else None
        sock = trio.socket.from_stdlib_socket(listener)
        try:
            async with trio.open_nursery() as nursery:
                log.info("control socket listening on %s", self.path or "an inherited socket")
                task_status.started(self)
                await self._accept_loop(sock, nursery)
        finally:
            sock.close()
            # Remove the file only if it is still ours: a newer daemon may have replaced it.
            if identity is not None and self.path and _identity(self.path) == identity:
                self.path.unlink(missing_ok=True)

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    log.error("control: accept failed (%s); retrying shortly", exc)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            nursery.start_soon(self._serve_client, conn)

    async def _serve_client(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        self.clients += 1
        try:
            async with stream:
                await self._serve_stream(stream)
        except _Stalled:
            log.warning("control: dropped a client that stopped reading")
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("control: client went away: %s", exc)
        except Exception:
            # A bug in serving one client must not take the control socket down.
            log.exception("control: serving a client failed")
        finally:
            self.clients -= 1

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        peer = read_peer(stream.socket)
        connection = _Connection(self, stream, peer)
        if connection.access is Access.NONE:
            log.warning("control: refused pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid)
            self.refused += 1
            await connection.send(
                encode_error(None, denied_message(peer, Access.NONE), ErrorCode.DENIED)
            )
            return
        if self.clients > self.settings.max_clients:
            self.refused += 1
            await connection.send(
                encode_error(
                    None,
                    f"too many control clients (at most {self.settings.max_clients}); "
                    "try again later",
                    ErrorCode.BUSY,
                )
            )
            return
        await connection.run()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


async def serve_control(
    handler: ControlHandler,
    settings: ControlSettings,
    *,
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the control server until cancelled: ``server = await nursery.start(serve_control,
    handler, settings)``. ``listener`` is a pre-bound listening socket (``activation_socket()``);
    without it the socket is bound at ``settings.path``."""
    await ControlServer(handler, settings).serve(listener=listener, task_status=task_status)
